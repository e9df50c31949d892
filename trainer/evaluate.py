"""Evaluating a model through the full pipeline, on images it never trained on.

Two kinds of truth: segmentation_wbc crops (whole white cell and nucleus; no blasts) and synthetic
fields (classes, nuclei and instances, blasts included, and each cell's kind). On synthetic fields a
cell classifier's types and differential are scored against the kinds. Each image can also be offered
to a CaseKeeper, which keeps the k best and k worst images (by Dice) for the report's examples grid.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np

from blastq.core.cells import CELL_TYPES, CellClassifier, load_cell_classifier
from blastq.core.image import Slide
from blastq.core.pipeline import PipelineConfig, SlideResult, process_slide
from blastq.core.segment import CLASS_NAMES, Engine, ModelInfo
from blastq.core.synth import SynthField, generate_field
from blastq.trainer.datasets import WbcItem, read_rgb, read_wbc_mask, wbc_split
from blastq.trainer.metrics import (
    ObjectCounts,
    PixelCounts,
    match_instances,
    matched_pairs,
    pixel_counts,
    segmentation_report,
)
from blastq.trainer.train import SYNTH_TEST_SEED0, SYNTH_VAL_SEED0

Tick = Callable[[int], None]
# A synthetic field with its truth: (rgb HWC uint8, classes HW uint8, instances HW int, mpp) and, to score
# a classifier's types, a fifth item mapping each true instance id to its kind (SynthCell.kind).
SynthTruth = (
    tuple[np.ndarray, np.ndarray, np.ndarray, float]
    | tuple[np.ndarray, np.ndarray, np.ndarray, float, Mapping[int, str]]
)


@dataclass(frozen=True)
class WbcEvaluation:
    """Whole-cell and nucleus agreement on segmentation_wbc crops (Dice/IoU: mean over images)."""

    dataset: str
    images: int
    cell_dice: float  # the labelled cell: predicted cells that overlap it
    cell_dice_all_pixels: float  # every predicted cell, unlabelled neighbours counted as false positives
    cell_iou: float
    nucleus_dice: float
    nucleus_iou: float
    pixel_accuracy: float  # background / cytoplasm / nucleus, all pixels of all images
    cell: PixelCounts  # summed over images: precision, recall, F1
    nucleus: PixelCounts
    pixels: int = 0  # all pixels of all images: the weight of pixel_accuracy when combining


@dataclass(frozen=True)
class CellTypeEvaluation:
    """How a cell classifier typed the white cells of synthetic fields (blasts stay the segmentation's call).

    Type figures are over the `fields` fields whose true kinds were given: types compare predicted and
    true cells matched one-to-one at IoU >= 0.5, the differential compares each field's percentages.
    The review share is over every predicted cell of every field.
    """

    classifier_version: str
    cells: int  # predicted white cells, all fields
    review_cells: int  # of them, marked for a person's review
    fields: int  # fields with true kinds; without any, the figures below are empty
    confusion: tuple[tuple[int, ...], ...]  # [true kind][predicted type], CELL_TYPES order, matched cells
    true_counts: tuple[int, ...]  # all true cells per CELL_TYPES, matched or not
    predicted_counts: tuple[int, ...]  # all predicted cells per CELL_TYPES, matched or not
    differential_abs_error: tuple[float, ...]  # per CELL_TYPES: mean over fields of |pred - true| points

    @property
    def review_share(self) -> float:
        return self.review_cells / self.cells if self.cells else 0.0

    @property
    def matched_cells(self) -> int:
        return int(sum(map(sum, self.confusion)))

    @property
    def accuracy(self) -> float:
        """Matched cells whose predicted type is their true kind; nan when none matched."""
        correct = sum(self.confusion[i][i] for i in range(len(CELL_TYPES)))
        return correct / self.matched_cells if self.matched_cells else math.nan

    def type_counts(self, cell_type: str) -> ObjectCounts:
        """One type among the matched cells: tp (right), fp (called it, was not), fn (was it, called other)."""
        i = CELL_TYPES.index(cell_type)
        tp = self.confusion[i][i]
        called = sum(row[i] for row in self.confusion)
        return ObjectCounts(tp, called - tp, sum(self.confusion[i]) - tp, 0.0)

    @property
    def types_seen(self) -> tuple[str, ...]:
        """Types that are in the truth or the predictions of the fields with kinds (CELL_TYPES order)."""
        return tuple(
            t for t, n, m in zip(CELL_TYPES, self.true_counts, self.predicted_counts, strict=True) if n or m
        )

    @property
    def differential_mean_abs_error(self) -> float:
        """Mean of differential_abs_error over types_seen (a type never there nor called is 0 by design)."""
        seen = [self.differential_abs_error[CELL_TYPES.index(t)] for t in self.types_seen]
        return float(np.mean(seen)) if seen else math.nan


@dataclass(frozen=True)
class SynthEvaluation:
    fields: int
    blast_dice: float  # over all pixels of all fields
    blast_iou: float
    white_cell_dice: float
    pixel_accuracy: float
    blast_objects: ObjectCounts  # blast instances matched at IoU >= 0.5
    cell_objects: ObjectCounts  # all white-cell instances matched at IoU >= 0.5
    blast_percent_abs_error: float  # mean over fields of |predicted - true| percentage points
    report: object  # the full SegmentationReport
    cell_types: CellTypeEvaluation | None = None  # None when no classifier typed the cells


# Label names of the examples' maps; the report colours each by name.
WBC_CASE_LABELS = ("background", "cytoplasm", "nucleus", "unscored cell")
CASE_PX = 320  # larger images are cropped to a CASE_PX square window for the examples grid


@dataclass(frozen=True, eq=False)
class ImageCase:
    """One evaluated image, small enough to keep: what the examples grid shows of it."""

    name: str
    dice: float  # of the class the evaluation ranks by (metric says which)
    metric: str  # "cell Dice" (segmentation_wbc) or "blast Dice" (synthetic)
    image: np.ndarray  # HWC uint8 RGB
    truth: np.ndarray  # HW uint8, index into label_names
    pred: np.ndarray  # HW uint8, index into label_names
    label_names: tuple[str, ...]


@dataclass(frozen=True)
class ExampleCases:
    """The best and the worst images of one evaluation, best first and worst first."""

    title: str
    best: tuple[ImageCase, ...]
    worst: tuple[ImageCase, ...]
    images: int  # images seen


class CaseKeeper:
    """Keeps the k best and the k worst images by Dice in two bounded heaps: O(k) memory, any count.

    Ranking is one total order, (Dice descending, arrival order), so the best k and the worst k
    never share an image once 2k images were seen; with fewer, the images are split between the two.
    """

    def __init__(self, k: int = 4, title: str = "") -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.title, self.seen = k, title, 0
        # Each heap's root is the image it would drop next: the weakest of the best, the least bad of the worst.
        self._best: list[tuple[float, int, ImageCase]] = []  # (dice, -seq)
        self._worst: list[tuple[float, int, ImageCase]] = []  # (-dice, seq)

    def __len__(self) -> int:
        """Images held (at most 2k)."""
        return len({id(c) for *_, c in self._best + self._worst})

    def add(self, case: ImageCase) -> None:
        seq, self.seen = self.seen, self.seen + 1
        for heap, key in ((self._best, (case.dice, -seq)), (self._worst, (-case.dice, seq))):
            if len(heap) < self.k:
                heapq.heappush(heap, (*key, case))
            elif key > heap[0][:2]:
                heapq.heapreplace(heap, (*key, case))

    def result(self) -> ExampleCases:
        held = {-neg_seq: c for _, neg_seq, c in self._best} | {seq: c for _, seq, c in self._worst}
        ranked = [held[s] for s in sorted(held, key=lambda s: (-held[s].dice, s))]
        n_best, n_worst = min(self.k, (self.seen + 1) // 2), min(self.k, self.seen // 2)
        worst = ranked[len(ranked) - n_worst :][::-1] if n_worst else []
        return ExampleCases(self.title, tuple(ranked[:n_best]), tuple(worst), self.seen)


def pick_cases(cases: Iterable[ImageCase], k: int = 4, title: str = "") -> ExampleCases:
    """The k best and k worst of `cases` by Dice (see CaseKeeper)."""
    keeper = CaseKeeper(k, title)
    for case in cases:
        keeper.add(case)
    return keeper.result()


def case_view(
    rgb: np.ndarray, truth: np.ndarray, pred: np.ndarray, focus: np.ndarray, size_px: int = CASE_PX
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copies of the three maps, cropped (if larger) to the size_px window holding most `focus` pixels."""
    h, w = truth.shape
    if h <= size_px and w <= size_px:
        return rgb.copy(), truth.copy(), pred.copy()
    wh, ww = min(h, size_px), min(w, size_px)
    # Sum of focus over every window position, from the integral image: argmax is the window to show.
    integral = cv2.integral(focus.astype(np.uint8), sdepth=cv2.CV_64F)
    sums = integral[wh:, ww:] - integral[:-wh, ww:] - integral[wh:, :-ww] + integral[:-wh, :-ww]
    y0, x0 = np.unravel_index(int(np.argmax(sums)), sums.shape)
    window = (slice(y0, y0 + wh), slice(x0, x0 + ww))
    return rgb[window].copy(), truth[window].copy(), pred[window].copy()


def _slide(rgb: np.ndarray, mpp: float, name: str) -> Slide:
    return Slide(rgb=rgb, mpp=mpp, mpp_source="user", name=name, sha256="")


def evaluate_wbc(
    engine: Engine,
    info: ModelInfo,
    items: Sequence[WbcItem],
    config: PipelineConfig = PipelineConfig(),
    tick: Tick | None = None,
    cases: CaseKeeper | None = None,
) -> list[WbcEvaluation]:
    """Per-dataset figures for segmentation_wbc crops; a predicted blast counts as white cell here.

    With `cases`, every crop is offered to it, ranked by its whole-cell Dice.
    """
    per: dict[str, list] = {}
    for item in items:
        rgb, truth = read_rgb(item.image_path), read_wbc_mask(item.mask_path)
        result = process_slide(_slide(rgb, item.mpp, item.image_path.name), engine, info, config)
        instances = result.maps.instances
        # Each crop labels one white cell; other (partial) cells in it are unlabelled, not background.
        # Score the predicted cells that overlap the labelled one, and report all pixels beside it.
        touching = np.setdiff1d(np.unique(instances[truth >= 1]), [0])
        cell_pred = np.isin(instances, touching)
        nuc_pred = result.maps.nuclei & cell_pred
        pred3 = np.where(nuc_pred, 2, np.where(cell_pred, 1, 0))
        cell_counts = pixel_counts(cell_pred, truth >= 1)
        if cases is not None:
            shown = np.where(pred3 == 0, np.where(instances > 0, 3, 0), pred3).astype(np.uint8)
            image, truth_v, pred_v = case_view(rgb, truth, shown, (truth >= 1) | cell_pred)
            cases.add(
                ImageCase(
                    f"{item.dataset}/{item.image_path.name} ({wbc_split(item.number)})",
                    cell_counts.dice,
                    "cell Dice",
                    image,
                    truth_v,
                    pred_v,
                    WBC_CASE_LABELS,
                )
            )
        per.setdefault(item.dataset, []).append(
            (
                cell_counts,
                pixel_counts(nuc_pred, truth == 2),
                int((pred3 == truth).sum()),
                truth.size,
                pixel_counts(instances > 0, truth >= 1),
            )
        )
        if tick:
            tick(1)
    out = []
    for ds, rows in sorted(per.items()):
        cells, nucs = [r[0] for r in rows], [r[1] for r in rows]
        out.append(
            WbcEvaluation(
                dataset=ds,
                images=len(rows),
                cell_dice=float(np.mean([c.dice for c in cells])),
                cell_dice_all_pixels=float(np.mean([r[4].dice for r in rows])),
                cell_iou=float(np.mean([c.iou for c in cells])),
                nucleus_dice=float(np.mean([n.dice for n in nucs])),
                nucleus_iou=float(np.mean([n.iou for n in nucs])),
                pixel_accuracy=sum(r[2] for r in rows) / sum(r[3] for r in rows),
                cell=sum(cells, PixelCounts(0, 0, 0, 0)),
                nucleus=sum(nucs, PixelCounts(0, 0, 0, 0)),
                pixels=sum(r[3] for r in rows),
            )
        )
    return out


def combine_wbc(evaluations: Iterable[WbcEvaluation]) -> list[WbcEvaluation]:
    """Per-dataset figures of several evaluations (e.g. the train, val and test splits) taken together.

    The same figures as one evaluation over all their images: per-image means weighted by image count,
    pixel accuracy by pixel count, confusion counts summed.
    """
    per: dict[str, list[WbcEvaluation]] = {}
    for e in evaluations:
        per.setdefault(e.dataset, []).append(e)
    out = []
    for ds, group in sorted(per.items()):
        images = sum(e.images for e in group)
        pixels = sum(e.pixels for e in group)
        if pixels == 0 and len(group) > 1:
            raise ValueError(f"cannot combine {ds} evaluations that do not record their pixel count")

        def mean(name: str, group=group, images=images) -> float:
            return sum(getattr(e, name) * e.images for e in group) / images

        out.append(
            replace(
                group[0],
                images=images,
                cell_dice=mean("cell_dice"),
                cell_dice_all_pixels=mean("cell_dice_all_pixels"),
                cell_iou=mean("cell_iou"),
                nucleus_dice=mean("nucleus_dice"),
                nucleus_iou=mean("nucleus_iou"),
                pixel_accuracy=(
                    sum(e.pixel_accuracy * e.pixels for e in group) / pixels
                    if pixels
                    else group[0].pixel_accuracy
                ),
                cell=sum((e.cell for e in group), PixelCounts(0, 0, 0, 0)),
                nucleus=sum((e.nucleus for e in group), PixelCounts(0, 0, 0, 0)),
                pixels=pixels,
            )
        )
    return out


# The fixed synthetic test set of the model card and report: fields from SYNTH_TEST_SEED0 on.
SYNTH_TEST_FIELDS = 24
SYNTH_TEST_SIZE_PX = 1024


def synthetic_test_fields(
    count: int, size_px: int = 512, mpp: float = 0.2, blast_fraction: float = 0.3
) -> list[SynthField]:
    """The fixed synthetic test set: seeds SYNTH_TEST_SEED0 + i, never used in training."""
    return [
        generate_field(SYNTH_TEST_SEED0 + i, size_px, size_px, mpp=mpp, blast_fraction=blast_fraction)
        for i in range(count)
    ]


def synth_truth(field: SynthField) -> SynthTruth:
    """A generated field as evaluate_synthetic takes it, with each cell's kind."""
    return field.image, field.classes, field.instances, field.mpp, {c.cell_id: c.kind for c in field.cells}


class _TypeTally:
    """Adds up one field after another into a CellTypeEvaluation."""

    def __init__(self, classifier_version: str) -> None:
        n = len(CELL_TYPES)
        self.version, self.cells, self.review, self.fields = classifier_version, 0, 0, 0
        self.confusion = np.zeros((n, n), np.int64)
        self.true_counts = np.zeros(n, np.int64)
        self.predicted_counts = np.zeros(n, np.int64)
        self.abs_error_sum = np.zeros(n, np.float64)

    def add(self, result: SlideResult, instances: np.ndarray, kinds: Mapping[int, str] | None) -> None:
        self.cells += result.stats.white_cells
        self.review += result.stats.review_cells
        if kinds is None:
            return
        unknown = set(kinds.values()) - set(CELL_TYPES)
        if unknown:
            raise ValueError(f"true kinds {sorted(unknown)} are not cell types ({', '.join(CELL_TYPES)})")
        self.fields += 1
        predicted = {c.cell_id: c.cell_type for c in result.maps.cells}
        for pred_id, true_id in matched_pairs(result.maps.instances, instances):
            if true_id not in kinds:
                raise ValueError(f"true instance {true_id} has no kind")
            self.confusion[CELL_TYPES.index(kinds[true_id]), CELL_TYPES.index(predicted[pred_id])] += 1
        true_n = np.array([sum(k == t for k in kinds.values()) for t in CELL_TYPES], np.int64)
        self.true_counts += true_n
        self.predicted_counts += [sum(c == t for c in predicted.values()) for t in CELL_TYPES]
        true_pct = 100.0 * true_n / true_n.sum() if true_n.sum() else np.zeros(len(CELL_TYPES))
        differential = result.stats.differential  # empty when nothing was segmented: 0 % of every type
        pred_pct = np.array([differential.get(t, {}).get("percent", 0.0) for t in CELL_TYPES], np.float64)
        self.abs_error_sum += np.abs(pred_pct - true_pct)

    def result(self) -> CellTypeEvaluation:
        return CellTypeEvaluation(
            classifier_version=self.version,
            cells=self.cells,
            review_cells=self.review,
            fields=self.fields,
            confusion=tuple(tuple(int(v) for v in row) for row in self.confusion),
            true_counts=tuple(int(v) for v in self.true_counts),
            predicted_counts=tuple(int(v) for v in self.predicted_counts),
            differential_abs_error=(
                tuple(float(v) for v in self.abs_error_sum / self.fields) if self.fields else ()
            ),
        )


def evaluate_synthetic(
    engine: Engine,
    info: ModelInfo,
    fields: Iterable[SynthTruth],
    config: PipelineConfig = PipelineConfig(),
    tick: Tick | None = None,
    cases: CaseKeeper | None = None,
    names: Sequence[str] | None = None,
    classifier: CellClassifier | str | None = "default",
) -> SynthEvaluation:
    """Figures on fields with full truth (SynthTruth; see synth_truth); any iterable, read once.

    `classifier` types the cells: a loaded one, a setting as load_cell_classifier reads it ("default", the
    shipped one; "none"; a file), or None for no typing (then `cell_types` is None). Types are scored
    on the fields that carry their true kinds. With `cases`, every field is offered to it, ranked by its
    blast Dice; `names` name the fields.
    """
    if isinstance(classifier, str):
        classifier = load_cell_classifier(classifier)
    types = _TypeTally(classifier.info.version) if classifier is not None else None
    report = None
    blast_obj = cell_obj = ObjectCounts(0, 0, 0, 0.0)
    errors = []
    for i, (rgb, classes, instances, mpp, *kinds) in enumerate(fields):
        name = names[i] if names is not None else f"field{i}"
        result = process_slide(_slide(rgb, mpp, name), engine, info, config, classifier=classifier)
        maps = result.maps
        r = segmentation_report(maps.classes, classes, CLASS_NAMES)
        report = r if report is None else report + r
        if cases is not None:
            true_blast, pred_blast = classes == 2, maps.classes == 2
            # The window shows blast errors first, then blasts: the worst fields show what went wrong.
            focus = 4 * (true_blast ^ pred_blast) + (true_blast | pred_blast)
            image, truth_v, pred_v = case_view(rgb, classes, maps.classes, focus)
            blast_dice = r.by_name("blast").dice
            cases.add(ImageCase(name, blast_dice, "blast Dice", image, truth_v, pred_v, CLASS_NAMES))
        blast_obj += match_instances(
            np.where(maps.classes == 2, maps.instances, 0), np.where(classes == 2, instances, 0)
        )
        cell_obj += match_instances(maps.instances, instances)
        true_ids = np.unique(instances[instances > 0])
        true_blasts = len(np.unique(instances[classes == 2]))
        true_pct = 100.0 * true_blasts / len(true_ids) if len(true_ids) else 0.0
        errors.append(abs(result.stats.blast_percent - true_pct))
        if types is not None:
            types.add(result, instances, kinds[0] if kinds else None)
        if tick:
            tick(1)
    if report is None:
        raise ValueError("no fields to evaluate")
    blast = report.by_name("blast")
    return SynthEvaluation(
        fields=len(errors),
        blast_dice=blast.dice,
        blast_iou=blast.iou,
        white_cell_dice=report.by_name("white_cell").dice,
        pixel_accuracy=report.pixel_accuracy,
        blast_objects=blast_obj,
        cell_objects=cell_obj,
        blast_percent_abs_error=float(np.mean(errors)),
        report=report,
        cell_types=types.result() if types is not None else None,
    )


# The fixed validation set used to compare models before a promotion: the segmentation_wbc val split
# (trainer/SPLIT.md) and synthetic fields from a part of the validation seed range that no training run
# draws from (runs use SYNTH_VAL_SEED0 + 10,000 x seed + i for i < synth_val, seeds below 90).
VALIDATION_SYNTH_SEED0 = SYNTH_VAL_SEED0 + 900_000
VALIDATION_SYNTH_FIELDS = 8


def validation_metrics(
    engine: Engine, info: ModelInfo, wbc_root, tick: Tick | None = None
) -> dict[str, float]:
    """Figures on the fixed validation set; `validation_score` is their mean (higher is better)."""
    from blastq.trainer.datasets import segmentation_wbc_items

    metrics: dict[str, float] = {}
    for e in evaluate_wbc(engine, info, segmentation_wbc_items(wbc_root, "val"), tick=tick):
        metrics[f"{e.dataset}_val_cell_dice"] = round(e.cell_dice, 4)
        metrics[f"{e.dataset}_val_nucleus_dice"] = round(e.nucleus_dice, 4)
    fields = (
        generate_field(VALIDATION_SYNTH_SEED0 + i, 512, 512, mpp=0.2, blast_fraction=0.3)
        for i in range(VALIDATION_SYNTH_FIELDS)
    )
    # Segmentation figures only: typing the cells would cost time and change none of them.
    synth = evaluate_synthetic(
        engine, info, ((f.image, f.classes, f.instances, f.mpp) for f in fields), tick=tick, classifier=None
    )
    metrics["synthetic_val_blast_dice"] = round(synth.blast_dice, 4)
    metrics["synthetic_val_blast_f1"] = round(synth.blast_objects.f1, 4)
    metrics["validation_score"] = round(float(np.mean(list(metrics.values()))), 4)
    return metrics


@dataclass(frozen=True)
class EvaluationReport:
    model_version: str
    folder: str
    split: str
    wbc: tuple[WbcEvaluation, ...] = ()
    synthetic: SynthEvaluation | None = None

    def as_dict(self) -> dict:
        out: dict = {"model_version": self.model_version, "folder": self.folder, "split": self.split}
        if self.wbc:
            out["segmentation_wbc"] = {
                e.dataset: {
                    "images": e.images,
                    "cell_dice": round(e.cell_dice, 4),
                    "cell_dice_all_pixels": round(e.cell_dice_all_pixels, 4),
                    "cell_iou": round(e.cell_iou, 4),
                    "nucleus_dice": round(e.nucleus_dice, 4),
                    "nucleus_iou": round(e.nucleus_iou, 4),
                    "pixel_accuracy": round(e.pixel_accuracy, 4),
                    "cell_precision": round(e.cell.precision, 4),
                    "cell_recall": round(e.cell.recall, 4),
                    "cell_f1": round(e.cell.f1, 4),
                    "nucleus_precision": round(e.nucleus.precision, 4),
                    "nucleus_recall": round(e.nucleus.recall, 4),
                }
                for e in self.wbc
            }
        if s := self.synthetic:
            out["synthetic"] = {
                "fields": s.fields,
                "blast_dice": round(s.blast_dice, 4),
                "blast_iou": round(s.blast_iou, 4),
                "white_cell_dice": round(s.white_cell_dice, 4),
                "pixel_accuracy": round(s.pixel_accuracy, 4),
                "blast_detection_precision": round(s.blast_objects.precision, 4),
                "blast_detection_recall": round(s.blast_objects.recall, 4),
                "blast_detection_f1": round(s.blast_objects.f1, 4),
                "cell_detection_f1": round(s.cell_objects.f1, 4),
                "blast_percent_mean_abs_error": round(s.blast_percent_abs_error, 2),
                "per_class": {
                    c.name: {k: round(getattr(c, k), 4) for k in ("dice", "iou", "precision", "recall", "f1")}
                    for c in s.report.classes
                },
            }
            if s.cell_types is not None:
                out["synthetic"]["cell_types"] = _cell_types_dict(s.cell_types)
        return out

    def as_text(self) -> str:
        lines = [f"model {self.model_version} on {self.folder} (split: {self.split})"]
        if self.wbc:
            lines.append(
                f"{'dataset':10} {'images':>6} {'cell Dice':>9} {'cell IoU':>8} {'nuc Dice':>8} {'nuc IoU':>8} "
                f"{'pix acc':>7} {'cell P':>6} {'cell R':>6} {'cell F1':>7} {'Dice all px':>11}"
            )
            for e in self.wbc:
                lines.append(
                    f"{e.dataset:10} {e.images:6d} {e.cell_dice:9.4f} {e.cell_iou:8.4f} {e.nucleus_dice:8.4f} "
                    f"{e.nucleus_iou:8.4f} {e.pixel_accuracy:7.4f} {e.cell.precision:6.3f} {e.cell.recall:6.3f} "
                    f"{e.cell.f1:7.4f} {e.cell_dice_all_pixels:11.4f}"
                )
        if s := self.synthetic:
            lines.append(f"synthetic fields: {s.fields}")
            lines.append(f"{'class':12} {'Dice':>7} {'IoU':>7} {'prec':>7} {'recall':>7} {'F1':>7}")
            for c in s.report.classes:
                lines.append(
                    f"{c.name:12} {c.dice:7.4f} {c.iou:7.4f} {c.precision:7.4f} {c.recall:7.4f} {c.f1:7.4f}"
                )
            lines.append(f"pixel accuracy {s.pixel_accuracy:.4f}")
            b = s.blast_objects
            lines.append(
                f"blast detection (IoU >= 0.5): precision {b.precision:.4f} recall {b.recall:.4f} F1 {b.f1:.4f}"
                f" (tp {b.tp}, fp {b.fp}, fn {b.fn})"
            )
            lines.append(f"white-cell detection F1 {s.cell_objects.f1:.4f}")
            lines.append(
                f"blast percentage: mean absolute error {s.blast_percent_abs_error:.2f} points per field"
            )
            if s.cell_types is not None:
                lines.extend(_cell_types_lines(s.cell_types))
        return "\n".join(lines)


def _rounded(value: float, digits: int = 4) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def _cell_types_dict(t: CellTypeEvaluation) -> dict:
    out: dict = {
        "classifier_version": t.classifier_version,
        "cells": t.cells,
        "review_cells": t.review_cells,
        "review_share": round(t.review_share, 4),
        "fields_with_kinds": t.fields,
    }
    if not t.fields:
        return out
    per_type = {}
    for name in t.types_seen:
        c, i = t.type_counts(name), CELL_TYPES.index(name)
        per_type[name] = {
            "recall": round(c.recall, 4),
            "precision": round(c.precision, 4),
            "f1": round(c.f1, 4),
            "matched": c.tp + c.fn,
            "true_cells": t.true_counts[i],
            "predicted_cells": t.predicted_counts[i],
            "differential_abs_error": round(t.differential_abs_error[i], 2),
        }
    out.update(
        matched_cells=t.matched_cells,
        accuracy=_rounded(t.accuracy),
        per_type=per_type,
        # Rows: true kind, columns: predicted type, both over every type of the differential.
        confusion={
            true: dict(zip(CELL_TYPES, row, strict=True))
            for true, row in zip(CELL_TYPES, t.confusion, strict=True)
        },
        differential_abs_error={
            name: round(v, 2) for name, v in zip(CELL_TYPES, t.differential_abs_error, strict=True)
        },
        differential_mean_abs_error=_rounded(t.differential_mean_abs_error, 2),
    )
    return out


def _cell_types_lines(t: CellTypeEvaluation) -> list[str]:
    lines = [f"cell types (classifier {t.classifier_version}):"]
    if t.fields:
        lines.append(
            f"type accuracy {t.accuracy:.4f} over {t.matched_cells} cells matched at IoU >= 0.5 "
            f"({t.fields} fields with true kinds)"
        )
        lines.append(
            f"{'type':12} {'recall':>7} {'prec':>7} {'F1':>7} {'true':>6} {'called':>6} {'diff err':>8}"
        )
        for name in t.types_seen:
            c, i = t.type_counts(name), CELL_TYPES.index(name)
            lines.append(
                f"{name:12} {c.recall:7.4f} {c.precision:7.4f} {c.f1:7.4f} {t.true_counts[i]:6d} "
                f"{t.predicted_counts[i]:6d} {t.differential_abs_error[i]:8.2f}"
            )
        lines.append("confusion of matched cells (rows: true kind, columns: predicted type)")
        lines.append(f"{'':12} " + " ".join(f"{name[:6]:>6}" for name in CELL_TYPES))
        for name, row in zip(CELL_TYPES, t.confusion, strict=True):
            lines.append(f"{name:12} " + " ".join(f"{v:6d}" for v in row))
        lines.append(
            f"differential: mean absolute error {t.differential_mean_abs_error:.2f} points per field and type "
            "(diff err: per type)"
        )
    else:
        lines.append("no true kinds given: types and differential not scored")
    lines.append(f"cells marked for review: {100 * t.review_share:.1f}% ({t.review_cells} of {t.cells})")
    return lines
