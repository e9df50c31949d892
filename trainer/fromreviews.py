"""Learning from a lab's own labelled cells: the per-cell classifier refit with them, and judged on the
lab's held-out samples and on the shipped test cells before it may replace the one in use.

Where the cells come from:
  reviews   every cell of a signed-off review (`core.adapters.reviewed_cells`): its crop read back from
            its image's gallery sheet, labelled with the class a person gave or confirmed.
  a folder  DIR/<class>/<image> (one sub-folder per cell type, or just `blast` and `other`): each image a
            crop whose labelled cell is the one nearest its centre, segmented here by the U-Net.

How it learns ("fine-tuning" a classifier that has no gradient): the shipped classifier's kind and
settings are refit on anchor cells that stand for what it was trained on (synthetic cells of fixed seeds,
and the real segmentation_wbc cells where the lab has them) together with the lab's cells, each lab cell
weighing `lab_weight` anchors. A cell labelled only `other` (not a blast, type unknown) takes the type the
shipped classifier gives it among the normal types. Smudges, artefacts and unidentified cells teach no
type and are left out.

The lab's cells are split by sample (by image for a folder): a group is held out when the first 8 hex
digits of sha256("blastq-holdout:" + its name) fall below the held-out share, so the split never depends
on what else is in the set, and a sample is wholly on one side. The split is written into the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from blastq.core.cells import (
    CELL_TYPES,
    CellClassifier,
    CellCrop,
    CellGallery,
    ClassifierInfo,
    blank_outside,
    features_matrix,
    gallery_crop,
)
from blastq.core.common import InvalidConfig, InvalidDataset
from blastq.core.outputs import read_gallery

OTHER = "other"  # not a blast; which normal type is not known
LAB_CLASSES: tuple[str, ...] = (*CELL_TYPES, OTHER)
ANCHOR_SEED = 5_000_000  # the synthetic seeds the shipped classifier's synthetic cells came from
TEST_SEED = 7_000_000  # synthetic test fields: outside the anchors' and the U-Net's seeds
FINE_TUNE_KINDS = ("svm", "random_forest")
# "Not worse" on the shipped test cells allows this much less macro F1: refitting moves the decision
# surface a little everywhere, and a lab's own cells are what its differential is made of.
SHIPPED_TOLERANCE = 0.01


@dataclass(frozen=True, eq=False)
class LabCells:
    """A lab's labelled cells: classifier-ready crops, a LAB_CLASSES label and a split group each."""

    crops: list[CellCrop]
    labels: list[str]
    groups: list[str]  # the unit of the split: a sample (reviews) or an image (folder)
    names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.crops)

    def subset(self, keep: Sequence[bool]) -> LabCells:
        idx = [i for i, k in enumerate(keep) if k]
        return LabCells(
            [self.crops[i] for i in idx],
            [self.labels[i] for i in idx],
            [self.groups[i] for i in idx],
            [self.names[i] for i in idx],
            self.source,
        )

    def counts(self) -> dict[str, int]:
        return {name: self.labels.count(name) for name in LAB_CLASSES if name in self.labels}


# --- where the cells come from ------------------------------------------------------------------


def review_cells(db, store, since=None) -> LabCells:
    """Every cell of every signed-off review since `since`, as classifier-ready crops."""
    from blastq.core.adapters import reviewed_cells

    cells = [c for c in reviewed_cells(db, since) if c.label in LAB_CLASSES]
    galleries: dict[str, CellGallery | None] = {}
    crops, labels, groups, names = [], [], [], []
    for cell in cells:
        if cell.store_prefix not in galleries:
            galleries[cell.store_prefix] = read_gallery(store, cell.store_prefix)
        gallery = galleries[cell.store_prefix]
        # No gallery (recorded before galleries) or not in it (past a whole slide's first cells): no crop.
        crop = gallery.crop(cell.cell_id) if gallery is not None else None
        if crop is None or not crop.cell.any():
            continue
        crops.append(blank_outside(crop))
        labels.append(cell.label)
        groups.append(cell.sample)
        names.append(f"{cell.sample}/{cell.result_id}-{cell.cell_id}")
    return LabCells(crops, labels, groups, names, "reviews")


def folder_cells(
    root: Path, mpp: float, engine, info, progress: Callable[[int, int], None] | None = None
) -> LabCells:
    """DIR/<class>/<images>: each image segmented at `mpp`, the cell nearest its centre taken."""
    from blastq.core.image import IMAGE_SUFFIXES, read_slide
    from blastq.core.pipeline import process_slide

    root = Path(root)
    if not root.is_dir():
        raise InvalidDataset("not a folder", path=root)
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    unknown = [p.name for p in folders if p.name not in LAB_CLASSES]
    if unknown:
        raise InvalidDataset(
            f"sub-folders {', '.join(unknown[:5])} are not cell classes (one of {', '.join(LAB_CLASSES)})",
            path=root,
        )
    files = [
        (f, p.name)
        for p in folders
        for f in sorted(p.iterdir())
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise InvalidDataset("no images in class sub-folders (DIR/<class>/<image>)", path=root)
    crops, labels, groups, names = [], [], [], []
    for done, (path, label) in enumerate(files, start=1):
        slide = read_slide(path, mpp=mpp)
        result = process_slide(slide, engine, info)
        if progress is not None:
            progress(done, len(files))
        if not result.maps.cells or result.gallery is None:
            continue
        h, w = slide.rgb.shape[:2]
        nearest = min(
            result.maps.cells, key=lambda c: (c.centroid_x - w / 2) ** 2 + (c.centroid_y - h / 2) ** 2
        )
        if nearest.cell_id not in result.gallery.cell_ids:
            continue
        crop = gallery_crop(
            result.gallery.rgb, result.gallery.labels, result.gallery.cell_ids.index(nearest.cell_id)
        )
        crops.append(blank_outside(crop))
        labels.append(label)
        groups.append(f"{label}/{path.stem}")
        names.append(f"{label}/{path.name}")
    if not crops:
        raise InvalidDataset("no cell found in any image", path=root)
    return LabCells(crops, labels, groups, names, f"folder {root.name}")


# --- the split -------------------------------------------------------------------------------------


def held_out_group(name: str, share: float) -> bool:
    digest = hashlib.sha256(f"blastq-holdout:{name}".encode()).hexdigest()
    return int(digest[:8], 16) / 16**8 < share


def split(cells: LabCells, share: float, swap: bool = False) -> tuple[LabCells, LabCells, dict]:
    """(train, held out, the split written down). With two groups or more, each side gets at least one.
    `swap`: the other way round (train on what the rule holds out): with share 0.5 the two ways are a
    two-fold cross-validation by sample."""
    if not 0 < share < 1:
        raise InvalidConfig(f"held-out share must be between 0 and 1, got {share}")
    groups = sorted(set(cells.groups))
    if len(groups) < 2:
        raise InvalidDataset(
            f"{len(groups)} sample(s): at least two are needed, one to learn from and one to test on"
        )
    out = {g for g in groups if held_out_group(g, share)}
    if not out:
        out = {min(groups, key=lambda g: hashlib.sha256(f"blastq-holdout:{g}".encode()).hexdigest())}
    if out == set(groups):
        out.discard(max(groups, key=lambda g: hashlib.sha256(f"blastq-holdout:{g}".encode()).hexdigest()))
    if swap:
        out = set(groups) - out
    held = [g in out for g in cells.groups]
    sign = ">=" if swap else "<"
    description = {
        "rule": f'held out: sha256("blastq-holdout:" + group)[:8] / 16**8 {sign} {share}',
        "unit": "sample" if cells.source == "reviews" else "image",
        "train_groups": sorted(set(groups) - out),
        "heldout_groups": sorted(out),
    }
    return cells.subset([not h for h in held]), cells.subset(held), description


# --- learning and judging --------------------------------------------------------------------------


def type_labels(base: CellClassifier, cells: LabCells) -> np.ndarray:
    """Indices into CELL_TYPES for training; `other` cells get the base's best normal type."""
    out = np.array([CELL_TYPES.index(l) if l in CELL_TYPES else -1 for l in cells.labels], np.int64)
    unknown = np.flatnonzero(out < 0)
    if len(unknown):
        probs = base.predict_proba([cells.crops[i] for i in unknown])
        probs[:, CELL_TYPES.index("blast")] = -1.0
        out[unknown] = probs.argmax(axis=1)
    return out


def fine_tune(
    base: CellClassifier,
    lab: LabCells,
    anchors,
    *,
    lab_weight: float = 3.0,
    seed: int = 0,
    version: str = "",
) -> CellClassifier:
    """The base's kind refit on the anchors (trainer.celldata.LabelledCells) and the lab's cells."""
    from blastq.trainer.compare import fit_weighted, make_estimator

    kind = base.info.kind
    if kind not in FINE_TUNE_KINDS:
        raise InvalidConfig(
            f"a {kind} classifier cannot be refit here (fine-tuning takes {', '.join(FINE_TUNE_KINDS)})"
        )
    if lab_weight <= 0:
        raise InvalidConfig(f"lab_weight must be positive, got {lab_weight}")
    lab_types = type_labels(base, lab)
    x = np.concatenate([features_matrix(anchors.crops), features_matrix(lab.crops)])
    y = np.concatenate([np.asarray(anchors.labels, np.int64), lab_types])
    weights = np.concatenate([np.ones(len(anchors)), np.full(len(lab), float(lab_weight))])
    estimator = make_estimator(kind, seed)
    fit_weighted(estimator, x, y, weights)
    info = ClassifierInfo(
        version=version or f"{base.info.version}+lab",
        kind=kind,
        cell_types=CELL_TYPES,
        trained_on=f"{anchors.source} ({len(anchors)} cells) + {lab.source} ({len(lab)} cells, weight {lab_weight:g}); "
        f"refit from {base.info.version}",
    )
    return CellClassifier(info, sklearn_model=estimator)


@dataclass(frozen=True)
class Figures:
    """How a classifier does on labelled cells: types where the type is known, blast or not on all."""

    cells: int
    typed_cells: int
    accuracy: float  # over cells with a type label
    macro_f1: float  # over the types those cells hold
    blast_sensitivity: float | None  # None without blasts among the cells
    blast_specificity: float | None  # None without non-blasts

    def as_dict(self) -> dict[str, Any]:
        return {
            k: (None if v is None else round(v, 4) if isinstance(v, float) else v)
            for k, v in self.__dict__.items()
        }


def figures(classifier: CellClassifier, crops: Sequence[CellCrop], labels: Sequence[str]) -> Figures:
    from blastq.trainer.compare import scores

    if not len(crops):
        return Figures(0, 0, 0.0, 0.0, None, None)
    predicted = classifier.predict_proba(list(crops)).argmax(axis=1)
    typed = [i for i, l in enumerate(labels) if l in CELL_TYPES]
    given = np.array([CELL_TYPES.index(labels[i]) for i in typed], np.int64)
    typing = scores(given, predicted[typed])  # macro over the types the cells hold, as the comparison's
    is_blast = np.array([l == "blast" for l in labels])
    says = predicted == CELL_TYPES.index("blast")
    sens = float(says[is_blast].mean()) if is_blast.any() else None
    spec = float((~says[~is_blast]).mean()) if (~is_blast).any() else None
    return Figures(len(crops), len(typed), typing.accuracy, typing.macro_f1, sens, spec)


def labelled_figures(classifier: CellClassifier, cells) -> Figures:
    """figures() for trainer.celldata.LabelledCells (type indices)."""
    return figures(classifier, cells.crops, [CELL_TYPES[int(i)] for i in cells.labels])


def not_worse(candidate: dict, base: dict, tolerance: float = 0.0) -> tuple[bool, str]:
    """The registry's rule on one test set: macro F1, and blast sensitivity where there are blasts."""
    if candidate["macro_f1"] < base["macro_f1"] - tolerance:
        return False, f"macro F1 {candidate['macro_f1']:.3f} < {base['macro_f1']:.3f}"
    cs, bs = candidate.get("blast_sensitivity"), base.get("blast_sensitivity")
    if cs is not None and bs is not None and cs < bs - tolerance:
        return False, f"blast sensitivity {cs:.3f} < {bs:.3f}"
    return True, "not worse"


@dataclass(frozen=True)
class Adaptation:
    """A refit classifier with its figures beside the base's, and whether it may replace it."""

    classifier: CellClassifier
    base_version: str
    split: dict
    heldout: dict  # {"base": Figures dict, "candidate": ...} on the lab's held-out cells
    shipped: dict  # {test set: {"base": ..., "candidate": ...}}
    acceptable: bool
    reasons: tuple[str, ...]

    def metrics(self) -> dict:
        return {
            "base": self.base_version,
            "lab_heldout": self.heldout,
            "shipped_tests": self.shipped,
            "acceptable": self.acceptable,
            "reasons": list(self.reasons),
            "split": self.split,
        }


def adapt(
    base: CellClassifier,
    lab: LabCells,
    anchors,
    tests: dict,
    *,
    heldout_share: float = 0.25,
    lab_weight: float = 3.0,
    seed: int = 0,
    version: str = "",
    swap: bool = False,
) -> Adaptation:
    """Split the lab's cells, refit on the training part, judge on the held-out part and on `tests`
    (name -> trainer.celldata.LabelledCells: the shipped test cells)."""
    train, held, description = split(lab, heldout_share, swap)
    candidate = fine_tune(base, train, anchors, lab_weight=lab_weight, seed=seed, version=version)
    heldout = {
        "cells": len(held),
        "base": figures(base, held.crops, held.labels).as_dict(),
        "candidate": figures(candidate, held.crops, held.labels).as_dict(),
    }
    ok, why = not_worse(heldout["candidate"], heldout["base"])
    reasons = [f"lab held-out: {why}"]
    acceptable = ok
    shipped = {}
    for name, cells in tests.items():
        shipped[name] = {
            "cells": len(cells),
            "base": labelled_figures(base, cells).as_dict(),
            "candidate": labelled_figures(candidate, cells).as_dict(),
        }
        ok, why = not_worse(shipped[name]["candidate"], shipped[name]["base"], SHIPPED_TOLERANCE)
        reasons.append(f"{name}: {why}")
        acceptable = acceptable and ok
    description = {
        **description,
        "train_cells": len(train),
        "heldout_cells": len(held),
        "lab_counts": lab.counts(),
    }
    info = replace(
        candidate.info,
        metrics={
            "base": base.info.version,
            "lab_heldout": heldout,
            "shipped_tests": shipped,
            "split": description,
        },
    )
    candidate = CellClassifier(info, sklearn_model=candidate.sklearn_model)
    return Adaptation(candidate, base.info.version, description, heldout, shipped, acceptable, tuple(reasons))
