"""How much of a slide's time the engine gets: process_slide against the engine alone, stage by stage.

python benchmarks/bench_efficiency.py [--sizes 2048 4096] [--threads N] [--repeat 3] [--artifacts] [--engine KIND]

For each synthetic smear (0.2 um/px), `process_slide` runs end to end with the default CPU engine and
the shipped cell classifier. The same work is then done stage by stage with the pipeline's public
functions, each stage timed on its own:

  prepare    prepare_image: resample to the model's scale + flat-field/CLAHE preprocessing
  tiling     pad_to_stride, plan_tiles, the stain check (needed_blocks) and fit_to_stain on every tile
  batching   cutting the tiles that run out, stacking them, to_model_input (NCHW float32)
  engine     engine.infer on those batches only: the pure engine time for the same tiles and batch size
  stitching  Stitcher.add_logits (probabilities of each tile's own pixels), result, crop (and resize)
  cells      extract_cells (threshold, watershed split, measurements)
  typing     type_cells with load_cell_classifier("default")
  stats      slide_stats
  artifacts  render_artifacts (PNG, TIFF, CSV, GeoJSON, HTML), with --artifacts; not in process_slide

overhead = (end to end - engine) / end to end: the share of a slide's time spent outside the engine;
segmentation overhead: the same for prepare..stitching only (what segment_prepared does).
Per cell: cells and typing in milliseconds per white cell found (the issue's budget: under 1 ms each).
Compute: the U-Net's FLOPs per pixel (2 x multiply-adds of every convolution, counted on the model), the
pixels the engine computed (tiles, overlap included) against the output pixels, the engine's FLOP/s on
the model, and the efficiency ratio
    (output pixels / end to end) / (engine FLOP/s / FLOPs per output pixel at zero overlap)
  = (output pixels / computed pixels) x (engine / end to end): how close a slide comes to the engine
running flat out on each output pixel once (target >= 70%).
The stages run one after another here, but in process_slide batching and stitching overlap the engine
(segment_prepared cuts the next batch and stitches the previous one while a batch runs), so the stage
sum can exceed end to end; on 2 cores the overlapped stages still take cores from the engine.
Figures are medians over --repeat rounds after a warm-up round; end to end and stages alternate within
a round, so a neighbour's load on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import torch

from blastq.core.cells import CellClassifier, extract_cells, load_cell_classifier, slide_stats, type_cells
from blastq.core.image import Slide
from blastq.core.outputs import render_artifacts
from blastq.core.pipeline import PipelineConfig, prepare_image, process_slide, segment_prepared
from blastq.core.segment import (
    N_OUTPUTS,
    Engine,
    ModelInfo,
    Stitcher,
    UNet,
    cpu_cores,
    default_model_path,
    fit_to_stain,
    iter_batches,
    load_engine,
    needed_blocks,
    pad_to_stride,
    plan_tiles,
    to_model_input,
)
from blastq.core.synth import generate_field

MPP = 0.2
SEGMENTATION_STAGES = ("prepare", "tiling", "batching", "engine", "stitching")
STAGES = ("prepare", "tiling", "batching", "engine", "stitching", "cells", "typing", "stats", "artifacts")


class StageClock:
    """Seconds per named stage of one staged run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, stage: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
        return out


def conv_flops_per_pixel(model: UNet, side: int = 256) -> float:
    """FLOPs per input pixel of the U-Net: 2 x the multiply-adds of every convolution on a side x side input."""
    total = 0

    def count(module: torch.nn.Conv2d, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += 2 * k * output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, model.in_channels, side, side))
    for hook in hooks:
        hook.remove()
    return total / (side * side)


def staged_run(
    slide: Slide, engine: Engine, info: ModelInfo, config: PipelineConfig, classifier: CellClassifier | None
) -> tuple[dict[str, float], np.ndarray, int, int]:
    """process_slide's work, stage by stage (segment_prepared's loop unrolled); (seconds, probs, tiles run,
    pixels the engine computed)."""
    clock = StageClock()
    height, width = slide.rgb.shape[:2]
    work = clock.run("prepare", lambda: prepare_image(slide.rgb, slide.mpp, info))
    wh, ww = work.shape[:2]

    def cut_tiles():
        padded = pad_to_stride(work, engine.stride)
        tiles = plan_tiles(padded.shape[0], padded.shape[1], config.tile_px, config.overlap_px, engine.stride)
        needed = needed_blocks(padded, config.overlap_px // 2)
        fitted = [fit_to_stain(t, needed, config.overlap_px // 2, engine.stride) for t in tiles]
        return padded, [t for t in fitted if t is not None]

    padded, todo = clock.run("tiling", cut_tiles)
    batches = list(iter_batches(todo, config.batch_size))
    inputs = clock.run(
        "batching", lambda: [to_model_input(np.stack([padded[t.slices] for t in b])) for b in batches]
    )
    logits = clock.run("engine", lambda: [engine.infer(x) for x in inputs])

    def stitch():
        stitcher = Stitcher(N_OUTPUTS, padded.shape[0], padded.shape[1])
        for batch, y in zip(batches, logits, strict=True):
            for t, tile_logits in zip(batch, y, strict=True):
                stitcher.add_logits(t, tile_logits)
        probs = stitcher.result()[:, :wh, :ww]
        if (wh, ww) != (height, width):
            probs = np.stack([cv2.resize(c, (width, height), interpolation=cv2.INTER_LINEAR) for c in probs])
        return probs

    probs = clock.run("stitching", stitch)
    computed = sum(t.height * t.width for t in todo)
    maps = clock.run("cells", lambda: extract_cells(probs, slide.rgb, slide.mpp))
    if classifier is not None:
        maps = clock.run("typing", lambda: type_cells(maps, work, info.mpp, classifier))
    clock.run("stats", lambda: slide_stats(maps.cells, config.blast_threshold_percent))
    return clock.seconds, probs, len(todo), computed


def bench_size(
    size: int,
    seed: int,
    engine: Engine,
    info: ModelInfo,
    classifier: CellClassifier | None,
    args: argparse.Namespace,
) -> None:
    """Print end to end, engine alone, overhead and the stage breakdown for one size x size smear."""
    field = generate_field(seed, size, size, mpp=MPP, blast_fraction=0.3)
    slide = Slide(field.image, MPP, "user", "bench.png", "")
    config = PipelineConfig()
    # Warm-up, and a check that the unrolled loop computes what the pipeline does.
    result = process_slide(slide, engine, info, config, classifier=classifier)
    _, probs, n_run, computed = staged_run(slide, engine, info, config, classifier)
    want, _, want_run = segment_prepared(
        prepare_image(slide.rgb, slide.mpp, info), (size, size), engine, config
    )
    if n_run != want_run or not np.allclose(probs, want, atol=1e-5):
        raise SystemExit(f"staged run differs from segment_prepared: {n_run} vs {want_run} tiles")
    end_to_end: list[float] = []
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        result = process_slide(slide, engine, info, config, classifier=classifier)
        end_to_end.append(time.perf_counter() - t0)
        seconds, _, _, _ = staged_run(slide, engine, info, config, classifier)
        if args.artifacts:
            t0 = time.perf_counter()
            render_artifacts(result, slide.rgb)
            seconds["artifacts"] = time.perf_counter() - t0
        for stage, s in seconds.items():
            stages[stage].append(s)
    e2e = statistics.median(end_to_end)
    med = {stage: statistics.median(s) for stage, s in stages.items() if s}
    engine_s = med["engine"]
    in_pipeline = sum(s for stage, s in med.items() if stage != "artifacts")
    print(
        f"smear {size}x{size} px (seed {seed}): {result.tiles_total} tiles, {result.tiles_run} run, "
        f"{result.stats.white_cells} cells found ({len(field.cells)} true)"
    )
    print(
        f"  end to end (process_slide) {e2e:7.2f} s   ({', '.join(f'{t:.2f}' for t in end_to_end)}), "
        f"{result.tiles_run / e2e:.1f} tiles/s"
    )
    print(f"  engine alone               {engine_s:7.2f} s   {result.tiles_run / engine_s:.1f} tiles/s")
    print(f"  overhead (e2e - engine)/e2e {(e2e - engine_s) / e2e:6.1%}   (target <= 10%)")
    # The same share for segmentation alone (what sliding-window tools do): cells and typing are analysis
    # the engine cannot do, the rest is the pipeline's own cost of feeding and blending tiles.
    segmentation = sum(med[s] for s in SEGMENTATION_STAGES)
    print(
        f"  segmentation overhead       {(segmentation - engine_s) / segmentation:6.1%}   (prepare..stitching: {segmentation:.2f} s)"
    )
    n_cells = max(1, result.stats.white_cells)
    print(
        f"  per cell: cells {med['cells'] / n_cells * 1000:.2f} ms, "
        f"typing {med.get('typing', 0.0) / n_cells * 1000:.2f} ms (target < 1 ms each)"
    )
    output = size * size
    flops = args.flops_per_px * computed / engine_s
    ratio = (output / e2e) / (flops / args.flops_per_px)
    print(
        f"  compute: {computed / output:.3f} computed pixels per output pixel, engine "
        f"{flops / 1e9:.0f} GFLOP/s on the model ({args.flops_per_px / 1e3:.1f} kFLOP per pixel), "
        f"{output / e2e / 1e6:.2f} output Mpx/s end to end"
    )
    print(f"  efficiency (output px/s) / (engine FLOP/s / FLOP per px) {ratio:6.1%}   (target >= 70%)")
    for stage in STAGES:
        if stage in med:
            note = "  (not in process_slide)" if stage == "artifacts" else ""
            print(f"    {stage:<10} {med[stage]:7.3f} s  {med[stage] / e2e:6.1%} of end to end{note}")
    print(
        f"    {'sum':<10} {in_pipeline:7.3f} s  {in_pipeline / e2e:6.1%} of end to end (stages of process_slide)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096], help="smear sides, px at 0.2 um/px")
    ap.add_argument("--seed", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=cpu_cores())
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--artifacts", action="store_true", help="also time render_artifacts")
    ap.add_argument("--engine", default="auto", help="engine kind (auto: int8 ONNX on CPU where shipped)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ap_kind = args.engine
    engine, info = load_engine(kind=ap_kind, threads=args.threads)
    model, _ = UNet.from_checkpoint(default_model_path())
    args.flops_per_px = conv_flops_per_pixel(model)
    classifier = load_cell_classifier("default")
    print(
        f"engine {engine.name}, {args.threads} threads, model {info.version}, "
        f"classifier {classifier.info.version if classifier else 'none'}, batch {PipelineConfig().batch_size}, "
        f"median of {args.repeat} after a warm-up"
    )
    for size in args.sizes:
        bench_size(size, args.seed, engine, info, classifier, args)


if __name__ == "__main__":
    main()
