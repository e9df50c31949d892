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
    for pkg in ("core", "worker", "trainer", "cli", "web"):
        assert f"blastq/{pkg}/__init__.py" in names
    assert "blastq/__init__.py" in names and "blastq/__main__.py" in names  # `python -m blastq`
    assert "blastq/core/weights/blastq-unet-default.pt" in names
    assert "blastq/core/weights/MODEL_CARD.md" in names
    assert "blastq/core/outputs/templates/report.html" in names  # the report pages render from the wheel
    # the review station's pages and script
    assert "blastq/web/templates/sample.html" in names and "blastq/web/static/review.js" in names
    assert "blastq/migrations/env.py" in names and "blastq/migrations/versions/0001_initial.py" in names
    # no bare top-level packages that would collide in site-packages
    assert not any(n.split("/")[0] in ("core", "worker", "trainer", "cli", "web", "tests") for n in names)


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
        "import blastq.core.pipeline.field, blastq.cli.main, blastq.trainer.train, blastq.worker, blastq.migrations; "
        "from blastq.core.segment.engines import load_engine; e, info = load_engine(); "
        "print(blastq.core.pipeline.field.__file__); print(info.version)"
    )
    out = subprocess.run(
        [str(py), "-c", code], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    assert out[0].startswith(str(venv)) and out[1]
    # `python -m blastq`, the dependencies on PYTHONPATH (after the venv's blastq: it has no `blastq`).
    env = {"PYTHONPATH": deps, "PATH": "/usr/bin:/bin"}
    for args in (["--version"], ["run", "--help"]):
        shown = subprocess.run(
            [str(py), "-m", "blastq", *args],
            check=True,
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        ).stdout
        assert shown.startswith("blastq, version ") if args == ["--version"] else "Usage: blastq run" in shown


def test_the_main_install_has_the_embedded_queue_and_bounded_ranges():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {
        d.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip(): d for d in project["dependencies"]
    }
    assert "celery" in names and names["kombu"].startswith(
        "kombu[sqlalchemy]"
    )  # `blastq worker` after `pip install .`
    # Calendar-versioned packages aside, each dependency states the major versions it is tested with.
    unbounded = [d for n, d in names.items() if "<" not in d and n not in ("tifffile", "imagecodecs")]
    assert not unbounded
