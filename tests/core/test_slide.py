"""Reading slide images: formats, normalisation to 8-bit RGB, pixel size, and refusals."""

from __future__ import annotations

import hashlib
import io
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from blastq.core.common.errors import InvalidConfig, InvalidSlide, SlideTooLarge
from blastq.core.image.scale import RED_CELL_DIAMETER_UM, estimate_scale
from blastq.core.image.slide import (
    decode_slide,
    image_size,
    metadata_mpp,
    read_slide,
)

PLASMA = (236, 230, 232)
RED_CELL = (212, 118, 134)
PALLOR = (228, 172, 182)


# --- image builders -------------------------------------------------------------------------------------


def _gradient_rgb(height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth, colourful image: exact for lossless formats, stable under JPEG."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), np.full_like(x, 128)], axis=2).astype(
        np.uint8
    )


def _disc(img: np.ndarray, cy: float, cx: float, radius: float, colour: tuple[int, int, int]) -> None:
    y, x = np.ogrid[: img.shape[0], : img.shape[1]]
    img[(y - cy) ** 2 + (x - cx) ** 2 <= radius**2] = colour


def _smear(diameter: float = 30.0, size: int = 400, seed: int = 0, white_cells: int = 0) -> np.ndarray:
    """Pink red cells with central pallor on plasma, on a jittered grid, two pairs touching."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = PLASMA
    radius = diameter / 2
    step = int(diameter * 1.7)
    centres = [
        (y + rng.uniform(-3, 3), x + rng.uniform(-3, 3))
        for y in range(step // 2, size, step)
        for x in range(step // 2, size, step)
    ]
    # Two touching pairs: centres one diameter apart, sharing an edge.
    centres[5] = (centres[5][0], centres[4][1] + diameter - 1)
    centres[12] = (centres[12][0], centres[11][1] + diameter - 1)
    for cy, cx in centres:
        _disc(img, cy, cx, radius, RED_CELL)
        _disc(img, cy, cx, radius * 0.35, PALLOR)
    for i in range(white_cells):
        # Purple white cells, twice the size of a red cell, sitting between the red cells.
        cy, cx = centres[2 * i + 1]
        _disc(img, cy, cx, diameter, (120, 80, 170))
        _disc(img, cy, cx, diameter * 0.6, (70, 30, 110))
    noise = rng.normal(0, 2.5, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_bytes(arr: np.ndarray, colour_type: int, extra_chunks: bytes = b"") -> bytes:
    """A PNG written by hand, for the variants cv2.imencode cannot make (grey+alpha, pHYs)."""
    height, width = arr.shape[:2]
    depth = 16 if arr.dtype == np.uint16 else 8
    rows = b"".join(b"\x00" + arr[y].astype(">u2" if depth == 16 else "u1").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + extra_chunks
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def _encode(rgb: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, rgb[:, :, ::-1])
    assert ok
    return buf.tobytes()


def _tiff_bytes(arr: np.ndarray, **kwargs: object) -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, arr, **kwargs)
    return out.getvalue()


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- formats and pixel normalisation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "encode"),
    [
        ("slide.png", lambda rgb: _encode(rgb, ".png")),
        ("slide.bmp", lambda rgb: _encode(rgb, ".bmp")),
        ("slide.tif", lambda rgb: _tiff_bytes(rgb, photometric="rgb")),
        ("slide.tiff", lambda rgb: _tiff_bytes(rgb, photometric="rgb", compression="zlib", tile=(16, 16))),
    ],
)
def test_lossless_formats_round_trip_exactly(tmp_path: Path, name: str, encode) -> None:
    rgb = _gradient_rgb()
    slide = read_slide(_write(tmp_path, name, encode(rgb)), mpp=0.25)
    assert slide.rgb.dtype == np.uint8 and slide.rgb.shape == rgb.shape
    np.testing.assert_array_equal(slide.rgb, rgb)
    assert (slide.mpp, slide.mpp_source, slide.name) == (0.25, "user", name)


def test_jpeg_round_trip_is_close_and_rgb_ordered(tmp_path: Path) -> None:
    rgb = _gradient_rgb()
    slide = read_slide(_write(tmp_path, "slide.jpg", _encode(rgb, ".jpg")), mpp=0.25)
    assert slide.rgb.shape == rgb.shape
    assert np.abs(slide.rgb.astype(int) - rgb).mean() < 3


def test_format_comes_from_magic_bytes_not_extension(tmp_path: Path) -> None:
    rgb = _gradient_rgb()
    slide = read_slide(_write(tmp_path, "really_a_png.jpg", _encode(rgb, ".png")), mpp=0.25)
    np.testing.assert_array_equal(slide.rgb, rgb)


def test_16bit_tiff_is_divided_by_257(tmp_path: Path) -> None:
    rgb = _gradient_rgb()
    slide = read_slide(_write(tmp_path, "deep.tif", _tiff_bytes(rgb.astype(np.uint16) * 257)), mpp=0.25)
    assert slide.rgb.dtype == np.uint8
    np.testing.assert_array_equal(slide.rgb, rgb)


def test_16bit_png_is_divided_by_257(tmp_path: Path) -> None:
    rgb = _gradient_rgb()
    slide = read_slide(_write(tmp_path, "deep.png", _png_bytes(rgb.astype(np.uint16) * 257, 2)), mpp=0.25)
    np.testing.assert_array_equal(slide.rgb, rgb)


def test_float_tiff_in_unit_range_is_scaled_to_255(tmp_path: Path) -> None:
    rgb = _gradient_rgb()
    data = _tiff_bytes(rgb.astype(np.float32) / 255.0, photometric="rgb")
    slide = read_slide(_write(tmp_path, "float.tif", data), mpp=0.25)
    assert np.abs(slide.rgb.astype(int) - rgb).max() <= 1


def test_rgba_png_is_composited_over_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 3, 4), np.uint8)
    rgba[..., :3] = (200, 0, 0)
    rgba[0, :, 3] = 0  # transparent row -> white
    rgba[1, :, 3] = 255  # opaque row -> the colour
    rgba[2:, :, 3] = 128  # half -> between
    slide = read_slide(_write(tmp_path, "alpha.png", _png_bytes(rgba, 6)), mpp=0.25)
    assert slide.rgb.shape == (4, 3, 3)
    np.testing.assert_array_equal(slide.rgb[0], np.full((3, 3), 255))
    np.testing.assert_array_equal(slide.rgb[1], np.tile([200, 0, 0], (3, 1)))
    assert np.abs(slide.rgb[2, 0].astype(int) - [228, 127, 127]).max() <= 1


def test_grey_alpha_png_is_composited_over_white(tmp_path: Path) -> None:
    la = np.zeros((2, 2, 2), np.uint8)
    la[..., 0] = 100
    la[0, :, 1] = 0
    la[1, :, 1] = 255
    slide = read_slide(_write(tmp_path, "la.png", _png_bytes(la, 4)), mpp=0.25)
    np.testing.assert_array_equal(slide.rgb[0], np.full((2, 3), 255))
    np.testing.assert_array_equal(slide.rgb[1], np.full((2, 3), 100))


@pytest.mark.parametrize(
    ("name", "encode"),
    [
        ("grey.png", lambda g: _png_bytes(g, 0)),
        ("grey.tif", lambda g: _tiff_bytes(g, photometric="minisblack")),
        ("grey.bmp", lambda g: cv2.imencode(".bmp", g)[1].tobytes()),
    ],
)
def test_greyscale_becomes_three_equal_channels(tmp_path: Path, name: str, encode) -> None:
    # The many grey levels of a photo: a gradient of 64 levels would be refused as a label mask.
    y, x = np.mgrid[0:48, 0:64]
    grey = ((x * 3 + y * 2) % 256).astype(np.uint8)
    slide = read_slide(_write(tmp_path, name, encode(grey)), mpp=0.25)
    assert slide.rgb.shape == (*grey.shape, 3)
    for channel in range(3):
        np.testing.assert_array_equal(slide.rgb[:, :, channel], grey)


def test_multipage_tiff_uses_the_first_page(tmp_path: Path) -> None:
    rgb = _gradient_rgb()
    data = _tiff_bytes(np.stack([rgb, 255 - rgb]), photometric="rgb")
    slide = read_slide(_write(tmp_path, "pages.tif", data), mpp=0.25)
    np.testing.assert_array_equal(slide.rgb, rgb)


def test_sha256_is_that_of_the_file_bytes(tmp_path: Path) -> None:
    data = _encode(_gradient_rgb(), ".png")
    slide = read_slide(_write(tmp_path, "hash.png", data), mpp=0.25)
    assert slide.sha256 == hashlib.sha256(data).hexdigest()


def test_decode_slide_from_bytes_matches_read_slide(tmp_path: Path) -> None:
    data = _encode(_gradient_rgb(), ".png")
    from_file = read_slide(_write(tmp_path, "same.png", data), mpp=0.3)
    from_bytes = decode_slide(data, "same.png", mpp=0.3)
    np.testing.assert_array_equal(from_file.rgb, from_bytes.rgb)
    assert (from_bytes.name, from_bytes.sha256, from_bytes.mpp) == ("same.png", from_file.sha256, 0.3)


@pytest.mark.parametrize(
    "encode",
    [
        lambda rgb: _encode(rgb, ".png"),
        lambda rgb: _encode(rgb, ".jpg"),
        lambda rgb: _encode(rgb, ".bmp"),
        lambda rgb: _tiff_bytes(rgb, photometric="rgb"),
    ],
)
def test_image_size_reads_width_and_height_from_the_header(encode) -> None:
    assert image_size(encode(_gradient_rgb(48, 64)), "x") == (64, 48)


# --- pixel size -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resolution", "unit", "expected_mpp"),
    [
        (1e4 / 0.25, "CENTIMETER", 0.25),
        (25_400 / 0.5, "INCH", 0.5),
    ],
)
def test_tiff_resolution_gives_mpp(tmp_path: Path, resolution: float, unit: str, expected_mpp: float) -> None:
    data = _tiff_bytes(
        _gradient_rgb(), photometric="rgb", resolution=(resolution, resolution), resolutionunit=unit
    )
    slide = read_slide(_write(tmp_path, "calibrated.tif", data))
    assert slide.mpp_source == "metadata"
    assert slide.mpp == pytest.approx(expected_mpp, rel=1e-4)


def test_png_phys_chunk_gives_mpp(tmp_path: Path) -> None:
    phys = _png_chunk(b"pHYs", struct.pack(">IIB", 4_000_000, 4_000_000, 1))  # pixels per metre
    slide = read_slide(_write(tmp_path, "calibrated.png", _png_bytes(_gradient_rgb(), 2, phys)))
    assert (slide.mpp, slide.mpp_source) == (pytest.approx(0.25), "metadata")


def test_jpeg_jfif_density_in_dots_per_cm_gives_mpp(tmp_path: Path) -> None:
    data = bytearray(_encode(_gradient_rgb(), ".jpg"))
    assert data[6:11] == b"JFIF\x00"
    data[13:18] = struct.pack(">BHH", 2, 40_000, 40_000)  # units = dots/cm
    slide = read_slide(_write(tmp_path, "calibrated.jpg", bytes(data)))
    assert (slide.mpp, slide.mpp_source) == (pytest.approx(0.25), "metadata")


def test_72_dpi_screen_default_is_ignored_and_mpp_estimated(tmp_path: Path) -> None:
    rgb = _smear(diameter=30)
    data = _tiff_bytes(rgb, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    assert metadata_mpp(data, "screen.tif") is None
    slide = read_slide(_write(tmp_path, "screen.tif", data))
    assert slide.mpp_source == "estimated"
    assert slide.mpp == pytest.approx(RED_CELL_DIAMETER_UM / 30, rel=0.1)


def test_user_mpp_wins_over_metadata(tmp_path: Path) -> None:
    phys = _png_chunk(b"pHYs", struct.pack(">IIB", 4_000_000, 4_000_000, 1))
    slide = read_slide(_write(tmp_path, "calibrated.png", _png_bytes(_gradient_rgb(), 2, phys)), mpp=0.5)
    assert (slide.mpp, slide.mpp_source) == (0.5, "user")


@pytest.mark.parametrize("bad_mpp", [0.0, -0.25, 50.0, 0.001, float("nan")])
def test_implausible_user_mpp_is_invalid_config(tmp_path: Path, bad_mpp: float) -> None:
    path = _write(tmp_path, "slide.png", _encode(_gradient_rgb(), ".png"))
    with pytest.raises(InvalidConfig, match="slide.png"):
        read_slide(path, mpp=bad_mpp)


def test_no_metadata_and_no_red_cells_is_invalid_slide_naming_the_file(tmp_path: Path) -> None:
    blank = np.full((200, 200, 3), 240, np.uint8)
    with pytest.raises(InvalidSlide, match="blank.png"):
        read_slide(_write(tmp_path, "blank.png", _encode(blank, ".png")))


# --- red-cell estimate --------------------------------------------------------------------------------------


@pytest.mark.parametrize("diameter", [16.0, 30.0, 50.0])
def test_estimate_from_pink_discs_is_within_10_percent(diameter: float) -> None:
    size = int(diameter * 14)
    mpp = estimate_scale(_smear(diameter=diameter, size=size)).mpp
    assert mpp == pytest.approx(RED_CELL_DIAMETER_UM / diameter, rel=0.1)


def test_estimate_is_not_pulled_by_large_purple_white_cells() -> None:
    mpp = estimate_scale(_smear(diameter=30, white_cells=4)).mpp
    assert mpp == pytest.approx(RED_CELL_DIAMETER_UM / 30, rel=0.1)


def test_estimate_on_blank_image_is_invalid_slide() -> None:
    with pytest.raises(InvalidSlide, match="red cells"):
        estimate_scale(np.full((300, 300, 3), 235, np.uint8))


def test_estimate_on_noise_is_invalid_slide() -> None:
    noise = np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    with pytest.raises(InvalidSlide):
        estimate_scale(noise)


# --- refusals -----------------------------------------------------------------------------------------------


def test_missing_file_is_invalid_slide(tmp_path: Path) -> None:
    with pytest.raises(InvalidSlide, match="absent.png"):
        read_slide(tmp_path / "absent.png", mpp=0.25)


def test_directory_is_invalid_slide(tmp_path: Path) -> None:
    folder = tmp_path / "folder.png"
    folder.mkdir()
    with pytest.raises(InvalidSlide, match="folder.png"):
        read_slide(folder, mpp=0.25)


def test_empty_file_is_invalid_slide(tmp_path: Path) -> None:
    with pytest.raises(InvalidSlide, match="empty.png"):
        read_slide(_write(tmp_path, "empty.png", b""), mpp=0.25)


def test_text_file_is_invalid_slide(tmp_path: Path) -> None:
    with pytest.raises(InvalidSlide, match="notes.png"):
        read_slide(_write(tmp_path, "notes.png", b"patient notes, not an image\n" * 10), mpp=0.25)


def test_unsupported_format_is_invalid_slide(tmp_path: Path) -> None:
    with pytest.raises(InvalidSlide, match="anim.gif"):
        read_slide(_write(tmp_path, "anim.gif", b"GIF89a" + bytes(200)), mpp=0.25)


def test_png_without_iend_is_invalid_slide(tmp_path: Path) -> None:
    data = _encode(_smear(size=200), ".png")
    with pytest.raises(InvalidSlide, match="cut.png"):
        read_slide(_write(tmp_path, "cut.png", data[:-12]), mpp=0.25)


def test_png_cut_mid_chunk_is_invalid_slide(tmp_path: Path) -> None:
    data = _encode(_smear(size=200), ".png")
    with pytest.raises(InvalidSlide, match="half.png"):
        read_slide(_write(tmp_path, "half.png", data[: len(data) // 2]), mpp=0.25)


def test_png_with_bad_crc_is_invalid_slide(tmp_path: Path) -> None:
    data = bytearray(_encode(_smear(size=200), ".png"))
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(InvalidSlide, match="flipped.png"):
        read_slide(_write(tmp_path, "flipped.png", bytes(data)), mpp=0.25)


def test_png_with_undecodable_data_is_invalid_slide(tmp_path: Path) -> None:
    # Valid chunk structure and CRCs around a body that is not zlib data: the decoder's failure
    # must come back as InvalidSlide.
    header = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", b"garbage!" * 8)
    data += _png_chunk(b"IEND", b"")
    with pytest.raises(InvalidSlide, match="garbled.png"):
        read_slide(_write(tmp_path, "garbled.png", data), mpp=0.25)


def test_truncated_jpeg_is_invalid_slide(tmp_path: Path) -> None:
    data = _encode(_smear(size=200), ".jpg")
    with pytest.raises(InvalidSlide, match="cut.jpg"):
        read_slide(_write(tmp_path, "cut.jpg", data[: len(data) - 200]), mpp=0.25)


def test_truncated_bmp_is_invalid_slide(tmp_path: Path) -> None:
    data = _encode(_smear(size=200), ".bmp")
    with pytest.raises(InvalidSlide, match="cut.bmp"):
        read_slide(_write(tmp_path, "cut.bmp", data[:-300]), mpp=0.25)


@pytest.mark.parametrize("tile", [None, (64, 64)])
def test_truncated_tiff_is_invalid_slide(tmp_path: Path, tile: tuple[int, int] | None) -> None:
    data = _tiff_bytes(_smear(size=200), photometric="rgb", tile=tile)
    with pytest.raises(InvalidSlide, match="cut.tif"):
        read_slide(_write(tmp_path, "cut.tif", data[: len(data) - 500]), mpp=0.25)


def test_zero_size_image_is_invalid_slide(tmp_path: Path) -> None:
    header = struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")
    with pytest.raises(InvalidSlide, match="zero.png"):
        read_slide(_write(tmp_path, "zero.png", data), mpp=0.25)


def _huge_png() -> bytes:
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")


def _huge_jpeg() -> bytes:
    # Start of image, then a baseline frame header claiming 65000 x 65000 pixels, 3 components.
    sof = struct.pack(">BHHB", 8, 65_000, 65_000, 3) + bytes([1, 0x11, 0, 2, 0x11, 1, 3, 0x11, 1])
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def _huge_bmp() -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, 100_000, 100_000, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + info


def _huge_tiff() -> bytes:
    # Little-endian TIFF, one IFD: 100000 x 100000 8-bit grey, one strip at the end of the file.
    entries = [
        (256, 4, 1, 100_000),  # ImageWidth, LONG
        (257, 4, 1, 100_000),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample, SHORT
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # Photometric: min-is-black
        (273, 4, 1, 200),  # StripOffsets
        (277, 3, 1, 1),  # SamplesPerPixel
        (278, 4, 1, 100_000),  # RowsPerStrip
        (279, 4, 1, 4_000_000_000),  # StripByteCounts
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        packed = struct.pack("<HI", value, 0)[:4] if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + bytes(64)


@pytest.mark.parametrize(
    ("name", "build"),
    [("bomb.png", _huge_png), ("bomb.jpg", _huge_jpeg), ("bomb.bmp", _huge_bmp), ("bomb.tif", _huge_tiff)],
)
def test_huge_header_is_slide_too_large_without_allocating(tmp_path: Path, name: str, build) -> None:
    path = _write(tmp_path, name, build())
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(SlideTooLarge, match=name):
            read_slide(path, mpp=0.25)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < 5_000_000


def test_max_pixels_is_configurable(tmp_path: Path) -> None:
    path = _write(tmp_path, "small.png", _encode(_gradient_rgb(48, 64), ".png"))
    with pytest.raises(SlideTooLarge, match="small.png"):
        read_slide(path, mpp=0.25, max_pixels=48 * 64 - 1)
    assert read_slide(path, mpp=0.25, max_pixels=48 * 64).rgb.shape == (48, 64, 3)


# --- what is no smear photo: refused with its reason, before any model work -------------------------------


@pytest.fixture(scope="module")
def field():
    from blastq.core.synth.field import generate_field

    return generate_field(7, 256, 256, mpp=0.2, blast_fraction=0.5)


def _label_masks(field) -> dict[str, np.ndarray]:
    classes = field.classes  # 0/1/2, as `blastq synth` writes NAME.mask.png
    return {
        "synth.mask.png": classes,
        "wbc-style.png": np.choose(classes, [0, 128, 255]).astype(np.uint8),  # segmentation_wbc's encoding
        "nuclei.png": field.nuclei.astype(np.uint8) * 255,
        "instances.png": (field.instances * 7 % 256).astype(np.uint8),  # many ids, flat regions
    }


@pytest.mark.parametrize("mpp", [None, 0.2])
@pytest.mark.parametrize("name", ["synth.mask.png", "wbc-style.png", "nuclei.png", "instances.png"])
def test_label_masks_are_refused_as_no_smear_with_or_without_mpp(tmp_path, field, name, mpp) -> None:
    mask = _label_masks(field)[name]
    path = _write(tmp_path, name, _png_bytes(mask, 0))
    with pytest.raises(InvalidSlide, match=rf"{name}: not a smear photo: .*(label mask|grey levels)"):
        read_slide(path, mpp=mpp)


def test_real_segmentation_wbc_masks_are_refused(wbc_root: Path) -> None:
    masks = (
        sorted((wbc_root / "dataset1").glob("*.png"))[:20]
        + sorted((wbc_root / "dataset2").glob("*.png"))[:20]
    )
    assert len(masks) == 40
    for path in masks:
        with pytest.raises(InvalidSlide, match="not a smear photo: only 3 distinct grey levels"):
            read_slide(path)


def test_real_smear_crops_and_synthetic_fields_pass_the_smear_check(wbc_root: Path) -> None:
    from blastq.core.image.slide import check_smear
    from blastq.core.synth.field import generate_field

    crops = sorted((wbc_root / "dataset1").glob("*.bmp")) + sorted((wbc_root / "dataset2").glob("*.bmp"))
    assert len(crops) == 400
    for path in crops:
        assert read_slide(path, mpp=0.2).mpp_source == "user"
    for seed, mpp in enumerate((0.05, 0.1, 0.2, 0.5, 1.0, 2.0)):
        image = generate_field(seed, 256, 256, mpp=mpp).image
        check_smear(image, f"synth at {mpp}")
        check_smear(np.ascontiguousarray(image[100:140, 100:140]), f"40 px crop at {mpp}")
    # A greyscale photo of a smear, with its many grey levels, is a smear too.
    grey = cv2.cvtColor(generate_field(9, 256, 256, mpp=0.2).image, cv2.COLOR_RGB2GRAY)
    check_smear(np.repeat(grey[:, :, None], 3, axis=2), "grey photo")


@pytest.mark.parametrize(
    ("name", "rgb", "reason"),
    [
        ("black.png", np.zeros((300, 300, 3), np.uint8), "the image is black"),
        ("white.png", np.full((300, 300, 3), 250, np.uint8), "the image is white"),
        (
            "grey-noise.png",
            np.random.default_rng(1).normal(128, 2, (300, 300, 3)).clip(0, 255).astype(np.uint8),
            "the image is uniform",
        ),
        (
            "bright-noise.png",
            np.random.default_rng(2).normal(235, 8, (300, 300, 3)).clip(0, 255).astype(np.uint8),
            "no stained cells",
        ),
    ],
)
def test_blank_and_unstained_images_are_refused_naming_the_reason(tmp_path, name, rgb, reason) -> None:
    path = _write(tmp_path, name, _encode(rgb, ".png"))
    with pytest.raises(InvalidSlide, match=rf"{name}: not a smear photo: .*{reason}"):
        read_slide(path, mpp=0.5)


def test_all_nan_float_tiff_is_refused_as_having_no_pixel_values(tmp_path) -> None:
    path = _write(
        tmp_path, "nan.tif", _tiff_bytes(np.full((64, 64, 3), np.nan, np.float32), photometric="rgb")
    )
    with pytest.raises(InvalidSlide, match="nan.tif: no pixel has a value: every sample is NaN"):
        read_slide(path, mpp=0.25)


def _phys(mpp: float) -> bytes:
    ppm = round(1e6 / mpp)
    return _png_chunk(b"pHYs", struct.pack(">IIB", ppm, ppm, 1))


def test_metadata_scale_no_smear_has_is_refused_naming_it_before_decoding(tmp_path, field) -> None:
    # 5 um/px would enlarge the image 25 times to the model's 0.2 um/px (6.7 GB for a 2 MP photo).
    path = _write(tmp_path, "coarse.png", _png_bytes(field.image, 2, _phys(5.0)))
    with pytest.raises(
        InvalidSlide, match=r"coarse.png: the pixel size in the PNG pHYs chunk is 5 um/px.*--mpp"
    ):
        read_slide(path)
    fine = _write(
        tmp_path, "fine.tif", _tiff_bytes(field.image, resolution=(1e6, 1e6), resolutionunit="CENTIMETER")
    )
    with pytest.raises(InvalidSlide, match=r"fine.tif: .*TIFF resolution tags is 0.01 um/px"):
        read_slide(fine)
    # The user's scale makes the same files usable.
    assert read_slide(path, mpp=0.2).mpp_source == "user"
    assert read_slide(fine, mpp=0.2).mpp_source == "user"
    # Screen and print defaults, far outside, are still ignored as if absent (the scale is estimated).
    for dpi in (72, 96, 150, 300, 600):
        assert metadata_mpp(_png_bytes(field.image, 2, _phys(25_400 / dpi)), "screen.png") is None


def test_jpeg_with_data_after_its_end_marker_is_read(tmp_path, field) -> None:
    data = _encode(field.image, ".jpg")
    trailing = data + b"\x00\x00trailer of a camera app\xff\xd8 not an image" * 20
    slide = read_slide(_write(tmp_path, "trailing.jpg", trailing), mpp=0.2)
    np.testing.assert_array_equal(slide.rgb, read_slide(_write(tmp_path, "plain.jpg", data), mpp=0.2).rgb)
    assert slide.sha256 == hashlib.sha256(trailing).hexdigest()
    # Cut inside the scan: no end-of-image marker where one must be, still truncated.
    cut = data[: len(data) // 2]
    with pytest.raises(InvalidSlide, match="truncated JPEG"):
        read_slide(_write(tmp_path, "cut.jpg", cut), mpp=0.2)


def _read_in_thread(path: Path, timeout_s: float = 10.0):
    """read_slide(path) in a thread: a reader blocked on a pipe fails the test instead of hanging it."""
    import threading

    outcome: list[BaseException | object] = []
    thread = threading.Thread(target=lambda: outcome.append(_catch(read_slide, path, mpp=0.2)), daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert outcome, f"reading {path} did not return within {timeout_s} s"
    return outcome[0]


def _catch(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        return exc


def test_named_pipe_is_refused_without_blocking(tmp_path) -> None:
    import os

    fifo = tmp_path / "slide.png"
    os.mkfifo(fifo)
    error = _read_in_thread(fifo)
    assert isinstance(error, InvalidSlide) and "slide.png: is a named pipe" in str(error)


def test_symlink_to_a_device_is_refused_and_to_a_file_is_followed(tmp_path, field) -> None:
    device = tmp_path / "device.png"
    device.symlink_to("/dev/null")  # /dev/zero the same, but it would be read forever before the fix
    with pytest.raises(InvalidSlide, match=r"device.png: is a character device \(a symlink to /dev/null\)"):
        read_slide(device, mpp=0.2)
    real = _write(tmp_path, "real.png", _encode(field.image, ".png"))
    link = tmp_path / "link.png"
    link.symlink_to(real)
    assert read_slide(link, mpp=0.2).sha256 == read_slide(real, mpp=0.2).sha256


def test_file_that_grows_while_read_is_refused(tmp_path, field, monkeypatch) -> None:
    import os

    import blastq.core.image.slide as slide_module

    path = _write(tmp_path, "growing.png", _encode(field.image, ".png"))
    real_fstat = os.fstat

    def fstat_before_the_append(fd: int):
        st = real_fstat(fd)
        # What fstat said before the writer appended the last 100 bytes.
        return os.stat_result((*st[:6], st.st_size - 100, *st[7:]))

    monkeypatch.setattr(slide_module.os, "fstat", fstat_before_the_append)
    with pytest.raises(InvalidSlide, match="growing.png: file grew while being read"):
        read_slide(path, mpp=0.2)
