"""benchmarks/bench_gpu.py: its dry mode runs on the CPU end to end, and its check catches broken engines."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_gpu.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def probabilities(classes: np.ndarray) -> np.ndarray:
    """NCHW probabilities (5 channels) that call each pixel the given class with 0.9."""
    n, h, w = classes.shape
    p = np.full((n, 5, h, w), 0.05, np.float32)
    for c in range(3):
        p[:, c][classes == c] = 0.9
    return p


def test_the_check_fails_an_all_background_engine_and_passes_a_faithful_one():
    bench = bench_module()
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 3, (2, 64, 64))
    reference = probabilities(classes)
    assert bench.agreement(reference, reference.copy()).problem == ""
    black = bench.agreement(reference, probabilities(np.zeros_like(classes)))  # the fp16 overflow failure
    assert "all background" in black.problem and black.foreground_share == 0.0
    nan = reference.copy()
    nan[0, 0, 0, 0] = np.nan
    assert "NaN" in bench.agreement(reference, nan).problem
    drift = classes.copy()
    drift[0, :3] = (drift[0, :3] + 1) % 3  # 3 rows of 128 changed class: 2.3% of pixels
    worse = bench.agreement(reference, probabilities(drift))
    assert worse.problem and worse.class_agreement < 0.995


def test_dry_run_times_every_cpu_engine_and_a_slide_end_to_end(tmp_path):
    out = tmp_path / "gpu.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry", "--json", str(out), "--folder", str(tmp_path / "slides")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(out.read_text())
    rows = {r["engine"]: r for r in figures["engines"]}
    assert set(rows) >= {"torch fp32", "torch bf16", "onnx"}
    assert rows["onnx"]["verdict"] == "ok" and rows["onnx"]["class_agreement"] >= 0.995
    assert rows["onnx"]["tiles_per_s"] > 0 and rows["torch fp32"]["tiles_per_s"] > 0
    assert figures["slide"]["cells"] > 5 and figures["slide"]["side_px"] == 1024
    assert "| onnx | ok |" in run.stdout and "whole slide 1024 x 1024 px" in run.stdout
