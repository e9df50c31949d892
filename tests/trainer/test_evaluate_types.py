"""Scoring the cell classifier on synthetic fields: type accuracy, confusion, differential error, review."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from blastq.cli.main import main
from blastq.core.cells.cellcrops import CELL_TYPES
from blastq.core.cells.classify import CellClassifier, ClassifierInfo
from blastq.core.synth.field import generate_field, read_field_masks, write_dataset
from blastq.trainer.evaluate import evaluate_synthetic, matched_pairs, synth_truth
from blastq.trainer.metrics import match_instances
from blastq.trainer.report import EvaluationReport, synth_folder_kinds

# Denser than the default smear (6 per 10k um2): ~20 cells per 512 px field, every kind present.
SEEDS = (101, 102, 103)


class AlwaysEosinophil(CellClassifier):
    """A classifier that is sure every cell is an eosinophil: the figures must show it."""

    def __init__(self) -> None:
        super().__init__(ClassifierInfo(version="always-eosinophil", kind="svm"))

    def predict_proba(self, crops):
        out = np.zeros((len(crops), len(CELL_TYPES)), np.float32)
        out[:, CELL_TYPES.index("eosinophil")] = 1.0
        return out


@pytest.fixture(scope="module")
def fields():
    return [generate_field(seed, 512, 512, wbc_per_10k_um2=20.0) for seed in SEEDS]


@pytest.fixture(scope="module")
def shipped_evaluation(shipped_engine, fields):
    engine, info = shipped_engine
    return evaluate_synthetic(engine, info, [synth_truth(f) for f in fields])


def report_of(evaluation) -> EvaluationReport:
    return EvaluationReport("v", "fields", "test", synthetic=evaluation)


def test_the_shipped_classifier_types_synthetic_cells_and_their_differential_well(shipped_evaluation, fields):
    types = shipped_evaluation.cell_types
    assert types is not None and types.classifier_version and types.fields == len(fields)
    assert types.true_counts == tuple(sum(c.kind == t for f in fields for c in f.cells) for t in CELL_TYPES)
    assert types.accuracy >= 0.8
    assert types.differential_mean_abs_error <= 5.0
    assert max(types.differential_abs_error) <= 10.0
    for name in ("neutrophil", "lymphocyte", "blast"):
        assert types.type_counts(name).f1 >= 0.7, name
    assert 0.0 <= types.review_share <= 0.5


def test_confusion_counts_sum_to_the_matched_cells(shipped_evaluation):
    types = shipped_evaluation.cell_types
    assert types.matched_cells == shipped_evaluation.cell_objects.tp > 0
    assert len(types.confusion) == len(CELL_TYPES) and {len(r) for r in types.confusion} == {len(CELL_TYPES)}
    rows = [sum(row) for row in types.confusion]
    assert all(matched <= true for matched, true in zip(rows, types.true_counts, strict=True))


def test_the_report_shows_the_typing_figures(shipped_evaluation):
    report = report_of(shipped_evaluation)
    figures = json.loads(json.dumps(report.as_dict(), allow_nan=False))["synthetic"]["cell_types"]
    assert figures["accuracy"] == round(shipped_evaluation.cell_types.accuracy, 4)
    assert sum(sum(row.values()) for row in figures["confusion"].values()) == figures["matched_cells"]
    assert set(figures["differential_abs_error"]) == set(CELL_TYPES)
    assert {"neutrophil", "blast"} <= set(figures["per_type"]) and "basophil" not in figures["per_type"]
    assert 0.0 <= figures["review_share"] <= 1.0
    text = report.as_text()
    assert "type accuracy" in text and "confusion" in text and "marked for review" in text


def test_a_wrong_classifier_gives_low_accuracy_and_a_large_differential_error(shipped_engine, fields):
    engine, info = shipped_engine
    wrong = evaluate_synthetic(engine, info, [synth_truth(f) for f in fields], classifier=AlwaysEosinophil())
    types = wrong.cell_types
    assert types.classifier_version == "always-eosinophil"
    # Blasts stay the segmentation's call: only they and the true eosinophils come out right.
    assert types.accuracy < 0.5
    assert types.type_counts("neutrophil").recall == 0.0
    assert types.differential_mean_abs_error > 15.0
    assert types.differential_abs_error[CELL_TYPES.index("eosinophil")] > 30.0


def test_without_a_classifier_no_typing_figures_appear(shipped_engine, fields):
    engine, info = shipped_engine
    evaluation = evaluate_synthetic(engine, info, [synth_truth(fields[0])], classifier=None)
    assert evaluation.cell_types is None
    report = report_of(evaluation)
    assert "cell_types" not in report.as_dict()["synthetic"] and "cell types" not in report.as_text()


def test_fields_without_kinds_score_only_the_review_share(shipped_engine, fields):
    engine, info = shipped_engine
    f = fields[0]
    types = evaluate_synthetic(engine, info, [(f.image, f.classes, f.instances, f.mpp)]).cell_types
    assert types.fields == 0 and types.cells > 0 and types.differential_abs_error == ()
    figures = report_of(
        evaluate_synthetic(engine, info, [(f.image, f.classes, f.instances, f.mpp)])
    ).as_dict()
    assert "accuracy" not in figures["synthetic"]["cell_types"]


def test_matched_pairs_are_the_pairs_match_instances_counts():
    truth = generate_field(7, 256, 256, wbc_per_10k_um2=30.0).instances
    pred = np.roll(truth, 6, axis=1)  # small cells shift below IoU 0.5, large ones stay matched
    pred[:40] = 0
    pairs = matched_pairs(pred, truth)
    assert len(pairs) == match_instances(pred, truth).tp > 0
    assert len({p for p, _ in pairs}) == len({t for _, t in pairs}) == len(pairs)


def test_kinds_of_a_synth_folder_come_back_only_when_the_field_regenerates_exactly(tmp_path):
    (path,) = write_dataset(tmp_path / "a", 1, seed=9, height_px=256, width_px=256)
    classes, _, instances = read_field_masks(path)
    field = generate_field(9, 256, 256)
    assert len(field.cells) > 1
    assert synth_folder_kinds(path, classes, instances, 0.2) == {c.cell_id: c.kind for c in field.cells}
    # Written with another blast fraction, the field regenerated with the default one differs.
    (other,) = write_dataset(tmp_path / "b", 1, seed=9, height_px=256, width_px=256, blast_fraction=0.9)
    classes, _, instances = read_field_masks(other)
    assert synth_folder_kinds(other, classes, instances, 0.2) is None
    assert synth_folder_kinds(tmp_path / "renamed.png", classes, instances, 0.2) is None


def test_blastq_evaluate_on_a_synth_folder_scores_the_shipped_classifier(tmp_path, monkeypatch):
    monkeypatch.setenv("BLASTQ_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("BLASTQ_MODEL", raising=False)
    runner = CliRunner()
    folder = tmp_path / "fields"
    args = ["synth", "--count", "2", "--size", "512", "--seed", "40", "--out", str(folder)]
    assert runner.invoke(main, args).exit_code == 0
    result = runner.invoke(main, ["evaluate", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    types = json.loads(result.stdout)["synthetic"]["cell_types"]
    assert types["classifier_version"] and types["fields_with_kinds"] == 2
    assert types["matched_cells"] > 0 and types["accuracy"] >= 0.8
