"""Whole-slide images read region by region: the slide is never decoded whole.

`open_slide_reader` picks a reader from the file's leading bytes and OpenSlide's format detection
(never the extension):

- OpenSlide vendor formats (SVS, NDPI, MRXS, SCN, VMS/VMU, BIF, Philips TIFF...): `OpenSlideReader`.
- Tiled, pyramidal or very large TIFF / OME-TIFF: `TiffRegionReader`, which reads and decodes only the
  tiles or strips a window touches, straight from the file with tifffile.
- PNG, JPEG, BMP and small stripped TIFFs: decoded whole by `core.image.slide` and wrapped in an
  `ArrayReader`, so the whole-slide pipeline takes any image.

Every reader returns level-0 HWC uint8 RGB windows of exactly the requested size; the part of a
window outside the slide is plasma white (`OUTSIDE_FILL`), so callers may ask for windows with a
margin at the slide edge.
"""

from __future__ import annotations

import contextlib
import re
import threading
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path
from types import TracebackType

import numpy as np
import tifffile

from blastq.core.common import InvalidConfig, InvalidSlide, SlideTooLarge
from blastq.core.common import file_sha256 as streamed_sha256
from blastq.core.image import slide as slide_io
from blastq.core.image.preprocessing import check_rgb

try:  # OpenSlide is optional at runtime: without it vendor formats are refused with a clear message.
    import openslide
except (ImportError, OSError):  # OSError: the python binding is there but the library is not
    openslide = None

# Whole slides are read window by window, so the pixel limit guards against nonsense headers, not
# memory: 20 gigapixels is a 140k x 140k slide, larger than any 40x scan of a smear.
WSI_MAX_PIXELS = 20_000_000_000
# Plasma white: what a window gets where it lies outside the slide (or on a tile that was never scanned).
OUTSIDE_FILL = 245
# One read_region call may not ask for more than this (768 MiB of RGB): a window, not the slide.
MAX_REGION_PIXELS = 256 * 1024 * 1024
# A tile or strip larger than this (48 MiB decoded RGB) defeats reading by region.
MAX_SEGMENT_PIXELS = 16 * 1024 * 1024
# Decoded tiles kept for overlapping windows: 64 MiB is 85 RGB tiles of 512 x 512 or 341 of 256 x 256.
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024

TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_IMAGE_MAGICS = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM")
_JPEG_COMPRESSIONS = frozenset({6, 7, 33007, 34892})
_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")
# OME units of PhysicalSizeX, in microns.
_OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}


class SlideReader(ABC):
    """A slide read window by window: level-0 HWC uint8 RGB regions of a possibly huge image."""

    name: str  # file name
    path: Path
    width: int  # level-0 pixels
    height: int
    mpp: float | None  # level-0 microns per pixel from the metadata; None if absent or refused
    format: str  # "tiff", "ome-tiff", "openslide:<vendor>", "image"
    # Why the metadata's pixel size was refused (outside slide.METADATA_MPP_RANGE), or None. Refused only
    # when it would be used: a user-given mpp makes the slide usable (core.pipeline.wholeslide.resolve_mpp).
    mpp_refused: str | None = None

    def has_data(self, x: int, y: int, width: int, height: int) -> bool:
        """False only when the level-0 window is known to hold no scanned pixels (sparse TIFF tiles)."""
        return True

    def read_region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """The level-0 window at (x, y) as HWC uint8 RGB (height, width, 3); outside the slide is 245."""
        x, y, width, height = _check_window(self.name, x, y, width, height)
        out = np.full((height, width, 3), OUTSIDE_FILL, np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, self.width), min(y + height, self.height)
        if x0 < x1 and y0 < y1:
            self._fill(out[y0 - y : y1 - y, x0 - x : x1 - x], x0, y0)
        return out

    @abstractmethod
    def _fill(self, dest: np.ndarray, x: int, y: int) -> None:
        """Write the slide pixels at (x, y) into dest (a view lying wholly inside the slide)."""

    @abstractmethod
    def close(self) -> None:
        """Release the file; the reader cannot be used afterwards."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.width}x{self.height} {self.format} mpp={self.mpp}>"


def _check_window(name: str, x: int, y: int, width: int, height: int) -> tuple[int, int, int, int]:
    values = []
    for label, value in (("x", x), ("y", y), ("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise InvalidConfig(f"read_region {label}={value!r} must be an integer", path=name)
        values.append(int(value))
    if values[2] < 0 or values[3] < 0:
        raise InvalidConfig(f"read_region size {values[2]}x{values[3]} must not be negative", path=name)
    if values[2] * values[3] > MAX_REGION_PIXELS:
        raise InvalidConfig(
            f"read_region of {values[2]}x{values[3]} exceeds {MAX_REGION_PIXELS} pixels; read smaller windows",
            path=name,
        )
    return values[0], values[1], values[2], values[3]


# --- in-memory images -------------------------------------------------------------------------------


class ArrayReader(SlideReader):
    """An in-memory HWC uint8 RGB image behind the reader interface (PNG/JPEG/BMP, small TIFFs, tests)."""

    def __init__(
        self,
        rgb: np.ndarray,
        name: str,
        mpp: float | None = None,
        *,
        path: str | Path | None = None,
        mpp_refused: str | None = None,
    ) -> None:
        try:
            check_rgb(rgb)
        except InvalidSlide as exc:
            raise InvalidSlide(f"{exc}", path=name) from exc
        slide_io.check_user_mpp(mpp, name)
        self._rgb: np.ndarray | None = rgb
        self.name = name
        self.path = Path(path) if path is not None else Path(name)
        self.height, self.width = int(rgb.shape[0]), int(rgb.shape[1])
        self.mpp = None if mpp is None else float(mpp)
        self.mpp_refused = mpp_refused
        self.format = "image"

    def _fill(self, dest: np.ndarray, x: int, y: int) -> None:
        if self._rgb is None:
            raise InvalidSlide("reader is closed", path=self.name)
        dest[...] = self._rgb[y : y + dest.shape[0], x : x + dest.shape[1]]

    def close(self) -> None:
        self._rgb = None


# --- TIFF and OME-TIFF ------------------------------------------------------------------------------


class TiffRegionReader(SlideReader):
    """Level 0 of a tiled or stripped (OME-)TIFF, decoding only the tiles/strips a window touches.

    Decoded segments (already RGB) are kept in an LRU cache bounded by `cache_bytes`, so overlapping
    windows do not decode a tile twice. `segments_decoded` counts decodes (for tests and profiling).
    Calls are serialised by a lock, so one reader may be shared between threads.
    """

    def __init__(
        self, path: str | Path, *, max_pixels: int = WSI_MAX_PIXELS, cache_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        self.path = Path(path)
        self.name = self.path.name
        label = str(self.path)
        _check_file(self.path)
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as exc:
            raise InvalidSlide(f"unreadable TIFF header ({_reason(exc)})", path=label) from exc
        try:
            self._open(label, max_pixels)
        except BaseException:
            self._tif.close()
            raise
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = int(cache_bytes)
        self._lock = threading.Lock()
        self.segments_decoded = 0

    def _open(self, label: str, max_pixels: int) -> None:
        tif = self._tif
        try:
            page = _level0_page(tif, label)
            self.width, self.height = int(page.imagewidth), int(page.imagelength)
            if self.width <= 0 or self.height <= 0:
                raise InvalidSlide(f"zero-size image ({self.width}x{self.height})", path=label)
            if self.width * self.height > max_pixels:
                raise SlideTooLarge(
                    f"{self.width}x{self.height} pixels exceeds the maximum of {max_pixels}", path=label
                )
            self._check_pixels(page, label)
            self._layout(page, label)
            offsets = np.asarray(page.dataoffsets, np.int64)
            counts = np.asarray(page.databytecounts, np.int64)
            if offsets.size != self._n_segments or counts.size != self._n_segments:
                raise InvalidSlide(
                    f"corrupt TIFF ({offsets.size} data offsets for {self._n_segments} tiles/strips)",
                    path=label,
                )
            size = self.path.stat().st_size
            if offsets.size and int((offsets + counts)[counts > 0].max(initial=0)) > size:
                raise InvalidSlide("truncated TIFF (image data runs past the end of the file)", path=label)
            self.mpp, self.mpp_refused = _checked_mpp(*_tiff_level0_mpp(tif, page), label)
        except InvalidSlide:
            raise
        except Exception as exc:
            raise InvalidSlide(f"unreadable TIFF ({_reason(exc)})", path=label) from exc
        self._page = page
        self._offsets, self._counts = offsets, counts
        # Per tile/strip of a plane: whether the file holds its data (offset and byte count not 0); with
        # separate planes a pixel needs every plane's.
        has = (offsets > 0) & (counts > 0)
        self._present = np.logical_and.reduce(has.reshape(-1, self._per_plane), axis=0)
        self._decode = page.decode
        self._jpeg = page.compression in _JPEG_COMPRESSIONS
        self.format = "ome-tiff" if tif.is_ome else "tiff"

    def _check_pixels(self, page: tifffile.TiffPage, label: str) -> None:
        photometric = page.photometric
        colour = photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
        grey = photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE)
        if photometric == tifffile.PHOTOMETRIC.YCBCR and page.compression not in _JPEG_COMPRESSIONS:
            # tifffile converts YCbCr to RGB only inside JPEG tiles.
            raise InvalidSlide("unsupported TIFF: YCbCr pixels without JPEG compression", path=label)
        if not (colour or grey):
            raise InvalidSlide(
                f"unsupported TIFF colour space {photometric.name} (need RGB or greyscale)", path=label
            )
        if page.dtype not in (np.uint8, np.uint16) or page.bitspersample not in (8, 16):
            raise InvalidSlide(
                f"unsupported TIFF pixel type {page.bitspersample}-bit {page.dtype} (need 8- or 16-bit unsigned)",
                path=label,
            )
        spp = int(page.samplesperpixel)
        if (colour and spp not in (3, 4)) or (grey and spp not in (1, 2)):
            raise InvalidSlide(
                f"unsupported TIFF with {spp} samples per pixel in {photometric.name} (need RGB, RGBA or grey)",
                path=label,
            )
        if int(page.imagedepth) != 1:
            raise InvalidSlide(f"unsupported volumetric TIFF (image depth {page.imagedepth})", path=label)
        extra = tuple(page.extrasamples or ())
        self._invert = photometric == tifffile.PHOTOMETRIC.MINISWHITE
        self._premultiplied = bool(extra) and extra[0] == 1
        # Unspecified extra samples (not alpha) carry nothing to show: keep the colour samples only.
        self._keep_samples = spp - len(extra) if extra and extra[0] == 0 else spp
        self._separate = page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and spp > 1
        self._samples = spp

    def _layout(self, page: tifffile.TiffPage, label: str) -> None:
        if page.is_tiled:
            self._seg_w, self._seg_h = int(page.tilewidth), int(page.tilelength)
        else:
            self._seg_w, self._seg_h = (
                self.width,
                max(1, min(int(page.rowsperstrip or self.height), self.height)),
            )
        self._tiled = bool(page.is_tiled)
        self._nx = -(-self.width // self._seg_w)
        self._ny = -(-self.height // self._seg_h)
        self._per_plane = self._nx * self._ny
        self._n_segments = self._per_plane * (self._samples if self._separate else 1)
        if self._seg_w * self._seg_h > MAX_SEGMENT_PIXELS:
            if not self._tiled and self._ny == 1:
                what = f"a single-strip TIFF of {self.width}x{self.height}"
            else:
                what = f"a TIFF of {self.width}x{self.height} in segments of {self._seg_w}x{self._seg_h}"
            raise InvalidSlide(
                f"{what} cannot be read region by region; save it tiled (e.g. tile 512)", path=label
            )

    def has_data(self, x: int, y: int, width: int, height: int) -> bool:
        """Whether any tile/strip under the window holds data (offset and byte count not 0), header only."""
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, self.width), min(y + height, self.height)
        if x0 >= x1 or y0 >= y1:
            return False
        rows = slice(y0 // self._seg_h, (y1 - 1) // self._seg_h + 1)
        cols = slice(x0 // self._seg_w, (x1 - 1) // self._seg_w + 1)
        return bool(self._present.reshape(self._ny, self._nx)[rows, cols].any())

    def _fill(self, dest: np.ndarray, x: int, y: int) -> None:
        h, w = dest.shape[:2]
        sw, sh = self._seg_w, self._seg_h
        with self._lock:
            if self._tif.filehandle.closed:
                raise InvalidSlide("reader is closed", path=self.name)
            for ty in range(y // sh, (y + h - 1) // sh + 1):
                for tx in range(x // sw, (x + w - 1) // sw + 1):
                    sx0, sy0 = tx * sw, ty * sh
                    if not self._present[ty * self._nx + tx]:
                        # Never scanned (no data in the file): blank slide, nothing to read or decode.
                        ax0, ay0 = max(x, sx0), max(y, sy0)
                        ax1, ay1 = min(x + w, sx0 + sw), min(y + h, sy0 + sh)
                        dest[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = OUTSIDE_FILL
                        continue
                    seg = self._segment(ty * self._nx + tx)
                    ax0, ay0 = max(x, sx0), max(y, sy0)
                    ax1, ay1 = min(x + w, sx0 + seg.shape[1]), min(y + h, sy0 + seg.shape[0])
                    dest[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = seg[
                        ay0 - sy0 : ay1 - sy0, ax0 - sx0 : ax1 - sx0
                    ]

    def _segment(self, index: int) -> np.ndarray:
        """Tile/strip `index` (within one plane) as HWC uint8 RGB, cropped to the image."""
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        ty, tx = divmod(index, self._nx)
        seg_h = min(self._seg_h, self.height - ty * self._seg_h)
        seg_w = min(self._seg_w, self.width - tx * self._seg_w)
        planes = [index + s * self._per_plane for s in range(self._samples)] if self._separate else [index]
        decoded = [self._decode_one(i) for i in planes]
        if any(d is None for d in decoded):
            # A tile with no data (offset or byte count 0) was never scanned: blank slide.
            rgb = np.full((seg_h, seg_w, 3), OUTSIDE_FILL, np.uint8)
        else:
            arr = decoded[0] if len(decoded) == 1 else np.concatenate(decoded, axis=2)
            rgb = self._to_rgb(arr[:seg_h, :seg_w])
        self.segments_decoded += 1
        if rgb.nbytes <= self._cache_limit:
            self._cache[index] = rgb
            self._cache_bytes += rgb.nbytes
            while self._cache_bytes > self._cache_limit:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.nbytes
        return rgb

    def _decode_one(self, index: int) -> np.ndarray | None:
        offset, count = int(self._offsets[index]), int(self._counts[index])
        if offset == 0 or count == 0:
            return None
        fh = self._tif.filehandle
        fh.seek(offset)
        data = fh.read(count)
        if len(data) != count:
            raise InvalidSlide(f"truncated TIFF (tile {index} runs past the end of the file)", path=self.path)
        kwargs = (
            {"jpegtables": self._page.jpegtables, "jpegheader": self._page.jpegheader} if self._jpeg else {}
        )
        try:
            segment, _, _ = self._decode(data, index, **kwargs)
        except Exception as exc:
            raise InvalidSlide(
                f"cannot decode TIFF tile/strip {index} ({_reason(exc)})", path=self.path
            ) from exc
        if segment is None:
            return None
        return segment[0]  # (depth=1, length, width, contig samples) -> HWC

    def _to_rgb(self, arr: np.ndarray) -> np.ndarray:
        if self._keep_samples < arr.shape[2]:
            arr = arr[:, :, : self._keep_samples]
        if self._invert:
            arr = slide_io.invert(arr)
        # uint16 is scaled by the dtype's max (65535 -> 255, rounded), as core.image.slide does.
        return slide_io.to_rgb8(arr, bgr=False, premultiplied=self._premultiplied)

    def cache_info(self) -> dict[str, int]:
        """Segments and bytes held by the decode cache, and its byte limit."""
        return {"segments": len(self._cache), "bytes": self._cache_bytes, "limit_bytes": self._cache_limit}

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cache_bytes = 0
            self._tif.close()


def _level0_page(tif: tifffile.TiffFile, label: str) -> tifffile.TiffPage:
    """The full-resolution page: the first level of the first series (OME and SubIFD pyramids too)."""
    if not tif.series:
        page = tif.pages.first
    else:
        level = tif.series[0].levels[0]
        if len(level.pages) > 1:
            raise InvalidSlide(
                f"unsupported TIFF with {len(level.pages)} image planes per level "
                f"(series shape {level.shape}, axes {level.axes}); need one RGB or grey plane",
                path=label,
            )
        page = level.pages[0]
    if page is None:
        raise InvalidSlide("TIFF without image data", path=label)
    if not isinstance(page, tifffile.TiffPage):
        page = page.aspage()
    return page


def _tiff_level0_mpp(tif: tifffile.TiffFile, page: tifffile.TiffPage) -> tuple[float | None, str]:
    """Microns per pixel from OME-XML, an Aperio description, or the resolution tags, in that order;
    with where it was found (for messages)."""
    if tif.is_ome:
        value = _ome_mpp(tif.ome_metadata or "")
        if value is not None:
            return value, "OME-XML PhysicalSizeX"
    description = tif.pages.first.description or ""
    if description.startswith("Aperio"):
        match = _APERIO_MPP.search(description)
        if match:
            with contextlib.suppress(ValueError):  # e.g. "1.2.3": fall through to the resolution tags
                return float(match.group(1)), "Aperio description's MPP"
    if page is tif.pages.first or page.offset == tif.pages.first.offset:
        return slide_io.tiff_mpp(tif), "TIFF resolution tags"
    return None, ""


def _ome_mpp(xml: str) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] == "Pixels":
            size = element.get("PhysicalSizeX")
            if size is None:
                return None
            factor = _OME_UNITS_UM.get(element.get("PhysicalSizeXUnit", "µm"))
            try:
                return float(size) * factor if factor is not None else None
            except ValueError:
                return None
    return None


def _checked_mpp(mpp: float | None, where: str, label: str) -> tuple[float | None, str | None]:
    """(mpp, None) for a plausible metadata pixel size, (None, None) for none or a screen default,
    (None, why) for one no smear has (slide.plausible_metadata_mpp)."""
    try:
        return slide_io.plausible_metadata_mpp(mpp, label, where), None
    except InvalidSlide as exc:
        return None, str(exc)


# --- OpenSlide --------------------------------------------------------------------------------------


class OpenSlideReader(SlideReader):
    """Level 0 of a vendor whole-slide image (SVS, NDPI, MRXS...) through OpenSlide."""

    def __init__(self, path: str | Path, *, max_pixels: int = WSI_MAX_PIXELS) -> None:
        self.path = Path(path)
        self.name = self.path.name
        label = str(self.path)
        _check_file(self.path)
        if openslide is None:
            raise InvalidSlide(
                "reading vendor slides needs OpenSlide (pip install openslide-python openslide-bin)",
                path=label,
            )
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise InvalidSlide("not a slide format OpenSlide can read", path=label) from exc
        except (openslide.OpenSlideError, OSError) as exc:
            raise InvalidSlide(f"OpenSlide cannot open the slide ({_reason(exc)})", path=label) from exc
        try:
            self.width, self.height = (int(v) for v in self._slide.dimensions)
            if self.width <= 0 or self.height <= 0:
                raise InvalidSlide(f"zero-size slide ({self.width}x{self.height})", path=label)
            if self.width * self.height > max_pixels:
                raise SlideTooLarge(
                    f"{self.width}x{self.height} pixels exceeds the maximum of {max_pixels}", path=label
                )
            properties = self._slide.properties
            vendor = properties.get(openslide.PROPERTY_NAME_VENDOR) or "unknown"
            try:
                mpp = float(properties.get(openslide.PROPERTY_NAME_MPP_X, "nan"))
            except ValueError:
                mpp = None
        except BaseException:
            self._slide.close()
            raise
        self.mpp, self.mpp_refused = _checked_mpp(mpp, "OpenSlide property openslide.mpp-x", label)
        self.format = f"openslide:{vendor}"
        self._lock = threading.Lock()
        self._closed = False

    def _fill(self, dest: np.ndarray, x: int, y: int) -> None:
        h, w = dest.shape[:2]
        with self._lock:
            if self._closed:
                raise InvalidSlide("reader is closed", path=self.name)
            try:
                rgba = np.asarray(self._slide.read_region((x, y), 0, (w, h)))
            except openslide.OpenSlideError as exc:
                raise InvalidSlide(
                    f"OpenSlide cannot read region ({x}, {y}, {w}x{h}) ({_reason(exc)})", path=self.path
                ) from exc
        # Transparent pixels lie outside the scanned area: composite over white, as OpenSlide advises.
        alpha = rgba[:, :, 3:4].astype(np.uint16)
        dest[...] = ((rgba[:, :, :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255).astype(
            np.uint8
        )

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._slide.close()
                self._closed = True


def _openslide_vendor(path: Path) -> str | None:
    """OpenSlide's format name for the file ("aperio", "generic-tiff"...), or None."""
    if openslide is None:
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError, ValueError):
        return None


# --- opening ----------------------------------------------------------------------------------------


def open_slide_reader(path: str | Path, *, max_pixels: int | None = None) -> SlideReader:
    """Open an image or whole-slide file for reading by region (default limit WSI_MAX_PIXELS)."""
    path = Path(path)
    limit = WSI_MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise InvalidConfig(f"max_pixels={max_pixels!r} must be a positive integer", path=path)
    head = _check_file(path)
    kind = _classify(path, head)
    if kind == "openslide":
        if head.startswith(TIFF_MAGICS):
            _check_tiff_extent(path)
        return OpenSlideReader(path, max_pixels=limit)
    if kind == "tiff-regions":
        return TiffRegionReader(path, max_pixels=limit)
    if kind == "whole":
        return _read_whole(path, limit)
    hint = (
        ""
        if openslide is not None
        else " (OpenSlide is not installed, so vendor formats such as MRXS are not recognised)"
    )
    raise InvalidSlide(
        f"not a PNG, JPEG, BMP, TIFF or whole-slide image (unrecognised leading bytes){hint}", path=path
    )


def is_whole_slide(path: str | Path) -> bool:
    """True for OpenSlide vendor formats and tiled, pyramidal or very large TIFFs (header only)."""
    path = Path(path)
    try:
        head = _check_file(path)
    except InvalidSlide:
        return False  # not a regular, readable file: core.image.slide gives the reason
    return _classify(path, head) in ("openslide", "tiff-regions")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of an image file, streamed (core.common.files); InvalidSlide, naming the file, for what is
    not a readable regular file or changes size while it is read."""
    path = Path(path)
    slide_io.check_regular_file(path)
    try:
        return streamed_sha256(path)
    except OSError as exc:
        raise InvalidSlide(f"cannot read file ({exc.strerror or exc})", path=path) from exc


def _check_file(path: Path) -> bytes:
    """Refuse a missing, directory, non-regular (device, pipe, socket), unreadable or empty path; return
    the leading bytes."""
    slide_io.check_regular_file(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise InvalidSlide(f"cannot read file ({exc.strerror or exc})", path=path) from exc
    if not head:
        raise InvalidSlide("empty file", path=path)
    return head


def _classify(path: Path, head: bytes) -> str:
    """'openslide', 'tiff-regions', 'whole' (decode whole with core.image.slide) or 'unknown'."""
    vendor = _openslide_vendor(path)
    if vendor is not None and vendor != "generic-tiff":
        return "openslide"
    if head.startswith(TIFF_MAGICS):
        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages.first
                levels = len(tif.series[0].levels) if tif.series else 1
                pixels = int(page.imagewidth) * int(page.imagelength)
                tiled = bool(page.is_tiled)
        except Exception:
            return "whole"  # core.image.slide gives the precise error for a broken TIFF
        # Stripped TIFFs up to read_slide's limit are decoded whole, as read_slide would.
        if tiled or levels > 1 or pixels > slide_io.DEFAULT_MAX_PIXELS:
            return "tiff-regions"
        return "whole"
    if head.startswith(_IMAGE_MAGICS):
        return "whole"
    return "unknown"


def _check_tiff_extent(path: Path) -> None:
    """Refuse a TIFF-based vendor slide whose level-0 data runs past the end of the file."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
    except Exception:
        return  # not parseable by tifffile (some vendor quirk): OpenSlide decides
    if ends.size and int(ends.max()) > path.stat().st_size:
        raise InvalidSlide("truncated slide (image data runs past the end of the file)", path=path)


def _read_whole(path: Path, max_pixels: int) -> ArrayReader:
    """Decode a PNG/JPEG/BMP/small TIFF whole with core.image.slide and wrap it."""
    label = str(path)
    limit = min(max_pixels, slide_io.DEFAULT_MAX_PIXELS)
    # No image format stores pixels in much more than their raw size: refuse before reading the bytes.
    size = slide_io.check_regular_file(path).st_size
    if size > 4 * limit + (1 << 20):
        raise SlideTooLarge(
            f"file of {size} bytes is too large to decode whole "
            f"(over {limit} pixels); convert it to a tiled TIFF",
            path=label,
        )
    data = slide_io.read_file(path)
    width, height = slide_io.image_size(data, label)
    if width * height > limit:
        raise SlideTooLarge(
            f"{width}x{height} pixels exceeds the maximum of {limit} for an image decoded whole; "
            "convert it to a tiled TIFF",
            path=label,
        )
    # A placeholder mpp skips the red-cell estimate: here the caller decides what to do without one.
    decoded = slide_io.decode_slide(data, label, mpp=1.0, max_pixels=limit)
    try:
        mpp, refused = slide_io.metadata_mpp(data, label), None
    except InvalidSlide as exc:  # refused only if it is needed: a user mpp makes the image usable
        mpp, refused = None, str(exc)
    return ArrayReader(decoded.rgb, path.name, mpp=mpp, path=path, mpp_refused=refused)


def _reason(exc: BaseException) -> str:
    """An exception as one short line for a message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
