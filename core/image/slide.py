"""Reading a slide image: bytes -> 8-bit RGB pixels plus the pixel size (mpp, microns per pixel).

PNG, JPEG and BMP are decoded with OpenCV, TIFF with tifffile. The format is taken from the magic
bytes, never the extension. Every check that can be done from the header (size, truncation) is done
before decoding, so a decompression bomb or a cut-off upload is refused without allocating pixels.
Only regular files are read, and never more bytes than their size (a link to /dev/zero, a named pipe).
`check_smear` refuses what is no smear photo at all (blank images, label masks) before any model work.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import tifffile

from blastq.core.common import InvalidConfig, InvalidSlide, SlideTooLarge
from blastq.core.image.scale import ScaleEstimate, estimate_scale

MppSource = Literal["metadata", "user", "estimated"]
ImageFormat = Literal["png", "jpeg", "bmp", "tiff"]

DEFAULT_MAX_PIXELS = 200_000_000
# Whole slides (core.pipeline.wholeslide), pixels at the model's scale: 10 gigapixels is 20 x 20 mm at 0.2 um/px,
# more than the monolayer of any smear and hours of a GPU. A header claiming more (a sparse TIFF of a
# few hundred KB can claim 100000 x 100000 px) is refused before any work.
DEFAULT_MAX_SLIDE_PIXELS = 10_000_000_000

# A smear is photographed through a 10x..100x objective onto camera pixels of about 2..6.5 um, behind
# couplers of 0.5x..1x: from 0.02 um/px (100x, small pixels) to about 1.3 um/px (10x, 0.5x coupler,
# large pixels). Coarser than 2 um/px a red cell (7.5 um) is under 4 pixels and no cell can be
# measured; finer than 0.02 is beyond any optical microscope. Metadata outside it is refused.
METADATA_MPP_RANGE = (0.02, 2.0)
# A user-given mpp outside this range is a typo (nm or mm instead of microns) or too coarse to show
# cells; the lower end allows phone cameras behind a 100x objective, which reach about 0.01.
USER_MPP_RANGE = (0.01, METADATA_MPP_RANGE[1])
# Resolution metadata coarser than this is a screen or print default written without any calibration
# (72/96/150/300/600/1200 dpi = 353/265/169/85/42/21 um/px): ignored as if absent, not refused.
SCREEN_DEFAULT_MPP = 20.0
# No image format stores a pixel in more than 32 bytes (4 samples of float64): a bigger file cannot be
# an image within the pixel limit, and is refused before its bytes are read.
_MAX_BYTES_PER_PIXEL = 32

# Cells must differ from the plasma by this many grey levels in green; less is a blank or noise image.
_MIN_CONTRAST = 12.0

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
    # The pixel limit it was read under (BLASTQ_MAX_PIXELS): the pipeline holds the image at the model's
    # scale to it too, before resampling (core.pipeline.field.check_slide).
    max_pixels: int = DEFAULT_MAX_PIXELS
    # How far an estimated scale can be trusted (0..1, core.image.scale); None for a given or metadata scale.
    mpp_confidence: float | None = None


def read_slide(path: str | Path, *, mpp: float | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Slide:
    """Read an image file into a Slide (user mpp > metadata mpp > estimate from red cells)."""
    path = Path(path)
    check_user_mpp(mpp, str(path))
    if max_pixels <= 0:
        raise InvalidConfig(f"max_pixels={max_pixels!r} must be positive", path=path)
    data = read_file(path, max_bytes=_MAX_BYTES_PER_PIXEL * max_pixels + (1 << 20))
    return _decode(data, path.name, str(path), mpp=mpp, max_pixels=max_pixels)


def check_regular_file(path: str | Path) -> os.stat_result:
    """The file's stat if it is a regular file (a symlink counts only if it leads to one), else InvalidSlide.

    Devices, named pipes and sockets never end or block when read: /dev/zero would be read until memory
    runs out, a pipe without a writer hangs the reader."""
    path = Path(path)
    try:
        info = path.stat()  # follows symlinks: what a read would get
    except FileNotFoundError as exc:
        raise InvalidSlide("no such file", path=path) from exc
    except OSError as exc:
        raise InvalidSlide(f"cannot read file ({exc.strerror or exc})", path=path) from exc
    if stat.S_ISDIR(info.st_mode):
        raise InvalidSlide("is a directory, not an image file", path=path)
    if not stat.S_ISREG(info.st_mode):
        via = f" (a symlink to {os.path.realpath(path)})" if path.is_symlink() else ""
        raise InvalidSlide(f"is a {_file_kind(info.st_mode)}{via}, not a regular image file", path=path)
    return info


def read_file(path: str | Path, *, max_bytes: int | None = None) -> bytes:
    """All bytes of a regular file, never more than its size: one that grows or shrinks meanwhile is refused."""
    path = Path(path)
    size = check_regular_file(path).st_size
    if max_bytes is not None and size > max_bytes:
        raise SlideTooLarge(
            f"file of {size} bytes is larger than any image within the pixel limit", path=path
        )
    try:
        # O_NONBLOCK: should the path have become a pipe since the check, opening it must not hang.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InvalidSlide(f"cannot read file ({exc.strerror or exc})", path=path) from exc
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise InvalidSlide(f"is a {_file_kind(opened.st_mode)}, not a regular image file", path=path)
        size = opened.st_size
        chunks, left = [], size
        while left > 0:
            block = os.read(fd, min(left, 1 << 24))
            if not block:
                raise InvalidSlide(f"file shrank while being read ({size - left} of {size} bytes)", path=path)
            chunks.append(block)
            left -= len(block)
        if os.read(fd, 1):
            raise InvalidSlide(
                f"file grew while being read (past its {size} bytes); is it still being written?", path=path
            )
    except OSError as exc:
        raise InvalidSlide(f"cannot read file ({exc.strerror or exc})", path=path) from exc
    finally:
        os.close(fd)
    return b"".join(chunks)


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "named pipe"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def decode_slide(
    data: bytes, name: str, *, mpp: float | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Slide:
    """Decode image bytes (e.g. from an object store) into a Slide; `name` is used in messages."""
    check_user_mpp(mpp, name)
    return _decode(data, name, name, mpp=mpp, max_pixels=max_pixels)


def image_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) read from the header only, without decoding pixels."""
    return _header_size(data, _detect_format(data, name), name)


def metadata_mpp(data: bytes, name: str) -> float | None:
    """The pixel size stored in the file (TIFF resolution, PNG pHYs, JPEG JFIF), None if absent or a
    screen default; InvalidSlide if it names a scale no smear photo has (`plausible_metadata_mpp`)."""
    fmt = _detect_format(data, name)
    try:
        if fmt == "png":
            value, where = _png_mpp(data, name), "PNG pHYs chunk"
        elif fmt == "jpeg":
            value, where = _jpeg_mpp(data, name), "JPEG JFIF density"
        elif fmt == "tiff":
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                value, where = tiff_mpp(tif), "TIFF resolution tags"
        else:
            # BMP's pels-per-metre fields are almost always 0 or a screen default; not trusted.
            value, where = None, ""
    except InvalidSlide:
        raise
    except Exception as exc:
        raise InvalidSlide(f"cannot read resolution metadata ({exc})", path=name) from exc
    return plausible_metadata_mpp(value, name, where)


def plausible_metadata_mpp(value: float | None, label: str, where: str) -> float | None:
    """A metadata pixel size checked for a smear: the value, None (absent or a screen default), or
    InvalidSlide naming it when it is outside METADATA_MPP_RANGE (e.g. a PNG whose pHYs says 5 um/px,
    which would be enlarged 25 times to the model's scale)."""
    if value is None or not math.isfinite(value) or value <= 0 or value > SCREEN_DEFAULT_MPP:
        return None
    lo, hi = METADATA_MPP_RANGE
    if not lo <= value <= hi:
        raise InvalidSlide(
            f"the pixel size in the {where} is {value:.4g} um/px, outside the {lo}..{hi} um/px of a "
            "smear photographed through a microscope; pass --mpp with the real pixel size",
            path=label,
        )
    return float(value)


def check_smear(rgb: np.ndarray, label: str) -> None:
    """Refuse, naming the reason, an image that is no photo of a stained smear: blank (black, white or
    uniform), a label mask or drawing (few distinct values, flat regions), or one without stained cells.

    Measured on a strided sample of at most about a million pixels, so a large slide costs no more than a
    small one. Loose on purpose: a real smear photo (any stain, any scale, a greyscale one with its many
    grey levels) must pass; what is refused would only give a meaningless verdict.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InvalidSlide(f"expected HWC uint8 RGB, got shape {rgb.shape} dtype {rgb.dtype}", path=label)
    height, width = rgb.shape[:2]
    step = max(1, math.isqrt(height * width // _SMEAR_SAMPLE_PX))
    sample = rgb[::step, ::step].reshape(-1, 3)
    grey = bool((sample[:, 0] == sample[:, 1]).all() and (sample[:, 1] == sample[:, 2]).all())
    kind = "grey levels" if grey else "colours"
    packed = (sample[:, 0].astype(np.uint32) << 16) | (sample[:, 1].astype(np.uint32) << 8) | sample[:, 2]
    distinct = int(np.unique(packed).size)
    green = sample[:, 1]
    low, high = np.percentile(green, [0.5, 99.5])
    if distinct == 1 or high - low < _MIN_CONTRAST and distinct > _SMEAR_MIN_VALUES:
        r, g, b = (int(v) for v in np.median(sample, axis=0))
        what = f"uniform (RGB {r}, {g}, {b})"
        if max(r, g, b) < 32 or min(r, g, b) > 223:
            what = "black" if max(r, g, b) < 32 else "white"
        raise InvalidSlide(f"not a smear photo: the image is {what}, with no stained cells", path=label)
    if sample.shape[0] >= _SMEAR_MIN_JUDGED_PX:
        if distinct <= _SMEAR_MIN_VALUES:
            raise InvalidSlide(
                f"not a smear photo: only {distinct} distinct {kind} (a label mask or drawing?); "
                "a photo of a smear has thousands",
                path=label,
            )
        # Photos have noise and smooth edges; masks and drawings are flat regions with sharp steps.
        rows = rgb[::step]
        flat = float((rows[:, 1:width:step] == rows[:, 0 : width - 1 : step]).all(axis=-1).mean())
        if width > 1 and flat >= _SMEAR_MAX_FLAT:
            raise InvalidSlide(
                f"not a smear photo: {flat:.0%} of neighbouring pixels are identical {kind} "
                "(a label mask or drawing?)",
                path=label,
            )
    if high - low < _MIN_CONTRAST:
        raise InvalidSlide(
            f"not a smear photo: no contrast (green levels {low:.0f}..{high:.0f}), so no stained cells",
            path=label,
        )
    # Stained cells (red cells, nuclei) absorb green: some pixels must be clearly darker than the plasma.
    plasma = float(np.percentile(green, 99))
    stained = float(np.count_nonzero(green < _STAINED_FRACTION_OF_PLASMA * plasma)) / green.size
    if stained < _MIN_STAINED_SHARE:
        raise InvalidSlide(
            f"not a smear photo: no stained cells (only {stained:.2%} of pixels are darker than "
            f"{_STAINED_FRACTION_OF_PLASMA:.0%} of the background)",
            path=label,
        )


# Pixels sampled by check_smear, and how few make an image too small to judge its colours by.
_SMEAR_SAMPLE_PX = 1 << 20
_SMEAR_MIN_JUDGED_PX = 256
# Label masks have a handful of values (blastq's 0/1/2, segmentation_wbc's 0/128/255); a 40x40 crop of a
# real smear already has hundreds of colours, its 120 x 120 crops thousands.
_SMEAR_MIN_VALUES = 64
# Masks have 97..99.8% identical neighbours; real smear photos 2..56% (segmentation_wbc dataset1/2).
_SMEAR_MAX_FLAT = 0.95
# A stained pixel has less than 80% of the plasma's green (optical density above 0.1); at least 0.1% of
# them: one red cell in a field of 100 x 100 um is 0.4%.
_STAINED_FRACTION_OF_PLASMA = 0.8
_MIN_STAINED_SHARE = 0.001


# --- decoding ---------------------------------------------------------------------------------------


def check_user_mpp(mpp: float | None, label: str | None = None) -> None:
    """Refuse a pixel size no microscope gives (NaN, bools and non-numbers too), naming `label` if given."""
    if mpp is None:
        return
    lo, hi = USER_MPP_RANGE
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(mpp, bool) or not (math.isfinite(value) and lo <= value <= hi):
        where = f"{label}: " if label else ""
        raise InvalidConfig(f"{where}mpp={mpp!r} is not a plausible pixel size (expected {lo}..{hi} um/px)")


def _decode(data: bytes, name: str, label: str, *, mpp: float | None, max_pixels: int) -> Slide:
    if max_pixels <= 0:
        raise InvalidConfig(f"max_pixels={max_pixels!r} must be positive", path=label)
    fmt = _detect_format(data, label)
    width, height = _header_size(data, fmt, label)
    if width <= 0 or height <= 0:
        raise InvalidSlide(f"zero-size image ({width}x{height})", path=label)
    if width * height > max_pixels:
        raise SlideTooLarge(f"{width}x{height} pixels exceeds the maximum of {max_pixels}", path=label)
    end = _check_complete(data, fmt, label)
    # The metadata scale is read (and an implausible one refused) from the header, before any pixel.
    found = metadata_mpp(data, label) if mpp is None else None
    try:
        rgb = _decode_tiff(data, label) if fmt == "tiff" else _decode_cv2(data[:end], label)
    except InvalidSlide as exc:
        if exc.path is not None:
            raise
        raise InvalidSlide(exc.reason, path=label) from exc
    except Exception as exc:
        raise InvalidSlide(f"cannot decode {fmt.upper()} ({exc})", path=label) from exc
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise InvalidSlide("zero-size image", path=label)

    # Before any scale is estimated or model run: a mask or a blank image gets its own reason.
    check_smear(rgb, label)
    source: MppSource
    estimate: ScaleEstimate | None = None
    if mpp is not None:
        value, source = float(mpp), "user"
    elif found is not None:
        value, source = found, "metadata"
    else:
        estimate = estimate_checked(rgb, label, "--mpp")
        value, source = estimate.mpp, "estimated"
    return Slide(
        rgb=rgb,
        mpp=value,
        mpp_source=source,
        name=name,
        sha256=hashlib.sha256(data).hexdigest(),
        max_pixels=max_pixels,
        mpp_confidence=estimate.confidence if estimate is not None else None,
    )


def estimate_checked(rgb: np.ndarray, label: str, option: str) -> ScaleEstimate:
    """The red-cell scale estimate of an image without a scale, or InvalidSlide naming `option` as the way
    out: when the image has nothing to measure, or the estimate is outside what a smear can have."""
    try:
        estimate = estimate_scale(rgb)
    except InvalidSlide as exc:
        raise InvalidSlide(f"no pixel size in the metadata and {exc}; pass {option}", path=label) from exc
    lo, hi = METADATA_MPP_RANGE
    if not lo <= estimate.mpp <= hi:
        raise InvalidSlide(
            f"no pixel size in the metadata, and the red cells give an implausible "
            f"{estimate.mpp:.4g} um/px (expected {lo}..{hi}); pass {option}",
            path=label,
        )
    return estimate


def _detect_format(data: bytes, label: str) -> ImageFormat:
    if not data:
        raise InvalidSlide("empty file", path=label)
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"BM"):
        return "bmp"
    if data.startswith(_TIFF_MAGICS):
        return "tiff"
    raise InvalidSlide("not a PNG, JPEG, BMP or TIFF image (unrecognised leading bytes)", path=label)


def _header_size(data: bytes, fmt: ImageFormat, label: str) -> tuple[int, int]:
    try:
        if fmt == "png":
            if len(data) < 24 or data[12:16] != b"IHDR":
                raise InvalidSlide("PNG without an IHDR header", path=label)
            return struct.unpack(">II", data[16:24])
        if fmt == "jpeg":
            return _jpeg_size(data, label)
        if fmt == "bmp":
            if len(data) < 26:
                raise InvalidSlide("BMP shorter than its header", path=label)
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
        raise InvalidSlide(f"unreadable {fmt.upper()} header ({exc})", path=label) from exc


def _jpeg_segments(data: bytes, label: str):
    """Yield (marker, payload) for the JPEG header segments up to the start of scan."""
    i = 2
    n = len(data)
    while i < n:
        if data[i] != 0xFF:
            raise InvalidSlide(f"corrupt JPEG header at byte {i}", path=label)
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
            raise InvalidSlide("truncated JPEG header", path=label)
        yield marker, data[i + 2 : i + length]
        if marker == 0xDA:
            return
        i += length
    raise InvalidSlide("truncated JPEG (no image data)", path=label)


def _jpeg_size(data: bytes, label: str) -> tuple[int, int]:
    for marker, payload in _jpeg_segments(data, label):
        if marker in _JPEG_SOF:
            if len(payload) < 5:
                raise InvalidSlide("corrupt JPEG frame header", path=label)
            height, width = struct.unpack(">HH", payload[1:5])
            return width, height
        if marker == 0xDA:
            break
    raise InvalidSlide("JPEG without a frame header", path=label)


def _check_complete(data: bytes, fmt: ImageFormat, label: str) -> int:
    """Refuse truncated or corrupted files that a decoder might half-decode without complaint; return
    where the image's data ends (bytes after a JPEG's end-of-image marker are not part of it)."""
    if fmt == "png":
        _png_chunks(data, label, verify=True)
    elif fmt == "jpeg":
        return _jpeg_end(data, label)
    elif fmt == "bmp":
        _check_bmp_length(data, label)
    else:
        _check_tiff_extent(data, label)
    return len(data)


def _jpeg_end(data: bytes, label: str) -> int:
    """The offset just past the JPEG's end-of-image marker, found by walking its segments and scans.

    Cameras and apps append data after EOI (thumbnails, padding, a whole video in "motion photos"), so
    the marker is looked for where it must be, not at the end of the file. Inside a scan 0xFF is
    followed by 0x00 (a stuffed byte) or a restart marker; any other byte after 0xFF is the next marker.
    """
    n = len(data)
    i = 2
    while i < n:
        if data[i] != 0xFF:
            raise InvalidSlide(f"corrupt JPEG (no marker at byte {i})", path=label)
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker == 0xD9:
            return i
        if marker in _JPEG_STANDALONE:
            continue
        if i + 2 > n:
            break
        (length,) = struct.unpack(">H", data[i : i + 2])
        if length < 2 or i + length > n:
            break
        i += length
        if marker == 0xDA:  # entropy-coded data up to the next marker
            while True:
                i = data.find(b"\xff", i)
                if i < 0 or i + 1 >= n:
                    i = n
                    break
                follower = data[i + 1]
                if follower == 0x00 or 0xD0 <= follower <= 0xD7:
                    i += 2
                    continue
                break
    raise InvalidSlide("truncated JPEG (no end-of-image marker)", path=label)


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
                f"truncated PNG ({kind.decode('ascii', 'replace')} chunk runs past the end)", path=label
            )
        if verify:
            (crc,) = struct.unpack(">I", data[end - 4 : end])
            if zlib.crc32(data[i + 4 : end - 4]) != crc:
                raise InvalidSlide(
                    f"corrupt PNG (bad CRC in {kind.decode('ascii', 'replace')} chunk)", path=label
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
        raise InvalidSlide("truncated PNG (no IEND chunk)", path=label)
    return found


def _check_bmp_length(data: bytes, label: str) -> None:
    if len(data) < 34:
        raise InvalidSlide("BMP shorter than its header", path=label)
    (declared,) = struct.unpack("<I", data[2:6])
    (pixel_offset,) = struct.unpack("<I", data[10:14])
    if declared and len(data) < declared:
        raise InvalidSlide(f"truncated BMP ({len(data)} of {declared} bytes)", path=label)
    (dib_size,) = struct.unpack("<I", data[14:18])
    if dib_size >= 40:
        w, h = struct.unpack("<ii", data[18:26])
        bpp, compression = struct.unpack("<HI", data[28:34])
        if compression in (0, 3):  # uncompressed rows: the pixel data size follows from the header
            needed = pixel_offset + ((abs(w) * bpp + 31) // 32) * 4 * abs(h)
            if len(data) < needed:
                raise InvalidSlide(f"truncated BMP ({len(data)} of {needed} bytes)", path=label)


def _check_tiff_extent(data: bytes, label: str) -> None:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            extents = list(zip(page.dataoffsets, page.databytecounts, strict=False))
    except Exception as exc:
        raise InvalidSlide(f"unreadable TIFF header ({exc})", path=label) from exc
    for offset, count in extents:
        if count and offset + count > len(data):
            raise InvalidSlide("truncated TIFF (image data runs past the end of the file)", path=label)


def _decode_cv2(data: bytes, label: str) -> np.ndarray:
    # IMREAD_UNCHANGED keeps 16-bit depth and alpha, which we normalise ourselves.
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise InvalidSlide("cannot decode image (corrupt or unsupported variant)", path=label)
    return to_rgb8(arr, bgr=True)


def _decode_tiff(data: bytes, label: str) -> np.ndarray:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages.first
        arr = page.asarray()
        photometric = page.photometric
        if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and arr.ndim == 3:
            arr = np.moveaxis(arr, 0, -1)
        if photometric == tifffile.PHOTOMETRIC.PALETTE:
            if page.colormap is None:
                raise InvalidSlide("palette TIFF without a colour map", path=label)
            arr = tifffile.apply_colormap(arr, page.colormap).astype(np.uint16)
            return to_rgb8(arr, bgr=False)
        if photometric not in (
            tifffile.PHOTOMETRIC.RGB,
            tifffile.PHOTOMETRIC.MINISBLACK,
            tifffile.PHOTOMETRIC.MINISWHITE,
            tifffile.PHOTOMETRIC.YCBCR,  # tifffile returns RGB for JPEG-compressed YCbCr
        ):
            raise InvalidSlide(f"unsupported TIFF colour space {photometric.name}", path=label)
        extra = tuple(page.extrasamples or ())
        premultiplied = bool(extra) and extra[0] == 1
        if extra and extra[0] == 0 and arr.ndim == 3:
            # Unspecified extra samples (not alpha) carry nothing to show: keep the colour samples.
            arr = arr[:, :, : arr.shape[2] - len(extra)]
    if photometric == tifffile.PHOTOMETRIC.MINISWHITE:
        arr = invert(arr)
    return to_rgb8(arr, bgr=False, premultiplied=premultiplied)


def invert(arr: np.ndarray) -> np.ndarray:
    """A MinIsWhite (or any inverted) raster as its ordinary, MinIsBlack values."""
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
        if arr.size and not np.isfinite(arr).any():
            raise InvalidSlide("no pixel has a value: every sample is NaN or infinite")
        arr = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        # Floats in [0, 1] are normalised intensities; anything larger is taken as 0..255 already.
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
        return np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        arr = np.clip(arr, 0, None)
        return (arr.astype(np.float64) * (255.0 / info.max) + 0.5).astype(np.uint8)
    raise InvalidSlide(f"unsupported pixel type {arr.dtype}")


def to_rgb8(arr: np.ndarray, *, bgr: bool, premultiplied: bool = False) -> np.ndarray:
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


def tiff_mpp(tif: tifffile.TiffFile) -> float | None:
    """The pixel size a TIFF's resolution tags state, in um/px; None where they state none."""
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
