"""Labelled white cells for the cell classifiers: real segmentation_wbc crops and synthetic fields.

Every cell comes as a normalised `CellCrop` (core.cells.cellcrops) cut from an image that went through the
same scale change and preprocessing as the U-Net's input, so the classifiers see cells as the pipeline
will hand them over. Cells cut from one image share a group: cross-validation never splits a group,
so no model is tested on a neighbour of a cell it was trained on (same stain, same light).
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

from blastq.core.cells import CELL_TYPES, CROP_MPP, CellCrop, crops_from_instances, normalise_crop
from blastq.core.common import InvalidConfig, InvalidDataset
from blastq.core.image import DEFAULT_PREPROCESS, PreprocessConfig, preprocess, resample, resample_labels
from blastq.core.synth import generate_field
from blastq.trainer.datasets import read_rgb, read_wbc_mask, segmentation_wbc_items

# segmentation_wbc's CSV values 1..5, in this order; they are the first five CELL_TYPES.
WBC_CSV_CLASSES: tuple[str, ...] = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")
WBC_DATASETS: tuple[str, ...] = ("dataset1", "dataset2")
# Synthetic fields for classification: 76.8 um square, twice the generator's default density so a
# field gives a handful of cells, and a blast share that makes blasts a common class, not a rare one.
SYNTH_FIELD_PX = 384
SYNTH_BLAST_FRACTION = 0.3
SYNTH_WBC_PER_10K_UM2 = 12.0


@dataclass(frozen=True, eq=False)
class LabelledCells:
    """Normalised cell crops with their type (index into CELL_TYPES), group and a readable name each."""

    crops: list[CellCrop]
    labels: np.ndarray  # (N,) int64, index into CELL_TYPES
    groups: np.ndarray  # (N,) int64: cells of one image / field share a group
    source: str  # "segmentation_wbc", "synthetic", or several joined by "+" (concat_cells)
    names: list[str]  # "dataset1/017", "synth/seed=12/cell=3"

    def __post_init__(self) -> None:
        n = len(self.crops)
        if not (len(self.labels) == len(self.groups) == len(self.names) == n):
            raise ValueError(
                f"{n} crops but {len(self.labels)} labels, {len(self.groups)} groups, {len(self.names)} names"
            )

    def __len__(self) -> int:
        return len(self.crops)

    def subset(self, idx: Sequence[int] | np.ndarray) -> LabelledCells:
        """The cells at `idx` (integer indices or a boolean mask), in that order."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64)
        return LabelledCells(
            crops=[self.crops[i] for i in idx],
            labels=self.labels[idx],
            groups=self.groups[idx],
            source=self.source,
            names=[self.names[i] for i in idx],
        )

    def counts(self) -> dict[str, int]:
        """Cells per type, every CELL_TYPES key present."""
        per = np.bincount(self.labels, minlength=len(CELL_TYPES))
        return {name: int(per[i]) for i, name in enumerate(CELL_TYPES)}


def concat_cells(*parts: LabelledCells) -> LabelledCells:
    """Several sets as one; groups are renumbered so that groups of different sets never merge."""
    crops: list[CellCrop] = []
    names: list[str] = []
    labels, groups, sources = [], [], []
    offset = 0
    for part in parts:
        crops += part.crops
        names += part.names
        labels.append(part.labels)
        groups.append(part.groups + offset)
        offset += int(part.groups.max()) + 1 if len(part) else 0
        if part.source not in sources:
            sources.append(part.source)
    return LabelledCells(
        crops=crops,
        labels=np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64),
        groups=np.concatenate(groups).astype(np.int64) if groups else np.zeros(0, np.int64),
        source="+".join(sources),
        names=names,
    )


def read_wbc_labels(path: Path) -> dict[int, int]:
    """A labels_datasetN.csv as {image number: index into CELL_TYPES}.

    The two files differ in their header ("image ID,class label" vs "image ID,class"), so columns are
    taken by position after checking that the first is the image ID.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    except OSError as exc:
        raise InvalidDataset(f"cannot read cell labels {path}: {exc}") from exc
    if not rows or len(rows[0]) < 2 or rows[0][0].strip().lower() != "image id":
        raise InvalidDataset("expected a header 'image ID,class label' (or 'image ID,class')", path=path)
    labels = {}
    for line, row in enumerate(rows[1:], start=2):
        try:
            number, value = int(row[0]), int(row[1])
        except (IndexError, ValueError):
            raise InvalidDataset(f"{path}:{line}: expected 'number,class', got {','.join(row)!r}") from None
        if not 1 <= value <= len(WBC_CSV_CLASSES):
            raise InvalidDataset(f"{path}:{line}: class {value} is not within 1..{len(WBC_CSV_CLASSES)}")
        labels[number] = CELL_TYPES.index(WBC_CSV_CLASSES[value - 1])
    return labels


def wbc_cells(
    root: Path,
    preprocess_config: PreprocessConfig = DEFAULT_PREPROCESS,
    datasets: Sequence[str] = WBC_DATASETS,
) -> LabelledCells:
    """Every segmentation_wbc crop that has a label in labels_<dataset>.csv, one cell per image.

    The image is resampled from its dataset's mpp to CROP_MPP and preprocessed as the U-Net's input;
    the cell is the largest connected part of mask >= 1 (a few masks hold a stray speck), the nucleus
    mask == 2 inside it. Group = image.
    """
    root = Path(root)
    items = segmentation_wbc_items(root, datasets=tuple(datasets))
    labels_by_ds = {ds: read_wbc_labels(root / f"labels_{ds}.csv") for ds in datasets}
    crops, labels, names = [], [], []
    for item in items:
        label = labels_by_ds[item.dataset].get(item.number)
        if label is None:
            continue
        crop = _wbc_crop(
            read_rgb(item.image_path), read_wbc_mask(item.mask_path), item.mpp, preprocess_config
        )
        if not crop.cell.any():
            raise InvalidDataset("the mask marks no cell", path=item.mask_path)
        crops.append(crop)
        labels.append(label)
        names.append(f"{item.dataset}/{item.image_path.stem}")
    if not crops:
        raise InvalidDataset(f"no labelled cells under {root} (labels_<dataset>.csv against the images)")
    return LabelledCells(
        crops=crops,
        labels=np.asarray(labels, np.int64),
        groups=np.arange(len(crops), dtype=np.int64),
        source="segmentation_wbc",
        names=names,
    )


def _wbc_crop(rgb: np.ndarray, mask: np.ndarray, mpp: float, config: PreprocessConfig) -> CellCrop:
    rgb = resample(rgb, mpp, CROP_MPP)
    mask = resample_labels(mask, mpp, CROP_MPP)
    if mask.shape != rgb.shape[:2]:
        mask = cv2.resize(mask, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
    parts, n = ndi.label(mask >= 1)
    if n == 0:
        cell = np.zeros(mask.shape, np.int32)
    else:
        sizes = np.bincount(parts.ravel(), minlength=n + 1)[1:]
        cell = (parts == int(np.argmax(sizes)) + 1).astype(np.int32)
    image = preprocess(rgb, CROP_MPP, config)
    (crop,) = crops_from_instances(image, cell, mask == 2, CROP_MPP, ids=[1])
    return normalise_crop(crop)


def synthetic_cells(
    n_fields: int,
    seed: int = 0,
    preprocess_config: PreprocessConfig = DEFAULT_PREPROCESS,
    variety: str = "classic",
) -> LabelledCells:
    """The white cells of `n_fields` generated fields (field i from seed + i), labelled by their kind.

    `variety`: the generator's "classic" or "wide" fields (blasts across their range beside their
    look-alikes, named stain families, decoys), or "mixed": wide for odd i, classic for even.

    Fields are 384 px at CROP_MPP with 30 % blasts at ~12 cells per 10,000 um2, preprocessed as the
    U-Net's input. Cells whose bounding box touches the field border are skipped (a cut cell would be
    mislabelled by its shape). Group = field index i.
    """
    if n_fields < 0:
        raise InvalidConfig(f"n_fields must be >= 0, got {n_fields}")
    crops, labels, groups, names = [], [], [], []
    for i in range(n_fields):
        field = generate_field(
            seed + i,
            SYNTH_FIELD_PX,
            SYNTH_FIELD_PX,
            mpp=CROP_MPP,
            blast_fraction=SYNTH_BLAST_FRACTION,
            wbc_per_10k_um2=SYNTH_WBC_PER_10K_UM2,
            variety="wide" if variety == "wide" or (variety == "mixed" and i % 2) else "classic",
        )
        h, w = field.instances.shape
        boxes = ndi.find_objects(field.instances)
        inside = []
        for cell in field.cells:
            box = boxes[cell.cell_id - 1] if cell.cell_id <= len(boxes) else None
            if box is None or box[0].start == 0 or box[1].start == 0 or box[0].stop == h or box[1].stop == w:
                continue
            inside.append(cell)
        if not inside:
            continue
        image = preprocess(field.image, CROP_MPP, preprocess_config)
        cut = crops_from_instances(
            image, field.instances, field.nuclei, CROP_MPP, ids=[c.cell_id for c in inside]
        )
        for cell, crop in zip(inside, cut, strict=True):
            crops.append(normalise_crop(crop))
            labels.append(CELL_TYPES.index(cell.kind))
            groups.append(i)
            names.append(
                f"synth/seed={seed + i}/cell={cell.cell_id}" + (f"/{cell.look}" if cell.look else "")
            )
    return LabelledCells(
        crops=crops,
        labels=np.asarray(labels, np.int64),
        groups=np.asarray(groups, np.int64),
        source="synthetic",
        names=names,
    )


def cv_folds(cells: LabelledCells, k: int = 5) -> np.ndarray:
    """The cross-validation fold (0..k-1) of every cell: group-aware, stratified, deterministic.

    A group (image / field) goes to one fold with all its cells. Each group is filed under its rarest
    class (fewest cells in `cells`; ties by CELL_TYPES order), so fields holding a rare cell spread
    that class over the folds. Classes are taken rarest first; within a class the groups are ordered by
    the sha1 hex digest of the group's first cell name (then the name itself), and dealt round-robin to
    folds 0, 1, ..., k-1, 0, ...; the deal goes on where the previous class stopped, so fold sizes stay
    even. Only names and labels decide, never Python's hash or a random state: the folds are the same
    on every run and machine, and a class with at least k groups is in every fold.
    """
    if k < 2:
        raise InvalidConfig(f"cross-validation needs k >= 2 folds, got {k}")
    unique_groups = np.unique(cells.groups)
    if len(unique_groups) < k:
        raise InvalidConfig(f"{len(unique_groups)} groups of cells cannot fill {k} folds")
    per_class = np.bincount(cells.labels, minlength=len(CELL_TYPES))
    rarity = {c: (int(per_class[c]), c) for c in range(len(per_class))}
    strata: dict[int, list[tuple[str, str, int]]] = {}
    for g in unique_groups:
        members = np.flatnonzero(cells.groups == g)
        rarest = min((int(c) for c in np.unique(cells.labels[members])), key=rarity.__getitem__)
        first = cells.names[members[0]]
        strata.setdefault(rarest, []).append((hashlib.sha1(first.encode()).hexdigest(), first, int(g)))
    fold_of_group: dict[int, int] = {}
    turn = 0
    for c in sorted(strata, key=rarity.__getitem__):
        for _, _, g in sorted(strata[c]):
            fold_of_group[g] = turn % k
            turn += 1
    return np.asarray([fold_of_group[int(g)] for g in cells.groups], np.int64)
