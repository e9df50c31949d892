"""Time one synthetic smear end to end on this machine and print the figures.

python benchmarks/bench_slide.py [--size 2048] [--threads 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from blastq.core.image import Slide
from blastq.core.pipeline import PipelineConfig, process_slide
from blastq.core.segment import load_engine
from blastq.core.synth import generate_field


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    field = generate_field(2048, args.size, args.size, blast_fraction=0.3)
    slide = Slide(field.image, 0.2, "user", "bench.png", "")
    engine, info = load_engine()
    config = PipelineConfig()
    process_slide(slide, engine, info, config)  # warm-up: first-call allocations, oneDNN kernel choice
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        result = process_slide(slide, engine, info, config)
        times.append(time.perf_counter() - t0)
    best = min(times)
    print(f"slide {args.size}x{args.size} px at 0.2 um/px, {args.threads} threads, model {info.version}")
    print(
        f"tiles: {result.tiles_total} total, {result.tiles_run} run, {result.tiles_total - result.tiles_run} skipped empty"
    )
    print(f"cells: {result.stats.white_cells} found ({len(field.cells)} true), blasts {result.stats.blasts}")
    print(f"seconds: best {best:.2f}, all {', '.join(f'{t:.2f}' for t in times)}")
    print(
        f"throughput: {args.size * args.size / best / 1e6:.2f} megapixels/s, {result.tiles_run / best:.1f} tiles/s"
    )


if __name__ == "__main__":
    main()
