"""Fit a blast caller (`core.cells.blastcall`) from labelled cells, and measure it against the share rule.

Labelled cells come as blastq's own cells.csv files with one more column (default `truth`) saying what
each cell is: `blast`, or any other type name (`lymphocyte`, `other`, ...) for a cell that is not; an empty
value leaves the cell out. Each file is one image, and images are the unit of hold-out: the figures a fit
reports are out-of-fold by image (cells of one image never sit on both sides), so they say what the caller
does on the lab's next image, not on the cells it was fitted to.

The threshold is chosen for screening: the highest at which the out-of-fold blasts are caught at
`sensitivity` (0.9 by default), so the review flag, not a missed blast, carries the doubt.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blastq.core.cells import BlastCaller, CellRecord, features_of
from blastq.core.common import InvalidConfig, InvalidDataset

NEEDED_COLUMNS = ("blast_probability", "area_um2", "nc_ratio", "circularity", "nucleus_area_um2")
_THRESHOLDS = np.round(np.concatenate([np.arange(0.95, 0.05, -0.05), [0.05, 0.03, 0.02, 0.01]]), 3)
_MAX_CSV_BYTES = 256 << 20


@dataclass(frozen=True)
class LabelledCells:
    features: np.ndarray  # (N, len(CALLER_FEATURES))
    is_blast: np.ndarray  # (N,) bool
    group: np.ndarray  # (N,) int: which image (file) each cell came from
    share: np.ndarray  # (N,) the U-Net's blast share, for the share rule's figures
    sources: tuple[str, ...]  # the files, in group order


@dataclass(frozen=True)
class CallFigures:
    threshold: float
    sensitivity: float
    specificity: float
    blasts: int
    others: int


def read_labelled_cells(paths: Sequence[Path], truth_column: str = "truth") -> LabelledCells:
    """Cells of blastq cells.csv files that have a label in `truth_column`."""
    rows: list[list[float]] = []
    labels: list[bool] = []
    groups: list[int] = []
    for g, path in enumerate(paths):
        path = Path(path)
        try:
            if path.stat().st_size > _MAX_CSV_BYTES:
                raise InvalidDataset(f"larger than {_MAX_CSV_BYTES >> 20} MiB; not a cells.csv", path=path)
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                missing = [c for c in (*NEEDED_COLUMNS, truth_column) if c not in (reader.fieldnames or ())]
                if missing:
                    raise InvalidDataset(
                        f"no column {', '.join(missing)} (a blastq cells.csv with a "
                        f"{truth_column!r} column saying which cells are blasts)",
                        path=path,
                    )
                for line, row in enumerate(reader, start=2):
                    truth = (row.get(truth_column) or "").strip().lower()
                    if not truth:
                        continue
                    try:
                        values = [float(row[c]) for c in NEEDED_COLUMNS]
                    except (TypeError, ValueError) as exc:
                        raise InvalidDataset(f"{path}:{line}: not a number in {NEEDED_COLUMNS}") from exc
                    if not all(np.isfinite(values)):
                        raise InvalidDataset(f"{path}:{line}: a measurement is not finite")
                    rows.append(values)
                    labels.append(truth == "blast")
                    groups.append(g)
        except OSError as exc:
            raise InvalidDataset(f"cannot read {path}: {exc.strerror or exc}") from exc
        except (UnicodeDecodeError, csv.Error) as exc:
            raise InvalidDataset(f"not a CSV file ({exc})", path=path) from exc
    if not rows:
        raise InvalidDataset(f"no labelled cells: every {truth_column!r} value in the files is empty")
    data = np.asarray(rows, np.float64)
    return LabelledCells(
        features=features_of(*data.T),
        is_blast=np.asarray(labels, bool),
        group=np.asarray(groups, np.int64),
        share=data[:, 0],
        sources=tuple(str(p) for p in paths),
    )


def figures_at(prob: np.ndarray, is_blast: np.ndarray, threshold: float) -> CallFigures:
    called = prob >= threshold
    blasts, others = int(is_blast.sum()), int((~is_blast).sum())
    return CallFigures(
        threshold=float(threshold),
        sensitivity=float(called[is_blast].mean()) if blasts else float("nan"),
        specificity=float((~called[~is_blast]).mean()) if others else float("nan"),
        blasts=blasts,
        others=others,
    )


def screening_threshold(prob: np.ndarray, is_blast: np.ndarray, sensitivity: float) -> float:
    """The highest threshold of the grid at which `sensitivity` of the blasts are called (else the lowest)."""
    for t in _THRESHOLDS:
        if figures_at(prob, is_blast, float(t)).sensitivity >= sensitivity:
            return float(t)
    return float(_THRESHOLDS[-1])


def _fit_raw(
    features: np.ndarray, is_blast: np.ndarray, c: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 1e-6, scale, 1.0)
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=1000)
    model.fit((features - mean) / scale, is_blast)
    return mean, scale, model.coef_[0], float(model.intercept_[0])


def out_of_fold(cells: LabelledCells, folds: int = 5, c: float = 1.0) -> np.ndarray | None:
    """Out-of-fold P(blast) per cell, images kept whole in one fold; None with fewer than 2 images that
    hold blasts and 2 that hold other cells (nothing could be held out honestly)."""
    groups = np.unique(cells.group)
    with_blasts = {int(g) for g in cells.group[cells.is_blast]}
    with_others = {int(g) for g in cells.group[~cells.is_blast]}
    if len(with_blasts) < 2 or len(with_others) < 2:
        return None
    k = min(folds, len(groups))
    fold_of = {int(g): i % k for i, g in enumerate(np.random.default_rng(0).permutation(groups))}
    fold = np.array([fold_of[int(g)] for g in cells.group])
    prob = np.full(len(fold), np.nan)
    for f in range(k):
        train, test = fold != f, fold == f
        if cells.is_blast[train].all() or not cells.is_blast[train].any():
            continue  # this fold's training part has one class only: its cells stay unscored (NaN)
        mean, scale, coef, intercept = _fit_raw(cells.features[train], cells.is_blast[train], c)
        caller = BlastCaller("fold", tuple(coef), intercept, tuple(mean), tuple(scale), 0.5)
        prob[test] = caller.probability(cells.features[test])
    return prob


def fit_caller(
    cells: LabelledCells,
    *,
    version: str,
    trained_on: str,
    sensitivity: float = 0.9,
    c: float = 1.0,
) -> BlastCaller:
    """A caller fitted on every labelled cell, its threshold and figures from out-of-fold predictions."""
    if not 0 < sensitivity <= 1:
        raise InvalidConfig(f"sensitivity must be in (0, 1], got {sensitivity}")
    if cells.is_blast.all() or not cells.is_blast.any():
        raise InvalidDataset(
            f"need both blasts and other cells to fit a blast caller; got {int(cells.is_blast.sum())} "
            f"blasts and {int((~cells.is_blast).sum())} others"
        )
    mean, scale, coef, intercept = _fit_raw(cells.features, cells.is_blast, c)
    oof = out_of_fold(cells, c=c)
    metrics: dict[str, object] = {"blasts": int(cells.is_blast.sum()), "others": int((~cells.is_blast).sum())}
    metrics["images"] = len(cells.sources)
    if oof is None:
        in_sample = BlastCaller("fit", tuple(coef), intercept, tuple(mean), tuple(scale), 0.5)
        threshold = screening_threshold(in_sample.probability(cells.features), cells.is_blast, sensitivity)
        metrics["held_out"] = "none: fewer than 2 images with blasts and 2 with other cells; in-sample only"
    else:
        scored = np.isfinite(oof)
        truth = cells.is_blast[scored]
        threshold = screening_threshold(oof[scored], truth, sensitivity)
        chosen = figures_at(oof[scored], truth, threshold)
        metrics["held_out"] = (
            f"out-of-fold, images kept whole in one of 5 folds ({int(scored.sum())} cells scored)"
        )
        metrics["sensitivity"] = round(chosen.sensitivity, 4)
        metrics["specificity"] = round(chosen.specificity, 4)
        share_threshold = screening_threshold(cells.share[scored], truth, sensitivity)
        share = figures_at(cells.share[scored], truth, share_threshold)
        metrics["share_rule"] = {
            "threshold": share_threshold,
            "sensitivity": round(share.sensitivity, 4),
            "specificity": round(share.specificity, 4),
        }
    return BlastCaller(
        version=version,
        coef=tuple(float(v) for v in coef),
        intercept=intercept,
        mean=tuple(float(v) for v in mean),
        scale=tuple(float(v) for v in scale),
        threshold=threshold,
        trained_on=trained_on,
        metrics=metrics,
    )


# Wide synthetic fields the developers' caller is fitted on: no training pool and not the operating
# point's test fields (trainer.operating.WIDE_TEST_SEED0) draw from these seeds.
CALLER_FIT_SEED0 = 9_300_000


# Review classes that say nothing about whether a cell is a blast.
UNKNOWN_BLAST_STATUS = ("unidentified", "smudge", "artefact")


def reviewed_labelled_cells(cells: Sequence) -> LabelledCells:
    """Cells of signed-off reviews (core.adapters.ReviewedCell) as a caller's training set: blast or not
    as the reviewer left it, grouped by sample; unidentified cells, smudges and artefacts left out."""
    records = [(c.label == "blast", c, c.sample) for c in cells if c.label not in UNKNOWN_BLAST_STATUS]
    if not records:
        raise InvalidDataset("no reviewed cells: sign off reviews in the review station first (blastq serve)")
    return _labelled(records)


def _labelled(records: Sequence[tuple[bool, CellRecord, str]]) -> LabelledCells:
    names = sorted({name for _, _, name in records})
    index = {name: i for i, name in enumerate(names)}
    share = np.array([c.blast_probability for _, c, _ in records], np.float64)
    return LabelledCells(
        features=features_of(
            share,
            [c.area_um2 for _, c, _ in records],
            [c.nc_ratio for _, c, _ in records],
            [c.circularity for _, c, _ in records],
            [c.nucleus_area_um2 for _, c, _ in records],
        ),
        is_blast=np.array([b for b, _, _ in records], bool),
        group=np.array([index[name] for _, _, name in records], np.int64),
        share=share,
        sources=tuple(names),
    )


def developer_comparison(
    model: Path, wbc_root: Path, fields: int = 24, progress: Callable[[str], None] = print
) -> tuple[BlastCaller, str]:
    """Fit a caller on the developers' data and compare it with the share rule on held-out data.

    Fit: wide synthetic fields from CALLER_FIT_SEED0 and the normal cells of segmentation_wbc's train and
    validation splits. Test: the operating point's wide test fields and the test split's normal cells,
    which neither the U-Net nor the caller saw. No real blasts exist here: real cells are all normal."""
    from blastq.core.segment import load_engine
    from blastq.trainer.operating import WIDE_TEST_SEED0, real_normal_cells, synthetic_cells

    engine, info = load_engine(model, kind="torch", device="cpu")
    progress(f"cells of {fields} + {fields} wide synthetic fields and 400 real crops ...")
    fit_synth = synthetic_cells(engine, info, range(CALLER_FIT_SEED0, CALLER_FIT_SEED0 + fields))
    test_synth = synthetic_cells(engine, info, range(WIDE_TEST_SEED0, WIDE_TEST_SEED0 + fields))
    real = real_normal_cells(engine, info, wbc_root)
    fit = _labelled(
        [(g.startswith("blast:"), c, f"synth{s}") for g, c, s in fit_synth]
        + [(False, c, name) for split, c, name in real if split != "test"]
    )
    test = _labelled(
        [(g.startswith("blast:"), c, f"synth{s}") for g, c, s in test_synth]
        + [(False, c, name) for split, c, name in real if split == "test"]
    )
    real_test = np.array([not name.startswith("synth") for name in test.sources])[test.group]
    caller = fit_caller(
        fit,
        version=f"blastq-caller-{info.version}",
        trained_on=(
            f"{info.version} on {fields} wide synthetic fields (seeds {CALLER_FIT_SEED0}+) and the "
            "normal cells of segmentation_wbc's train and validation splits"
        ),
    )
    share_t = screening_threshold(fit.share, fit.is_blast, 0.9)
    lines = [
        "held out: wide synthetic test fields (blasts and normal cells) and segmentation_wbc test-split "
        "normal cells",
        "rule                                   sensitivity  false blast (synthetic)  false blast (real test)",
    ]
    rules = [
        ("blast share >= 0.5", test.share, 0.5),
        (f"blast share >= {share_t:g} (screening)", test.share, share_t),
        (f"caller P(blast) >= {caller.threshold:g}", caller.probability(test.features), caller.threshold),
    ]
    for name, score, t in rules:
        called = score >= t
        synth_normal = ~test.is_blast & ~real_test
        lines.append(
            f"{name:<38} {called[test.is_blast].mean():>11.3f}  {called[synth_normal].mean():>23.3f}  "
            f"{called[real_test].mean():>23.3f}"
        )
    return caller, "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    from blastq.core.cells import write_caller

    parser = argparse.ArgumentParser(description=developer_comparison.__doc__)
    parser.add_argument("model", type=Path)
    parser.add_argument("--wbc", type=Path, required=True)
    parser.add_argument("--fields", type=int, default=24)
    parser.add_argument("--out", type=Path, help="write the fitted caller here")
    args = parser.parse_args(argv)
    caller, table = developer_comparison(args.model, args.wbc, args.fields)
    print(table)
    if args.out:
        print(f"wrote {write_caller(caller, args.out)}")


if __name__ == "__main__":
    main()
