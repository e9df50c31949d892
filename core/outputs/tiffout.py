"""Big 2-D maps (labels, masks, instance ids) written as tiled, compressed, pyramidal TIFF in bounded memory.

The whole-slide pipeline makes its maps band by band and never holds a whole one. PyramidTiffSink takes
rows top to bottom and spools every pyramid level to its own raw temporary file (beside the output, or in
a given scratch folder) as the rows arrive (level k is arr[::2**k, ::2**k], nearest neighbour, because
labels must never be interpolated). close() then
streams each level back one stripe of tile rows at a time into tifffile, so peak memory is about one
stripe (tile x width x itemsize), not the map. Sub-resolutions are SubIFDs of the level-0 page with
NewSubfileType 1, the layout QuPath, OME and tifffile read as a pyramid.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import tifffile

# Classic TIFF addresses 4 GiB; switch to BigTIFF well before the compressed file could get near that.
BIGTIFF_ABOVE_BYTES = 2**31
COMPRESSIONS = ("zlib", "zstd", "lzw", "none")


def write_levels(
    path: str | os.PathLike[str],
    levels: Sequence[Iterable[np.ndarray]],
    shapes: Sequence[tuple[int, ...]],
    *,
    level_mpps: Sequence[float] | None,
    bigtiff: bool,
    first: Mapping[str, Any] | None = None,
    reduced_as: str = "subifds",
    ome: bool = False,
    **options: Any,
) -> None:
    """Write a tiled pyramid, the one writer of blastq's pyramidal TIFFs (label maps, synthetic slides).

    `levels[k]` yields level k's tiles in TIFF order (row-major), `shapes[k]` its (height, width[,
    samples]). Reduced levels are SubIFDs of level 0 with NewSubfileType 1 (`reduced_as="subifds"`: the
    layout QuPath, OME and tifffile read as a pyramid) or further top-level pages ("pages": Aperio SVS).
    `level_mpps[k]` gives level k's resolution tags; `first` adds level 0's tags (description, metadata);
    `options` are tifffile's, common to every level (tile, dtype, compression, photometric). tifffile
    gathers at most one stripe of tiles at a time, so memory stays one stripe of the widest level."""
    if reduced_as not in ("subifds", "pages"):
        raise ValueError(f"reduced_as must be 'subifds' or 'pages', got {reduced_as!r}")
    tile_h, tile_w = options["tile"]
    itemsize = np.dtype(options["dtype"]).itemsize
    with tifffile.TiffWriter(path, bigtiff=bigtiff, ome=ome) as writer:
        for k, (tiles, shape) in enumerate(zip(levels, shapes, strict=True)):
            samples = shape[2] if len(shape) > 2 else 1
            kwargs: dict[str, Any] = {
                "shape": shape,
                "metadata": None,  # no tifffile "shaped" JSON unless `first` gives metadata
                # tifffile's encoder threads gather up to `buffersize` bytes of tiles at once (512 MB by
                # default); hold that to one stripe's tiles so memory stays bounded.
                "buffersize": -(-shape[1] // tile_w) * tile_h * tile_w * samples * itemsize,
                **options,
            }
            if level_mpps is not None:
                px_per_cm = 1e4 / level_mpps[k]
                kwargs.update(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
            if k == 0:
                kwargs.update(first or {})
                if reduced_as == "subifds" and len(shapes) > 1:
                    kwargs["subifds"] = len(shapes) - 1
            else:
                kwargs["subfiletype"] = 0 if reduced_as == "pages" else 1
            writer.write(tiles, **kwargs)


def pyramid_shapes(height: int, width: int, min_level_px: int) -> list[tuple[int, int]]:
    """Level shapes from full size, halving (shape of arr[::2, ::2]) until both sides <= min_level_px."""
    shapes = [(height, width)]
    while max(shapes[-1]) > min_level_px:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


class PyramidTiffSink:
    """Append rows of a (height, width) map top to bottom; close() writes a tiled, compressed, pyramidal TIFF.

    Use as a context manager: close on success, abort on exception. Errors in use are ValueError.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        height: int,
        width: int,
        dtype: npt.DTypeLike,
        *,
        mpp: float | None = None,
        tile: int = 512,
        compression: str = "zlib",
        min_level_px: int = 1024,
        description: str | None = None,
        scratch_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.height = int(height)
        self.width = int(width)
        self.dtype = np.dtype(dtype)
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"map size must be positive, got {height}x{width} for {self.path}")
        if self.dtype.kind not in "iuf" or not self.dtype.isnative:
            raise ValueError(f"dtype must be numeric in native byte order, got {self.dtype} for {self.path}")
        if tile <= 0 or tile % 16:
            raise ValueError(f"tile must be a positive multiple of 16 (a TIFF rule), got {tile}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        if min_level_px < 1:
            raise ValueError(f"min_level_px must be >= 1, got {min_level_px}")
        if mpp is not None and not mpp > 0:
            raise ValueError(f"mpp must be positive, got {mpp}")
        if not self.path.parent.is_dir():
            raise ValueError(f"output folder does not exist: {self.path.parent}")
        # Where the levels are spooled (default beside the output); core.pipeline.scratch folders are removed
        # even when the run is killed, at the next run's start.
        spool = Path(scratch_dir) if scratch_dir is not None else self.path.parent
        if not spool.is_dir():
            raise ValueError(f"scratch folder does not exist: {spool}")
        self.mpp = mpp
        self.tile = tile
        self.compression = compression
        self.description = description
        self.level_shapes = pyramid_shapes(self.height, self.width, min_level_px)
        self.rows_written = 0
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._state = "open"  # open -> closed | aborted
        self._raw_paths: list[Path] = []
        self._raw_files: list[IO[bytes]] = []
        try:
            for level in range(len(self.level_shapes)):
                fd, name = tempfile.mkstemp(dir=spool, prefix=f".{self.path.name}.", suffix=f".l{level}.raw")
                self._raw_paths.append(Path(name))
                self._raw_files.append(os.fdopen(fd, "w+b"))
        except BaseException:
            self._drop_temporaries()
            raise

    def __enter__(self) -> PyramidTiffSink:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state != "aborted":  # a caller who aborted on purpose leaves the block quietly
            self.close()

    @property
    def levels(self) -> int:
        return len(self.level_shapes)

    def write_rows(self, rows: np.ndarray) -> None:
        """Append the next (n, width) rows (n >= 0) of the map, in order."""
        if self._state != "open":
            raise ValueError(f"sink for {self.path} is {self._state}")
        if not isinstance(rows, np.ndarray) or rows.ndim != 2 or rows.shape[1] != self.width:
            shape = getattr(rows, "shape", type(rows).__name__)
            raise ValueError(f"rows must be an (n, {self.width}) array for {self.path}, got {shape}")
        if rows.dtype != self.dtype:
            raise ValueError(f"rows must be {self.dtype} for {self.path}, got {rows.dtype}")
        n = rows.shape[0]
        if self.rows_written + n > self.height:
            raise ValueError(
                f"too many rows for {self.path}: {self.rows_written} written + {n} > height {self.height}"
            )
        start = self.rows_written
        for level, f in enumerate(self._raw_files):
            step = 2**level
            # Rows whose global index is a multiple of step belong to this level.
            part = rows[(-start) % step :: step, ::step]
            if part.any():
                f.write(np.ascontiguousarray(part).data)
            else:  # all background: leave a hole (a sparse file; most of a slide is plasma)
                f.seek(part.nbytes, os.SEEK_CUR)
        self.rows_written += n

    def close(self) -> Path:
        """Write the TIFF at path (atomically) and drop the temporaries; ValueError if rows are missing."""
        if self._state == "closed":
            return self.path
        if self._state == "aborted":
            raise ValueError(f"sink for {self.path} was aborted")
        if self.rows_written != self.height:
            self.abort()
            raise ValueError(
                f"{self.path} not written: only {self.rows_written} of {self.height} rows were given"
            )
        try:
            for f in self._raw_files:
                f.truncate(f.tell())  # a hole at the end still counts: the file gets its full length
                f.flush()
            self._write_tiff(self._partial)
            os.replace(self._partial, self.path)
        except BaseException:
            self.abort()
            raise
        self._drop_temporaries()
        self._state = "closed"
        return self.path

    def abort(self) -> None:
        """Drop the temporaries and any partial output; the sink cannot be used afterwards."""
        if self._state == "closed":
            return
        self._state = "aborted"
        self._drop_temporaries()
        with contextlib.suppress(FileNotFoundError):
            self._partial.unlink()

    def _drop_temporaries(self) -> None:
        for f in self._raw_files:
            f.close()
        for p in self._raw_paths:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self._raw_files = []
        self._raw_paths = []

    def _image_description(self) -> str:
        meta: dict[str, object] = {"mpp": self.mpp, "levels": self.levels}
        if self.description is not None:
            meta["description"] = self.description
        return json.dumps(meta)  # ASCII-only by default, as TIFF requires

    def _write_tiff(self, target: Path) -> None:
        raw_bytes = sum(h * w for h, w in self.level_shapes) * self.dtype.itemsize
        write_levels(
            target,
            [self._tiles(f, shape) for shape, f in zip(self.level_shapes, self._raw_files, strict=True)],
            self.level_shapes,
            level_mpps=None if self.mpp is None else [self.mpp * 2**k for k in range(self.levels)],
            bigtiff=raw_bytes > BIGTIFF_ABOVE_BYTES,
            first={"description": self._image_description()},  # ours, in ImageDescription
            dtype=self.dtype,
            tile=(self.tile, self.tile),
            photometric="minisblack",
            compression=None if self.compression == "none" else self.compression,
        )

    def _tiles(self, f: IO[bytes], shape: tuple[int, int]) -> Iterator[np.ndarray]:
        """The level's tiles in TIFF order (row-major), read back one stripe of tile rows at a time."""
        height, width = shape
        f.seek(0)
        for y in range(0, height, self.tile):
            n = min(self.tile, height - y)
            stripe = np.fromfile(f, dtype=self.dtype, count=n * width)
            if stripe.size != n * width:
                raise OSError(f"temporary raster for {self.path} is short: {f.name}")
            stripe = stripe.reshape(n, width)
            for x in range(0, width, self.tile):
                tile = stripe[:, x : x + self.tile]  # edge tiles are zero-padded by tifffile
                # tifffile keeps the first tile of a page (peek_iterator) until the page is done: as a view
                # it would pin the first stripe too, so that one is a copy.
                yield tile.copy() if y == 0 and x == 0 else tile
            del stripe, tile  # the last tile is a view: drop it too, or it pins this stripe


def read_tiff_level(path: str | os.PathLike[str], level: int = 0) -> np.ndarray:
    """One pyramid level of a TIFF as an array (whole level in memory: for tests and small files)."""
    with tifffile.TiffFile(path) as tif:
        return tif.series[0].levels[level].asarray()


def tiff_levels(path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """The (height, width) of each pyramid level, full size first."""
    with tifffile.TiffFile(path) as tif:
        return [tuple(lv.shape[:2]) for lv in tif.series[0].levels]
