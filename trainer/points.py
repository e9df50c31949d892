"""Point annotations in the ALL-IDB1 style, for object-level evaluation of blast detection.

Each image `NAME.jpg` comes with `NAME.xyc`: one blast centroid per line, "x y" in pixels of that
image (x to the right, y down), whitespace separated; an empty file means no blasts. Points carry no
outline, so they score detection only: a predicted blast is a hit when an annotated point lies inside
it or near its centroid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

from blastq.core.cells import LABEL_BLAST
from blastq.core.common import InvalidDataset
from blastq.core.image import read_slide
from blastq.core.pipeline import PipelineConfig, process_slide
from blastq.core.segment import Engine, ModelInfo
from blastq.trainer.metrics import ObjectCounts

POINT_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
# A point just outside a predicted outline still names that cell: annotators click near the middle
# of a blast (6-10 um in radius), and a slightly small predicted outline should not turn a hit into
# one false positive plus one miss.
DEFAULT_MAX_DISTANCE_UM = 5.0


@dataclass(frozen=True)
class PointItem:
    """One image and its file of blast centroids."""

    image_path: Path
    points_path: Path

    @property
    def name(self) -> str:
        return self.image_path.name


def read_points(path: Path) -> np.ndarray:
    """The (N, 2) float64 array of (x, y) pixel points in an .xyc file; (0, 2) for an empty file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidDataset(f"cannot read point file {path}: {exc}") from exc
    points = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            x, y = (float(f) for f in fields)
        except ValueError:
            raise InvalidDataset(
                f"{path}:{number}: expected 'x y' (two numbers), got {line.strip()!r}"
            ) from None
        if not (np.isfinite(x) and np.isfinite(y)) or x < 0 or y < 0:
            raise InvalidDataset(f"{path}:{number}: point ({x}, {y}) is not a pixel position")
        points.append((x, y))
    return np.asarray(points, np.float64).reshape(-1, 2)


def points_items(folder: Path) -> list[PointItem]:
    """The images of `folder` that have a NAME.xyc beside them; an .xyc without its image is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidDataset(f"not a folder: {folder}")
    images = {
        p.stem: p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix.lower() in POINT_IMAGE_SUFFIXES
    }
    items = []
    for xyc in sorted(folder.glob("*.xyc")):
        image = images.get(xyc.stem)
        if image is None:
            raise InvalidDataset(f"no image for {xyc} (expected {xyc.stem}.jpg or another image type)")
        items.append(PointItem(image, xyc))
    if not items:
        raise InvalidDataset(f"no point-annotated images (NAME.jpg + NAME.xyc) in {folder}")
    return items


def match_points(
    pred_instances: np.ndarray, pred_is_blast: np.ndarray, points: np.ndarray, max_distance_px: float
) -> ObjectCounts:
    """Match predicted blasts to annotated points one-to-one.

    pred_instances: HW int instance map (0 background); pred_is_blast: bool per instance id
    (pred_is_blast[i] for instance i; index 0 unused); points: (N, 2) x, y. A blast and a point may
    pair when the point lies inside the blast or within max_distance_px of its centroid. Among
    those pairs the most matches are taken (ties: inside first, then nearest centroids). Unmatched
    blasts are false positives, unmatched points false negatives; non-blast cells count for neither.
    Points have no outline, so matched_iou_sum is 0: read precision, recall and f1.
    """
    pred_instances = np.asarray(pred_instances)
    pred_is_blast = np.asarray(pred_is_blast, bool).reshape(-1)
    points = np.asarray(points, np.float64).reshape(-1, 2)
    if max_distance_px < 0:
        raise ValueError(f"max_distance_px must be >= 0, got {max_distance_px}")
    n_ids = int(pred_instances.max(initial=0)) + 1
    if pred_is_blast.size < n_ids:
        raise ValueError(f"pred_is_blast has {pred_is_blast.size} entries, instance ids go up to {n_ids - 1}")
    present = np.bincount(pred_instances.ravel().astype(np.intp), minlength=n_ids) > 0
    blast_ids = np.flatnonzero(present & pred_is_blast[:n_ids])
    blast_ids = blast_ids[blast_ids > 0]
    if blast_ids.size == 0 or len(points) == 0:
        return ObjectCounts(tp=0, fp=int(blast_ids.size), fn=len(points), matched_iou_sum=0.0)
    centroids = np.asarray(ndi.center_of_mass(np.ones(pred_instances.shape), pred_instances, blast_ids))
    centroids = centroids.reshape(-1, 2)[:, ::-1]  # (row, col) -> (x, y)
    distance = np.linalg.norm(centroids[:, None, :] - points[None, :, :], axis=2)  # blasts x points

    h, w = pred_instances.shape
    col, row = np.rint(points[:, 0]).astype(np.int64), np.rint(points[:, 1]).astype(np.int64)
    on_image = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    under = np.zeros(len(points), np.int64)
    under[on_image] = pred_instances[row[on_image], col[on_image]]
    inside = blast_ids[:, None] == under[None, :]

    allowed = inside | (distance <= max_distance_px)
    # Inside pairs cost 0, near ones their distance; a forbidden pair costs more than all allowed
    # pairs together, so the assignment first maximises the number of allowed pairs.
    cost = np.where(inside, 0.0, distance)
    forbidden = cost[allowed].sum() + 1.0
    rows, cols = linear_sum_assignment(np.where(allowed, cost, forbidden))
    tp = int(allowed[rows, cols].sum())
    return ObjectCounts(tp=tp, fp=int(blast_ids.size) - tp, fn=len(points) - tp, matched_iou_sum=0.0)


def evaluate_points(
    engine: Engine,
    info: ModelInfo,
    items: Sequence[PointItem],
    mpp: float | None,
    config: PipelineConfig = PipelineConfig(),
    *,
    max_distance_um: float = DEFAULT_MAX_DISTANCE_UM,
    tick: Callable[[int], None] | None = None,
) -> ObjectCounts:
    """Blast detection counts over point-annotated images, each run through the full pipeline.

    mpp: the images' microns per pixel (ALL-IDB1 files carry none); None reads it from the file's
    metadata or estimates it from red cells, as `blastq run` does.
    """
    total = ObjectCounts(0, 0, 0, 0.0)
    for item in items:
        slide = read_slide(item.image_path, mpp=mpp)
        result = process_slide(slide, engine, info, config)
        is_blast = np.zeros(int(result.maps.instances.max(initial=0)) + 1, bool)
        for cell in result.maps.cells:
            is_blast[cell.cell_id] = cell.label == LABEL_BLAST
        total += match_points(
            result.maps.instances, is_blast, read_points(item.points_path), max_distance_um / slide.mpp
        )
        if tick is not None:
            tick(1)
    return total
