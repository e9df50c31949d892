"""Reading a slide image: bytes -> 8-bit RGB pixels plus the pixel size (mpp, microns per pixel).

PNG, JPEG and BMP are decoded with OpenCV, TIFF with tifffile. The format is taken from the magic
bytes, never the extension. Every check that can be done from the header (size, truncation) is done
before decoding, so a decompression bomb or a cut-off upload is refused without allocating pixels.
"""

from __future__ import annotations

import hashlib
import io
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import tifffile
from scipy import ndimage as ndi
from skimage import filters, measure, segmentation
from skimage.feature import peak_local_max

from blastq.core.errors import InvalidConfig, InvalidSlide, SlideTooLarge

MppSource = Literal["metadata", "user", "estimated"]
ImageFormat = Literal["png", "jpeg", "bmp", "tiff"]

DEFAULT_MAX_PIXELS = 200_000_000
RED_CELL_DIAMETER_UM = 7.5

# A user-given mpp outside this range is a typo (nm or mm instead of microns), not a microscope.
USER_MPP_RANGE = (0.01, 10.0)
# Metadata outside this range is a screen default (72/96/300 dpi = 353/265/85 um/px), not a calibration.
METADATA_MPP_RANGE = (0.02, 5.0)
MIN_RED_CELLS = 5

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# JPEG start-of-frame markers (all except DHT C4, JPG C8 and DAC CC) carry the image size.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# JPEG markers without a length field.
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD9)])


@dataclass(frozen=True)
class Slide:
    """A decoded slide: HWC uint8 RGB pixels, the pixel size and where it came from."""

    rgb: np.ndarray  # HWC uint8 RGB
    mpp: float
    mpp_source: MppSource
    name: str  # file name (or the given name for bytes)
    sha256: str  # hex sha256 of the file bytes


def read_slide(path: str | Path, *, mpp: float | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Slide:
    """Read an image file into a Slide (user mpp > metadata mpp > estimate from red cells)."""
    path = Path(path)
    _check_user_mpp(mpp, str(path))
    if not path.exists():
        raise InvalidSlide(f"{path}: no such file")
    if path.is_dir():
        raise InvalidSlide(f"{path}: is a directory, not an image file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidSlide(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    return _decode(data, path.name, str(path), mpp=mpp, max_pixels=max_pixels)


def decode_slide(
    data: bytes, name: str, *, mpp: float | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Slide:
    """Decode image bytes (e.g. from an object store) into a Slide; `name` is used in messages."""
    _check_user_mpp(mpp, name)
    return _decode(data, name, name, mpp=mpp, max_pixels=max_pixels)


def image_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) read from the header only, without decoding pixels."""
    return _header_size(data, _detect_format(data, name), name)


def metadata_mpp(data: bytes, name: str) -> float | None:
    """The pixel size stored in the file (TIFF resolution, PNG pHYs, JPEG JFIF), or None if absent/implausible."""
    fmt = _detect_format(data, name)
    try:
        if fmt == "png":
            value = _png_mpp(data, name)
        elif fmt == "jpeg":
            value = _jpeg_mpp(data, name)
        elif fmt == "tiff":
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                value = _tiff_mpp(tif)
        else:
            # BMP's pels-per-metre fields are almost always 0 or a screen default; not trusted.
            value = None
    except InvalidSlide:
        raise
    except Exception as exc:
        raise InvalidSlide(f"{name}: cannot read resolution metadata ({exc})") from exc
    if value is None or not math.isfinite(value):
        return None
    lo, hi = METADATA_MPP_RANGE
    return value if lo <= value <= hi else None


def estimate_mpp_from_red_cells(rgb: np.ndarray, *, min_cells: int = MIN_RED_CELLS) -> float:
    """Estimate mpp from the median diameter of isolated, round red cells (7.5 um each)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InvalidSlide(f"expected HWC uint8 RGB, got shape {rgb.shape} dtype {rgb.dtype}")
    diameters = _red_cell_diameters(rgb)
    if diameters.size < min_cells:
        raise InvalidSlide(
            f"found {diameters.size} plausible red cells, need {min_cells} to estimate the pixel size"
        )
    return float(RED_CELL_DIAMETER_UM / np.median(diameters))


# --- decoding ---------------------------------------------------------------------------------------


def _check_user_mpp(mpp: float | None, label: str) -> None:
    if mpp is None:
        return
    lo, hi = USER_MPP_RANGE
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(mpp, bool) or not (math.isfinite(value) and lo <= value <= hi):
        raise InvalidConfig(f"{label}: mpp={mpp!r} is not a plausible pixel size (expected {lo}..{hi} um/px)")


def _decode(data: bytes, name: str, label: str, *, mpp: float | None, max_pixels: int) -> Slide:
    if max_pixels <= 0:
        raise InvalidConfig(f"{label}: max_pixels={max_pixels!r} must be positive")
    fmt = _detect_format(data, label)
    width, height = _header_size(data, fmt, label)
    if width <= 0 or height <= 0:
        raise InvalidSlide(f"{label}: zero-size image ({width}x{height})")
    if width * height > max_pixels:
        raise SlideTooLarge(f"{label}: {width}x{height} pixels exceeds the maximum of {max_pixels}")
    _check_complete(data, fmt, label)
    try:
        rgb = _decode_tiff(data, label) if fmt == "tiff" else _decode_cv2(data, label)
    except InvalidSlide:
        raise
    except Exception as exc:
        raise InvalidSlide(f"{label}: cannot decode {fmt.upper()} ({exc})") from exc
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise InvalidSlide(f"{label}: zero-size image")

    source: MppSource
    if mpp is not None:
        value, source = float(mpp), "user"
    else:
        found = metadata_mpp(data, label)
        if found is not None:
            value, source = found, "metadata"
        else:
            try:
                value, source = estimate_mpp_from_red_cells(rgb), "estimated"
            except InvalidSlide as exc:
                raise InvalidSlide(f"{label}: no pixel size in the metadata and {exc}; pass mpp") from exc
    return Slide(rgb=rgb, mpp=value, mpp_source=source, name=name, sha256=hashlib.sha256(data).hexdigest())


def _detect_format(data: bytes, label: str) -> ImageFormat:
    if not data:
        raise InvalidSlide(f"{label}: empty file")
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"BM"):
        return "bmp"
    if data.startswith(_TIFF_MAGICS):
        return "tiff"
    raise InvalidSlide(f"{label}: not a PNG, JPEG, BMP or TIFF image (unrecognised leading bytes)")


def _header_size(data: bytes, fmt: ImageFormat, label: str) -> tuple[int, int]:
    try:
        if fmt == "png":
            if len(data) < 24 or data[12:16] != b"IHDR":
                raise InvalidSlide(f"{label}: PNG without an IHDR header")
            return struct.unpack(">II", data[16:24])
        if fmt == "jpeg":
            return _jpeg_size(data, label)
        if fmt == "bmp":
            if len(data) < 26:
                raise InvalidSlide(f"{label}: BMP shorter than its header")
            (dib_size,) = struct.unpack("<I", data[14:18])
            if dib_size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit unsigned sizes
                return struct.unpack("<HH", data[18:22])
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)  # negative height = top-down rows
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            return int(page.imagewidth), int(page.imagelength)
    except InvalidSlide:
        raise
    except Exception as exc:
        raise InvalidSlide(f"{label}: unreadable {fmt.upper()} header ({exc})") from exc


def _jpeg_segments(data: bytes, label: str):
    """Yield (marker, payload) for the JPEG header segments up to the start of scan."""
    i = 2
    n = len(data)
    while i < n:
        if data[i] != 0xFF:
            raise InvalidSlide(f"{label}: corrupt JPEG header at byte {i}")
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker == 0xD9 or i + 2 > n:
            break
        (length,) = struct.unpack(">H", data[i : i + 2])
        if length < 2 or i + length > n:
            raise InvalidSlide(f"{label}: truncated JPEG header")
        yield marker, data[i + 2 : i + length]
        if marker == 0xDA:
            return
        i += length
    raise InvalidSlide(f"{label}: truncated JPEG (no image data)")


def _jpeg_size(data: bytes, label: str) -> tuple[int, int]:
    for marker, payload in _jpeg_segments(data, label):
        if marker in _JPEG_SOF:
            if len(payload) < 5:
                raise InvalidSlide(f"{label}: corrupt JPEG frame header")
            height, width = struct.unpack(">HH", payload[1:5])
            return width, height
        if marker == 0xDA:
            break
    raise InvalidSlide(f"{label}: JPEG without a frame header")


def _check_complete(data: bytes, fmt: ImageFormat, label: str) -> None:
    """Refuse truncated or corrupted files that a decoder might half-decode without complaint."""
    if fmt == "png":
        _png_chunks(data, label, verify=True)
    elif fmt == "jpeg":
        # Some writers pad after EOI with zeros; anything else missing the marker was cut off.
        if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            raise InvalidSlide(f"{label}: truncated JPEG (no end-of-image marker)")
    elif fmt == "bmp":
        _check_bmp_length(data, label)
    else:
        _check_tiff_extent(data, label)


def _png_chunks(data: bytes, label: str, *, verify: bool) -> dict[bytes, bytes]:
    """Walk the PNG chunks (checking CRCs if verify); return the first payload of each ancillary type."""
    found: dict[bytes, bytes] = {}
    i = len(_PNG_MAGIC)
    n = len(data)
    while i + 12 <= n:
        (length,) = struct.unpack(">I", data[i : i + 4])
        kind = data[i + 4 : i + 8]
        end = i + 12 + length
        if end > n:
            raise InvalidSlide(
                f"{label}: truncated PNG ({kind.decode('ascii', 'replace')} chunk runs past the end)"
            )
        if verify:
            (crc,) = struct.unpack(">I", data[end - 4 : end])
            if zlib.crc32(data[i + 4 : end - 4]) != crc:
                raise InvalidSlide(
                    f"{label}: corrupt PNG (bad CRC in {kind.decode('ascii', 'replace')} chunk)"
                )
        if kind == b"IEND":
            return found
        if kind not in (b"IDAT", b"IHDR"):
            found.setdefault(kind, data[i + 8 : end - 4])
        elif kind == b"IDAT" and not verify:
            # The ancillary chunks we read (pHYs) must come before the first IDAT.
            return found
        i = end
    if verify:
        raise InvalidSlide(f"{label}: truncated PNG (no IEND chunk)")
    return found


def _check_bmp_length(data: bytes, label: str) -> None:
    if len(data) < 34:
        raise InvalidSlide(f"{label}: BMP shorter than its header")
    (declared,) = struct.unpack("<I", data[2:6])
    (pixel_offset,) = struct.unpack("<I", data[10:14])
    if declared and len(data) < declared:
        raise InvalidSlide(f"{label}: truncated BMP ({len(data)} of {declared} bytes)")
    (dib_size,) = struct.unpack("<I", data[14:18])
    if dib_size >= 40:
        w, h = struct.unpack("<ii", data[18:26])
        bpp, compression = struct.unpack("<HI", data[28:34])
        if compression in (0, 3):  # uncompressed rows: the pixel data size follows from the header
            needed = pixel_offset + ((abs(w) * bpp + 31) // 32) * 4 * abs(h)
            if len(data) < needed:
                raise InvalidSlide(f"{label}: truncated BMP ({len(data)} of {needed} bytes)")


def _check_tiff_extent(data: bytes, label: str) -> None:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            extents = list(zip(page.dataoffsets, page.databytecounts, strict=False))
    except Exception as exc:
        raise InvalidSlide(f"{label}: unreadable TIFF header ({exc})") from exc
    for offset, count in extents:
        if count and offset + count > len(data):
            raise InvalidSlide(f"{label}: truncated TIFF (image data runs past the end of the file)")


def _decode_cv2(data: bytes, label: str) -> np.ndarray:
    # IMREAD_UNCHANGED keeps 16-bit depth and alpha, which we normalise ourselves.
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise InvalidSlide(f"{label}: cannot decode image (corrupt or unsupported variant)")
    return _to_rgb8(arr, bgr=True)


def _decode_tiff(data: bytes, label: str) -> np.ndarray:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages.first
        arr = page.asarray()
        photometric = page.photometric
        if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and arr.ndim == 3:
            arr = np.moveaxis(arr, 0, -1)
        if photometric == tifffile.PHOTOMETRIC.PALETTE:
            if page.colormap is None:
                raise InvalidSlide(f"{label}: palette TIFF without a colour map")
            arr = tifffile.apply_colormap(arr, page.colormap).astype(np.uint16)
            return _to_rgb8(arr, bgr=False)
        if photometric not in (
            tifffile.PHOTOMETRIC.RGB,
            tifffile.PHOTOMETRIC.MINISBLACK,
            tifffile.PHOTOMETRIC.MINISWHITE,
            tifffile.PHOTOMETRIC.YCBCR,  # tifffile returns RGB for JPEG-compressed YCbCr
        ):
            raise InvalidSlide(f"{label}: unsupported TIFF colour space {photometric.name}")
        extra = tuple(page.extrasamples or ())
        premultiplied = bool(extra) and extra[0] == 1
        if extra and extra[0] == 0 and arr.ndim == 3:
            # Unspecified extra samples (not alpha) carry nothing to show: keep the colour samples.
            arr = arr[:, :, : arr.shape[2] - len(extra)]
    if photometric == tifffile.PHOTOMETRIC.MINISWHITE:
        arr = _invert(arr)
    return _to_rgb8(arr, bgr=False, premultiplied=premultiplied)


def _invert(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.bool_:
        return ~arr
    if np.issubdtype(arr.dtype, np.integer):
        return np.iinfo(arr.dtype).max - arr
    return 1.0 - arr


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        # Floats in [0, 1] are normalised intensities; anything larger is taken as 0..255 already.
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
        return np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        arr = np.clip(arr, 0, None)
        return (arr.astype(np.float64) * (255.0 / info.max) + 0.5).astype(np.uint8)
    raise InvalidSlide(f"unsupported pixel type {arr.dtype}")


def _to_rgb8(arr: np.ndarray, *, bgr: bool, premultiplied: bool = False) -> np.ndarray:
    """Any decoded array (2-D grey, HW1/HW2/HW3/HW4, 8/16-bit/float) -> HWC uint8 RGB."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        grey = _to_uint8(arr)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if arr.ndim != 3:
        raise InvalidSlide(f"unsupported image layout {arr.shape}")
    channels = arr.shape[2]
    arr = _to_uint8(arr)
    if channels == 2:
        colour, alpha = np.repeat(arr[:, :, :1], 3, axis=2), arr[:, :, 1]
    elif channels == 3:
        colour, alpha = arr, None
    elif channels >= 4:
        # Extra samples beyond alpha (rare multi-sample TIFFs) carry nothing we can show.
        colour, alpha = arr[:, :, :3], arr[:, :, 3]
    else:
        raise InvalidSlide(f"unsupported image layout {arr.shape}")
    if bgr:
        colour = colour[:, :, ::-1]
    if alpha is not None:
        # Composite over white: transparent regions of an export are blank slide, not black.
        a = alpha.astype(np.float32)[:, :, None] / 255.0
        fg = colour.astype(np.float32) if premultiplied else colour.astype(np.float32) * a
        colour = np.clip(fg + 255.0 * (1.0 - a) + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(colour)


# --- resolution metadata ----------------------------------------------------------------------------


def _png_mpp(data: bytes, label: str) -> float | None:
    phys = _png_chunks(data, label, verify=False).get(b"pHYs")
    if phys is None or len(phys) != 9:
        return None
    ppu_x, ppu_y, unit = struct.unpack(">IIB", phys)
    if unit != 1 or ppu_x == 0 or ppu_y == 0:  # unit 0 = aspect ratio only
        return None
    return 1e6 / ((ppu_x + ppu_y) / 2.0)


def _jpeg_mpp(data: bytes, label: str) -> float | None:
    for marker, payload in _jpeg_segments(data, label):
        if marker == 0xE0 and payload.startswith(b"JFIF\x00") and len(payload) >= 12:
            unit, x_density, y_density = struct.unpack(">BHH", payload[7:12])
            if x_density == 0 or y_density == 0:
                return None
            density = (x_density + y_density) / 2.0
            if unit == 1:  # dots per inch
                return 25_400.0 / density
            if unit == 2:  # dots per cm
                return 10_000.0 / density
            return None
        if marker == 0xDA:
            break
    return None


def _tiff_mpp(tif: tifffile.TiffFile) -> float | None:
    page = tif.pages.first
    tags = page.tags
    if "XResolution" not in tags:
        return None
    numerator, denominator = tags["XResolution"].value
    if numerator == 0 or denominator == 0:
        return None
    pixels_per_unit = numerator / denominator
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2  # TIFF default: inch
    if unit == 2:
        return 25_400.0 / pixels_per_unit
    if unit == 3:
        return 10_000.0 / pixels_per_unit
    # ImageJ writes unit-less resolution plus "unit=micron" in its description.
    imagej = tif.imagej_metadata or {}
    if str(imagej.get("unit", "")).lower() in ("micron", "um", "\\u00b5m", "µm"):
        return 1.0 / pixels_per_unit
    return None


# --- red-cell pixel-size estimate -------------------------------------------------------------------


# Red cells must be at least this wide to be measured (so the estimate is limited to mpp <= 0.75):
# below it pixelation dominates the diameter, and blobs of smoothed noise reach 6..9 px.
_MIN_CELL_DIAMETER_PX = 10.0
# Cells must differ from the plasma by this many grey levels in green; less is a blank or noise image.
_MIN_CONTRAST = 12.0
# A central window this wide holds dozens of red cells at any plausible mpp (>= 0.05); more only
# costs time (under 1 s for 1024 x 1024 on one core).
_ESTIMATE_WINDOW_PX = 1024
_DISC3 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))


def _red_cell_diameters(rgb: np.ndarray) -> np.ndarray:
    """Equivalent diameters (px) of the round, whole, red-cell-coloured objects in the image."""
    height, width = rgb.shape[:2]
    top, left = max(0, (height - _ESTIMATE_WINDOW_PX) // 2), max(0, (width - _ESTIMATE_WINDOW_PX) // 2)
    rgb = rgb[top : top + _ESTIMATE_WINDOW_PX, left : left + _ESTIMATE_WINDOW_PX]
    # Haemoglobin and eosin absorb green most, so green separates red cells from plasma best.
    green = cv2.GaussianBlur(np.ascontiguousarray(rgb[:, :, 1]), (0, 0), 1.0)
    if int(green.max()) - int(green.min()) < _MIN_CONTRAST:
        return np.empty(0)
    # Two-class Otsu separates plasma from all cells when red cells are well stained, but white cells
    # from everything else when red cells are pale; the upper three-class threshold catches the
    # latter. Keep whichever finds more round red cells: a wrong threshold gives ragged blobs.
    thresholds = [filters.threshold_otsu(green)]
    if np.unique(green).size >= 3:
        thresholds.append(filters.threshold_multiotsu(green, classes=3)[1])
    best = np.empty(0)
    for threshold in thresholds:
        foreground = green < threshold
        if not foreground.any() or foreground.all():
            continue
        if float(green[~foreground].mean()) - float(green[foreground].mean()) < _MIN_CONTRAST:
            continue
        diameters = _round_cell_diameters(rgb, foreground)
        if diameters.size > best.size:
            best = diameters
    return best


def _round_cell_diameters(rgb: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Split a cell mask into cells and return the diameters of those that look like whole red cells."""
    height, width = foreground.shape
    # The pale central pallor falls on the plasma side of the threshold: fill it back in.
    opened = cv2.morphologyEx(foreground.astype(np.uint8), cv2.MORPH_OPEN, _DISC3)
    foreground = ndi.binary_fill_holes(opened)
    components, n = ndi.label(foreground)
    if n == 0:
        return np.empty(0)
    distance = cv2.distanceTransform(foreground.astype(np.uint8), cv2.DIST_L2, 5)
    # Touching cells are split at the necks of the distance map. The peak spacing comes from the
    # typical inscribed radius of a component (a chain of red cells is one cell wide): the median by
    # count, once specks far below the area-weighted radius are set aside.
    radii = np.asarray(ndi.maximum(distance, components, np.arange(1, n + 1)))
    areas = np.bincount(components.ravel(), minlength=n + 1)[1:].astype(np.float64)
    radii = radii[radii >= max(_MIN_CELL_DIAMETER_PX / 2, 0.25 * _weighted_median(radii, areas))]
    if radii.size == 0:
        return np.empty(0)
    radius = float(np.median(radii))
    peaks = peak_local_max(
        distance,
        min_distance=max(2, int(0.6 * radius)),
        threshold_abs=0.5 * radius,
        labels=components,
        exclude_border=False,
    )
    markers = np.zeros(components.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    cells = segmentation.watershed(-distance, markers, mask=foreground)

    plasma = np.median(rgb[~foreground], axis=0) if (~foreground).any() else np.full(3, 255.0)
    plasma = np.maximum(plasma.astype(np.float64), 1.0)
    rows = []  # diameter px, whole and round (0/1), optical density in R, G, B relative to the plasma
    for region in measure.regionprops(cells, intensity_image=rgb):
        r0, c0, r1, c1 = region.bbox
        diameter = region.equivalent_diameter_area
        # A cell cut by the image edge has an unknown size. Cheap tests first: shape measures cost.
        usable = (
            r0 > 0
            and c0 > 0
            and r1 < height
            and c1 < width
            and diameter >= _MIN_CELL_DIAMETER_PX
            and region.eccentricity < 0.75
            and region.solidity > 0.9
        )
        colour = np.asarray(region.intensity_mean, np.float64) if usable else plasma
        rows.append((diameter, usable, *(-np.log(np.maximum(colour, 1.0) / plasma))))
    diameter, usable, od_red, od_green, od_blue = np.asarray(rows, dtype=np.float64).reshape(-1, 5).T
    candidate = usable > 0
    if not candidate.any():
        return np.empty(0)
    # Relative to the plasma, red cells absorb blue about as much as red (haemoglobin, eosin), while
    # nuclei and blue cytoplasm absorb red clearly more: on dataset2 (CellaVision) the blue-minus-red
    # density is about +0.02 for red cells and below -0.2 for 95% of white cells. By count, so that a
    # large white cell cannot set it, a density far above the typical one is a nucleus too.
    keep = candidate & (od_blue - od_red > -0.15) & (od_green <= 1.5 * np.median(od_green[candidate]))
    diameter = diameter[keep]
    if diameter.size == 0:
        return diameter
    # Unsplit doublets and fragments sit far from the typical red-cell size.
    typical = np.median(diameter)
    return diameter[(diameter > 0.75 * typical) & (diameter < 1.33 * typical)]


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])
