"""Whole slides with bounded memory: chunk by chunk, cells on chunk borders counted once.

A whole slide (tens of thousands of pixels a side) never exists in memory as one array. It is cut
into chunks of `chunk_px` (at the model's scale) in raster order; each chunk is read from the slide
with a margin around it, preprocessed, segmented with the same tiled engine loop as a small image
(`pipeline.segment_prepared`), and its cells extracted and typed. Per-pixel results go to rasters on
disk (`DiskRaster`), which become tiled, compressed, pyramidal TIFFs at the end; memory is that of one
chunk, whatever the slide's size.

Who owns a cell on a chunk border. Each cell is seen whole by the chunks whose windows contain it (the
margin is larger than a cell's radius plus the tile overlap), but slightly differently (other context at
the window's edge), so two chunks could place its centroid on different sides of a border. The rule, in
raster order: a chunk ignores a cell cut by its window's edge (a part, not the cell); it leaves a whole
cell whose centroid lies in a later chunk's core if that chunk's window holds it too; otherwise it takes
the cell unless at most half of its pixels were taken by earlier cells. Each cell is then taken once: by
the first chunk that sees it whole with its centroid at or behind that chunk's core, and every later
sighting overlaps that claim. Clumps larger than a window (more than ~80 um across) are the limit: no
chunk sees them whole, and their parts are the chunks' watershed cells.

Coordinates: the rasters are at the model's scale (`analysis_mpp`, written into the TIFFs); cell
records (centroid, bounding box, pixel areas) are in the slide's level-0 pixels, like a small image's,
so that cells.geojson lands on the slide in a viewer.
"""

from __future__ import annotations

import contextvars
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from blastq.core.adapters import Settings, setting_default
from blastq.core.cells import (
    LABEL_BLAST,
    WSI_GALLERY_CELLS,
    CellClassifier,
    CellGallery,
    CellMaps,
    CellRecord,
    GalleryBuilder,
    SlideStats,
    call_rule,
    extract_cells,
    slide_stats,
    type_cells,
)
from blastq.core.common import InvalidConfig, InvalidSlide, SlideTooLarge, stage
from blastq.core.image import (
    MppSource,
    PreprocessConfig,
    check_user_mpp,
    estimate_checked,
    preprocess,
)
from blastq.core.pipeline.field import PipelineConfig, config_for_engine, segment_prepared
from blastq.core.pipeline.resultkey import ModelIdentity, result_key, scale_key, whole_slide_result_key
from blastq.core.pipeline.scratch import new_scratch_folder
from blastq.core.segment import Engine, ModelInfo, padded_shape, plan_tiles

Progress = Callable[[int, int], None]  # (tiles done, tiles total)

# A cell's radius is at most ~13 um (blasts up to ~25 um across); the tile overlap gives the context
# that the window's own border lacks. Both together: every cell whose centroid is in a core is whole
# in its chunk's window, and every pixel it covers was predicted with context.
CELL_RADIUS_UM = 12.8
# Side of the region read to estimate the pixel size from red cells when the slide has no metadata.
MPP_ESTIMATE_PX = 2048
# Longest side of overlay.png for a whole slide (the TIFFs carry the full resolution).
OVERVIEW_PX = 2048
PLASMA = 245  # fill for window parts outside the slide, as the readers do
# Chunk sides and margins are multiples of this: a multiple of the stride of any U-Net up to depth 7.
WINDOW_ALIGN_PX = 64


@dataclass(frozen=True)
class WholeSlideConfig:
    """How a slide is cut into chunks; results depend on it slightly (its hash joins the result key)."""

    chunk_px: int = setting_default("wsi_chunk_px")  # core side at the model's scale; plus the margin
    margin_px: int | None = None  # default: CELL_RADIUS_UM at the model's scale + half the tile overlap
    # Both are rounded up to multiples of WINDOW_ALIGN_PX: see grid().
    # The most pixels a slide may have at the model's scale (BLASTQ_MAX_SLIDE_PIXELS), refused before
    # any chunk is read. Not part of the result key: it decides whether a slide runs, not what it gives.
    max_pixels: int = setting_default("max_slide_pixels")

    def __post_init__(self) -> None:
        if self.chunk_px < 256 or (self.margin_px is not None and self.margin_px < 0):
            raise InvalidConfig(
                f"bad whole-slide chunking: chunk_px={self.chunk_px} (>= 256), margin_px={self.margin_px} (>= 0)"
            )
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise InvalidConfig(f"max_slide_pixels must be a positive integer, got {self.max_pixels!r}")

    def grid(self, model_mpp: float, pipeline: PipelineConfig) -> tuple[int, int]:
        """(chunk side, margin) in model pixels, both multiples of WINDOW_ALIGN_PX.

        Windows then start on multiples of the model's stride, as the tiles of a whole image do, so the
        tiles' answers are the whole image's wherever a window has the model's context (the tiling is
        exact: core.segment.tiling), and two windows that cover a pixel mostly agree on it exactly: a
        cell on a border looks the same from both sides (the ownership rule does not rely on it, but
        fewer cells are split differently).
        """
        margin = self.margin_px
        if margin is None:
            margin = math.ceil(CELL_RADIUS_UM / model_mpp) + pipeline.overlap_px // 2
        return _round_up(self.chunk_px, WINDOW_ALIGN_PX), _round_up(margin, WINDOW_ALIGN_PX)


def _round_up(value: int, step: int) -> int:
    return max(step, -(-value // step) * step)


@dataclass(frozen=True)
class WholeSlideResult:
    """What a whole slide gives: the figures, every cell, and the files written (SlideResult's fields,
    but no maps: those are the TIFFs in `files`)."""

    name: str
    sha256: str
    width: int
    height: int
    mpp: float
    mpp_source: MppSource
    mpp_confidence: float | None
    model_version: str
    params_key: str
    cells: tuple[CellRecord, ...]
    stats: SlideStats
    seconds: float
    tiles_total: int
    tiles_run: int
    classifier_version: str
    analysis_mpp: float  # pixel size of the TIFF rasters
    chunks: int
    files: dict[str, Path]
    blast_call: str = ""  # how blasts were called (core.cells.blastcall.call_rule)


# --- disk rasters ---------------------------------------------------------------------------------------


class DiskRaster:
    """A (height, width) raster in a raw row-major file: read and write any window, memory for that only.

    Plain reads and writes (not np.memmap, whose touched pages count as the process's memory).
    """

    def __init__(self, path: Path, height: int, width: int, dtype) -> None:
        self.path, self.height, self.width = Path(path), height, width
        self.dtype = np.dtype(dtype)
        self._row_bytes = width * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, height * self._row_bytes)  # sparse: zeros cost no disk until written

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        out = np.empty((y1 - y0, x1 - x0), self.dtype)
        if x0 == 0 and x1 == self.width:  # whole rows: one read
            out.ravel().view(np.uint8)[:] = np.frombuffer(
                os.pread(self._fd, out.nbytes, y0 * self._row_bytes), np.uint8
            )
            return out
        nbytes, offset = (x1 - x0) * self.dtype.itemsize, x0 * self.dtype.itemsize
        for i, y in enumerate(range(y0, y1)):
            out[i] = np.frombuffer(os.pread(self._fd, nbytes, y * self._row_bytes + offset), self.dtype)
        return out

    def write(self, y0: int, x0: int, block: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Write block at (y0, x0); with `rows` (bool per block row) only those rows (the file stays sparse
        where nothing was ever written)."""
        block = np.ascontiguousarray(block, self.dtype)
        offset = x0 * self.dtype.itemsize
        for i in range(block.shape[0]) if rows is None else np.flatnonzero(rows):
            os.pwrite(self._fd, block[i].tobytes(), (y0 + i) * self._row_bytes + offset)

    def row_stripes(self, rows: int) -> Iterator[np.ndarray]:
        for y in range(0, self.height, rows):
            yield self.read(y, min(self.height, y + rows), 0, self.width)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)


# --- the chunk grid -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    index: int
    core: tuple[int, int, int, int]  # y0, y1, x0, x1 at the model's scale
    window: tuple[int, int, int, int]  # the core plus the margin, clipped to the slide


def chunk_grid(height: int, width: int, chunk_px: int, margin: int) -> list[Chunk]:
    """Chunks covering a height x width slide (model scale) in raster order."""
    chunks = []
    for y0 in range(0, height, chunk_px):
        for x0 in range(0, width, chunk_px):
            y1, x1 = min(height, y0 + chunk_px), min(width, x0 + chunk_px)
            window = (
                max(0, y0 - margin),
                min(height, y1 + margin),
                max(0, x0 - margin),
                min(width, x1 + margin),
            )
            chunks.append(Chunk(len(chunks), (y0, y1, x0, x1), window))
    return chunks


def _core_index(chunk_px: int, n_cols: int, y: float, x: float) -> int:
    """Raster index of the chunk whose core holds the point (y, x)."""
    return int(y // chunk_px) * n_cols + int(x // chunk_px)


# --- reading windows ------------------------------------------------------------------------------------


def source_region(window: tuple[int, int, int, int], scale: float) -> tuple[int, int, int, int]:
    """(x, y, width, height) of the level-0 region that `read_window` reads for a model-scale window."""
    wy0, wy1, wx0, wx1 = window
    if scale == 1.0:
        return wx0, wy0, wx1 - wx0, wy1 - wy0
    sy0, sx0 = math.floor(wy0 / scale), math.floor(wx0 / scale)
    sy1, sx1 = math.ceil(wy1 / scale) + 1, math.ceil(wx1 / scale) + 1
    return sx0, sy0, sx1 - sx0, sy1 - sy0


def read_window(reader, window: tuple[int, int, int, int], scale: float) -> np.ndarray:
    """The slide under a model-scale window, resampled to the model's scale (HWC uint8 RGB)."""
    wy0, wy1, wx0, wx1 = window
    if scale == 1.0:
        return reader.read_region(*source_region(window, scale))
    sx0, sy0, sw, sh = source_region(window, scale)
    sx1, sy1 = sx0 + sw, sy0 + sh
    region = reader.read_region(sx0, sy0, sw, sh)
    size = (round((sx1 - sx0) * scale), round((sy1 - sy0) * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    big = cv2.resize(region, size, interpolation=interp)
    oy, ox = round(wy0 - sy0 * scale), round(wx0 - sx0 * scale)
    out = np.full((wy1 - wy0, wx1 - wx0, 3), PLASMA, np.uint8)
    part = big[oy : oy + out.shape[0], ox : ox + out.shape[1]]
    out[: part.shape[0], : part.shape[1]] = part
    return out


def resolve_mpp(reader, mpp: float | None) -> tuple[float, MppSource, float | None]:
    """User mpp > the slide's metadata > an estimate from red cells in the slide's centre; with the
    estimate's confidence (None for the others)."""
    check_user_mpp(mpp, reader.name)
    if mpp is not None:
        return float(mpp), "user", None
    if reader.mpp is not None:
        return float(reader.mpp), "metadata", None
    refused = getattr(reader, "mpp_refused", None)  # the metadata's scale, implausible for a smear
    if refused:
        raise InvalidSlide(refused)
    side_h, side_w = min(MPP_ESTIMATE_PX, reader.height), min(MPP_ESTIMATE_PX, reader.width)
    centre = reader.read_region((reader.width - side_w) // 2, (reader.height - side_h) // 2, side_w, side_h)
    estimate = estimate_checked(centre, reader.name, "mpp")
    return estimate.mpp, "estimated", estimate.confidence


# --- the slide ------------------------------------------------------------------------------------------


def process_whole_slide(
    reader,
    engine: Engine,
    info: ModelInfo,
    out_dir: str | Path,
    *,
    sha256: str,
    mpp: float | None = None,
    config: PipelineConfig = PipelineConfig(),
    wsi: WholeSlideConfig = WholeSlideConfig(),
    classifier: CellClassifier | None = None,
    progress: Progress | None = None,
) -> WholeSlideResult:
    """Segment a whole slide chunk by chunk; write mask/nuclei/instances TIFFs, overlay and cell files.

    `reader` is a region reader (blastq.core.image.wsi): name, width, height, mpp and read_region(x, y, w, h).
    """
    from blastq.core.outputs import PyramidTiffSink

    start = time.perf_counter()
    out_dir = Path(out_dir)
    config = config_for_engine(config, engine)
    slide_mpp, mpp_source, mpp_confidence = resolve_mpp(reader, mpp)
    scale = slide_mpp / info.mpp  # model pixels per slide pixel
    height, width = max(1, round(reader.height * scale)), max(1, round(reader.width * scale))
    if height * width > wsi.max_pixels:
        raise SlideTooLarge(
            f"{reader.width}x{reader.height} pixels at {slide_mpp:.4g} um/px ({mpp_source}) "
            f"are {width}x{height} at the model's {info.mpp:g} um/px, over the maximum of "
            f"{wsi.max_pixels} pixels (BLASTQ_MAX_SLIDE_PIXELS)",
            path=reader.name,
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    chunk_px, margin = wsi.grid(info.mpp, config)
    chunks = chunk_grid(height, width, chunk_px, margin)
    n_cols = math.ceil(width / chunk_px)
    pre = PreprocessConfig(**info.preprocess)
    tiles_per_chunk = [
        len(
            plan_tiles(
                *padded_shape(w[1] - w[0], w[3] - w[2], engine.stride),
                config.tile_px,
                config.overlap_px,
                engine.stride,
            )
        )
        for w in (c.window for c in chunks)
    ]
    tiles_total, tiles_before, tiles_run = sum(tiles_per_chunk), 0, 0
    thumb_scale = min(1.0, OVERVIEW_PX / max(height, width))
    thumb = np.full(
        (max(1, round(height * thumb_scale)), max(1, round(width * thumb_scale)), 3), PLASMA, np.uint8
    )

    # Rasters and TIFF spools (tens of GB, sparse, for a large slide) live in a scratch folder of the
    # system's temporary folder: removed when this ends, or at the next run's start if this one is killed.
    scratch = new_scratch_folder()
    instances = nuclei = None
    cells: list[CellRecord] = []
    rings: list[list[list[float]]] = []
    is_blast = [False]  # by global cell id (0: background)
    gallery = GalleryBuilder(WSI_GALLERY_CELLS)
    has_data = getattr(reader, "has_data", None)

    def load(chunk: Chunk) -> tuple[np.ndarray, np.ndarray] | None:
        if has_data is not None and not has_data(*source_region(chunk.window, scale)):
            return None  # no scanned tile under the window (a sparse TIFF): plasma, nothing to decode
        with stage("read"):
            raw = read_window(reader, chunk.window, scale)
        with stage("preprocess"):
            return raw, preprocess(raw, info.mpp, pre)

    try:
        instances = DiskRaster(scratch / "instances.raw", height, width, np.uint32)
        nuclei = DiskRaster(scratch / "nuclei.raw", height, width, np.uint8)
        # The next chunk is read and preprocessed while this one is segmented (decoding and
        # preprocessing release the GIL for most of their time).
        with ThreadPoolExecutor(1, thread_name_prefix="blastq-read") as pool:
            # In a copy of this context: the reading thread's stages count in this slide's stage times.
            pending = pool.submit(contextvars.copy_context().run, load, chunks[0])
            for k, chunk in enumerate(chunks):
                loaded = pending.result()
                if k + 1 < len(chunks):
                    pending = pool.submit(contextvars.copy_context().run, load, chunks[k + 1])
                if loaded is None:  # background: its tiles count as done, none is run
                    tiles_before += tiles_per_chunk[k]
                    if progress:
                        progress(tiles_before, tiles_total)
                    continue
                raw, work = loaded

                def tick(done: int, total: int, before=tiles_before) -> None:
                    if progress:
                        progress(before + done, tiles_total)

                probs, _, n_run = segment_prepared(work, work.shape[:2], engine, config, tick)
                tiles_before += tiles_per_chunk[k]
                tiles_run += n_run
                maps = extract_cells(
                    probs,
                    raw,
                    info.mpp,
                    blast_threshold=config.blast_cell_threshold,
                    caller=config.blast_caller,
                )
                del probs
                taken = _take_cells(maps, chunk, instances, chunks, chunk_px, n_cols)
                # The slide-wide ids the loop below gives the taken cells: the gallery keeps those.
                slide_id = {c.cell_id: len(cells) + 1 + k for k, c in enumerate(taken)}
                if taken and classifier is not None:
                    maps = type_cells(
                        replace(maps, cells=tuple(taken)),
                        work,
                        info.mpp,
                        classifier,
                        on_crop=lambda cell_id, crop, ids=slide_id: gallery.add_crop(ids[cell_id], crop),
                    )
                    taken = list(maps.cells)
                elif taken and not gallery.full:
                    ids = list(slide_id)
                    gallery.add(maps.instances, maps.nuclei, ids, work, info.mpp, [slide_id[i] for i in ids])
                _paint(maps, taken, chunk, instances, nuclei, len(cells) + 1)
                for cell in taken:
                    gid = len(cells) + 1
                    rings.append(_ring(maps.instances, cell, chunk, scale))
                    cells.append(_to_slide(cell, gid, chunk, scale))
                    is_blast.append(cell.label == LABEL_BLAST)
                _paste_thumb(thumb, raw, chunk, thumb_scale)
                del maps, raw, work

        # Rasters -> pyramidal TIFFs, stripe by stripe.
        label_of = np.where(np.array(is_blast), 2, 1).astype(np.uint8)
        label_of[0] = 0
        files = {
            "mask.tif": out_dir / "mask.tif",
            "nuclei.tif": out_dir / "nuclei.tif",
            "instances.tif": out_dir / "instances.tif",
        }
        spool = {"mpp": info.mpp, "scratch_dir": scratch}
        with (
            PyramidTiffSink(files["mask.tif"], height, width, np.uint8, **spool) as mask_sink,
            PyramidTiffSink(files["instances.tif"], height, width, np.uint32, **spool) as inst_sink,
        ):
            for rows in instances.row_stripes(512):
                inst_sink.write_rows(rows)
                mask_sink.write_rows(label_of[rows])
        with PyramidTiffSink(files["nuclei.tif"], height, width, np.uint8, **spool) as nuc_sink:
            for rows in nuclei.row_stripes(512):
                nuc_sink.write_rows(rows)
    finally:
        for raster in (instances, nuclei):
            if raster is not None:
                raster.close()
        shutil.rmtree(scratch, ignore_errors=True)

    stats = slide_stats(cells, config.blast_threshold_percent, config.min_white_cells)
    model = ModelIdentity.of(info, classifier.info.sha256 if classifier is not None else "")
    result = WholeSlideResult(
        name=reader.name,
        sha256=sha256,
        width=reader.width,
        height=reader.height,
        mpp=slide_mpp,
        mpp_source=mpp_source,
        mpp_confidence=mpp_confidence,
        model_version=info.version,
        params_key=whole_slide_key(result_key(config, model, scale_key(slide_mpp, mpp_source)), wsi),
        cells=tuple(cells),
        stats=stats,
        seconds=round(time.perf_counter() - start, 3),  # the cell files below take a moment more
        tiles_total=tiles_total,
        tiles_run=tiles_run,
        classifier_version=classifier.info.version if classifier is not None else "",
        blast_call=call_rule(config.blast_cell_threshold, config.blast_caller),
        analysis_mpp=info.mpp,
        chunks=len(chunks),
        files=files,
    )
    files.update(_write_cell_files(result, rings, thumb, thumb_scale * scale, out_dir, gallery.build()))
    return result


def whole_slide_key(image_key: str, wsi: WholeSlideConfig = WholeSlideConfig()) -> str:
    """The result key of a whole slide: its image key (core.pipeline.resultkey.result_key) and the chunking."""
    return whole_slide_result_key(image_key, wsi)


def _take_cells(
    maps: CellMaps, chunk: Chunk, instances: DiskRaster, chunks: list[Chunk], chunk_px: int, n_cols: int
) -> list[CellRecord]:
    """The chunk's cells that are its to take (see the module's docstring), window-local records."""
    if not maps.cells:
        return []
    wy0, wy1, wx0, wx1 = chunk.window
    claimed = instances.read(wy0, wy1, wx0, wx1) > 0
    taken = []
    for cell in maps.cells:
        box = (cell.bbox_y0 + wy0, cell.bbox_y1 + wy0, cell.bbox_x0 + wx0, cell.bbox_x1 + wx0)
        if not _inside(box, chunk.window, chunks[-1].window):
            continue  # cut by this window's edge: only part of it is here
        owner = _core_index(chunk_px, n_cols, cell.centroid_y + wy0, cell.centroid_x + wx0)
        if owner > chunk.index and _inside(box, chunks[owner].window, chunks[-1].window):
            continue  # a later chunk has it in its core, and sees it whole
        ys, xs = slice(cell.bbox_y0, cell.bbox_y1), slice(cell.bbox_x0, cell.bbox_x1)
        mine = maps.instances[ys, xs] == cell.cell_id
        if np.count_nonzero(claimed[ys, xs] & mine) * 2 > cell.area_px:
            continue  # an earlier chunk took it
        taken.append(cell)
    return taken


def _inside(box: tuple[int, int, int, int], window: tuple[int, int, int, int], last: tuple) -> bool:
    """Whether a cell's box (global, y1/x1 exclusive) lies in the window without touching an edge of it
    that is not the slide's own edge (`last`, the last chunk's window, ends where the slide does)."""
    y0, y1, x0, x1 = box
    wy0, wy1, wx0, wx1 = window
    height, width = last[1], last[3]
    return (
        (y0 > wy0 or wy0 == 0)
        and (y1 < wy1 or wy1 == height)
        and (x0 > wx0 or wx0 == 0)
        and (x1 < wx1 or wx1 == width)
    )


def _paint(
    maps: CellMaps,
    taken: list[CellRecord],
    chunk: Chunk,
    instances: DiskRaster,
    nuclei: DiskRaster,
    first_id: int,
) -> None:
    """Write the taken cells into the rasters (global ids from first_id), never over earlier cells."""
    if not taken:
        return
    wy0, wy1, wx0, wx1 = chunk.window
    lut = np.zeros(int(maps.instances.max()) + 1, np.uint32)
    for i, cell in enumerate(taken):
        lut[cell.cell_id] = first_id + i
    y0 = min(c.bbox_y0 for c in taken)
    y1 = max(c.bbox_y1 for c in taken)
    x0 = min(c.bbox_x0 for c in taken)
    x1 = max(c.bbox_x1 for c in taken)
    new = lut[maps.instances[y0:y1, x0:x1]]
    old = instances.read(wy0 + y0, wy0 + y1, wx0 + x0, wx0 + x1)
    fresh = (new > 0) & (old == 0)
    old[fresh] = new[fresh]
    changed = fresh.any(axis=1)
    instances.write(wy0 + y0, wx0 + x0, old, changed)
    nuc = nuclei.read(wy0 + y0, wy0 + y1, wx0 + x0, wx0 + x1)
    nuc[fresh & maps.nuclei[y0:y1, x0:x1]] = 255
    nuclei.write(wy0 + y0, wx0 + x0, nuc, changed)


def _to_slide(cell: CellRecord, gid: int, chunk: Chunk, scale: float) -> CellRecord:
    """A window-local record at the model's scale -> the slide's level-0 pixels, with its global id."""
    wy0, _, wx0, _ = chunk.window
    area2 = scale * scale
    return replace(
        cell,
        cell_id=gid,
        centroid_x=round((cell.centroid_x + wx0) / scale, 2),
        centroid_y=round((cell.centroid_y + wy0) / scale, 2),
        bbox_x0=math.floor((cell.bbox_x0 + wx0) / scale),
        bbox_y0=math.floor((cell.bbox_y0 + wy0) / scale),
        bbox_x1=math.ceil((cell.bbox_x1 + wx0) / scale),
        bbox_y1=math.ceil((cell.bbox_y1 + wy0) / scale),
        area_px=round(cell.area_px / area2),
        nucleus_area_px=round(cell.nucleus_area_px / area2),
    )


def _ring(local: np.ndarray, cell: CellRecord, chunk: Chunk, scale: float) -> list[list[float]]:
    """The cell's outline in level-0 slide pixels (closed ring)."""
    wy0, _, wx0, _ = chunk.window
    crop = (local[cell.bbox_y0 : cell.bbox_y1, cell.bbox_x0 : cell.bbox_x1] == cell.cell_id).astype(np.uint8)
    contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if contours:
        pts = max(contours, key=cv2.contourArea)[:, 0, :]
        ring = [
            [round((x + cell.bbox_x0 + wx0) / scale, 1), round((y + cell.bbox_y0 + wy0) / scale, 1)]
            for x, y in pts
        ]
    else:
        ring = []
    if len(ring) < 3:
        x0, y0 = (cell.bbox_x0 + wx0) / scale, (cell.bbox_y0 + wy0) / scale
        x1, y1 = (cell.bbox_x1 + wx0) / scale, (cell.bbox_y1 + wy0) / scale
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
    ring.append(ring[0])
    return ring


def _paste_thumb(thumb: np.ndarray, raw: np.ndarray, chunk: Chunk, t: float) -> None:
    """Put the chunk's core, shrunk, into the overview picture."""
    y0, y1, x0, x1 = chunk.core
    wy0, _, wx0, _ = chunk.window
    ty0, ty1 = round(y0 * t), min(thumb.shape[0], round(y1 * t))
    tx0, tx1 = round(x0 * t), min(thumb.shape[1], round(x1 * t))
    if ty1 <= ty0 or tx1 <= tx0:
        return
    core = raw[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0]
    thumb[ty0:ty1, tx0:tx1] = cv2.resize(core, (tx1 - tx0, ty1 - ty0), interpolation=cv2.INTER_AREA)


def _write_cell_files(
    result: WholeSlideResult,
    rings: list,
    thumb: np.ndarray,
    thumb_per_px: float,
    out_dir: Path,
    gallery: CellGallery,
) -> dict[str, Path]:
    """overlay.png (the overview with outlines), cells.csv, cells.geojson, summary.json, report.html, and
    the gallery of its first cells."""
    from blastq.core.outputs import (
        COLOUR_BLAST,
        COLOUR_WHITE_CELL,
        cells_csv_bytes,
        gallery_artifacts,
        geojson_bytes,
        png_bytes,
        report_html,
        summary_dict,
    )

    overview = thumb.copy()
    for cell, ring in zip(result.cells, rings, strict=True):
        pts = np.round(np.array(ring) * thumb_per_px).astype(np.int32)
        colour = COLOUR_BLAST if cell.label == LABEL_BLAST else COLOUR_WHITE_CELL
        cv2.polylines(overview, [pts], True, colour, 1)
    files = {
        "overlay.png": png_bytes(overview),
        "cells.csv": cells_csv_bytes(result.cells),
        "cells.geojson": geojson_bytes(result.cells, rings),
        "summary.json": json.dumps(
            {**summary_dict(result), "analysis_mpp": result.analysis_mpp, "chunks": result.chunks}, indent=2
        ).encode(),
        "report.html": report_html(result, overview, result.cells),
        **{a.name: a.data for a in gallery_artifacts(gallery)},
    }
    paths = {}
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
        paths[name] = out_dir / name
    return paths


def whole_slide_config(settings: Settings) -> WholeSlideConfig:
    """How whole slides are cut into chunks; the chunking is part of a whole slide's result key."""
    return WholeSlideConfig(chunk_px=settings.wsi_chunk_px, max_pixels=settings.max_slide_pixels)
