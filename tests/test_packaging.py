"""The distribution: a built wheel installs the four packages under `blastq` with the shipped model."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("blastq-*.whl")
    return whl


def test_wheel_maps_the_folders_under_blastq_and_ships_the_model(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in ("core", "worker", "trainer", "cli"):
        assert f"blastq/{pkg}/__init__.py" in names
    assert "blastq/core/weights/blastq-unet-default.pt" in names
    assert "blastq/core/weights/MODEL_CARD.md" in names
    assert "blastq/migrations/env.py" in names and "blastq/migrations/versions/0001_initial.py" in names
    # no bare top-level packages that would collide in site-packages
    assert not any(n.split("/")[0] in ("core", "worker", "trainer", "cli", "tests") for n in names)


def test_wheel_imports_and_runs_in_a_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True
    )
    # Dependencies come from this environment's site-packages, appended after the fresh venv's own,
    # so blastq itself is imported from the wheel that was just installed.
    deps = sysconfig.get_paths()["purelib"]
    code = (
        f"import sys; sys.path.append({deps!r}); "
        "import blastq.core.pipeline, blastq.cli.main, blastq.trainer.train, blastq.worker, blastq.migrations; "
        "from blastq.core.engines import load_engine; e, info = load_engine(); "
        "print(blastq.core.pipeline.__file__); print(info.version)"
    )
    out = subprocess.run(
        [str(py), "-c", code], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    assert out[0].startswith(str(venv)) and out[1]
