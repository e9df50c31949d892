"""From probability maps to white-cell instances (touching cells split) and per-cell measurements."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import regionprops
from skimage.segmentation import watershed

from blastq.core.cells.blastcall import BlastCaller, features_of
from blastq.core.common import timed
from blastq.core.segment import MARKER_CHANNEL, NUCLEUS_CHANNEL

LABEL_WHITE_CELL = "white_cell"
LABEL_BLAST = "blast"
# A cell is a blast when its mean blast share reaches this: a screening operating point, below the even
# odds of 0.5, chosen and measured on the model card (BLASTQ_BLAST_CELL_THRESHOLD). Blasts called below
# CONFIDENT_BLAST_SHARE are marked for review: the doubt is the reviewer's to settle.
DEFAULT_BLAST_CELL_THRESHOLD = 0.5
CONFIDENT_BLAST_SHARE = 0.5
# Smaller objects are platelets, debris or specks of stain; the smallest lymphocytes are ~7 um (38 um^2).
MIN_CELL_AREA_UM2 = 15.0
MIN_MARKER_AREA_UM2 = 2.0
# Every white cell has a nucleus; a red cell, a clump of them or a platelet clump outlined as a cell has
# none. Less nucleus than this share of the cell, and than this area, and it is not a white cell. The
# real segmentation_wbc crops' cells have at least 15% (the smallest share measured), synthetic ones 60%.
MIN_NUCLEUS_SHARE = 0.05
MIN_NUCLEUS_AREA_UM2 = 3.0


@dataclass(frozen=True)
class CellRecord:
    """One white cell; pixel coordinates are those of the input image, bbox x1/y1 exclusive."""

    cell_id: int
    label: str
    centroid_x: float
    centroid_y: float
    bbox_x0: int
    bbox_y0: int
    bbox_x1: int
    bbox_y1: int
    area_px: int
    area_um2: float
    perimeter_um: float
    circularity: float
    nucleus_area_px: int
    nucleus_area_um2: float
    nc_ratio: float
    mean_r: float
    mean_g: float
    mean_b: float
    blast_probability: float
    # The cell classifier's answer (blastq.core.cells.classify); empty/0 when no classifier ran.
    cell_type: str = ""
    cell_type_probability: float = 0.0
    # The classifier is unsure, or disagrees with the segmentation's blast call, or the cell could not be
    # measured or typed (then review_reason says why; the slide's other cells go on).
    review: bool = False
    review_reason: str = ""
    p_neutrophil: float = 0.0
    p_lymphocyte: float = 0.0
    p_monocyte: float = 0.0
    p_eosinophil: float = 0.0
    p_basophil: float = 0.0
    p_blast: float = 0.0


CELL_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(CellRecord))
_REASON_CHARS = 200  # a review reason is one line of a table, not a traceback


def failure_reason(stage: str, exc: Exception) -> str:
    """One line for `CellRecord.review_reason`: the stage that failed and the error, e.g. "features failed: ..."."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())  # OpenCV's messages span several lines
    if len(text) > _REASON_CHARS:
        text = text[: _REASON_CHARS - 3] + "..."
    return f"{stage} failed: {text}"


def joined_reasons(*reasons: str) -> str:
    """Review reasons of several stages as one field ("; " between them, empty ones left out)."""
    return "; ".join(r for r in reasons if r)


@dataclass(frozen=True)
class CellMaps:
    """Per-pixel results at input resolution."""

    classes: np.ndarray  # HW uint8: 0 background, 1 white cell, 2 blast (each cell has one label)
    nuclei: np.ndarray  # HW bool
    instances: np.ndarray  # HW int32, 0 background, ids == CellRecord.cell_id
    cells: tuple[CellRecord, ...]


def split_instances(
    foreground: np.ndarray, marker_prob: np.ndarray, mpp: float, *, marker_threshold: float = 0.5
) -> np.ndarray:
    """Instance ids (HW int32) for a foreground mask, touching cells split at the predicted markers.

    Each predicted marker (a cell's inner core) seeds a watershed on the distance to the background,
    so two touching cells part along the neck between them. Foreground blobs with no marker keep one id.
    Ids are 1..n in seed order: marker-seeded cells by their marker's first pixel in raster order, then
    unseeded blobs by theirs.
    """
    px_per_um2 = 1.0 / (mpp * mpp)
    blobs, n_blobs = ndi.label(foreground)
    if n_blobs == 0:
        return np.zeros(foreground.shape, np.int32)
    markers = (marker_prob > marker_threshold) & foreground
    seeds, n_seeds = ndi.label(markers)
    # Counted over the marker pixels only: a bincount over the whole image costs more than the rest.
    seed_kept = np.bincount(seeds[markers], minlength=n_seeds + 1) >= MIN_MARKER_AREA_UM2 * px_per_um2
    seed_kept[0] = False
    unseeded_offset = int(np.flatnonzero(seed_kept).max()) if seed_kept.any() else 0
    # Blob by blob, on the blob's bounding box (+1 px where the image goes on): a blob with one marker is
    # that marker's cell, one with none seeds itself (numbered after every marker), and only a blob with
    # several markers needs the watershed, on the distance to the background within its box. The
    # distances are those of the whole image: a blob pixel's nearest background pixel lies within a pixel
    # of the blob's box (blobs are 4-connected, so the first non-blob pixel on a monotone path to any
    # other pixel is background). A blob's split depends on that blob alone, so two whole-slide windows
    # that both hold it split it alike.
    labels = np.zeros(foreground.shape, np.int32)
    height, width = foreground.shape
    for k, (ys, xs) in enumerate(ndi.find_objects(blobs), start=1):
        box = (
            slice(max(ys.start - 1, 0), min(ys.stop + 1, height)),
            slice(max(xs.start - 1, 0), min(xs.stop + 1, width)),
        )
        blob = blobs[box] == k
        blob_seeds = np.where(blob & seed_kept[seeds[box]], seeds[box], 0)
        ids = np.unique(blob_seeds[blob_seeds > 0])
        if len(ids) == 0:  # the marker head missed it: the blob seeds itself, after every marker
            labels[box][blob] = k + unseeded_offset
        elif len(ids) == 1:
            labels[box][blob] = ids[0]
        else:
            split = watershed(-ndi.distance_transform_edt(blob), blob_seeds, mask=blob)
            labels[box][blob] = split[blob]
    # Small objects dropped and the rest numbered 1..n in label order, counted over the foreground only.
    at_cells = labels[foreground]
    sizes = np.bincount(at_cells)
    kept = sizes >= MIN_CELL_AREA_UM2 * px_per_um2
    kept[0] = False
    lut = np.zeros(len(sizes), np.int32)
    lut[kept] = np.arange(1, int(kept.sum()) + 1, dtype=np.int32)
    out = np.zeros(foreground.shape, np.int32)
    out[foreground] = lut[at_cells]
    return out


def drop_cells_without_nucleus(instances: np.ndarray, nuclei: np.ndarray, mpp: float) -> np.ndarray:
    """The instance map without the objects that have (almost) no nucleus, ids renumbered 1..n in order."""
    cell_px = np.bincount(instances.ravel(), minlength=1)
    nucleus_px = np.bincount(instances[nuclei], minlength=cell_px.size)
    kept = (nucleus_px >= MIN_NUCLEUS_SHARE * cell_px) & (nucleus_px >= MIN_NUCLEUS_AREA_UM2 / (mpp * mpp))
    kept[0] = False
    if kept[1:].all():
        return instances
    lut = np.zeros(cell_px.size, np.int32)
    lut[kept] = np.arange(1, int(kept.sum()) + 1, dtype=np.int32)
    return lut[instances]


@timed("cells")
def extract_cells(
    probs: np.ndarray,
    rgb: np.ndarray,
    mpp: float,
    *,
    blast_threshold: float = DEFAULT_BLAST_CELL_THRESHOLD,
    caller: BlastCaller | None = None,
) -> CellMaps:
    """Cells from a (C, H, W) probability map (unet channel order) aligned with an HWC RGB image.

    A cell is a blast when its mean blast share reaches `blast_threshold`, or, with a `caller`, when the
    caller's P(blast) from the share and the cell's measurements reaches the caller's threshold."""
    p_wbc, p_blast = probs[1], probs[2]
    foreground = (p_wbc + p_blast) > probs[0]
    instances = split_instances(foreground, probs[MARKER_CHANNEL], mpp)
    nucleus_prob = probs[NUCLEUS_CHANNEL] > 0.5
    instances = drop_cells_without_nucleus(instances, nucleus_prob, mpp)
    nuclei = nucleus_prob & (instances > 0)
    n = int(instances.max())
    if n == 0:
        return CellMaps(np.zeros(instances.shape, np.uint8), nuclei, instances, ())
    # Per-cell means over the cells' pixels only, by bincount: one pass each, where ndi.mean over the
    # whole image walked every background pixel five times (benchmarks/bench_efficiency.py).
    where = np.flatnonzero(instances)
    ids = instances.ravel()[where]

    def cell_sum(values_at_cells: np.ndarray) -> np.ndarray:
        return np.bincount(ids, weights=values_at_cells, minlength=n + 1)[1:]

    cell_px = np.bincount(ids, minlength=n + 1)[1:].astype(np.float64)  # > 0: ids are 1..n, relabelled

    def cell_mean(values_at_cells: np.ndarray) -> np.ndarray:
        return cell_sum(values_at_cells) / cell_px

    # A cell is labelled from all its pixels: the mean share of blast among white-cell probability.
    wbc_at, blast_at = p_wbc.ravel()[where], p_blast.ravel()[where]
    blast_prob = cell_mean(blast_at / np.maximum(wbc_at + blast_at, 1e-6))
    nucleus_px = cell_sum(nuclei.ravel()[where]).astype(int)
    means = [cell_mean(rgb[..., c].ravel()[where]) for c in range(3)]
    um2 = mpp * mpp
    outlines, reasons = [], []
    for region in regionprops(instances):
        try:
            outlines.append(_outline(region))
            reasons.append("")
        except MemoryError:
            raise
        except Exception as exc:  # one odd outline must not cost the slide its other cells
            reasons.append(failure_reason("measurement", exc))
            outlines.append(_outline_from_pixels(instances, int(region.label)))
    perimeters = np.array([o[2] for o in outlines], np.float64)
    circularity = np.where(
        perimeters > 0, np.minimum(1.0, 4 * np.pi * cell_px / np.maximum(perimeters, 1e-9) ** 2), 0.0
    )
    if caller is None:
        score, is_blast, what = blast_prob, blast_prob >= blast_threshold, "blast share"
    else:
        score = caller.probability(
            features_of(blast_prob, cell_px * um2, nucleus_px / cell_px, circularity, nucleus_px * um2)
        )
        is_blast, what = score >= caller.threshold, "blast call probability"
    label_of = np.concatenate([[0], np.where(is_blast, 2, 1)]).astype(np.uint8)
    classes = label_of[instances]
    cells = []
    for i, ((cy, cx), (y0, x0, y1, x1), perimeter) in enumerate(outlines):
        cell_id, reason = i + 1, reasons[i]
        area = int(cell_px[i])
        if is_blast[i] and score[i] < CONFIDENT_BLAST_SHARE:
            reason = joined_reasons(reason, f"blast at the screening threshold ({what} {score[i]:.2f})")
        cells.append(
            CellRecord(
                cell_id=cell_id,
                label=LABEL_BLAST if is_blast[i] else LABEL_WHITE_CELL,
                centroid_x=round(float(cx), 2),
                centroid_y=round(float(cy), 2),
                bbox_x0=int(x0),
                bbox_y0=int(y0),
                bbox_x1=int(x1),
                bbox_y1=int(y1),
                area_px=area,
                area_um2=round(area * um2, 3),
                perimeter_um=round(perimeter * mpp, 3),
                circularity=round(float(circularity[i]), 4),
                nucleus_area_px=int(nucleus_px[i]),
                nucleus_area_um2=round(nucleus_px[i] * um2, 3),
                nc_ratio=round(nucleus_px[i] / area, 4),
                mean_r=round(float(means[0][i]), 2),
                mean_g=round(float(means[1][i]), 2),
                mean_b=round(float(means[2][i]), 2),
                blast_probability=round(float(blast_prob[i]), 4),
                review=bool(reason),
                review_reason=reason,
            )
        )
    return CellMaps(classes, nuclei, instances, tuple(cells))


def _outline(region) -> tuple[tuple[float, float], tuple[int, int, int, int], float]:
    """((cy, cx), (y0, x0, y1, x1), perimeter_px) of one regionprops region."""
    return region.centroid, region.bbox, float(region.perimeter)


def _outline_from_pixels(
    instances: np.ndarray, cell_id: int
) -> tuple[tuple[float, float], tuple[int, int, int, int], float]:
    """_outline's answer from the cell's pixels alone, perimeter 0 (unknown): the fallback when it fails."""
    ys, xs = np.nonzero(instances == cell_id)
    bbox = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
    return (float(ys.mean()), float(xs.mean())), bbox, 0.0
