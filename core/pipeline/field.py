"""One slide, start to end: scale -> preprocess -> tiles -> engine -> stitch -> cells -> stats.

`blastq run` and the worker's task both call `process_slide`; the queue adds delivery, never
different image logic. Nothing here touches files, databases or queues.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

import cv2
import numpy as np

from blastq.core.adapters import Settings, setting_default
from blastq.core.cells import (
    BlastCaller,
    CellClassifier,
    CellGallery,
    CellMaps,
    GalleryBuilder,
    SlideStats,
    call_rule,
    caller_setting,
    extract_cells,
    slide_stats,
    type_cells,
)
from blastq.core.common import InvalidConfig, SlideTooLarge, StageTimes, current_times, timed
from blastq.core.image import PreprocessConfig, Slide, preprocess, resample, resampled_shape
from blastq.core.pipeline.resultkey import ModelIdentity, result_key, scale_key
from blastq.core.segment import (
    N_OUTPUTS,
    Engine,
    ModelInfo,
    Stitcher,
    Tile,
    fit_to_stain,
    iter_batches,
    needed_blocks,
    pad_to_stride,
    plan_tiles,
    planned_precision,
    to_model_input,
)

Progress = Callable[[int, int], None]  # (tiles done, tiles total)


@dataclass(frozen=True)
class PipelineConfig:
    """Parameters that change results; their hash is part of a result's identity."""

    # Defaults are the settings' (core.adapters.settings.Settings), written there once.
    tile_px: int = setting_default("tile_px")  # at the model's scale
    # At least the radius of the largest cell, so every cell is whole in some tile.
    overlap_px: int = setting_default("overlap_px")
    batch_size: int = setting_default("batch_size")
    skip_empty_tiles: bool = True
    blast_threshold_percent: float = setting_default("blast_threshold_percent")
    # Below this many white cells the verdict is "insufficient cells" (core.cells.stats).
    min_white_cells: int = setting_default("min_white_cells")
    # A cell's mean blast share at which it is a blast (core.cells.instances): the screening operating point.
    blast_cell_threshold: float = setting_default("blast_cell_threshold")
    # The cell classifier setting ("default", "none" or a file): which file it is enters the result key
    # by its sha256 (core.pipeline.resultkey), not by this name, which differs between machines.
    classifier: str = setting_default("classifier")
    # A fitted blast caller (BLASTQ_BLAST_CALLER) decides which cells are blasts instead of the share
    # rule above; its coefficients enter the key.
    blast_caller: BlastCaller | None = None
    # "int8" when the engine runs the quantised U-Net (BLASTQ_ENGINE=onnx-int8): its maps differ slightly
    # from fp32's, so its results are keyed apart. "" (fp32, fp16) leaves keys as they were.
    precision: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.blast_cell_threshold < 1:
            raise InvalidConfig(f"blast_cell_threshold must be in (0, 1), got {self.blast_cell_threshold}")
        if self.tile_px < 32 or not 0 <= self.overlap_px < self.tile_px // 2 + 1 or self.batch_size < 1:
            raise InvalidConfig(
                f"bad tiling: tile_px={self.tile_px} (>= 32), overlap_px={self.overlap_px} "
                f"(0..tile_px/2), batch_size={self.batch_size} (>= 1)"
            )

    def key(self) -> str:
        """Short stable hash of the parameters that change a result (batch size does not).

        One part of a result's key: `core.pipeline.resultkey.result_key` adds the model, classifier and scale."""
        params = {
            k: v for k, v in asdict(self).items() if k not in ("batch_size", "classifier", "blast_caller")
        }
        if self.blast_caller is not None:  # absent otherwise: keys of results without one stay as they were
            params["blast_caller"] = self.blast_caller.key()
        if not self.precision:  # likewise
            del params["precision"]
        return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class SlideResult:
    name: str
    sha256: str
    width: int
    height: int
    mpp: float
    mpp_source: str
    model_version: str
    params_key: str
    maps: CellMaps
    stats: SlideStats
    seconds: float
    tiles_total: int
    tiles_run: int
    classifier_version: str = ""  # "" when no classifier typed the cells
    mpp_confidence: float | None = None  # of an estimated scale (core.image.scale); None for a given one
    blast_call: str = ""  # how blasts were called (core.cells.blastcall.call_rule)
    gallery: CellGallery | None = None  # every cell's crop, for review and for learning from it


def check_slide(slide: Slide, info: ModelInfo) -> None:
    """Refuse, before any model work, a slide whose image at the model's scale exceeds its pixel limit.

    A 2000 x 2000 photo said to be at 5 um/px is 50000 x 50000 at 0.2 um/px: 7 GB before preprocessing.
    The limit the slide was read under (BLASTQ_MAX_PIXELS) holds for what the model sees as well."""
    height, width = slide.rgb.shape[:2]
    work_h, work_w = resampled_shape(height, width, slide.mpp, info.mpp)
    if work_h * work_w > slide.max_pixels:
        raise SlideTooLarge(
            f"{width}x{height} pixels at {slide.mpp:.4g} um/px ({slide.mpp_source}) are "
            f"{work_w}x{work_h} at the model's {info.mpp:g} um/px, over the maximum of {slide.max_pixels} "
            "pixels (BLASTQ_MAX_PIXELS)",
            path=slide.name,
        )


@timed("preprocess")
def prepare_image(rgb: np.ndarray, mpp: float, info: ModelInfo) -> np.ndarray:
    """The image the model sees: resampled to its scale and preprocessed as it was trained (HWC uint8)."""
    work = resample(rgb, mpp, info.mpp)
    return preprocess(work, info.mpp, PreprocessConfig(**info.preprocess))


def segment_probabilities(
    rgb: np.ndarray,
    mpp: float,
    engine: Engine,
    info: ModelInfo,
    config: PipelineConfig = PipelineConfig(),
    progress: Progress | None = None,
) -> tuple[np.ndarray, int, int]:
    """(C, H, W) float32 probabilities at the input's size, plus (tiles total, tiles run)."""
    return segment_prepared(prepare_image(rgb, mpp, info), rgb.shape[:2], engine, config, progress)


def segment_prepared(
    work: np.ndarray,
    out_shape: tuple[int, int],
    engine: Engine,
    config: PipelineConfig = PipelineConfig(),
    progress: Progress | None = None,
) -> tuple[np.ndarray, int, int]:
    """Probabilities for a prepared image (`prepare_image`), resized to out_shape (the input's H, W).

    The image is cut by `plan_tiles` (tiles of up to tile_px, overlapping by overlap_px, each deciding the
    pixels it is most central to: the whole-image answer when overlap_px // 2 reaches the model's context);
    with skip_empty_tiles, tiles of plain plasma do not run and tiles mostly of plasma run cut down to their
    stained part (`fit_to_stain`). (tiles total, tiles run) count the planned tiles."""
    if config.tile_px % engine.stride:
        raise InvalidConfig(f"tile_px={config.tile_px} must be a multiple of {engine.stride} for this model")
    height, width = out_shape
    wh, ww = work.shape[:2]
    work = pad_to_stride(work, engine.stride)
    tiles = plan_tiles(work.shape[0], work.shape[1], config.tile_px, config.overlap_px, engine.stride)
    stitcher = Stitcher(N_OUTPUTS, work.shape[0], work.shape[1])
    todo = tiles
    if config.skip_empty_tiles:
        needed = needed_blocks(work, config.overlap_px // 2)
        fitted = (fit_to_stain(tile, needed, config.overlap_px // 2, engine.stride) for tile in tiles)
        todo = [tile for tile in fitted if tile is not None]
    done = len(tiles) - len(todo)
    if progress:
        progress(done, len(tiles))
    for n_stitched in _run_batches(work, todo, engine, stitcher, config.batch_size):
        done += n_stitched
        if progress:
            progress(done, len(tiles))
    probs = stitcher.result()[:, :wh, :ww]
    if (wh, ww) != (height, width):
        probs = np.stack([cv2.resize(c, (width, height), interpolation=cv2.INTER_LINEAR) for c in probs])
    return probs, len(tiles), len(todo)


def _run_batches(
    work: np.ndarray, todo: list[Tile], engine: Engine, stitcher: Stitcher, batch_size: int
) -> Iterator[int]:
    """Run the engine on `todo` in batches and stitch them in order; yields each stitched batch's size.

    With the engine on a GPU, while it runs batch i one thread cuts batch i+1's input and another stitches
    batch i-1 (ONNX Runtime and torch release the GIL; cutting and stitching are numpy copies and
    arithmetic). At most one input ahead and two outputs behind are held, and the stitcher sees the
    batches in order, one at a time, so the map is the same as from the plain loop. The first error of
    any stage is raised here, after the threads stop.

    A CPU engine already runs on every core (`engines.cpu_cores`), and its threads meet at a barrier after
    every layer: a cutting or stitching thread taking one of the cores delays them all. On the 2-core
    machine of benchmarks/bench_efficiency.py that made a 4096 px slide 10 s slower, so there the batches
    run one after another.
    """
    batches = list(iter_batches(todo, batch_size))
    if not batches:
        return
    # Stage times (core.common.timing), handed to the cutting and stitching threads explicitly.
    times = current_times() or StageTimes()

    def cut(batch: list[Tile]) -> np.ndarray:
        start = time.perf_counter()
        x = to_model_input(np.stack([work[t.slices] for t in batch]))
        times.add("stitch", time.perf_counter() - start)
        return x

    def infer(x: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        logits = engine.infer(x)
        times.add("engine", time.perf_counter() - start)
        return logits

    def stitch(batch: list[Tile], logits: np.ndarray) -> int:
        if len(logits) != len(batch):
            raise ValueError(f"the engine gave {len(logits)} outputs for a batch of {len(batch)} tiles")
        start = time.perf_counter()
        for tile, tile_logits in zip(batch, logits, strict=True):
            stitcher.add_logits(tile, tile_logits)
        times.add("stitch", time.perf_counter() - start)
        return len(batch)

    if not _engine_on_gpu(engine):
        for batch in batches:
            yield stitch(batch, infer(cut(batch)))
        return

    cutter = ThreadPoolExecutor(1, thread_name_prefix="blastq-cut")
    stitching = ThreadPoolExecutor(1, thread_name_prefix="blastq-stitch")
    try:
        next_input = cutter.submit(cut, batches[0])
        behind: deque[Future[int]] = deque()
        for i, batch in enumerate(batches):
            x = next_input.result()
            if i + 1 < len(batches):
                next_input = cutter.submit(cut, batches[i + 1])
            logits = infer(x)
            # Queued before waiting for the previous one: the stitch thread goes on while progress reports.
            behind.append(stitching.submit(stitch, batch, logits))
            if len(behind) > 1:
                yield behind.popleft().result()
        while behind:
            yield behind.popleft().result()
    finally:
        cutter.shutdown(wait=True, cancel_futures=True)
        stitching.shutdown(wait=True, cancel_futures=True)


def _engine_on_gpu(engine: Engine) -> bool:
    """True for engines that leave the CPU cores free (ONNX Runtime's device_type, torch's device)."""
    kind = getattr(engine, "device_type", None) or getattr(getattr(engine, "device", None), "type", "cpu")
    return kind == "cuda"


def process_slide(
    slide: Slide,
    engine: Engine,
    info: ModelInfo,
    config: PipelineConfig = PipelineConfig(),
    progress: Progress | None = None,
    classifier: CellClassifier | None = None,
) -> SlideResult:
    """Segment one slide, measure its cells and, with a classifier, type them (the differential)."""
    start = time.perf_counter()
    check_slide(slide, info)
    config = config_for_engine(config, engine)
    work = prepare_image(slide.rgb, slide.mpp, info)
    probs, n_tiles, n_run = segment_prepared(work, slide.rgb.shape[:2], engine, config, progress)
    maps = extract_cells(
        probs, slide.rgb, slide.mpp, blast_threshold=config.blast_cell_threshold, caller=config.blast_caller
    )
    del probs
    gallery = GalleryBuilder()
    if classifier is not None:
        # Crops come from the model's view of the slide: the classifiers were trained on that. The
        # gallery's crops are cut in the same pass.
        maps = type_cells(maps, work, info.mpp, classifier, on_crop=gallery.add_crop)
    else:
        gallery.add(maps.instances, maps.nuclei, [c.cell_id for c in maps.cells], work, info.mpp)
    stats = slide_stats(maps.cells, config.blast_threshold_percent, config.min_white_cells)
    height, width = slide.rgb.shape[:2]
    model = ModelIdentity.of(info, classifier.info.sha256 if classifier is not None else "")
    return SlideResult(
        name=slide.name,
        sha256=slide.sha256,
        width=width,
        height=height,
        mpp=slide.mpp,
        mpp_source=slide.mpp_source,
        model_version=info.version,
        params_key=result_key(config, model, scale_key(slide.mpp, slide.mpp_source)),
        maps=maps,
        stats=stats,
        seconds=round(time.perf_counter() - start, 3),
        tiles_total=n_tiles,
        tiles_run=n_run,
        classifier_version=classifier.info.version if classifier is not None else "",
        blast_call=call_rule(config.blast_cell_threshold, config.blast_caller),
        mpp_confidence=slide.mpp_confidence,
        gallery=gallery.build(),
    )


def config_for_engine(config: PipelineConfig, engine: Engine) -> PipelineConfig:
    """`config` with the engine's precision where it changes results (int8), so its results key apart."""
    precision = "int8" if getattr(engine, "precision", "fp32") == "int8" else ""
    return config if config.precision == precision else replace(config, precision=precision)


def pipeline_config(settings: Settings, model_sha256: str = "") -> PipelineConfig:
    """The pipeline parameters these settings ask for; their key is part of a result's identity.

    With the checkpoint's sha256, the precision its engine will run at (int8 where `auto` finds an int8 file
    for it) is known before any engine loads: `blastq submit` keys results as the worker will."""
    return PipelineConfig(
        blast_caller=caller_setting(settings.blast_caller),
        tile_px=settings.tile_px,
        overlap_px=settings.overlap_px,
        batch_size=settings.batch_size,
        blast_threshold_percent=settings.blast_threshold_percent,
        blast_cell_threshold=settings.blast_cell_threshold,
        min_white_cells=settings.min_white_cells,
        classifier=settings.classifier,
        precision=planned_precision(
            settings.engine, settings.device, model_sha256, settings.engine_cache_dir
        ),
    )
