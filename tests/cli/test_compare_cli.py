"""End-to-end: `blastq compare-classifiers` on a few real cells and synthetic fields."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from blastq.cli import classify
from blastq.cli.main import main


@pytest.fixture(scope="module")
def cli():
    if "compare-classifiers" not in main.commands:  # until cli/main.py registers the command itself
        classify.register(main)
    runner = CliRunner()
    return lambda *args: runner.invoke(main, [str(a) for a in args])


def test_compare_classifiers_writes_the_report_saves_the_winner_and_exits_0(cli, wbc_root, tmp_path):
    from blastq.core.cells.classify import load_classifier

    out, best = tmp_path / "report", tmp_path / "best.pt"
    result = cli(
        "compare-classifiers",
        "--wbc",
        wbc_root,
        "--synth-fields",
        4,
        "--folds",
        2,
        "--limit-cells",
        24,
        "--cnn-epochs",
        1,
        "--models",
        "svm,cnn",
        "--out",
        out,
        "--save-best",
        best,
    )
    assert result.exit_code == 0, result.output
    assert "winner:" in result.output and "took" in result.output
    assert {"index.html", "comparison.json", "macro_f1.png", "confusion_segmentation_wbc.png"} <= {
        p.name for p in out.iterdir()
    }
    data = json.loads((out / "comparison.json").read_text())
    assert data["models"] == ["svm", "cnn"] and data["folds"] == 2
    assert data["datasets"]["segmentation_wbc"]["cells"] == 24
    assert load_classifier(best).info.kind == data["winner"]


def test_an_unknown_model_is_one_line_and_exit_2(cli, wbc_root, tmp_path):
    result = cli("compare-classifiers", "--wbc", wbc_root, "--out", tmp_path / "r", "--models", "svm,resnet")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert (
        len(lines) == 1 and "resnet" in lines[0] and "svm,random_forest,cnn,unet_encoder_linear" in lines[0]
    )
    assert not (tmp_path / "r").exists()
