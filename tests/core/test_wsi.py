"""Whole-slide reading: region reads from tiled/stripped/OME TIFF and OpenSlide, refusals, synthetic slides."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from blastq.core.common.errors import InvalidConfig, InvalidSlide, SlideTooLarge
from blastq.core.image import wsi
from blastq.core.image.wsi import (
    OUTSIDE_FILL,
    ArrayReader,
    OpenSlideReader,
    TiffRegionReader,
    file_sha256,
    is_whole_slide,
    open_slide_reader,
)
from blastq.core.synth.slide import write_synthetic_slide

HEIGHT, WIDTH = 600, 900


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    """Noise plus a gradient: every pixel differs, so any misplaced tile shows."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([x * 255 // WIDTH, y * 255 // HEIGHT, (x + y) % 256], axis=2)
    return ((base + rng.integers(0, 40, base.shape)) % 256).astype(np.uint8)


def _write(path: Path, data: np.ndarray, **kwargs) -> Path:
    kwargs.setdefault("metadata", None)
    tifffile.imwrite(path, data, **kwargs)
    return path


def _expected(image: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The window cut from an in-memory image, plasma white outside it."""
    out = np.full((h, w, 3), OUTSIDE_FILL, np.uint8)
    y0, y1, x0, x1 = max(y, 0), min(y + h, image.shape[0]), max(x, 0), min(x + w, image.shape[1])
    if y0 < y1 and x0 < x1:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = image[y0:y1, x0:x1]
    return out


def _windows(seed: int = 0, count: int = 25) -> list[tuple[int, int, int, int]]:
    """Random windows plus ones crossing tile borders, hanging over every edge, or wholly outside."""
    rng = np.random.default_rng(seed)
    fixed = [
        (0, 0, WIDTH, HEIGHT),
        (120, 120, 20, 20),  # across a 128-px tile corner
        (250, 0, 30, 600),  # across a 256-px tile column, full height
        (-40, -30, 100, 90),  # top-left margin
        (WIDTH - 50, HEIGHT - 20, 130, 70),  # bottom-right margin
        (-10, -10, WIDTH + 20, HEIGHT + 20),  # the whole slide with a margin all round
        (WIDTH + 5, 10, 40, 40),  # wholly outside
        (3, 7, 1, 1),
        (0, 0, 0, 5),  # empty
    ]
    random = [
        (
            int(rng.integers(-60, WIDTH)),
            int(rng.integers(-60, HEIGHT)),
            int(rng.integers(1, 400)),
            int(rng.integers(1, 300)),
        )
        for _ in range(count)
    ]
    return fixed + random


# --- TIFF region reads ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout",
    [
        {"tile": (128, 128), "compression": "zlib"},
        {"tile": (256, 256), "compression": None},
        {"rowsperstrip": 32, "compression": "zlib"},
        {"tile": (128, 128), "compression": "zlib", "planarconfig": "separate"},
    ],
    ids=["tiled128-zlib", "tiled256-raw", "stripped32", "tiled-planar"],
)
def test_region_reads_equal_the_image(tmp_path, rgb, layout):
    data = np.ascontiguousarray(np.moveaxis(rgb, 2, 0)) if layout.get("planarconfig") == "separate" else rgb
    path = _write(tmp_path / "slide.tif", data, photometric="rgb", **layout)
    with TiffRegionReader(path) as reader:
        assert (reader.width, reader.height, reader.format) == (WIDTH, HEIGHT, "tiff")
        for x, y, w, h in _windows():
            region = reader.read_region(x, y, w, h)
            assert region.shape == (h, w, 3) and region.dtype == np.uint8
            np.testing.assert_array_equal(
                region, _expected(rgb, x, y, w, h), err_msg=f"window {(x, y, w, h)}"
            )


def test_region_read_decodes_only_the_tiles_it_touches(tmp_path, rgb):
    path = _write(tmp_path / "slide.tif", rgb, photometric="rgb", tile=(128, 128), compression="zlib")
    with TiffRegionReader(path) as reader:
        reader.read_region(100, 100, 60, 60)  # tiles (0,0), (0,1), (1,0), (1,1)
        assert reader.segments_decoded == 4
        reader.read_region(130, 130, 20, 20)  # inside tile (1,1): served from the cache
        assert reader.segments_decoded == 4
        reader.read_region(-50, -50, 40, 40)  # wholly outside: nothing to decode
        assert reader.segments_decoded == 4
        reader.read_region(WIDTH - 3, HEIGHT - 10, 100, 100)  # the last tile (x 896..899) only
        assert reader.segments_decoded == 5


def test_decode_cache_stays_within_its_byte_bound(tmp_path, rgb):
    path = _write(tmp_path / "slide.tif", rgb, photometric="rgb", tile=(128, 128), compression="zlib")
    limit = 3 * 128 * 128 * 3  # three tiles
    with TiffRegionReader(path, cache_bytes=limit) as reader:
        np.testing.assert_array_equal(reader.read_region(0, 0, WIDTH, HEIGHT), rgb)
        info = reader.cache_info()
        # Edge tiles are cropped to the slide, so a few more than three may fit; never all 35.
        assert 0 < info["bytes"] <= limit and 3 <= info["segments"] < 10
        decoded = reader.segments_decoded
        reader.read_region(0, 0, 10, 10)  # evicted long ago: decoded again
        assert reader.segments_decoded == decoded + 1


def test_pyramidal_tiff_reads_level0(tmp_path, rgb):
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tif:
        options = {"photometric": "rgb", "tile": (128, 128), "compression": "zlib", "metadata": None}
        tif.write(rgb, subifds=2, **options)
        tif.write(rgb[::2, ::2], subfiletype=1, **options)
        tif.write(rgb[::4, ::4], subfiletype=1, **options)
    assert is_whole_slide(path)
    with open_slide_reader(path) as reader:
        assert isinstance(reader, TiffRegionReader)
        assert (reader.width, reader.height) == (WIDTH, HEIGHT)
        np.testing.assert_array_equal(reader.read_region(0, 0, WIDTH, HEIGHT), rgb)


def test_ome_tiff_gives_mpp_from_physical_size_with_its_unit(tmp_path, rgb):
    path = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(
            rgb,
            photometric="rgb",
            tile=(128, 128),
            compression="zlib",
            subifds=1,
            metadata={"axes": "YXS", "PhysicalSizeX": 250, "PhysicalSizeXUnit": "nm"},
        )
        tif.write(rgb[::2, ::2], photometric="rgb", tile=(128, 128), compression="zlib", subfiletype=1)
    with open_slide_reader(path) as reader:
        assert reader.format == "ome-tiff"
        assert reader.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(reader.read_region(50, 60, 300, 200), rgb[60:260, 50:350])


def test_mpp_comes_from_resolution_tags_and_screen_defaults_are_ignored(tmp_path, rgb):
    calibrated = _write(
        tmp_path / "cal.tif",
        rgb,
        photometric="rgb",
        tile=(128, 128),
        resolution=(1e4 / 0.33, 1e4 / 0.33),
        resolutionunit="CENTIMETER",
    )
    screen = _write(
        tmp_path / "dpi.tif",
        rgb,
        photometric="rgb",
        tile=(128, 128),
        resolution=(72, 72),
        resolutionunit="INCH",
    )
    with TiffRegionReader(calibrated) as reader:
        assert reader.mpp == pytest.approx(0.33, rel=1e-6)
    with TiffRegionReader(screen) as reader:
        assert reader.mpp is None


def test_aperio_description_mpp_is_read_without_openslide(tmp_path, rgb):
    description = (
        "Aperio Image Library v10.0.0\r\n900x600 [0,0 900x600] (128x128) RAW|AppMag = 40|MPP = 0.2468"
    )
    path = _write(tmp_path / "a.svs", rgb, photometric="rgb", tile=(128, 128), description=description)
    with TiffRegionReader(path) as reader:
        assert reader.mpp == pytest.approx(0.2468)


def test_rgba_is_composited_over_white_and_grey_is_replicated(tmp_path, rgb):
    alpha = np.zeros((HEIGHT, WIDTH, 1), np.uint8)
    alpha[:, : WIDTH // 2] = 255  # left half opaque, right half transparent
    rgba = _write(
        tmp_path / "rgba.tif",
        np.concatenate([rgb, alpha], axis=2),
        photometric="rgb",
        extrasamples=["unassalpha"],
        tile=(128, 128),
    )
    grey = rgb[:, :, 1].copy()
    grey_path = _write(tmp_path / "grey.tif", grey, photometric="minisblack", tile=(128, 128))
    with TiffRegionReader(rgba) as reader:
        region = reader.read_region(0, 0, WIDTH, HEIGHT)
        np.testing.assert_array_equal(region[:, : WIDTH // 2], rgb[:, : WIDTH // 2])
        assert (region[:, WIDTH // 2 :] == 255).all()
    with TiffRegionReader(grey_path) as reader:
        np.testing.assert_array_equal(
            reader.read_region(0, 0, WIDTH, HEIGHT), np.repeat(grey[:, :, None], 3, axis=2)
        )


def test_uint16_is_scaled_by_the_dtype_max(tmp_path, rgb):
    wide = rgb.astype(np.uint16) * 257  # 255 -> 65535
    path = _write(tmp_path / "wide.tif", wide, photometric="rgb", tile=(128, 128), compression="zlib")
    with TiffRegionReader(path) as reader:
        np.testing.assert_array_equal(reader.read_region(0, 0, WIDTH, HEIGHT), rgb)


def test_unsupported_pixels_are_refused_naming_the_file(tmp_path):
    path = _write(tmp_path / "float.tif", np.zeros((64, 64, 3), np.float32), photometric="rgb", tile=(32, 32))
    with pytest.raises(InvalidSlide, match=r"float\.tif: unsupported TIFF pixel type 32-bit float32"):
        TiffRegionReader(path)


def test_single_strip_tiff_too_big_for_regions_is_refused(tmp_path, rgb, monkeypatch):
    path = _write(tmp_path / "strip.tif", rgb, photometric="rgb", rowsperstrip=HEIGHT)
    monkeypatch.setattr(wsi, "MAX_SEGMENT_PIXELS", 100_000)
    with pytest.raises(
        InvalidSlide, match=r"single-strip TIFF of 900x600 cannot be read region by region; save it tiled"
    ):
        TiffRegionReader(path)


# --- OpenSlide ----------------------------------------------------------------------------------------


def test_openslide_generic_tiff_reads_the_same_pixels(tmp_path, rgb):
    path = _write(tmp_path / "generic.tif", rgb, photometric="rgb", tile=(128, 128), compression="zlib")
    with OpenSlideReader(path) as slide, TiffRegionReader(path) as tiff:
        assert slide.format == "openslide:generic-tiff"
        assert (slide.width, slide.height) == (WIDTH, HEIGHT)
        for x, y, w, h in _windows(seed=3, count=8):
            np.testing.assert_array_equal(slide.read_region(x, y, w, h), tiff.read_region(x, y, w, h))


@pytest.mark.parametrize("compression", ["zlib", "jpeg"])
def test_synthetic_svs_opens_in_openslide_as_aperio(tmp_path, compression):
    path = tmp_path / "synthetic.svs"
    info = write_synthetic_slide(
        path, 1536, 1100, mpp=0.25, field_px=512, tile=256, svs=True, compression=compression
    )
    assert is_whole_slide(path)
    with open_slide_reader(path) as slide, TiffRegionReader(path) as tiff:
        assert isinstance(slide, OpenSlideReader)
        assert slide.format == "openslide:aperio"
        assert slide.mpp == pytest.approx(0.25) and tiff.mpp == pytest.approx(0.25)
        assert slide._slide.level_dimensions == tuple(tuple(size) for size in info["levels"])
        window = (1400, 1000, 300, 200)  # crosses tiles and both far edges
        # Both decode the same JPEG tiles with libjpeg-turbo: equal in practice, a small margin allowed.
        difference = np.abs(slide.read_region(*window).astype(int) - tiff.read_region(*window))
        assert difference.max() <= (0 if compression == "zlib" else 2)
        assert (slide.read_region(*window)[150:, 200:] == OUTSIDE_FILL).all()


# --- whole images, detection, hashing -------------------------------------------------------------------


def test_array_reader_cuts_windows_with_plasma_margins(rgb):
    reader = ArrayReader(rgb, "field.png", mpp=0.2)
    assert (reader.width, reader.height, reader.mpp, reader.format) == (WIDTH, HEIGHT, 0.2, "image")
    for x, y, w, h in _windows(seed=5, count=5):
        np.testing.assert_array_equal(reader.read_region(x, y, w, h), _expected(rgb, x, y, w, h))
    with pytest.raises(InvalidSlide, match="grey.png: expected an HWC uint8 RGB array"):
        ArrayReader(rgb[:, :, 0], "grey.png")
    with pytest.raises(InvalidConfig, match="plausible pixel size"):
        ArrayReader(rgb, "field.png", mpp=250.0)


def test_png_and_small_stripped_tiff_open_as_whole_images(tmp_path, rgb):
    png = tmp_path / "field.png"
    cv2.imwrite(str(png), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    stripped = _write(tmp_path / "small.tif", rgb, photometric="rgb", rowsperstrip=64)
    tiled = _write(tmp_path / "tiled.tif", rgb, photometric="rgb", tile=(128, 128))
    assert not is_whole_slide(png)
    assert not is_whole_slide(stripped)
    assert is_whole_slide(tiled)
    for path in (png, stripped):
        with open_slide_reader(path) as reader:
            assert isinstance(reader, ArrayReader) and reader.name == path.name
            np.testing.assert_array_equal(
                reader.read_region(-5, 10, 200, 100), _expected(rgb, -5, 10, 200, 100)
            )


def test_format_comes_from_the_bytes_not_the_extension(tmp_path, rgb):
    disguised = _write(tmp_path / "slide.png", rgb, photometric="rgb", tile=(128, 128))
    with open_slide_reader(disguised) as reader:
        assert isinstance(reader, TiffRegionReader)


def test_file_sha256_matches_hashlib_with_any_chunk(tmp_path):
    path = tmp_path / "blob.bin"
    data = np.random.default_rng(1).bytes(100_003)
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


# --- refusals -------------------------------------------------------------------------------------------


def test_unreadable_inputs_are_refused_in_one_line(tmp_path, rgb):
    text = tmp_path / "notes.tif"
    text.write_text("not an image at all\n")
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    cases = [
        (tmp_path / "missing.svs", "no such file"),
        (tmp_path, "is a directory"),
        (empty, "empty file"),
        (text, "not a PNG, JPEG, BMP, TIFF or whole-slide image"),
    ]
    for path, message in cases:
        with pytest.raises(InvalidSlide, match=message) as caught:
            open_slide_reader(path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_truncated_tiled_tiff_is_refused_when_opened(tmp_path, rgb):
    path = _write(tmp_path / "cut.tif", rgb, photometric="rgb", tile=(128, 128), compression="zlib")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InvalidSlide, match=r"cut\.tif: truncated TIFF") as caught:
        open_slide_reader(path)
    assert "\n" not in str(caught.value)


def test_too_many_pixels_is_refused_before_decoding(tmp_path, rgb):
    path = _write(tmp_path / "big.tif", rgb, photometric="rgb", tile=(128, 128))
    with pytest.raises(SlideTooLarge, match="900x600 pixels exceeds the maximum of 100000"):
        open_slide_reader(path, max_pixels=100_000)
    with pytest.raises(InvalidConfig, match="max_pixels"):
        open_slide_reader(path, max_pixels=0)


def test_bad_windows_and_closed_readers_are_refused(tmp_path, rgb):
    path = _write(tmp_path / "slide.tif", rgb, photometric="rgb", tile=(128, 128))
    reader = TiffRegionReader(path)
    with pytest.raises(InvalidConfig, match="must not be negative"):
        reader.read_region(0, 0, -1, 10)
    with pytest.raises(InvalidConfig, match="must be an integer"):
        reader.read_region(0.5, 0, 10, 10)
    reader.close()
    with pytest.raises(InvalidSlide, match="closed"):
        reader.read_region(0, 0, 10, 10)


# --- synthetic slides -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ome", [False, True])
def test_synthetic_slide_round_trips_size_mpp_and_levels(tmp_path, ome):
    path = tmp_path / ("synthetic.ome.tif" if ome else "synthetic.tif")
    ticks = []
    info = write_synthetic_slide(
        path,
        1536,
        1100,
        seed=3,
        mpp=0.2,
        field_px=512,
        tile=256,
        ome=ome,
        progress=lambda *a: ticks.append(a),
    )
    assert ticks == [(i, 9) for i in range(1, 10)]
    assert info["levels"] == [(1536, 1100), (768, 550)]
    assert info["fields"] == 9 and info["white_cells"] > 0 and 0 < info["blasts"] <= info["white_cells"]
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert [level.shape[:2] for level in levels] == [(1100, 1536), (550, 768)]
        assert tif.pages.first.is_tiled and len(tif.pages) == 1  # reduced levels are SubIFDs
        small = levels[1].asarray()
    with open_slide_reader(path) as reader:
        assert reader.format == ("ome-tiff" if ome else "tiff")
        assert (reader.width, reader.height) == (1536, 1100)
        assert reader.mpp == pytest.approx(0.2)
        full = reader.read_region(0, 0, 1536, 1100)
    # The reduced level is the 2 x 2 mean of level 0, and the synthetic smear is not blank.
    halved = cv2.resize(full, (768, 550), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - halved).max() <= 1
    assert full.std() > 5


def test_synthetic_slide_memory_is_bounded_by_a_band_not_the_slide(tmp_path):
    peaks = []
    for height in (1024, 4096):
        tracemalloc.start()
        try:
            write_synthetic_slide(tmp_path / f"tall{height}.tif", 512, height, field_px=256, tile=256)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    # Four times the rows (and a pyramid for the tall one) must not cost four times the memory.
    assert peaks[1] < 1.5 * peaks[0]
    assert peaks[1] < 512 * 4096 * 3


# --- hostile files: non-regular paths, sparse tiles, implausible scales ---------------------------------


def _in_thread(fn, *args, timeout_s: float = 10.0):
    """fn(*args) in a thread, its result or exception; a call blocked on a pipe fails instead of hanging."""
    import threading

    outcome: list = []

    def run() -> None:
        try:
            outcome.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert outcome, f"{fn.__name__}{args} did not return within {timeout_s} s"
    return outcome[0]


def test_named_pipes_and_devices_are_refused_without_reading(tmp_path):
    import os

    fifo = tmp_path / "slide.svs"
    os.mkfifo(fifo)
    device = tmp_path / "scan.tif"
    device.symlink_to("/dev/null")
    assert _in_thread(is_whole_slide, fifo) is False
    for path, kind in ((fifo, "named pipe"), (device, "character device")):
        for fn in (open_slide_reader, file_sha256):
            error = _in_thread(fn, path)
            assert isinstance(error, InvalidSlide), error
            assert f"{path}: is a {kind}" in str(error)


def test_tiles_without_data_are_plasma_and_never_read(tmp_path):
    from hostile import sparse_tiff

    from blastq.core.synth.field import generate_field

    field = generate_field(3, 512, 512, mpp=0.2).image
    path = sparse_tiff(tmp_path / "sparse.tif", 100_000, 100_000, tiles={(10, 12): field})
    assert path.stat().st_size < 2_000_000  # ~38k empty tiles: the header claims 10 gigapixels
    with open_slide_reader(path) as reader:
        assert (reader.width, reader.height) == (100_000, 100_000)
        assert not reader.has_data(0, 0, 5120, 6144)
        assert reader.has_data(5000, 6000, 200, 200)
        blank = reader.read_region(20_000, 20_000, 2048, 2048)
        assert (blank == OUTSIDE_FILL).all() and reader.segments_decoded == 0
        np.testing.assert_array_equal(reader.read_region(5120, 6144, 512, 512), field)
        assert reader.segments_decoded == 1


def test_implausible_metadata_scale_is_kept_as_a_reason_not_used(tmp_path, rgb):
    path = _write(
        tmp_path / "coarse.tif",
        rgb,
        photometric="rgb",
        tile=(128, 128),
        resolution=(2000, 2000),
        resolutionunit="CENTIMETER",
    )  # 5 um/px
    with open_slide_reader(path) as reader:
        assert reader.mpp is None
        assert "TIFF resolution tags is 5 um/px" in reader.mpp_refused and "--mpp" in reader.mpp_refused
