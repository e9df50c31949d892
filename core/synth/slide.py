"""Synthetic whole-slide images: a mosaic of `core.synth.field` fields written as a tiled, pyramidal TIFF.

Memory stays bounded by one band of fields (field_px rows x the slide width x 3 bytes): tiles are
handed to tifffile from a generator. Pyramid levels are built in a second pass, each level from the
one above read back band by band through `TiffRegionReader`, into temporary files beside the target;
the final file then copies the already-compressed tiles of every level without re-encoding them.

Layouts:
- default: level 0 plus reduced levels as SubIFDs (subfiletype 1), resolution tags in pixels per cm;
- ome=True: the same as an OME-TIFF with PhysicalSizeX/Y in microns;
- svs=True: an Aperio SVS (first ImageDescription "Aperio Image Library ...|MPP = ..."), levels as
  top-level pages, which OpenSlide opens as "aperio" with zlib, LZW, uncompressed or JPEG tiles.
  OpenSlide's generic-tiff reader sees level 0 only of either layout, so SVS is the way to give
  OpenSlide a pyramid.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import tifffile

from blastq.core.common import InvalidConfig
from blastq.core.image import OUTSIDE_FILL, TiffRegionReader
from blastq.core.outputs import write_levels
from blastq.core.synth.field import generate_field

# Reduced levels halve until the longer side is at most this many pixels.
PYRAMID_MIN_PX = 1024


def write_synthetic_slide(
    path: str | Path,
    width: int,
    height: int,
    *,
    seed: int = 0,
    mpp: float = 0.2,
    field_px: int = 2048,
    tile: int = 512,
    pyramid: bool = True,
    ome: bool = False,
    svs: bool = False,
    compression: str | None = "zlib",
    blast_fraction: float = 0.3,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write a width x height synthetic smear as a tiled TIFF; return its size, levels and truth counts."""
    path = Path(path)
    _check_args(width, height, mpp, field_px, tile, ome, svs)
    start = time.perf_counter()
    sizes = [(width, height)]
    while pyramid and max(sizes[-1]) > PYRAMID_MIN_PX:
        w, h = sizes[-1]
        sizes.append(((w + 1) // 2, (h + 1) // 2))
    counts = {"fields": 0, "white_cells": 0, "blasts": 0}
    bands = _field_bands(width, height, seed, mpp, field_px, blast_fraction, counts, progress)
    # Level-0 raw size decides BigTIFF: compressed data is smaller, so this errs on the safe side.
    options = {
        "compression": compression,
        "tile": (tile, tile),
        "photometric": "rgb",
        "dtype": np.uint8,
        "bigtiff": width * height * 3 * 4 // 3 > 2**31 - 2**24,
    }
    if len(sizes) == 1:
        _write_levels(path, [_tiles(bands, width, height, tile)], sizes, mpp, ome, svs, options)
    else:
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
            level_paths = [Path(tmp) / f"level{k}.tif" for k in range(len(sizes))]
            _write_levels(
                level_paths[0], [_tiles(bands, width, height, tile)], sizes[:1], mpp, False, False, options
            )
            for k in range(1, len(sizes)):
                w, h = sizes[k]
                halved = _tiles(_halved_bands(level_paths[k - 1], w, h, tile), w, h, tile)
                _write_levels(level_paths[k], [halved], [sizes[k]], mpp * 2**k, False, False, options)
            _write_levels(path, [_encoded_tiles(p) for p in level_paths], sizes, mpp, ome, svs, options)
    return {
        "path": str(path),
        "width": width,
        "height": height,
        "mpp": mpp,
        "levels": sizes,
        **counts,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _check_args(width: int, height: int, mpp: float, field_px: int, tile: int, ome: bool, svs: bool) -> None:
    if width < 1 or height < 1:
        raise InvalidConfig(f"slide size must be positive, got {width}x{height} px")
    if field_px < 16:
        raise InvalidConfig(f"field_px must be at least 16, got {field_px}")
    if tile < 16 or tile % 16:
        raise InvalidConfig(f"tile must be a positive multiple of 16 (a TIFF rule), got {tile}")
    if not 0.02 <= mpp <= 5.0:
        raise InvalidConfig(f"mpp must be within 0.02..5 microns per pixel, got {mpp}")
    if ome and svs:
        raise InvalidConfig("choose one of ome=True and svs=True")


def _field_bands(
    width: int,
    height: int,
    seed: int,
    mpp: float,
    field_px: int,
    blast_fraction: float,
    counts: dict,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[np.ndarray]:
    """Rows of fields (HWC uint8, field_px rows, the last one shorter), counting their truth."""
    columns = math.ceil(width / field_px)
    for row, y in enumerate(range(0, height, field_px)):
        band_h = min(field_px, height - y)
        band = np.empty((band_h, width, 3), np.uint8)
        for col, x in enumerate(range(0, width, field_px)):
            band_w = min(field_px, width - x)
            # Edge fields are rendered at their cropped size, so the truth covers exactly the slide.
            # One stain for the whole slide (a slide is stained once); layout, cells and light per field.
            field = generate_field(
                seed + row * columns + col,
                band_h,
                band_w,
                mpp=mpp,
                blast_fraction=blast_fraction,
                stain_seed=seed,
            )
            band[:, x : x + band_w] = field.image
            counts["fields"] += 1
            if progress:
                progress(counts["fields"], columns * math.ceil(height / field_px))
            counts["white_cells"] += len(field.cells)
            counts["blasts"] += sum(cell.is_blast for cell in field.cells)
        yield band


def _halved_bands(source: Path, width: int, height: int, tile: int) -> Iterator[np.ndarray]:
    """The level below `source`, `tile` rows at a time: 2 x 2 means of bands read back by region."""
    with TiffRegionReader(source, cache_bytes=0) as reader:  # bands never overlap: nothing to reuse
        for y in range(0, height, tile):
            rows = min(tile, height - y)
            # Odd edges average with the plasma-white fill beyond the slide.
            band = reader.read_region(0, 2 * y, 2 * width, 2 * rows)
            yield cv2.resize(band, (width, rows), interpolation=cv2.INTER_AREA)


def _tiles(bands: Iterator[np.ndarray], width: int, height: int, tile: int) -> Iterator[np.ndarray]:
    """Row-major (tile, tile, 3) tiles from bands of rows of any height; edge tiles padded with 245."""
    pending: list[np.ndarray] = []
    have = 0
    for y in range(0, height, tile):
        rows = min(tile, height - y)
        while have < rows:
            band = next(bands)
            pending.append(band)
            have += band.shape[0]
        block = np.concatenate(pending) if len(pending) > 1 else pending[0]
        strip, rest = block[:rows], block[rows:]
        pending, have = ([rest] if len(rest) else []), len(rest)
        for x in range(0, width, tile):
            piece = strip[:, x : x + tile]
            if piece.shape[:2] != (tile, tile):
                padded = np.full((tile, tile, 3), OUTSIDE_FILL, np.uint8)
                padded[: piece.shape[0], : piece.shape[1]] = piece
                piece = padded
            yield np.ascontiguousarray(piece)


def _encoded_tiles(source: Path) -> Iterator[bytes]:
    """The compressed tiles of a single-level tiled TIFF, in index order, without decoding them."""
    with tifffile.TiffFile(source) as tif:
        page = tif.pages.first
        fh = tif.filehandle
        for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
            fh.seek(offset)
            yield fh.read(count)


def _write_levels(
    path: Path,
    levels: list[Iterator],
    sizes: list[tuple[int, int]],
    mpp: float,
    ome: bool,
    svs: bool,
    options: dict,
) -> None:
    """Level 0 and its reduced levels (SubIFDs, or top-level pages for SVS) from tile iterators, through
    core.outputs.tiffout's one pyramid writer."""
    options = dict(options)
    bigtiff = options.pop("bigtiff")
    width, height = sizes[0]
    first: dict = {}
    if ome:
        first["metadata"] = {
            "axes": "YXS",
            "PhysicalSizeX": mpp,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": mpp,
            "PhysicalSizeYUnit": "µm",
        }
    if svs:
        first["description"] = _aperio_description(width, height, options["tile"][0], mpp, options)
    write_levels(
        path,
        levels,
        [(h, w, 3) for w, h in sizes],
        level_mpps=[mpp * width / w for w, _ in sizes],
        bigtiff=bigtiff,
        first=first,
        reduced_as="pages" if svs else "subifds",
        ome=ome,
        **options,
    )


def _aperio_description(width: int, height: int, tile: int, mpp: float, options: dict) -> str:
    compression = str(options["compression"] or "raw").upper()
    magnification = round(10.0 / mpp)  # 0.25 um/px is a 40x scan
    return (
        f"Aperio Image Library v10.0.0\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) "
        f"{compression}|AppMag = {magnification}|MPP = {mpp}"
    )
