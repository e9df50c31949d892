"""Evaluating a model through the full pipeline, on images it never trained on.

Two kinds of truth: segmentation_wbc crops (whole white cell and nucleus; no blasts) and synthetic
fields (classes, nuclei and instances, blasts included).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from blastq.core.engines import Engine
from blastq.core.metrics import ObjectCounts, PixelCounts, match_instances, pixel_counts, segmentation_report
from blastq.core.pipeline import PipelineConfig, process_slide
from blastq.core.slide import Slide
from blastq.core.synth import generate_field
from blastq.core.unet import CLASS_NAMES, ModelInfo
from blastq.trainer.datasets import WbcItem, read_rgb, read_wbc_mask
from blastq.trainer.train import SYNTH_TEST_SEED0

Tick = Callable[[int], None]


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


def _slide(rgb: np.ndarray, mpp: float, name: str) -> Slide:
    return Slide(rgb=rgb, mpp=mpp, mpp_source="user", name=name, sha256="")


def evaluate_wbc(
    engine: Engine,
    info: ModelInfo,
    items: Sequence[WbcItem],
    config: PipelineConfig = PipelineConfig(),
    tick: Tick | None = None,
) -> list[WbcEvaluation]:
    """Per-dataset figures for segmentation_wbc crops; a predicted blast counts as white cell here."""
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
        per.setdefault(item.dataset, []).append(
            (
                pixel_counts(cell_pred, truth >= 1),
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
            )
        )
    return out


def synthetic_test_fields(count: int, size_px: int = 512, mpp: float = 0.2, blast_fraction: float = 0.3):
    """The fixed synthetic test set: seeds SYNTH_TEST_SEED0 + i, never used in training."""
    return [
        generate_field(SYNTH_TEST_SEED0 + i, size_px, size_px, mpp=mpp, blast_fraction=blast_fraction)
        for i in range(count)
    ]


def evaluate_synthetic(
    engine: Engine,
    info: ModelInfo,
    fields: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, float]],
    config: PipelineConfig = PipelineConfig(),
    tick: Tick | None = None,
) -> SynthEvaluation:
    """Figures on (rgb, classes, instances, mpp) tuples with full truth."""
    report = None
    blast_obj = cell_obj = ObjectCounts(0, 0, 0, 0.0)
    errors = []
    for i, (rgb, classes, instances, mpp) in enumerate(fields):
        result = process_slide(_slide(rgb, mpp, f"field{i}"), engine, info, config)
        maps = result.maps
        r = segmentation_report(maps.classes, classes, CLASS_NAMES)
        report = r if report is None else report + r
        blast_obj += match_instances(
            np.where(maps.classes == 2, maps.instances, 0), np.where(classes == 2, instances, 0)
        )
        cell_obj += match_instances(maps.instances, instances)
        true_ids = np.unique(instances[instances > 0])
        true_blasts = len(np.unique(instances[classes == 2]))
        true_pct = 100.0 * true_blasts / len(true_ids) if len(true_ids) else 0.0
        errors.append(abs(result.stats.blast_percent - true_pct))
        if tick:
            tick(1)
    if report is None:
        raise ValueError("no fields to evaluate")
    blast = report.by_name("blast")
    return SynthEvaluation(
        fields=len(fields),
        blast_dice=blast.dice,
        blast_iou=blast.iou,
        white_cell_dice=report.by_name("white_cell").dice,
        pixel_accuracy=report.pixel_accuracy,
        blast_objects=blast_obj,
        cell_objects=cell_obj,
        blast_percent_abs_error=float(np.mean(errors)),
        report=report,
    )
