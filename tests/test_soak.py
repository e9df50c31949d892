"""benchmarks/soak.py in small: a few slides through two workers with every kind of fault it injects, so the
script keeps working (its full run, 200 slides, is minutes long and stays out of the test suite)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_a_small_soak_loses_and_duplicates_nothing(tmp_path):
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed")
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "soak.py"), "--slides", "6", "--size", "256",
         "--kill-every", "5,9", "--db-outage-s", "4", "--timeout-s", "420", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    faults = report["faults"]
    assert faults["broker_restarts"] == 1 and faults["database_outage_s"] >= 4, faults
    assert faults["pool_kills"] + faults["main_kills"] >= 1, faults
    counts = {k: report[k] for k in ("submitted", "succeeded", "failed", "lost")}
    assert counts == {"submitted": 6, "succeeded": 6, "failed": 0, "lost": 0}, report["failure_reasons"]
    assert report["duplicated_result_rows"] == report["duplicated_cell_rows"] == 0
    assert report["result_rows"] == report["distinct_slides_succeeded"] == 6
    assert report["succeeded_without_all_outputs"] == report["orphaned_store_objects"] == 0
    assert report["clean"] and done.returncode == 0
