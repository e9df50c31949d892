"""The classifier comparison: metrics, suspect labels, the winner, the report, a small real run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from blastq.core.cells.cellcrops import CELL_TYPES, CellCrop
from blastq.core.common.errors import InvalidConfig
from blastq.trainer.compare import (
    MODELS,
    REAL,
    SYNTHETIC,
    Comparison,
    DatasetResult,
    ModelResult,
    compare_cells,
    confusion_matrix,
    default_unet,
    fit_final,
    limit_cells,
    load_cells,
    parse_models,
    scores,
    suspect_labels,
)
from blastq.trainer.compare_report import confusion_png_name, write_comparison_report

N, L, M, E, B, X = range(6)  # CELL_TYPES indices: neutrophil .. blast


# ---------------------------------------------------------------- metrics by hand


def test_confusion_matrix_counts_given_rows_against_predicted_columns():
    cm = confusion_matrix(np.array([N, N, L, M]), np.array([N, L, L, N]))
    assert cm.shape == (6, 6)
    assert cm[N, N] == 1 and cm[N, L] == 1 and cm[L, L] == 1 and cm[M, N] == 1
    assert cm.sum() == 4


def test_scores_of_a_hand_made_example():
    given = np.array([N, N, N, N, L, L, M, M])
    predicted = np.array([N, N, N, L, L, N, M, X])  # one blast predicted though the data holds none
    s = scores(given, predicted)
    assert s.accuracy == pytest.approx(5 / 8)
    n, lym, mono = s.by_name("neutrophil"), s.by_name("lymphocyte"), s.by_name("monocyte")
    assert (n.precision, n.recall) == (pytest.approx(3 / 4), pytest.approx(3 / 4))
    assert (lym.precision, lym.recall) == (pytest.approx(1 / 2), pytest.approx(1 / 2))
    assert (mono.precision, mono.recall, mono.f1) == (1.0, pytest.approx(1 / 2), pytest.approx(2 / 3))
    # The macro averages neutrophil, lymphocyte and monocyte only: the absent blast is left out.
    assert s.macro_over == ("neutrophil", "lymphocyte", "monocyte")
    assert s.macro_precision == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    assert s.macro_recall == pytest.approx((3 / 4 + 1 / 2 + 1 / 2) / 3)
    assert s.macro_f1 == pytest.approx((3 / 4 + 1 / 2 + 2 / 3) / 3)
    blast = s.by_name("blast")
    assert (blast.cells, blast.predicted, blast.precision, blast.recall, blast.f1) == (0, 1, 0.0, 0.0, 0.0)
    assert s.confusion[M][X] == 1


def test_a_class_never_predicted_scores_zero_not_nan():
    s = scores(np.array([N, E]), np.array([N, N]))
    eos = s.by_name("eosinophil")
    assert (eos.precision, eos.recall, eos.f1) == (0.0, 0.0, 0.0)
    assert np.isfinite([s.macro_precision, s.macro_recall, s.macro_f1]).all()


def test_classes_with_few_cells_are_marked_not_meaningful():
    given = np.array([N] * 12 + [B] * 4)
    s = scores(given, given)
    assert s.by_name("neutrophil").meaningful and not s.by_name("basophil").meaningful
    assert "basophil" in s.macro_over  # reported and averaged, just flagged


def test_mismatched_or_out_of_range_labels_are_refused():
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 6]), np.array([0, 1]))


def test_parse_models_keeps_the_canonical_order_and_names_the_bad_one():
    assert parse_models("cnn, svm") == ("svm", "cnn")
    with pytest.raises(InvalidConfig, match="resnet"):
        parse_models("svm,resnet")
    with pytest.raises(InvalidConfig):
        parse_models(" , ")


# ---------------------------------------------------------------- hand-made comparisons


def _result(model: str, given: list[int], predicted: list[int]) -> ModelResult:
    return ModelResult(model, scores(np.array(given), np.array(predicted)), 1.5, 2.25, tuple(predicted))


def _dataset(name: str, given: list[int], predictions: dict[str, list[int]]) -> DatasetResult:
    return DatasetResult(
        name=name,
        names=tuple(f"{name}/{i:03d}" for i in range(len(given))),
        labels=tuple(given),
        folds=tuple(i % 2 for i in range(len(given))),
        groups=len(given),
        results=tuple(_result(m, given, p) for m, p in predictions.items()),
    )


def _comparison() -> Comparison:
    real_given = [N, N, L, L, M, B]
    real = _dataset(
        REAL,
        real_given,
        {
            "svm": [N, L, L, L, M, B],
            "random_forest": [N, L, L, L, M, N],
            "cnn": [N, L, L, N, M, N],
            "unet_encoder_linear": [N, N, L, L, M, N],
        },
    )
    synth_given = [N, L, X, X]
    synth = _dataset(
        SYNTHETIC,
        synth_given,
        {
            "svm": [N, L, X, X],
            "random_forest": [N, L, X, L],
            "cnn": [L, L, X, X],
            "unet_encoder_linear": [N, L, X, X],
        },
    )
    return Comparison(
        datasets=(real, synth),
        models=MODELS,
        folds=2,
        seed=0,
        suspects=suspect_labels(real),
        split="2-fold cross-validation by hand",
        settings=(("synth_fields", 1),),
        seconds=3.0,
    )


def test_suspect_labels_are_cells_at_least_three_models_disagree_with():
    comparison = _comparison()
    # Cell 1 (given neutrophil): svm, random_forest and cnn say lymphocyte. Cell 5 (basophil): three say
    # neutrophil. Cell 3: only cnn disagrees.
    assert [(s.name, s.given, s.predicted, s.votes) for s in comparison.suspects] == [
        ("segmentation_wbc/001", "neutrophil", "lymphocyte", 3),
        ("segmentation_wbc/005", "basophil", "neutrophil", 3),
    ]
    assert dict(comparison.suspects[0].predictions)["unet_encoder_linear"] == "neutrophil"
    two_models = _dataset(REAL, [N], {"svm": [L], "cnn": [L]})
    assert suspect_labels(two_models) == ()


def test_the_winner_has_the_best_macro_f1_averaged_over_datasets():
    comparison = _comparison()
    means = {m: comparison.mean_macro_f1(m) for m in MODELS}
    assert comparison.winner == max(means, key=means.get) == "svm"
    expected = np.mean([d.result("cnn").scores.macro_f1 for d in comparison.datasets])
    assert means["cnn"] == pytest.approx(expected)


def test_as_dict_is_json_and_as_text_names_every_model():
    comparison = _comparison()
    data = json.loads(json.dumps(comparison.as_dict()))
    assert data["winner"] == "svm"
    real = data["datasets"][REAL]
    assert real["class_counts"]["basophil"] == 1 and real["models"]["svm"]["macro_over"] == [
        "neutrophil",
        "lymphocyte",
        "monocyte",
        "basophil",
    ]
    assert len(data["suspect_labels"]) == 2
    text = comparison.as_text()
    assert all(m in text for m in MODELS) and "winner: svm" in text


def test_report_writes_its_files_and_the_page_links_them(tmp_path):
    page = write_comparison_report(_comparison(), tmp_path / "report")
    assert page.name == "index.html"
    files = {p.name for p in page.parent.iterdir()}
    pngs = {"macro_f1.png", confusion_png_name(REAL), confusion_png_name(SYNTHETIC)}
    assert files == {"index.html", "comparison.json"} | pngs
    text = page.read_text()
    for name in pngs | {"comparison.json"}:
        assert f'"{name}"' in text
    for png in pngs:
        assert (page.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "segmentation_wbc/005" in text and "kept as given" in text  # the suspect list
    assert "not meaningful" in text and "2-fold cross-validation by hand" in text
    assert json.loads((page.parent / "comparison.json").read_text())["winner"] == "svm"


class _Cells:
    """The part of LabelledCells limit_cells uses."""

    def __init__(self, labels):
        self.labels = np.asarray(labels)

    def subset(self, idx):
        return list(idx)


def test_limit_cells_takes_the_classes_in_turn():
    picked = limit_cells(_Cells([N, N, N, N, L, L, B]), 5)
    assert picked == [0, 1, 4, 5, 6]  # neutrophil, lymphocyte, basophil, then neutrophil, lymphocyte


# ---------------------------------------------------------------- a small real run


@pytest.fixture(scope="module")
def unet_and_cells(wbc_root):
    unet, preprocess_config = default_unet()
    cells = load_cells(wbc_root, synth_fields=6, seed=0, preprocess_config=preprocess_config, wbc_limit=40)
    return unet, cells


@pytest.fixture(scope="module")
def small_comparison(unet_and_cells):
    unet, cells = unet_and_cells
    return compare_cells(cells, folds=3, seed=0, unet=unet, cnn_epochs=1)


def test_a_small_comparison_covers_every_model_on_both_datasets(small_comparison, unet_and_cells):
    _, cells = unet_and_cells
    assert [d.name for d in small_comparison.datasets] == [REAL, SYNTHETIC]
    real = small_comparison.dataset(REAL)
    assert len(real.labels) == 40 and real.class_counts[B] == 4 and real.class_counts[X] == 0
    assert set(real.folds) == {0, 1, 2}
    for d in small_comparison.datasets:
        assert len(d.labels) == len(cells[d.name])
        for r in d.results:
            assert len(r.predicted) == len(d.labels)
            assert 0 <= r.scores.accuracy <= 1 and r.train_seconds >= 0 and r.infer_ms_per_cell > 0
    assert "blast" not in real.result("svm").scores.macro_over
    assert "basophil" not in small_comparison.dataset(SYNTHETIC).result("svm").scores.macro_over
    assert small_comparison.dataset(REAL).result("random_forest").scores.macro_f1 > 0.5  # well above chance
    assert small_comparison.winner in MODELS


def _figures(dataset: DatasetResult) -> dict:
    return {r.model: (r.scores, r.predicted) for r in dataset.results}


def test_the_same_seed_gives_the_same_figures(small_comparison, unet_and_cells):
    unet, cells = unet_and_cells
    # The models with a random state; the synthetic figures do not depend on the real cells beside them.
    again = compare_cells({SYNTHETIC: cells[SYNTHETIC]}, folds=3, seed=0, models=("svm", "cnn"), cnn_epochs=1)
    first = _figures(small_comparison.dataset(SYNTHETIC))
    assert _figures(again.dataset(SYNTHETIC)) == {m: first[m] for m in ("svm", "cnn")}


@pytest.mark.parametrize("model", MODELS)
def test_fit_final_trains_on_every_cell_and_saves_a_classifier_the_pipeline_loads(
    model, unet_and_cells, tmp_path
):
    from blastq.core.cells.classify import load_classifier

    unet, cells = unet_and_cells
    few = {name: c.subset(range(0, len(c), 2)) for name, c in cells.items()}
    final = fit_final(model, few, seed=0, unet=unet, cnn_epochs=1, metrics={"cv_macro_f1_mean": 0.5})
    assert final.info.kind == model and "segmentation_wbc (20 cells)" in final.info.trained_on
    path = tmp_path / f"{model}.pt"
    final.save(path)
    loaded = load_classifier(path)
    crops: list[CellCrop] = cells[REAL].crops[:5]
    probs = loaded.predict_proba(crops)
    assert probs.shape == (5, len(CELL_TYPES))
    np.testing.assert_allclose(probs, final.classifier().predict_proba(crops), atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
