"""The cell-classifier comparison: hand-made features with an SVM or a random forest, a small CNN, and a
linear head on the frozen U-Net encoder, cross-validated on the same cells and the same folds.

    blastq compare-classifiers --wbc ../shared/data/segmentation_wbc --out docs/classifiers

Each dataset (the real segmentation_wbc crops, synthetic fields) is compared on its own: every model is
trained on k-1 folds and predicts the held-out fold, and the out-of-fold predictions of all folds give
accuracy, per-class and macro precision / recall / F1 and a confusion matrix. The winner (best macro F1
averaged over the datasets) can then be trained on all cells with `fit_final`.

Timing: `train_seconds` is the fitting alone, summed over the folds; `infer_ms_per_cell` is the
prediction plus, for every model that needs one, the per-cell representation (hand-made features,
encoder features). Crop normalisation is the same for all models and counted for none.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from blastq.core.cells import CELL_TYPES, CellCrop
from blastq.core.common import InvalidConfig

if TYPE_CHECKING:
    from blastq.core.cells import CellClassifier, ClassifierInfo
    from blastq.core.image import PreprocessConfig
    from blastq.core.segment import UNet
    from blastq.trainer.celldata import LabelledCells

MODELS: tuple[str, ...] = ("svm", "random_forest", "cnn", "unet_encoder_linear")
# What each model learns from: hand-made features, the crops themselves, or U-Net encoder features.
REPRESENTATION = {
    "svm": "features",
    "random_forest": "features",
    "cnn": "crops",
    "unet_encoder_linear": "encoder",
}
REAL, SYNTHETIC = "segmentation_wbc", "synthetic"
# Below this many cells in a dataset a class's precision / recall / F1 swing by tens of points with one
# cell (segmentation_wbc has 4 basophils): they are reported, marked as not meaningful.
MIN_MEANINGFUL_CELLS = 10
# A real cell is a suspect label when this many models' out-of-fold predictions disagree with it.
SUSPECT_VOTES = 3
# Synthetic fields of the comparison: generate_field seeds CLASSIFIER_SYNTH_SEED0 + 10,000 x seed + i,
# outside the U-Net's training, validation and test seeds (trainer/SPLIT.md), so the encoder never saw them.
CLASSIFIER_SYNTH_SEED0 = 5_000_000
RF_TREES = 300

Progress = Callable[[int, int, str], None]  # (steps done, steps in all, what runs now)


# ---------------------------------------------------------------- metrics from label arrays


@dataclass(frozen=True)
class ClassScores:
    """One class's figures over the out-of-fold predictions of one model on one dataset."""

    name: str
    cells: int  # cells with this given label (the support)
    predicted: int  # cells predicted as this class
    precision: float  # 0 when nothing was predicted as this class
    recall: float  # 0 when the class has no cells
    f1: float
    meaningful: bool  # False: fewer than MIN_MEANINGFUL_CELLS cells, or none (then outside the macro)


@dataclass(frozen=True)
class Scores:
    """Accuracy, per-class and macro figures and the confusion matrix of given vs predicted labels."""

    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    classes: tuple[ClassScores, ...]  # one per CELL_TYPES, in order
    confusion: tuple[tuple[int, ...], ...]  # [given][predicted], CELL_TYPES order
    macro_over: tuple[str, ...]  # the classes the macro averages: those with at least one cell
    # Macro F1 over the classes with at least MIN_MEANINGFUL_CELLS cells: shows how much a handful of
    # cells (segmentation_wbc's 4 basophils) moves the macro.
    macro_f1_meaningful: float

    def by_name(self, name: str) -> ClassScores:
        """The figures of the class called `name`."""
        return self.classes[CELL_TYPES.index(name)]

    def as_dict(self) -> dict[str, Any]:
        """Rounded figures, JSON-able."""
        return {
            "accuracy": round(self.accuracy, 4),
            "macro_precision": round(self.macro_precision, 4),
            "macro_recall": round(self.macro_recall, 4),
            "macro_f1": round(self.macro_f1, 4),
            "macro_over": list(self.macro_over),
            "macro_f1_meaningful": round(self.macro_f1_meaningful, 4),
            "per_class": {
                c.name: {
                    "cells": c.cells,
                    "predicted": c.predicted,
                    "precision": round(c.precision, 4),
                    "recall": round(c.recall, 4),
                    "f1": round(c.f1, 4),
                    "meaningful": c.meaningful,
                }
                for c in self.classes
            },
            "confusion": [list(row) for row in self.confusion],
        }


def confusion_matrix(
    given: np.ndarray, predicted: np.ndarray, n_classes: int = len(CELL_TYPES)
) -> np.ndarray:
    """(n_classes, n_classes) int64 counts: rows the given label, columns the predicted one
    (sklearn.metrics.confusion_matrix over every class, so a class nobody has still has its row)."""
    from sklearn.metrics import confusion_matrix as sklearn_confusion

    given, predicted = np.asarray(given, np.int64), np.asarray(predicted, np.int64)
    if given.shape != predicted.shape:
        raise ValueError(f"{given.shape[0]} given labels but {predicted.shape[0]} predictions")
    if given.size and (
        min(given.min(), predicted.min()) < 0 or max(given.max(), predicted.max()) >= n_classes
    ):
        raise ValueError(f"labels must lie in 0..{n_classes - 1}")
    if not given.size:
        return np.zeros((n_classes, n_classes), np.int64)
    return sklearn_confusion(given, predicted, labels=np.arange(n_classes)).astype(np.int64)


def scores(given: np.ndarray, predicted: np.ndarray) -> Scores:
    """Accuracy, per-class and macro precision / recall / F1 over CELL_TYPES (sklearn.metrics; 0 where
    a class was never predicted or never given).

    The macro averages the classes with at least one given cell: a class the dataset does not hold
    (no blasts in segmentation_wbc, no basophils in synthetic fields) has no recall to speak of, and
    its precision is already charged to the classes whose cells were predicted as it.
    """
    from sklearn.metrics import precision_recall_fscore_support

    cm = confusion_matrix(given, predicted)
    cells, hits, predicted_n = cm.sum(axis=1), np.diag(cm), cm.sum(axis=0)
    labels = np.arange(len(CELL_TYPES))
    if cm.sum():
        precision, recall, f1, _ = precision_recall_fscore_support(
            np.asarray(given), np.asarray(predicted), labels=labels, average=None, zero_division=0
        )
    else:
        precision = recall = f1 = np.zeros(len(labels))
    present = cells > 0
    classes = tuple(
        ClassScores(
            name,
            int(cells[i]),
            int(predicted_n[i]),
            float(precision[i]),
            float(recall[i]),
            float(f1[i]),
            bool(cells[i] >= MIN_MEANINGFUL_CELLS),
        )
        for i, name in enumerate(CELL_TYPES)
    )

    def macro(values: np.ndarray, over: np.ndarray = present) -> float:
        return float(values[over].mean()) if over.any() else 0.0

    return Scores(
        accuracy=float(hits.sum() / cm.sum()) if cm.sum() else 0.0,
        macro_precision=macro(precision),
        macro_recall=macro(recall),
        macro_f1=macro(f1),
        classes=classes,
        confusion=tuple(tuple(int(v) for v in row) for row in cm),
        macro_over=tuple(name for name, p in zip(CELL_TYPES, present, strict=True) if p),
        macro_f1_meaningful=macro(f1, cells >= MIN_MEANINGFUL_CELLS),
    )


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class ModelResult:
    """One model's cross-validated figures on one dataset."""

    model: str
    scores: Scores
    train_seconds: float  # fitting only, summed over the folds
    infer_ms_per_cell: float  # prediction + the model's per-cell representation; crop normalisation excluded
    predicted: tuple[int, ...]  # out-of-fold prediction per cell (index into CELL_TYPES), dataset order

    def as_dict(self) -> dict[str, Any]:
        """Figures and predictions, JSON-able."""
        return {
            "model": self.model,
            **self.scores.as_dict(),
            "train_seconds": round(self.train_seconds, 2),
            "infer_ms_per_cell": round(self.infer_ms_per_cell, 3),
            "predicted": list(self.predicted),
        }


@dataclass(frozen=True)
class DatasetResult:
    """Every model's figures on one dataset, with the cells and folds they were measured on."""

    name: str  # REAL or SYNTHETIC
    names: tuple[str, ...]  # cell names, e.g. "dataset1/017", "synth/seed=5000012/cell=3"
    labels: tuple[int, ...]  # given label per cell (index into CELL_TYPES)
    folds: tuple[int, ...]  # fold per cell
    groups: int  # images (real) or fields (synthetic)
    results: tuple[ModelResult, ...]

    @property
    def class_counts(self) -> tuple[int, ...]:
        """Cells per CELL_TYPES class."""
        counts = Counter(self.labels)
        return tuple(counts.get(i, 0) for i in range(len(CELL_TYPES)))

    def result(self, model: str) -> ModelResult:
        """The figures of `model` on this dataset."""
        for r in self.results:
            if r.model == model:
                return r
        raise KeyError(f"{model} was not compared on {self.name}")

    def as_dict(self) -> dict[str, Any]:
        """The dataset's cells, folds and every model's figures, JSON-able."""
        return {
            "name": self.name,
            "cells": len(self.labels),
            "groups": self.groups,
            "class_counts": dict(zip(CELL_TYPES, self.class_counts, strict=True)),
            "fold_sizes": [int(v) for v in np.bincount(self.folds)] if self.folds else [],
            "models": {r.model: r.as_dict() for r in self.results},
            "cell_names": list(self.names),
            "labels": list(self.labels),
            "folds": list(self.folds),
        }


@dataclass(frozen=True)
class SuspectLabel:
    """A real cell whose given label most models' out-of-fold predictions disagree with."""

    name: str  # the image, e.g. "dataset1/017"
    given: str
    predicted: str  # the commonest prediction among the disagreeing models
    votes: int  # models disagreeing with the given label
    predictions: tuple[tuple[str, str], ...]  # (model, predicted label) for every model

    def as_dict(self) -> dict[str, Any]:
        """JSON-able."""
        return {
            "name": self.name,
            "given": self.given,
            "predicted": self.predicted,
            "votes": self.votes,
            "predictions": dict(self.predictions),
        }


@dataclass(frozen=True)
class Comparison:
    """Every model's cross-validated figures per dataset, the suspect labels and how it was run."""

    datasets: tuple[DatasetResult, ...]
    models: tuple[str, ...]
    folds: int
    seed: int
    suspects: tuple[SuspectLabel, ...]  # empty when fewer than SUSPECT_VOTES models were compared
    split: str  # how the cells were split, in words
    settings: tuple[tuple[str, Any], ...]  # synth_fields, cnn_epochs, wbc_limit, ...
    seconds: float  # wall time of the whole comparison

    def dataset(self, name: str) -> DatasetResult:
        """The figures on dataset `name`."""
        for d in self.datasets:
            if d.name == name:
                return d
        raise KeyError(f"no dataset {name} in this comparison")

    def mean_macro_f1(self, model: str) -> float:
        """`model`'s macro F1 averaged over the datasets (each dataset weighs the same)."""
        return float(np.mean([d.result(model).scores.macro_f1 for d in self.datasets]))

    @property
    def winner(self) -> str:
        """The model with the best macro F1 averaged over the datasets (the first in MODELS on a tie)."""
        return max(self.models, key=lambda m: (self.mean_macro_f1(m), -self.models.index(m)))

    def as_dict(self) -> dict[str, Any]:
        """Everything, JSON-able."""
        return {
            "models": list(self.models),
            "folds": self.folds,
            "seed": self.seed,
            "settings": dict(self.settings),
            "split": self.split,
            "seconds": round(self.seconds, 1),
            "winner": self.winner,
            "mean_macro_f1": {m: round(self.mean_macro_f1(m), 4) for m in self.models},
            "datasets": {d.name: d.as_dict() for d in self.datasets},
            "suspect_labels": [s.as_dict() for s in self.suspects],
            "suspect_rule": f"real cells whose given label at least {SUSPECT_VOTES} of the models' "
            "out-of-fold "
            "predictions disagree with; kept in training and evaluation as given",
            "timing": "train_seconds: fitting only, summed over folds; infer_ms_per_cell: prediction plus "
            "the "
            "model's per-cell features (hand-made or encoder); crop normalisation excluded for all models",
        }

    def as_text(self) -> str:
        """The summary table, the per-class F1 and the winner, for a terminal."""
        head = f"{'dataset':18}{'model':21}{'cells':>6}{'accuracy':>9}{'macro P':>9}{'macro R':>9}"
        head += f"{'macro F1':>9}{'no rare':>9}{'train s':>9}{'ms/cell':>9}"
        lines = [head]
        for d in self.datasets:
            for r in d.results:
                s = r.scores
                lines.append(
                    f"{d.name:18}{r.model:21}{len(d.labels):6d}{s.accuracy:9.3f}{s.macro_precision:9.3f}"
                    f"{s.macro_recall:9.3f}{s.macro_f1:9.3f}{s.macro_f1_meaningful:9.3f}"
                    f"{r.train_seconds:9.1f}"
                    f"{r.infer_ms_per_cell:9.2f}"
                )
        for d in self.datasets:
            shown = [i for i, n in enumerate(d.class_counts) if n]
            lines.append("")
            lines.append(
                f"F1 per class, {d.name} (cells): "
                + ", ".join(
                    f"{CELL_TYPES[i]} ({d.class_counts[i]}{rare_mark(d.class_counts[i])})" for i in shown
                )
            )
            for r in d.results:
                lines.append(f"  {r.model:21}" + "".join(f"{r.scores.classes[i].f1:8.3f}" for i in shown))
        lines.insert(
            len(self.models) * len(self.datasets) + 1,
            f"no rare: macro F1 without the classes of fewer than {MIN_MEANINGFUL_CELLS} cells; "
            "train s: fitting, all folds; ms/cell: prediction + features, crop normalisation excluded",
        )
        if any(n < MIN_MEANINGFUL_CELLS for d in self.datasets for n in d.class_counts if n):
            lines.append(f"* fewer than {MIN_MEANINGFUL_CELLS} cells: per-class figures not meaningful")
        lines.append("")
        means = ", ".join(f"{m} {self.mean_macro_f1(m):.3f}" for m in self.models)
        lines.append(f"winner: {self.winner} (macro F1 averaged over {len(self.datasets)} datasets: {means})")
        if len(self.models) >= SUSPECT_VOTES:
            lines.append(
                f"suspect labels: {len(self.suspects)} real cell(s) where at least {SUSPECT_VOTES} of "
                f"{len(self.models)} models disagree with the given label (kept as given)"
            )
        return "\n".join(lines)


def rare_mark(cells: int) -> str:
    """'*' after the cell count of a class too small for its figures to mean much, else ''."""
    return "" if cells >= MIN_MEANINGFUL_CELLS else "*"


def parse_models(text: str) -> tuple[str, ...]:
    """'svm,cnn' -> ("svm", "cnn") in MODELS order; InvalidConfig naming an unknown or empty list."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise InvalidConfig(
            f"unknown model {', '.join(unknown)!s} in --models {text!r}: choose from {','.join(MODELS)}"
            if unknown
            else f"--models {text!r} names no model: choose from {','.join(MODELS)}"
        )
    return tuple(m for m in MODELS if m in names)


# ---------------------------------------------------------------- the cells


def limit_cells(cells: LabelledCells, limit: int | None) -> LabelledCells:
    """At most `limit` cells, the classes taken in turn (so a small trial still sees every class).

    Within a class cells keep their order; the result keeps the dataset's order.
    """
    if limit is None or limit >= len(cells.labels):
        return cells
    queues = [list(np.flatnonzero(cells.labels == c)) for c in range(len(CELL_TYPES))]
    picked: list[int] = []
    while len(picked) < limit:
        for q in queues:
            if q and len(picked) < limit:
                picked.append(int(q.pop(0)))
    return cells.subset(np.array(sorted(picked)))


def load_cells(
    wbc_root: Path | None,
    *,
    synth_fields: int,
    seed: int = 0,
    preprocess_config: PreprocessConfig,
    wbc_limit: int | None = None,
    synth_variety: str = "classic",
) -> dict[str, LabelledCells]:
    """The labelled cells by dataset name: segmentation_wbc (when `wbc_root`) and `synth_fields` fields
    of the generator's `synth_variety` (celldata.synthetic_cells)."""
    from blastq.trainer.celldata import synthetic_cells, wbc_cells

    out: dict[str, LabelledCells] = {}
    if wbc_root is not None:
        out[REAL] = limit_cells(wbc_cells(Path(wbc_root), preprocess_config), wbc_limit)
    if synth_fields > 0:
        out[SYNTHETIC] = synthetic_cells(
            synth_fields,
            seed=CLASSIFIER_SYNTH_SEED0 + 10_000 * seed,
            preprocess_config=preprocess_config,
            variety=synth_variety,
        )
    if not out:
        raise InvalidConfig("nothing to compare on: give a segmentation_wbc folder or synth_fields > 0")
    return out


# ---------------------------------------------------------------- the models


def make_estimator(model: str, seed: int) -> Any:
    """The scikit-learn pipeline of a features-based model (svm, random_forest, unet_encoder_linear)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if model == "svm":
        return make_pipeline(
            StandardScaler(), SVC(kernel="rbf", probability=True, class_weight="balanced", random_state=seed)
        )
    if model == "random_forest":
        # Trees need no scaling; balanced_subsample re-weighs each tree's bootstrap sample.
        return RandomForestClassifier(
            n_estimators=RF_TREES, class_weight="balanced_subsample", random_state=seed
        )
    if model == "unet_encoder_linear":
        # Multinomial (lbfgs' default for several classes); balanced like the other models so that the
        # macro F1 compares the representations, not how each model treats rare classes.
        return make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
        )
    raise InvalidConfig(
        f"{model} is not a scikit-learn model (one of svm, random_forest, unet_encoder_linear)"
    )


def sklearn_proba(estimator: Any, x: np.ndarray) -> np.ndarray:
    """(N, len(CELL_TYPES)) probabilities; classes the estimator never saw get 0."""
    out = np.zeros((len(x), len(CELL_TYPES)))
    if len(x):
        out[:, np.asarray(estimator.classes_, np.int64)] = estimator.predict_proba(x)
    return out


def _fit(estimator: Any, x: np.ndarray, labels: np.ndarray) -> None:
    # scikit-learn 1.9 deprecates SVC(probability=True) for CalibratedClassifierCV(SVC(), ensemble=False),
    # but that one's cross-validation refuses a class with fewer cells than folds (segmentation_wbc has 4
    # basophils, 3 in a training fold); libsvm's own Platt scaling copes. Needs scikit-learn < 1.11.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The `probability` parameter", category=FutureWarning)
        estimator.fit(x, labels)


def fit_weighted(estimator: Any, x: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> None:
    """_fit with a weight per cell (a pipeline passes them to its last step)."""
    from sklearn.pipeline import Pipeline

    key = f"{estimator.steps[-1][0]}__sample_weight" if isinstance(estimator, Pipeline) else "sample_weight"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The `probability` parameter", category=FutureWarning)
        estimator.fit(x, labels, **{key: np.asarray(weights, np.float64)})


@dataclass(frozen=True, eq=False)
class _Inputs:
    """The per-cell representations a set of models needs, with the seconds each took for all cells."""

    crops: list[CellCrop]
    seconds: Mapping[str, float]  # by REPRESENTATION value: "features", "encoder" ("crops" cost nothing)
    features: np.ndarray | None = None  # (N, F) hand-made features
    encoder: np.ndarray | None = None  # (N, D) U-Net encoder features


def _representations(
    cells: LabelledCells, models: Sequence[str], unet: UNet | None, report: Callable[[str], None]
) -> _Inputs:
    needed = {REPRESENTATION[m] for m in models}
    features = encoder = None
    seconds: dict[str, float] = {"crops": 0.0}
    if "features" in needed:
        from blastq.core.cells import features_matrix

        report("hand-made features")
        t0 = time.perf_counter()
        features = features_matrix(cells.crops)
        seconds["features"] = time.perf_counter() - t0
    if "encoder" in needed:
        from blastq.trainer.cellnets import encoder_features

        if unet is None:
            raise InvalidConfig("unet_encoder_linear needs the U-Net")
        report("U-Net encoder features")
        t0 = time.perf_counter()
        encoder = encoder_features(unet, cells.crops)
        seconds["encoder"] = time.perf_counter() - t0
    return _Inputs(list(cells.crops), seconds, features, encoder)


def _fit_predict(
    model: str,
    inputs: _Inputs,
    labels: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    seed: int,
    cnn_epochs,
) -> tuple[np.ndarray, float, float]:
    """(probabilities of the test cells, fit seconds, predict seconds)."""
    if model == "cnn":
        from blastq.trainer.cellnets import fit_cnn, predict_cnn

        kwargs = {} if cnn_epochs is None else {"epochs": cnn_epochs}
        t0 = time.perf_counter()
        net = fit_cnn(
            [inputs.crops[i] for i in train],
            labels[train],
            seed=seed,
            class_weights="balanced",
            **kwargs,
        )
        t1 = time.perf_counter()
        probs = predict_cnn(net, [inputs.crops[i] for i in test])
        return np.asarray(probs, np.float64), t1 - t0, time.perf_counter() - t1
    x = inputs.features if REPRESENTATION[model] == "features" else inputs.encoder
    estimator = make_estimator(model, seed)
    t0 = time.perf_counter()
    _fit(estimator, x[train], labels[train])
    t1 = time.perf_counter()
    probs = sklearn_proba(estimator, x[test])
    return probs, t1 - t0, time.perf_counter() - t1


def _split_text(folds: int, datasets: Mapping[str, LabelledCells]) -> str:
    sizes = "; ".join(
        f"{name}: {len(c.labels)} cells in {len(set(c.groups.tolist()))} groups"
        for name, c in datasets.items()
    )
    return (
        f"{folds}-fold cross-validation per dataset, the same folds for every model "
        "(blastq.trainer.celldata.cv_folds): group-aware, all cells of one image (segmentation_wbc) or one "
        "synthetic field share a fold, so no model is tested on a cell of an image it was trained on; "
        "stratified, each group filed under its rarest class, classes rarest first, each class's groups "
        "ordered by the sha1 of their first cell's name and dealt to the folds in turn; only names and "
        "labels decide, so the folds are the same on every run and machine. Figures pool the out-of-fold "
        "predictions of all folds. "
        f"{sizes}."
    )


def compare_cells(
    datasets: Mapping[str, LabelledCells],
    *,
    folds: int = 5,
    seed: int = 0,
    models: Sequence[str] = MODELS,
    unet: UNet | None = None,
    cnn_epochs: int | None = None,
    progress: Progress | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Comparison:
    """Cross-validate `models` on each dataset's cells with cv_folds(cells, folds); see the module doc.

    `unet` is needed for unet_encoder_linear; `cnn_epochs` None keeps fit_cnn's default.
    """
    from blastq.trainer.celldata import cv_folds

    started = time.perf_counter()
    models = tuple(models)
    if folds < 2:
        raise InvalidConfig(f"folds={folds}: cross-validation needs at least 2")
    fold_of = {name: np.asarray(cv_folds(cells, k=folds)) for name, cells in datasets.items()}
    total = sum(len(models) * len(np.unique(f)) for f in fold_of.values())
    done = 0

    def report(what: str) -> None:
        if progress is not None:
            progress(done, total, what)

    results = []
    for name, cells in datasets.items():
        labels = np.asarray(cells.labels, np.int64)
        fold = fold_of[name]
        inputs = _representations(cells, models, unet, lambda what, name=name: report(f"{name}: {what}"))
        model_results = []
        for model in models:
            probs = np.zeros((len(labels), len(CELL_TYPES)))
            fit_s = predict_s = 0.0
            fold_ids = np.unique(fold)
            for k, f in enumerate(fold_ids):
                report(f"{name}: {model} fold {k + 1}/{len(fold_ids)}")
                test = np.flatnonzero(fold == f)
                train = np.flatnonzero(fold != f)
                probs[test], fit, pred = _fit_predict(model, inputs, labels, train, test, seed, cnn_epochs)
                fit_s, predict_s = fit_s + fit, predict_s + pred
                done += 1
            predicted = probs.argmax(axis=1)
            representation_s = inputs.seconds.get(REPRESENTATION[model], 0.0)
            model_results.append(
                ModelResult(
                    model=model,
                    scores=scores(labels, predicted),
                    train_seconds=fit_s,
                    infer_ms_per_cell=1000 * (representation_s + predict_s) / max(1, len(labels)),
                    predicted=tuple(int(v) for v in predicted),
                )
            )
        results.append(
            DatasetResult(
                name=name,
                names=tuple(cells.names),
                labels=tuple(int(v) for v in labels),
                folds=tuple(int(v) for v in fold),
                groups=len(set(np.asarray(cells.groups).tolist())),
                results=tuple(model_results),
            )
        )
    report("done")
    real = next((d for d in results if d.name == REAL), None)
    return Comparison(
        datasets=tuple(results),
        models=models,
        folds=folds,
        seed=seed,
        suspects=suspect_labels(real) if real is not None else (),
        split=_split_text(folds, datasets),
        settings=tuple(sorted({"cnn_epochs": _cnn_epochs(cnn_epochs, models), **(settings or {})}.items())),
        seconds=time.perf_counter() - started,
    )


def _cnn_epochs(cnn_epochs: int | None, models: Sequence[str]) -> int | None:
    if "cnn" not in models:
        return None
    if cnn_epochs is None:
        from blastq.trainer.cellnets import CNN_EPOCHS

        return CNN_EPOCHS
    return cnn_epochs


def suspect_labels(dataset: DatasetResult, votes: int = SUSPECT_VOTES) -> tuple[SuspectLabel, ...]:
    """Cells whose given label at least `votes` models' out-of-fold predictions disagree with, most votes
    first. None when fewer than `votes` models were compared. The labels stay as given: this only lists
    them for a person to check (the dataset's authors say not every label was checked by an expert)."""
    if len(dataset.results) < votes:
        return ()
    out = []
    for i, (name, given) in enumerate(zip(dataset.names, dataset.labels, strict=True)):
        predictions = tuple((r.model, CELL_TYPES[r.predicted[i]]) for r in dataset.results)
        wrong = [label for _, label in predictions if label != CELL_TYPES[given]]
        if len(wrong) >= votes:
            out.append(
                SuspectLabel(
                    name, CELL_TYPES[given], Counter(wrong).most_common(1)[0][0], len(wrong), predictions
                )
            )
    return tuple(sorted(out, key=lambda s: (-s.votes, s.name)))


def default_unet() -> tuple[UNet, PreprocessConfig]:
    """The shipped U-Net (for its encoder) and the preprocessing it was trained with (for the crops)."""
    from blastq.core.image import PreprocessConfig
    from blastq.core.segment import UNet, default_model_path

    unet, info = UNet.from_checkpoint(default_model_path())
    return unet, PreprocessConfig(**info.preprocess)


# ---------------------------------------------------------------- the final model


@dataclass(frozen=True, eq=False)
class FinalClassifier:
    """A model trained on all cells, ready for `blastq.core.cells.classify.save_classifier`."""

    info: ClassifierInfo
    sklearn_model: Any = None
    torch_model: Any = None
    torch_arch: Mapping[str, Any] | None = None

    def classifier(self) -> CellClassifier:
        """As the pipeline loads it: predict_proba(normalised crops) -> (N, len(CELL_TYPES))."""
        from blastq.core.cells import CellClassifier

        return CellClassifier(self.info, self.sklearn_model, self.torch_model)

    def save(self, path: Path) -> str:
        """Write the classifier file; return its sha256."""
        from blastq.core.cells import save_classifier

        return save_classifier(
            Path(path),
            self.info,
            sklearn_model=self.sklearn_model,
            torch_model=self.torch_model,
            torch_arch=dict(self.torch_arch or {}),
        )


def fit_final(
    model: str,
    datasets: Mapping[str, LabelledCells],
    *,
    seed: int = 0,
    unet: UNet | None = None,
    cnn_epochs: int | None = None,
    version: str = "",
    metrics: Mapping[str, Any] | None = None,
) -> FinalClassifier:
    """Train `model` on the cells of every dataset together (usually Comparison.winner, real + synthetic)."""
    from blastq.core.cells import ClassifierInfo

    if model not in MODELS:
        raise InvalidConfig(f"unknown model {model!r}: choose from {','.join(MODELS)}")
    crops = [c for cells in datasets.values() for c in cells.crops]
    labels = np.concatenate([np.asarray(cells.labels, np.int64) for cells in datasets.values()])
    trained_on = ", ".join(f"{name} ({len(cells.labels)} cells)" for name, cells in datasets.items())
    info = ClassifierInfo(
        version=version or f"{model}-seed{seed}",
        kind=model,
        cell_types=CELL_TYPES,
        trained_on=trained_on,
        metrics=dict(metrics or {}),
    )
    if model == "cnn":
        from blastq.trainer.cellnets import fit_cnn

        kwargs = {} if cnn_epochs is None else {"epochs": cnn_epochs}
        net = fit_cnn(crops, labels, seed=seed, class_weights="balanced", **kwargs)
        return FinalClassifier(info, torch_model=net.eval(), torch_arch=net.arch())
    estimator = make_estimator(model, seed)
    if model == "unet_encoder_linear":
        from blastq.core.cells import EncoderFeatures
        from blastq.trainer.cellnets import encoder_features

        if unet is None:
            raise InvalidConfig("unet_encoder_linear needs the U-Net")
        _fit(estimator, encoder_features(unet, crops), labels)
        return FinalClassifier(
            info, sklearn_model=estimator, torch_model=EncoderFeatures(unet).eval(), torch_arch=unet.arch()
        )
    from blastq.core.cells import features_matrix

    _fit(estimator, features_matrix(crops), labels)
    return FinalClassifier(info, sklearn_model=estimator)
