"""Tiles per second of each engine present, on the same weights and tiles, and how far they disagree.

python benchmarks/bench_engines.py [--batch 8] [--tile 256] [--threads 2] [--rounds 10] [--model PATH]

CPU: torch fp32 (channels_last) and ONNX Runtime. With CUDA: torch fp32, fp16 and fp16 compiled,
ONNX Runtime's CUDA provider when installed, and TensorRT fp16 when torch-tensorrt is. Engines take
turns round by round, so a neighbour's load on a shared machine hits them alike. The figure is the
median over rounds; the spread (min..max) shows how noisy the machine was.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from blastq.core.segment import (
    Engine,
    OnnxEngine,
    TensorRTEngine,
    TorchEngine,
    UNet,
    cached_onnx,
    default_model_path,
    logits_to_probabilities,
    tensorrt_available,
    to_model_input,
)
from blastq.core.synth import generate_field


def tiles_batch(n: int, tile_px: int) -> np.ndarray:
    """`n` tiles cut from one synthetic smear: real cell content, not noise."""
    field = generate_field(7, tile_px * 2, tile_px * ((n + 1) // 2), blast_fraction=0.3)
    tiles = [
        field.image[r * tile_px : (r + 1) * tile_px, c * tile_px : (c + 1) * tile_px]
        for r in range(2)
        for c in range((n + 1) // 2)
    ]
    return to_model_input(np.stack(tiles[:n]))


def engines_present(
    model_path: Path, threads: int, cache_dir: Path
) -> list[tuple[str, Callable[[], Engine]]]:
    model, info = UNet.from_checkpoint(model_path)
    onnx_path = None
    try:
        onnx_path = cached_onnx(model, info, cache_dir)
    except Exception as exc:
        print(f"onnx: not available ({exc})")
    out: list[tuple[str, Callable[[], Engine]]] = [
        ("torch-cpu-fp32", lambda: TorchEngine(copy.deepcopy(model), "cpu"))
    ]
    if onnx_path:
        out.append(("onnx-cpu", lambda: OnnxEngine(onnx_path, info, "cpu", threads=threads)))
    if torch.cuda.is_available():
        out += [
            ("torch-cuda-fp32", lambda: TorchEngine(copy.deepcopy(model), "cuda", compile=False)),
            ("torch-cuda-fp16", lambda: TorchEngine(copy.deepcopy(model), "cuda", fp16=True, compile=False)),
            (
                "torch-cuda-fp16-compiled",
                lambda: TorchEngine(copy.deepcopy(model), "cuda", fp16=True, compile=True),
            ),
        ]
        import importlib.util

        if onnx_path and importlib.util.find_spec("onnxruntime"):
            import onnxruntime as ort

            if "CUDAExecutionProvider" in ort.get_available_providers():
                out.append(("onnx-cuda", lambda: OnnxEngine(onnx_path, info, "cuda", threads=threads)))
        if tensorrt_available():
            out.append(
                (
                    "tensorrt-fp16",
                    lambda: TensorRTEngine(copy.deepcopy(model), info, "cuda", cache_dir=cache_dir),
                )
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--model", type=Path, default=default_model_path())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = tiles_batch(args.batch, args.tile)
    with tempfile.TemporaryDirectory() as cache:
        built: list[tuple[str, Engine]] = []
        for label, make in engines_present(args.model, args.threads, Path(cache)):
            try:
                engine = make()
                engine.infer(x)  # warm-up: allocations, kernel choice, compilation
                engine.infer(x)
            except Exception as exc:
                print(f"{label}: failed ({type(exc).__name__}: {exc})")
                continue
            built.append((label, engine))
        seconds: dict[str, list[float]] = {label: [] for label, _ in built}
        for _ in range(args.rounds):
            for label, engine in built:
                t0 = time.perf_counter()
                engine.infer(x)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                seconds[label].append(time.perf_counter() - t0)
        reference = logits_to_probabilities(built[0][1].infer(x))
        print(
            f"batch {args.batch} x {args.tile}x{args.tile} tiles, {args.threads} CPU threads, "
            f"{args.rounds} rounds, model {args.model.name}, torch {torch.__version__}"
            + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
        )
        print(f"{'engine':<26} {'tiles/s':>8} {'(min..max)':>16} {'max |dp| vs torch-cpu-fp32':>28}")
        for label, engine in built:
            rates = [args.batch / s for s in seconds[label]]
            diff = float(np.abs(logits_to_probabilities(engine.infer(x)) - reference).max())
            spread = f"({min(rates):.1f}..{max(rates):.1f})"
            print(f"{label:<26} {statistics.median(rates):>8.1f} {spread:>16} {diff:>28.2e}")


if __name__ == "__main__":
    main()
