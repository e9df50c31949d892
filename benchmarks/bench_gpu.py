"""The GPU path in one short run: every engine's tiles/s, its agreement with fp32, and a 20k slide end to end.

python benchmarks/bench_gpu.py [--device cuda] [--tile 1024] [--batch 8] [--slide-px 20480] [--rounds 10]
python benchmarks/bench_gpu.py --dry        # the same code on the CPU, small sizes (what CI runs)

Candidates, each on the same batch of synthetic-smear tiles (the shipped U-Net):
  torch fp32          eager, channels-last: the reference
  torch fp16 / bf16   autocast, channels-last (fp16 on CUDA only)
  torch compiled      torch.compile of the fp16 model (CUDA; --compile adds fp32 on CPU, minutes to build)
  onnx                ONNX Runtime (its CUDA provider on a GPU, when installed; the CPU one in --dry)
  tensorrt            torch-tensorrt fp16 (blastq[tensorrt]), when installed and on CUDA

Each is checked against fp32 before it is timed: the class maps must agree on >= 99.5% of pixels, the
share of pixels called white cell must be within 5% of fp32's, and no output may be NaN. That catches the
all-background output fp16 U-Nets give when an activation overflows (the failure other projects hit):
such a candidate is printed as FAILED with the reason and not timed. Then tiles/s: the median of --rounds
timed batches after warm-up batches (engine.infer returns host arrays, so every batch is synchronised).

Last, a synthetic whole slide (--slide-px a side, 0.2 um/px, written once as a tiled TIFF under --folder)
runs end to end through `process_whole_slide` with the fastest agreeing engine, cutting and stitching
overlapped with the engine (they are on a GPU engine: core.pipeline.field._run_batches), and the shipped
cell classifier. One table is printed; --json FILE writes the figures too. A candidate that FAILED its
check is a finding, not an error (exit status 0); exit status 2 when no GPU is visible without --dry.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from blastq.core.pipeline import PipelineConfig
from blastq.core.segment import (
    N_CLASSES,
    Engine,
    ModelInfo,
    OnnxEngine,
    TensorRTEngine,
    TorchEngine,
    UNet,
    cached_onnx,
    default_model_path,
    logits_to_probabilities,
    median_infer_seconds,
    tensorrt_available,
    to_model_input,
)
from blastq.core.synth import generate_field

MIN_CLASS_AGREEMENT = 0.995
MAX_FOREGROUND_CHANGE = 0.05


@dataclass
class Row:
    """One candidate's line of the table."""

    engine: str
    verdict: str  # "ok" or "FAILED: why" or "unavailable: why"
    class_agreement: float | None = None
    max_prob_diff: float | None = None
    foreground_share: float | None = None
    tiles_per_s: float | None = None
    megapixels_per_s: float | None = None


@dataclass
class Agreement:
    class_agreement: float
    max_prob_diff: float
    foreground_share: float
    problem: str  # "" when it agrees


def agreement(reference: np.ndarray, probs: np.ndarray) -> Agreement:
    """How far a candidate's NCHW probabilities are from fp32's, and what is wrong with them if anything."""
    if not np.isfinite(probs).all():
        return Agreement(0.0, float("inf"), 0.0, "NaN or infinite outputs")
    ref_cls, cls = reference[:, :N_CLASSES].argmax(1), probs[:, :N_CLASSES].argmax(1)
    agree = float((ref_cls == cls).mean())
    diff = float(np.abs(reference - probs).max())
    ref_fg, fg = float((ref_cls > 0).mean()), float((cls > 0).mean())
    problem = ""
    if ref_fg > 0 and abs(fg - ref_fg) > MAX_FOREGROUND_CHANGE * ref_fg:
        problem = f"white-cell pixels {fg:.1%} vs fp32 {ref_fg:.1%}"
        if fg == 0:
            problem += " (all background)"
    elif agree < MIN_CLASS_AGREEMENT:
        problem = f"class maps agree on {agree:.2%} of pixels (< {MIN_CLASS_AGREEMENT:.1%})"
    return Agreement(agree, diff, fg, problem)


def tile_batch(batch: int, tile: int, seed: int = 7) -> np.ndarray:
    """NCHW float32: `batch` tiles of a synthetic smear at the model's scale (cells, red cells, plasma)."""
    side = int(np.ceil(np.sqrt(batch)))
    field = generate_field(seed, tile * side, tile * side, mpp=0.2, blast_fraction=0.3)
    tiles = [
        field.image[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
        for r in range(side)
        for c in range(side)
    ][:batch]
    return to_model_input(np.stack(tiles))


def candidates(
    model: UNet, info: ModelInfo, device: str, cache: Path, compile_cpu: bool
) -> dict[str, Callable[[], Engine]]:
    """Name -> engine factory, for what this machine can run (a factory may still fail: then unavailable)."""
    cuda = device.startswith("cuda")

    def fresh() -> UNet:  # each engine moves or converts its own copy
        return copy.deepcopy(model)

    out: dict[str, Callable[[], Engine]] = {}
    if cuda:
        out["torch fp16"] = lambda: TorchEngine(fresh(), device, fp16=True, compile=False)
    out["torch bf16"] = lambda: TorchEngine(fresh(), device, bf16=True, compile=False)
    if cuda:
        out["torch fp16 compiled"] = lambda: TorchEngine(fresh(), device, fp16=True, compile=True)
    elif compile_cpu:
        out["torch fp32 compiled"] = lambda: TorchEngine(fresh(), device, compile=True)
    if importlib.util.find_spec("onnxruntime") is not None:
        out["onnx"] = lambda: OnnxEngine(cached_onnx(fresh(), info, cache), info, device=device)
    if cuda and tensorrt_available():
        out["tensorrt fp16"] = lambda: TensorRTEngine(fresh(), info, device, cache_dir=cache)
    return out


def run_candidates(
    factories: dict[str, Callable[[], Engine]],
    reference: Engine,
    x: np.ndarray,
    rounds: int,
    warmup: int,
) -> tuple[list[Row], dict[str, Engine]]:
    """The table's engine rows (fp32 first) and the engines that agreed, by name."""
    n, _, h, w = x.shape
    ref_probs = logits_to_probabilities(reference.infer(x))
    seconds = median_infer_seconds(reference, x, rounds, warmup)
    rows = [
        Row(
            "torch fp32",
            "ok",
            1.0,
            0.0,
            float((ref_probs[:, :N_CLASSES].argmax(1) > 0).mean()),
            n / seconds,
            n * h * w / seconds / 1e6,
        )
    ]
    agreed: dict[str, Engine] = {"torch fp32": reference}
    for name, make in factories.items():
        try:
            engine = make()
            probs = logits_to_probabilities(engine.infer(x))
        except Exception as exc:  # a missing provider, a failed build: say so and go on
            rows.append(Row(name, f"unavailable: {type(exc).__name__}: {' '.join(str(exc).split())[:120]}"))
            continue
        check = agreement(ref_probs, probs)
        if check.problem:
            rows.append(
                Row(
                    name,
                    f"FAILED: {check.problem}",
                    check.class_agreement,
                    check.max_prob_diff,
                    check.foreground_share,
                )
            )
            continue
        seconds = median_infer_seconds(engine, x, rounds, warmup)
        rows.append(
            Row(
                name,
                "ok",
                check.class_agreement,
                check.max_prob_diff,
                check.foreground_share,
                n / seconds,
                n * h * w / seconds / 1e6,
            )
        )
        agreed[name] = engine
    return rows, agreed


def slide_end_to_end(
    engine: Engine, info: ModelInfo, side: int, folder: Path, config: PipelineConfig
) -> dict:
    """Write (once) and run a side x side synthetic slide; seconds, cells and megapixels/s."""
    from blastq.core.cells import load_cell_classifier
    from blastq.core.image import file_sha256, open_slide_reader
    from blastq.core.pipeline import process_whole_slide
    from blastq.core.synth import write_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"bench-gpu-{side}.tif"
    if not path.is_file():
        write_synthetic_slide(path, side, side, seed=20480)
    classifier = load_cell_classifier("default")
    with tempfile.TemporaryDirectory() as out, open_slide_reader(path) as reader:
        t0 = time.perf_counter()
        result = process_whole_slide(
            reader, engine, info, out, sha256=file_sha256(path), config=config, classifier=classifier
        )
        seconds = time.perf_counter() - t0
    return {
        "side_px": side,
        "seconds": round(seconds, 2),
        "cells": len(result.cells),
        "tiles_run": result.tiles_run,
        "megapixels_per_s": round(side * side / seconds / 1e6, 2),
    }


def print_table(rows: list[Row], header: str) -> None:
    print(header)
    print("| engine | check vs fp32 | class agreement | max prob diff | white-cell px | tiles/s | Mpx/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:

        def f(v: float | None, fmt: str) -> str:
            return "" if v is None else format(v, fmt)

        print(
            f"| {r.engine} | {r.verdict} | {f(r.class_agreement, '.4%')} | {f(r.max_prob_diff, '.1e')} | "
            f"{f(r.foreground_share, '.1%')} | {f(r.tiles_per_s, '.1f')} | {f(r.megapixels_per_s, '.1f')} |"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--dry",
        action="store_true",
        help="run on the CPU with small sizes (CI): tile 256, batch 2, slide 1024",
    )
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda, cpu with --dry)")
    ap.add_argument("--tile", type=int, default=None, help="tile side in px (default 1024; 256 with --dry)")
    ap.add_argument("--batch", type=int, default=None, help="tiles per batch (default 8; 2 with --dry)")
    ap.add_argument(
        "--slide-px",
        type=int,
        default=None,
        help="whole-slide side (default 20480; 1024 with --dry; 0: skip)",
    )
    ap.add_argument(
        "--rounds", type=int, default=None, help="timed batches per engine (default 10; 2 with --dry)"
    )
    ap.add_argument("--compile", action="store_true", help="also torch.compile fp32 on the CPU (minutes)")
    ap.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "blastq-bench-gpu")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.dry else "cuda")
    tile = args.tile or (256 if args.dry else 1024)
    batch = args.batch or (2 if args.dry else 8)
    side = args.slide_px if args.slide_px is not None else (1024 if args.dry else 20480)
    rounds = args.rounds or (2 if args.dry else 10)
    warmup = 1 if args.dry else 3
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"no CUDA GPU visible to torch {torch.__version__}: run with --dry for the CPU", file=sys.stderr
        )
        return 2

    model, info = UNet.from_checkpoint(default_model_path())
    reference = TorchEngine(copy.deepcopy(model), device, compile=False)
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"
    x = tile_batch(batch, tile)
    with tempfile.TemporaryDirectory() as cache:
        factories = candidates(model, info, device, Path(cache), args.compile)
        rows, agreed = run_candidates(factories, reference, x, rounds, warmup)
        header = (
            f"{gpu}, torch {torch.__version__}, model {info.version}, batches of {batch} x {tile} px tiles, "
            f"median of {rounds} after {warmup} warm-up{' (dry run on the CPU)' if args.dry else ''}"
        )
        print_table(rows, header)
        slide = None
        if side > 0:
            ok = [r for r in rows if r.verdict == "ok" and r.engine in agreed]
            best = max(ok, key=lambda r: r.tiles_per_s or 0.0)
            config = PipelineConfig(tile_px=tile, batch_size=batch)
            slide = slide_end_to_end(agreed[best.engine], info, side, args.folder, config)
            slide["engine"] = best.engine
            print(
                f"whole slide {side} x {side} px (0.2 um/px) with {best.engine}, cutting and stitching "
                f"overlapped: {slide['seconds']} s, {slide['megapixels_per_s']} Mpx/s, {slide['cells']} cells, "
                f"{slide['tiles_run']} tiles run"
            )
    if args.json:
        args.json.write_text(
            json.dumps({"header": header, "engines": [asdict(r) for r in rows], "slide": slide}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
