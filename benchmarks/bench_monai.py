"""blastq's pipeline against the sliding-window script a user would write with MONAI, on one smear.

python benchmarks/bench_monai.py [--size 4096] [--threads N] [--repeat 3] [--seed 2048] [--no-torch]

blastq runs `process_slide` with its defaults: the default CPU engine (`load_engine(kind="auto")`: ONNX
Runtime), tiles of up to 1024 px overlapping by 128 px, each deciding the pixels it is most central to
(the whole-image answer: core.segment.tiling), plain plasma skipped. MONAI's `sliding_window_inference`
runs three ways, each followed by the same `extract_cells` and `slide_stats` (what the user script does):

  monai, same tiles     blastq's engine, blastq's tile size and overlap (overlap=128/1024), its
                        "constant" blending (the mean where windows overlap: MONAI has no cut-in-the-middle)
  monai, 256 gaussian   blastq's engine, 256 px windows, overlap 0.25, Gaussian blending (MONAI's usual)
  monai, torch          the same on the torch model, eager (eval, inference_mode): what a MONAI user has

So the first ratio is blastq's loop against MONAI's on the same engine and the same windows; the others
add MONAI's usual window and the engine. Both sides get the same threads (torch and ONNX Runtime); both
blend logits or probabilities as they do (MONAI logits, blastq probabilities of the tiles' own pixels).
Neither types cells (process_slide without a classifier; it still cuts every cell's gallery crop).

Timings are medians over --repeat rounds after one warm-up round; candidates take turns within a round,
so a neighbour's load on a shared machine hits them alike. The class maps are compared with blastq's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import monai
import numpy as np
import torch
from monai.inferers import sliding_window_inference

from blastq.core.cells import extract_cells, slide_stats
from blastq.core.image import Slide
from blastq.core.pipeline import PipelineConfig, prepare_image, process_slide, segment_probabilities
from blastq.core.segment import (
    N_CLASSES,
    Engine,
    ModelInfo,
    UNet,
    cpu_cores,
    default_model_path,
    load_engine,
    logits_to_probabilities,
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
    rgb: np.ndarray, mpp: float, predictor: Predictor, info: ModelInfo, window: Window, batch_size: int
) -> np.ndarray:
    """(C, H, W) probabilities the way a MONAI user would get them: one sliding window over the image."""
    work = prepare_image(rgb, mpp, info)
    x = torch.from_numpy(to_model_input(work[None]))
    with torch.inference_mode():
        logits = sliding_window_inference(
            x,
            roi_size=(window.roi_px, window.roi_px),
            sw_batch_size=batch_size,
            predictor=predictor,
            overlap=window.overlap,
            mode=window.mode,
        )
    probs = logits_to_probabilities(torch.as_tensor(logits).numpy())[0]
    height, width = rgb.shape[:2]
    if probs.shape[1:] != (height, width):
        probs = np.stack([cv2.resize(c, (width, height), interpolation=cv2.INTER_LINEAR) for c in probs])
    return probs


@dataclass(frozen=True)
class Window:
    """MONAI's sliding-window parameters."""

    roi_px: int
    overlap: float  # a share of the window
    mode: str  # "constant" or "gaussian"

    def windows(self, height: int, width: int) -> int:
        """How many windows MONAI runs on a height x width image (its scan interval, rounded as it does)."""
        step = max(1, int(self.roi_px * (1 - self.overlap)))

        def n(length: int) -> int:
            return 1 if length <= self.roi_px else -(-(length - self.roi_px) // step) + 1

        return n(height) * n(width)


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
    ap.add_argument("--no-torch", action="store_true", help="leave out MONAI on the torch model (slowest)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    field = generate_field(args.seed, args.size, args.size, mpp=MPP, blast_fraction=0.3)
    slide = Slide(field.image, MPP, "user", "bench.png", "")
    config = PipelineConfig()  # 1024 px tiles, 128 px overlap, plasma skipped
    engine, info = load_engine(default_model_path(), kind="auto", threads=args.threads)
    model, _ = UNet.from_checkpoint(default_model_path())
    model.eval()
    same = Window(config.tile_px, config.overlap_px / config.tile_px, "constant")
    usual = Window(256, 0.25, "gaussian")

    def run_blastq() -> tuple[Run, np.ndarray]:
        t0 = time.perf_counter()
        result = process_slide(slide, engine, info, config)
        t1 = time.perf_counter()
        probs, _, n_run = segment_probabilities(slide.rgb, slide.mpp, engine, info, config)
        t2 = time.perf_counter()
        return Run(t1 - t0, t2 - t1, result.stats.white_cells, result.stats.blasts, n_run), probs

    def monai_run(predictor: Predictor, window: Window, batch: int) -> Callable[[], tuple[Run, np.ndarray]]:
        def run() -> tuple[Run, np.ndarray]:
            t0 = time.perf_counter()
            probs = monai_segment(slide.rgb, slide.mpp, predictor, info, window, batch)
            t1 = time.perf_counter()
            maps = extract_cells(probs, slide.rgb, slide.mpp)
            stats = slide_stats(maps.cells, config.blast_threshold_percent)
            t2 = time.perf_counter()
            n = window.windows(args.size, args.size)
            return Run(t2 - t0, t1 - t0, stats.white_cells, stats.blasts, n), probs

        return run

    on_engine = engine_predictor(engine)
    candidates: dict[str, Callable[[], tuple[Run, np.ndarray]]] = {
        "blastq": run_blastq,
        "monai, same tiles": monai_run(on_engine, same, config.batch_size),
        "monai, 256 gaussian": monai_run(on_engine, usual, 8),
    }
    if not args.no_torch:
        candidates["monai, torch"] = monai_run(model, usual, 8)
    warm, probs = {}, {}
    for label, run in candidates.items():  # warm-up; its outputs are the ones compared
        warm[label], probs[label] = run()
    runs: dict[str, list[Run]] = {label: [] for label in candidates}
    for _ in range(args.repeat):
        for label, run in candidates.items():
            runs[label].append(run()[0])
    total = {label: statistics.median(r.total_s for r in rs) for label, rs in runs.items()}
    segment = {label: statistics.median(r.segment_s for r in rs) for label, rs in runs.items()}

    print(
        f"smear {args.size}x{args.size} px at {MPP} um/px (seed {args.seed}, {len(field.cells)} true white cells), "
        f"model {info.version}, engine {engine.name}, {args.threads} threads, monai {monai.__version__}, "
        f"torch {torch.__version__}"
    )
    print(
        f"blastq: tiles up to {config.tile_px} px, overlap {config.overlap_px} px, batch {config.batch_size}: "
        f"{warm['blastq'].tiles_run} run"
    )
    print(f"seconds, median of {args.repeat} after a warm-up:")
    print(f"  {'':<22} {'end to end':>11} {'segment only':>13} {'windows':>8}   (end to end, each run)")
    for label, rs in runs.items():
        each = ", ".join(f"{r.total_s:.2f}" for r in rs)
        print(
            f"  {label:<22} {total[label]:>11.2f} {segment[label]:>13.2f} {warm[label].tiles_run:>8}   ({each})"
        )
    targets = {"monai, same tiles": 1.5, "monai, torch": 4.0}
    for label in runs:
        if label != "blastq":
            target = f" (target >= {targets[label]}x)" if label in targets else ""
            print(
                f"ratio {label} / blastq: end to end {total[label] / total['blastq']:.2f}x, "
                f"segment only {segment[label] / segment['blastq']:.2f}x{target}"
            )
    counts = ", ".join(f"{label} {r.white_cells} ({r.blasts} blasts)" for label, r in warm.items())
    print(f"white cells: {counts}; true {len(field.cells)}")
    blastq_map = class_map(probs["blastq"])
    for label in runs:
        if label != "blastq":
            print(f"class maps, blastq vs {label}: {agreement(blastq_map, class_map(probs[label]))}")


if __name__ == "__main__":
    main()
