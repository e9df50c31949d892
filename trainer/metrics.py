"""Pixel and object metrics for comparing predicted masks with ground truth.

Everything is counts first, ratios second: a frozen dataclass holds integer confusion counts, ``+`` sums
them across images, and the ratios are properties computed from the sums. Summing counts and then
taking the ratio (micro averaging over images) is what a dataset-level score should be; use
``mean_per_image`` on per-image ratios when a per-image average is wanted instead.

Empty-case convention, the same for every ratio here: when there is nothing to get wrong the score
is perfect, and when there is something to find (or something was claimed) but no overlap it is 0.

* both empty (``tp + fp + fn == 0``): dice = iou = precision = recall = f1 = 1.0;
* nothing predicted but something to find (``tp + fp == 0``, ``fn > 0``): precision = recall = 0.0;
* something predicted but nothing to find (``tp + fn == 0``, ``fp > 0``): precision = recall = 0.0;
* no pixels at all: accuracy = 1.0.

With this convention f1 equals dice, and iou = dice / (2 - dice) holds in every case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Largest (pred objects x truth objects) table counted with a dense bincount (int64, 64 MiB); above it
# the overlapping pixel pairs are sorted with np.unique instead.
_DENSE_PAIR_TABLE_MAX = 1 << 23


def _ratio(num: int, den: int, *, empty: float) -> float:
    return num / den if den else empty


@dataclass(frozen=True)
class PixelCounts:
    """Confusion counts of one binary question (foreground or not), summable across images."""

    tp: int
    fp: int
    fn: int
    tn: int

    def __add__(self, other: PixelCounts) -> PixelCounts:
        if not isinstance(other, PixelCounts):
            return NotImplemented
        return PixelCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    def __radd__(self, other: object) -> PixelCounts:
        # Lets sum(counts_list) start from the builtin 0.
        if other == 0:
            return self
        return NotImplemented

    @property
    def total(self) -> int:
        """Number of pixels counted."""
        return self.tp + self.fp + self.fn + self.tn

    @property
    def dice(self) -> float:
        """2tp / (2tp + fp + fn); 1.0 when prediction and truth are both empty."""
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn, empty=1.0)

    @property
    def iou(self) -> float:
        """tp / (tp + fp + fn) (Jaccard); 1.0 when prediction and truth are both empty."""
        return _ratio(self.tp, self.tp + self.fp + self.fn, empty=1.0)

    @property
    def precision(self) -> float:
        """tp / (tp + fp); with nothing predicted, 1.0 if there was nothing to find, else 0.0."""
        return _ratio(self.tp, self.tp + self.fp, empty=1.0 if self.fn == 0 else 0.0)

    @property
    def recall(self) -> float:
        """tp / (tp + fn); with nothing to find, 1.0 if nothing was predicted, else 0.0."""
        return _ratio(self.tp, self.tp + self.fn, empty=1.0 if self.fp == 0 else 0.0)

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall; equal to dice under the empty-case convention."""
        return self.dice

    @property
    def accuracy(self) -> float:
        """(tp + tn) / total; 1.0 when no pixel was counted."""
        return _ratio(self.tp + self.tn, self.total, empty=1.0)


def _check_same_shape(pred: np.ndarray, truth: np.ndarray, what: str) -> None:
    if pred.shape != truth.shape:
        raise ValueError(f"{what}: pred shape {pred.shape} != truth shape {truth.shape}")


def pixel_counts(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> PixelCounts:
    """Count tp/fp/fn/tn of two HW bool masks (nonzero = foreground), skipping pixels where valid is False."""
    pred = np.asarray(pred).astype(bool, copy=False)
    truth = np.asarray(truth).astype(bool, copy=False)
    _check_same_shape(pred, truth, "pixel_counts")
    if valid is None:
        n = pred.size
    else:
        valid = np.asarray(valid).astype(bool, copy=False)
        _check_same_shape(valid, truth, "pixel_counts valid mask")
        n = int(np.count_nonzero(valid))
        pred = pred & valid
        truth = truth & valid
    tp = int(np.count_nonzero(pred & truth))
    n_pred = int(np.count_nonzero(pred))
    n_truth = int(np.count_nonzero(truth))
    fp = n_pred - tp
    fn = n_truth - tp
    return PixelCounts(tp=tp, fp=fp, fn=fn, tn=n - tp - fp - fn)


@dataclass(frozen=True)
class ClassReport:
    """One class of a multi-class label map, scored one-vs-rest."""

    name: str
    counts: PixelCounts

    @property
    def dice(self) -> float:
        """Dice of this class against all others."""
        return self.counts.dice

    @property
    def iou(self) -> float:
        """IoU of this class against all others."""
        return self.counts.iou

    @property
    def precision(self) -> float:
        """Precision of this class against all others."""
        return self.counts.precision

    @property
    def recall(self) -> float:
        """Recall of this class against all others."""
        return self.counts.recall

    @property
    def f1(self) -> float:
        """F1 of this class against all others (equals dice)."""
        return self.counts.f1


@dataclass(frozen=True)
class SegmentationReport:
    """Per-class one-vs-rest counts of a multi-class segmentation plus overall pixel accuracy.

    ``background`` is the index in ``classes`` left out of the macro means (None: none left out).
    Reports of the same classes add: counts and pixel totals are summed, ratios recomputed.
    """

    classes: tuple[ClassReport, ...]
    correct_px: int
    total_px: int
    background: int | None = 0

    def __add__(self, other: SegmentationReport) -> SegmentationReport:
        if not isinstance(other, SegmentationReport):
            return NotImplemented
        names = tuple(c.name for c in self.classes)
        other_names = tuple(c.name for c in other.classes)
        if names != other_names or self.background != other.background:
            raise ValueError(
                f"cannot add reports of different classes: {names} (background {self.background}) "
                f"vs {other_names} (background {other.background})"
            )
        return SegmentationReport(
            classes=tuple(
                ClassReport(a.name, a.counts + b.counts)
                for a, b in zip(self.classes, other.classes, strict=True)
            ),
            correct_px=self.correct_px + other.correct_px,
            total_px=self.total_px + other.total_px,
            background=self.background,
        )

    def __radd__(self, other: object) -> SegmentationReport:
        # Lets sum(reports) start from the builtin 0.
        if other == 0:
            return self
        return NotImplemented

    @property
    def pixel_accuracy(self) -> float:
        """Fraction of valid pixels given the right label; 1.0 when no pixel was counted."""
        return _ratio(self.correct_px, self.total_px, empty=1.0)

    @property
    def scored_classes(self) -> tuple[ClassReport, ...]:
        """The classes the macro means average over (all but the background index)."""
        return tuple(c for i, c in enumerate(self.classes) if i != self.background)

    def _macro(self, metric: str) -> float:
        return mean_per_image([getattr(c, metric) for c in self.scored_classes])

    @property
    def mean_dice(self) -> float:
        """Unweighted mean dice over the scored classes (nan if there are none)."""
        return self._macro("dice")

    @property
    def mean_iou(self) -> float:
        """Unweighted mean IoU over the scored classes (nan if there are none)."""
        return self._macro("iou")

    @property
    def mean_f1(self) -> float:
        """Unweighted mean F1 over the scored classes (nan if there are none)."""
        return self._macro("f1")

    def by_name(self, name: str) -> ClassReport:
        """The report of the class called name; KeyError if there is none."""
        for c in self.classes:
            if c.name == name:
                return c
        raise KeyError(f"no class {name!r} in report; classes are {[c.name for c in self.classes]}")


def _check_label_map(labels: np.ndarray, n_classes: int, what: str) -> None:
    if labels.dtype.kind not in "biu":
        raise ValueError(f"{what} must be an integer label map, got dtype {labels.dtype}")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(
            f"{what} has labels in [{int(labels.min())}, {int(labels.max())}] but only {n_classes} "
            f"class names (labels 0..{n_classes - 1})"
        )


def segmentation_report(
    pred: np.ndarray,
    truth: np.ndarray,
    class_names: Sequence[str],
    *,
    valid: np.ndarray | None = None,
    background: int | None = 0,
) -> SegmentationReport:
    """Score an integer HW label map against truth per class (label i is class_names[i]), one-vs-rest."""
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    n = len(class_names)
    if n == 0:
        raise ValueError("segmentation_report needs at least one class name")
    if background is not None and not 0 <= background < n:
        raise ValueError(f"background index {background} is not one of the {n} classes {list(class_names)}")
    _check_same_shape(pred, truth, "segmentation_report")
    if valid is not None:
        valid = np.asarray(valid).astype(bool, copy=False)
        _check_same_shape(valid, truth, "segmentation_report valid mask")
        pred = pred[valid]
        truth = truth[valid]
    _check_label_map(pred, n, "pred")
    _check_label_map(truth, n, "truth")

    # confusion[t, p]: pixels of true class t labelled p, from one bincount over the joint label.
    joint = truth.ravel().astype(np.intp) * n + pred.ravel().astype(np.intp)
    confusion = np.bincount(joint, minlength=n * n).reshape(n, n)
    total = int(joint.size)
    tp = np.diagonal(confusion)
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    classes = tuple(
        ClassReport(
            name=str(name),
            counts=PixelCounts(
                tp=int(tp[i]),
                fp=int(fp[i]),
                fn=int(fn[i]),
                tn=total - int(tp[i]) - int(fp[i]) - int(fn[i]),
            ),
        )
        for i, name in enumerate(class_names)
    )
    return SegmentationReport(
        classes=classes, correct_px=int(tp.sum()), total_px=total, background=background
    )


@dataclass(frozen=True)
class ObjectCounts:
    """Object-level matching counts, summable across images.

    tp: matched pairs, fp: unmatched predictions, fn: unmatched truths, matched_iou_sum: sum of the
    IoUs of the matched pairs. Ratios follow the module's empty-case convention.
    """

    tp: int
    fp: int
    fn: int
    matched_iou_sum: float

    def __add__(self, other: ObjectCounts) -> ObjectCounts:
        if not isinstance(other, ObjectCounts):
            return NotImplemented
        return ObjectCounts(
            self.tp + other.tp,
            self.fp + other.fp,
            self.fn + other.fn,
            self.matched_iou_sum + other.matched_iou_sum,
        )

    def __radd__(self, other: object) -> ObjectCounts:
        # Lets sum(counts_list) start from the builtin 0.
        if other == 0:
            return self
        return NotImplemented

    @property
    def precision(self) -> float:
        """Matched predictions / predictions; with none predicted, 1.0 if none were to find, else 0.0."""
        return _ratio(self.tp, self.tp + self.fp, empty=1.0 if self.fn == 0 else 0.0)

    @property
    def recall(self) -> float:
        """Matched truths / truths; with none to find, 1.0 if none were predicted, else 0.0."""
        return _ratio(self.tp, self.tp + self.fn, empty=1.0 if self.fp == 0 else 0.0)

    @property
    def f1(self) -> float:
        """2tp / (2tp + fp + fn); 1.0 when there are no objects on either side."""
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn, empty=1.0)

    @property
    def mean_matched_iou(self) -> float:
        """Mean IoU of the matched pairs (segmentation quality); nan when nothing matched."""
        return self.matched_iou_sum / self.tp if self.tp else math.nan

    @property
    def panoptic_quality(self) -> float:
        """matched_iou_sum / (tp + fp/2 + fn/2), i.e. mean matched IoU x f1; 1.0 with no objects at all."""
        den = self.tp + 0.5 * (self.fp + self.fn)
        return self.matched_iou_sum / den if den else 1.0


def _compact_ids(labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relabel a flat instance map to 0 (background), 1..n; return it, the n object areas and their ids."""
    if labels.dtype.kind not in "biu":
        raise ValueError(f"{what} must be an integer instance map, got dtype {labels.dtype}")
    if labels.size == 0:
        return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if labels.dtype.kind == "i" and int(labels.min()) < 0:
        raise ValueError(f"{what} has negative instance id {int(labels.min())}; ids must be >= 0")
    max_id = int(labels.max())
    if max_id <= max(labels.size, 1 << 20):
        # Ids are dense enough for a lookup table: linear time, no sort of the whole image.
        areas_by_id = np.bincount(labels.astype(np.intp, copy=False), minlength=max_id + 1)
        present = np.flatnonzero(areas_by_id[1:]) + 1
        lut = np.zeros(max_id + 1, dtype=np.int32 if present.size < 2**31 - 1 else np.int64)
        lut[present] = np.arange(1, present.size + 1)
        return lut[labels], areas_by_id[present].astype(np.int64), present.astype(np.int64)
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.intp, copy=False)
    if ids[0] != 0:
        inverse += 1
    areas = np.bincount(inverse)[1:]
    return inverse, areas.astype(np.int64), ids[ids != 0].astype(np.int64)


def _pair_overlaps(
    pred_ids: np.ndarray, truth_ids: np.ndarray, n_pred: int, n_truth: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse contingency table: (pred index, truth index, overlap px) of every overlapping pair, 0-based."""
    both = (pred_ids > 0) & (truth_ids > 0)
    keys = (pred_ids[both] - 1).astype(np.int64) * n_truth + (truth_ids[both] - 1)
    if n_pred * n_truth <= _DENSE_PAIR_TABLE_MAX:
        table = np.bincount(keys, minlength=n_pred * n_truth)
        pair_keys = np.flatnonzero(table)
        overlaps = table[pair_keys]
    else:
        pair_keys, overlaps = np.unique(keys, return_counts=True)
    return pair_keys // max(n_truth, 1), pair_keys % max(n_truth, 1), overlaps.astype(np.int64)


def _greedy_matches(
    pred: np.ndarray, truth: np.ndarray, iou_threshold: float, caller: str
) -> tuple[list[tuple[int, int, float]], int, int]:
    """The matched (pred id, truth id, IoU) triples, plus the object counts (n pred, n truth)."""
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    _check_same_shape(pred, truth, caller)
    pred_ids, pred_areas, pred_orig = _compact_ids(pred.reshape(-1), "pred")
    truth_ids, truth_areas, truth_orig = _compact_ids(truth.reshape(-1), "truth")
    n_pred, n_truth = pred_areas.size, truth_areas.size

    p_idx, t_idx, overlap = _pair_overlaps(pred_ids, truth_ids, n_pred, n_truth)
    union = pred_areas[p_idx] + truth_areas[t_idx] - overlap
    iou = overlap / union

    keep = iou >= iou_threshold
    p_idx, t_idx, iou = p_idx[keep], t_idx[keep], iou[keep]
    order = np.lexsort((t_idx, p_idx, -iou))
    pred_used: set[int] = set()
    truth_used: set[int] = set()
    matches = []
    for p, t, v in zip(p_idx[order].tolist(), t_idx[order].tolist(), iou[order].tolist(), strict=True):
        if p in pred_used or t in truth_used:
            continue
        pred_used.add(p)
        truth_used.add(t)
        matches.append((int(pred_orig[p]), int(truth_orig[t]), v))
    return matches, n_pred, n_truth


def match_instances(pred: np.ndarray, truth: np.ndarray, iou_threshold: float = 0.5) -> ObjectCounts:
    """Match objects of two HW instance maps (0 = background) one-to-one by IoU >= iou_threshold.

    Candidate pairs are taken greedily by decreasing IoU (ties: lower pred id, then lower truth id in
    compacted order), each object used at most once. Above a threshold of 0.5 a pair is unique anyway,
    so greedy equals optimal there. Objects must overlap to match, even with a threshold of 0.
    """
    matches, n_pred, n_truth = _greedy_matches(pred, truth, iou_threshold, "match_instances")
    iou_sum = 0.0
    for _, _, v in matches:
        iou_sum += v
    tp = len(matches)
    return ObjectCounts(tp=tp, fp=n_pred - tp, fn=n_truth - tp, matched_iou_sum=iou_sum)


def matched_pairs(pred: np.ndarray, truth: np.ndarray, iou_threshold: float = 0.5) -> list[tuple[int, int]]:
    """(pred id, truth id) of the objects match_instances counts as true positives, by the same rule."""
    matches, _, _ = _greedy_matches(pred, truth, iou_threshold, "matched_pairs")
    return [(p, t) for p, t, _ in matches]


def mean_per_image(values: Sequence[float]) -> float:
    """Mean of the values ignoring nan; nan if there is no non-nan value."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan
