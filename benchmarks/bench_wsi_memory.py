"""Peak memory against slide size: whole slides of 4k, 10k and 20k pixels a side, chunk by chunk.

python benchmarks/bench_wsi_memory.py [--sizes 4096 10240 20480] [--folder /tmp/blastq-wsi-bench]
                                      [--chunk-px 3072] [--whole-image]

Each size is a synthetic whole slide (`blastq synth-slide`: a pyramidal tiled TIFF, zlib, 512 px tiles,
a mosaic of 2048 px synthetic fields at 0.2 um/px), written once into --folder and reused. Each slide is
then processed in a fresh child process, exactly as `blastq run` does for a whole slide (shipped U-Net,
default CPU engine, shipped cell classifier, artifacts written), and the child reports its peak resident
memory (ru_maxrss) and the resident memory after loading the model and classifier, before the slide.

Printed per size: seconds, cells, peak RSS, peak minus the loaded baseline, and the ratio of each
peak to the smallest slide's. Targets (issue 6): the 20k slide's peak within 1.5x of the 4k slide's, and
under 2 GB. --whole-image adds the small-image pipeline (read_slide + process_slide: the whole image in
memory) on the 4k slide for comparison.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, tempfile
from pathlib import Path

def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")

mode, path, chunk_px = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
from blastq.core.cells import load_cell_classifier
from blastq.core.segment import load_engine
engine, info = load_engine(None)
classifier = load_cell_classifier("default")
import numpy as np
from blastq.core.segment import to_model_input
engine.infer(to_model_input(np.full((1, 256, 256, 3), 245, np.uint8)))  # engine warm: its arenas exist
loaded = rss_mb()
start = time.perf_counter()
with tempfile.TemporaryDirectory() as out:
    if mode == "wsi":
        from blastq.core.pipeline import WholeSlideConfig, process_whole_slide
        from blastq.core.image import file_sha256, open_slide_reader
        with open_slide_reader(path) as reader:
            result = process_whole_slide(
                reader, engine, info, out, sha256=file_sha256(path), wsi=WholeSlideConfig(chunk_px=chunk_px),
                classifier=classifier,
            )
        cells, tiles = len(result.cells), result.tiles_run
    else:
        import tifffile
        from blastq.core.outputs import render_artifacts
        from blastq.core.pipeline import process_slide
        from blastq.core.image import Slide
        rgb = tifffile.imread(path, level=0)
        result = process_slide(Slide(rgb, 0.2, "user", path.name, "0"), engine, info, classifier=classifier)
        for a in render_artifacts(result, rgb):
            (Path(out) / a.name).write_bytes(a.data)
        cells, tiles = len(result.maps.cells), result.tiles_run
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "cells": cells, "tiles": tiles, "loaded_mb": loaded, "peak_mb": peak}))
"""


def ensure_slide(folder: Path, size: int) -> Path:
    from blastq.core.synth import write_synthetic_slide

    path = folder / f"synth_slide_{size}.tif"
    if not path.exists():
        t = time.perf_counter()
        info = write_synthetic_slide(path.with_suffix(".partial.tif"), size, size, seed=size)
        path.with_suffix(".partial.tif").rename(path)
        print(
            f"  wrote {path.name}: {info['white_cells']} white cells in the truth, "
            f"{path.stat().st_size / 2**20:.0f} MiB, {time.perf_counter() - t:.0f}s",
            flush=True,
        )
    return path


def measure(mode: str, path: Path, chunk_px: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(path), str(chunk_px)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{mode} {path.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 10240, 20480])
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "blastq-wsi-bench")
    parser.add_argument("--chunk-px", type=int, default=3072)
    parser.add_argument(
        "--whole-image", action="store_true", help="also the small-image pipeline on the smallest"
    )
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in sorted(args.sizes):
        path = ensure_slide(args.folder, size)
        figures = measure("wsi", path, args.chunk_px)
        rows.append((f"whole slide {size}", size, figures))
        print(f"  {size}: {json.dumps(figures)}", flush=True)
    if args.whole_image:
        size = min(args.sizes)
        figures = measure("image", ensure_slide(args.folder, size), args.chunk_px)
        rows.append((f"whole image {size}", size, figures))
    base = rows[0][2]["peak_mb"]
    print(f"\nchunk_px={args.chunk_px}; peak = max resident memory of the child (MiB)")
    print(
        f"{'run':<20}{'seconds':>9}{'cells':>8}{'tiles':>8}{'loaded':>9}{'peak':>9}{'peak-loaded':>13}{'x smallest':>12}"
    )
    for name, _, f in rows:
        print(
            f"{name:<20}{f['seconds']:>9.1f}{f['cells']:>8}{f['tiles']:>8}{f['loaded_mb']:>9.0f}{f['peak_mb']:>9.0f}"
            f"{f['peak_mb'] - f['loaded_mb']:>13.0f}{f['peak_mb'] / base:>12.2f}"
        )
    wsi = [r for r in rows if r[0].startswith("whole slide")]
    largest = wsi[-1][2]["peak_mb"]
    print(
        f"\nlargest / smallest whole-slide peak: {largest / base:.2f}x (target <= 1.5x); "
        f"largest peak {largest / 1024:.2f} GiB (target < 2 GB)"
    )


if __name__ == "__main__":
    main()
