"""blastq's pipeline against the sliding-window script a user would write with MONAI, on one smear.

python benchmarks/bench_monai.py [--size 4096] [--threads N] [--repeat 3] [--seed 2048] [--monai-engine]

Both sides use the shipped U-Net, the same preprocessing (`prepare_image`), 256 px tiles overlapping by
64 px (MONAI: overlap=0.25), the same Gaussian tile weight (sigma = tile/8, floor 1e-3; checked below),
softmax/sigmoid as `logits_to_probabilities`, and cells by `extract_cells`. blastq runs `process_slide`
with its default CPU engine (`load_engine(kind="auto")`: ONNX Runtime where installed) and skips tiles of
plain plasma; the MONAI script runs the torch model eagerly (eval, inference_mode) on every window and
blends logits, not probabilities. Both get the same threads (torch and ONNX Runtime). `--monai-engine`
adds MONAI's loop driving blastq's engine, which splits blastq's lead into engine and loop.

Timings are medians over --repeat rounds after one warm-up round; candidates take turns within a round,
so a neighbour's load on a shared machine hits them alike. MONAI's end to end is its segmentation plus
`extract_cells` and `slide_stats` from the same run (what the user script does, in order).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import cv2
import monai
import numpy as np
import torch
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference

from blastq.core.cells import extract_cells, slide_stats
from blastq.core.image import Slide
from blastq.core.pipeline import PipelineConfig, prepare_image, process_slide, segment_probabilities
from blastq.core.segment import (
    N_CLASSES,
    Engine,
    ModelInfo,
    UNet,
    blend_window,
    cpu_cores,
    default_model_path,
    load_engine,
    logits_to_probabilities,
    tile_grid,
    to_model_input,
)
from blastq.core.synth import generate_field

MPP = 0.2
Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Run:
    """One timed run of one candidate."""

    total_s: float
    segment_s: float
    white_cells: int
    blasts: int
    tiles_run: int


def monai_segment(
    rgb: np.ndarray, mpp: float, predictor: Predictor, info: ModelInfo, config: PipelineConfig
) -> np.ndarray:
    """(C, H, W) probabilities the way a MONAI user would get them: one sliding window over the image."""
    work = prepare_image(rgb, mpp, info)
    x = torch.from_numpy(to_model_input(work[None]))
    with torch.inference_mode():
        logits = sliding_window_inference(
            x,
            roi_size=(config.tile_px, config.tile_px),
            sw_batch_size=config.batch_size,
            predictor=predictor,
            overlap=config.overlap_px / config.tile_px,
            mode="gaussian",
        )
    probs = logits_to_probabilities(torch.as_tensor(logits).numpy())[0]
    height, width = rgb.shape[:2]
    if probs.shape[1:] != (height, width):
        probs = np.stack([cv2.resize(c, (width, height), interpolation=cv2.INTER_LINEAR) for c in probs])
    return probs


def engine_predictor(engine: Engine) -> Predictor:
    """blastq's engine behind MONAI's predictor interface (NCHW tensor in, NCHW tensor out)."""
    return lambda x: torch.from_numpy(engine.infer(x.numpy()))


def class_map(probs: np.ndarray) -> np.ndarray:
    """HW uint8: argmax of the class channels (0 background, 1 white cell, 2 blast)."""
    return probs[:N_CLASSES].argmax(0).astype(np.uint8)


def agreement(a: np.ndarray, b: np.ndarray) -> str:
    """Pixel agreement of two class maps: over all pixels, and over pixels either calls a cell."""
    cells = (a > 0) | (b > 0)
    on_cells = float((a[cells] == b[cells]).mean()) if cells.any() else 1.0
    return f"{(a == b).mean():.5f} of all pixels, {on_cells:.4f} of pixels either calls a cell"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096, help="smear side, px at 0.2 um/px")
    ap.add_argument("--seed", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=cpu_cores())
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--monai-engine", action="store_true", help="also time MONAI's loop on blastq's engine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    field = generate_field(args.seed, args.size, args.size, mpp=MPP, blast_fraction=0.3)
    slide = Slide(field.image, MPP, "user", "bench.png", "")
    config = PipelineConfig()  # 256 px tiles, 64 px overlap, batch 8, empty tiles skipped
    engine, info = load_engine(default_model_path(), kind="auto", threads=args.threads)
    model, _ = UNet.from_checkpoint(default_model_path())
    model.eval()

    n_tiles = len(tile_grid(args.size, args.size, config.tile_px, config.overlap_px))  # MONAI's windows too
    # MONAI leaves its peak at exp(-0.5^2 / 2 sigma^2)^2 (no pixel sits on the centre), blastq scales
    # its to 1: a constant factor, which cancels in the weighted mean. Compare the shapes.
    w_monai = compute_importance_map((config.tile_px,) * 2, "gaussian").numpy()
    window_diff = float(np.abs(blend_window(config.tile_px) - w_monai / w_monai.max()).max())

    # Each run returns its probabilities too ((C, H, W) float32); only the warm-up's are kept.
    def run_blastq() -> tuple[Run, np.ndarray]:
        t0 = time.perf_counter()
        result = process_slide(slide, engine, info, config)
        t1 = time.perf_counter()
        probs, _, n_run = segment_probabilities(slide.rgb, slide.mpp, engine, info, config)
        t2 = time.perf_counter()
        return Run(t1 - t0, t2 - t1, result.stats.white_cells, result.stats.blasts, n_run), probs

    def monai_run(predictor: Predictor) -> Callable[[], tuple[Run, np.ndarray]]:
        def run() -> tuple[Run, np.ndarray]:
            t0 = time.perf_counter()
            probs = monai_segment(slide.rgb, slide.mpp, predictor, info, config)
            t1 = time.perf_counter()
            maps = extract_cells(probs, slide.rgb, slide.mpp)
            stats = slide_stats(maps.cells, config.blast_threshold_percent)
            t2 = time.perf_counter()
            return Run(t2 - t0, t1 - t0, stats.white_cells, stats.blasts, n_tiles), probs

        return run

    candidates: dict[str, Callable[[], tuple[Run, np.ndarray]]] = {
        "blastq": run_blastq,
        "monai": monai_run(model),
    }
    if args.monai_engine:
        candidates["monai+blastq engine"] = monai_run(engine_predictor(engine))
    warm, probs = {}, {}
    for label, run in candidates.items():  # warm-up; its outputs are the ones compared
        warm[label], probs[label] = run()
    runs: dict[str, list[Run]] = {label: [] for label in candidates}
    for _ in range(args.repeat):
        for label, run in candidates.items():
            runs[label].append(run()[0])
    total = {label: statistics.median(r.total_s for r in rs) for label, rs in runs.items()}
    segment = {label: statistics.median(r.segment_s for r in rs) for label, rs in runs.items()}
    # Agreement with empty-tile skipping off too: what remains is logits- vs probability-blending.
    probs_all, _, _ = segment_probabilities(
        slide.rgb, slide.mpp, engine, info, replace(config, skip_empty_tiles=False)
    )

    print(
        f"smear {args.size}x{args.size} px at {MPP} um/px (seed {args.seed}, {len(field.cells)} true white cells), "
        f"model {info.version}, tiles {config.tile_px} px, overlap {config.overlap_px} px, batch {config.batch_size}"
    )
    print(
        f"blastq: engine {engine.name}, {args.threads} threads; tiles {n_tiles} total, "
        f"{warm['blastq'].tiles_run} run, {n_tiles - warm['blastq'].tiles_run} skipped empty"
    )
    print(
        f"monai {monai.__version__}: torch {torch.__version__} eager, {torch.get_num_threads()} threads, "
        f"{n_tiles} windows, sw_batch_size {config.batch_size}, overlap {config.overlap_px / config.tile_px}, gaussian"
    )
    print(f"blend windows, each scaled to peak 1: max |w_blastq - w_monai| = {window_diff:.1e}")
    print(f"seconds, median of {args.repeat} after a warm-up:")
    print(f"  {'':<20} {'end to end':>11} {'segment only':>13}   (end to end, each run)")
    for label, rs in runs.items():
        each = ", ".join(f"{r.total_s:.2f}" for r in rs)
        print(f"  {label:<20} {total[label]:>11.2f} {segment[label]:>13.2f}   ({each})")
    for label in runs:
        if label != "blastq":
            print(
                f"ratio {label}/blastq: end to end {total[label] / total['blastq']:.2f}x, "
                f"segment only {segment[label] / segment['blastq']:.2f}x (target >= 1.5x)"
            )
    counts = ", ".join(f"{label} {r.white_cells} ({r.blasts} blasts)" for label, r in warm.items())
    print(f"white cells: {counts}; true {len(field.cells)}")
    blastq_map, monai_map, all_map = (class_map(p) for p in (probs["blastq"], probs["monai"], probs_all))
    print(f"class maps, blastq vs monai: {agreement(blastq_map, monai_map)}")
    print(f"class maps, blastq without empty-tile skipping vs monai: {agreement(all_map, monai_map)}")
    print(f"class maps, blastq with vs without skipping: {agreement(blastq_map, all_map)}")
    if args.monai_engine:
        mixed_map = class_map(probs["monai+blastq engine"])
        print(f"class maps, monai on torch vs on blastq's engine: {agreement(monai_map, mixed_map)}")


if __name__ == "__main__":
    main()
