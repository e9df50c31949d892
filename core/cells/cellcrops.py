"""One white cell cut out of a (preprocessed) image: the unit every cell classifier takes.

Crops are normalised to one scale and size, centred on the cell, with everything outside the cell
(dilated by a micron) set to white: the classifiers see the cell itself, not its neighbours, so crops
from crowded synthetic smears and from single-cell real crops look alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi

from blastq.core.image import resample, resample_labels

# The labels of the differential. The first five are those of segmentation_wbc's CSVs (1..5).
CELL_TYPES: tuple[str, ...] = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil", "blast")
CROP_MPP = 0.2  # microns per pixel of a normalised crop (the U-Net's scale)
CROP_PX = 128  # 25.6 um: the largest monocytes and blasts (~20 um) fit with a margin
CONTEXT_UM = 1.0  # pixels this close to the cell are kept (its edge), the rest is blanked
BLANK = 255  # blanked pixels: white, as background after flat-field correction


@dataclass(frozen=True, eq=False)
class CellCrop:
    """One cell: `rgb` HWC uint8 with `cell` and `nucleus` HW bool masks of the same size, at `mpp`."""

    rgb: np.ndarray
    cell: np.ndarray
    nucleus: np.ndarray  # inside `cell`
    mpp: float


def crops_from_instances(
    rgb: np.ndarray,
    instances: np.ndarray,
    nuclei: np.ndarray,
    mpp: float,
    ids: Iterable[int] | None = None,
    margin_um: float = 2.0,
) -> list[CellCrop]:
    """A crop (not yet normalised) per instance id, in `ids` order (default: 1..max).

    rgb HWC uint8, instances HW int (0 = background), nuclei HW bool, all the same size at `mpp`.
    An id with no pixels gives a crop with an empty mask (the classifiers treat it as unknown).
    """
    if rgb.shape[:2] != instances.shape or nuclei.shape != instances.shape:
        raise ValueError(f"rgb {rgb.shape[:2]}, instances {instances.shape} and nuclei {nuclei.shape} differ")
    boxes = ndi.find_objects(instances)
    ids = range(1, len(boxes) + 1) if ids is None else ids
    margin = int(np.ceil(margin_um / mpp))
    h, w = instances.shape
    crops = []
    for i in ids:
        box = boxes[i - 1] if 0 < i <= len(boxes) else None
        if box is None:
            empty = np.zeros((1, 1), bool)
            crops.append(CellCrop(np.full((1, 1, 3), BLANK, np.uint8), empty, empty, mpp))
            continue
        y0, y1 = max(0, box[0].start - margin), min(h, box[0].stop + margin)
        x0, x1 = max(0, box[1].start - margin), min(w, box[1].stop + margin)
        cell = instances[y0:y1, x0:x1] == i
        crops.append(CellCrop(rgb[y0:y1, x0:x1].copy(), cell, nuclei[y0:y1, x0:x1] & cell, mpp))
    return crops


def normalise_crop(
    crop: CellCrop, mpp: float = CROP_MPP, size_px: int = CROP_PX, blank: bool = True
) -> CellCrop:
    """The crop at `mpp`, `size_px` square, centred on the cell's centroid, outside the cell blanked
    (with `blank=False` its neighbours stay: what a person reviewing the cell wants to see).

    A cell larger than the window is cut at the window's edge (its measurements then come out smaller:
    such cells are rare at 25.6 um and the classifiers still see most of them).
    """
    blanked, shown = normalised_views(crop, mpp, size_px)
    return blanked if blank else shown


def normalised_views(
    crop: CellCrop, mpp: float = CROP_MPP, size_px: int = CROP_PX
) -> tuple[CellCrop, CellCrop]:
    """(blanked, with its neighbours): both views of `normalise_crop` from one resampling."""
    rgb = resample(crop.rgb, crop.mpp, mpp)
    cell = resample_labels(crop.cell, crop.mpp, mpp)
    nucleus = resample_labels(crop.nucleus, crop.mpp, mpp) & cell
    if cell.shape != rgb.shape[:2]:  # rounding can differ by a pixel between the two resizes
        cell = cv2.resize(cell.astype(np.uint8), rgb.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
        nucleus = cv2.resize(nucleus.astype(np.uint8), rgb.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
    out_blanked = np.full((size_px, size_px, 3), BLANK, np.uint8)
    out_rgb = np.full((size_px, size_px, 3), BLANK, np.uint8)
    out_cell = np.zeros((size_px, size_px), bool)
    out_nucleus = np.zeros((size_px, size_px), bool)
    if cell.any():
        cy, cx = (int(round(v)) for v in ndi.center_of_mass(cell))
        near = ndi.binary_dilation(cell, iterations=max(1, int(round(CONTEXT_UM / mpp))))
        # Paste the window [cy - size/2, cy + size/2) of the source into the output.
        top, left = cy - size_px // 2, cx - size_px // 2
        sy0, sx0 = max(0, top), max(0, left)
        sy1, sx1 = min(cell.shape[0], top + size_px), min(cell.shape[1], left + size_px)
        dy, dx = sy0 - top, sx0 - left
        region = (slice(dy, dy + sy1 - sy0), slice(dx, dx + sx1 - sx0))
        source = (slice(sy0, sy1), slice(sx0, sx1))
        out_rgb[region] = rgb[source]
        out_blanked[region] = np.where(near[source][..., None], rgb[source], np.uint8(BLANK))
        out_cell[region] = cell[source]
        out_nucleus[region] = nucleus[source]
    return (
        CellCrop(out_blanked, out_cell, out_nucleus, mpp),
        CellCrop(out_rgb, out_cell, out_nucleus, mpp),
    )


def blank_outside(crop: CellCrop) -> CellCrop:
    """A normalised crop kept with its neighbours (`normalise_crop(blank=False)`) as the classifiers see
    it: everything farther than CONTEXT_UM from the cell white. The same pixels as `normalise_crop`, but
    for a cell cut at the window's edge, whose edge margin inside the window is all that is known."""
    near = ndi.binary_dilation(crop.cell, iterations=max(1, int(round(CONTEXT_UM / crop.mpp))))
    return CellCrop(np.where(near[..., None], crop.rgb, np.uint8(BLANK)), crop.cell, crop.nucleus, crop.mpp)


def crops_to_array(crops: Iterable[CellCrop]) -> np.ndarray:
    """Normalised crops as NCHW float32: RGB scaled to [0, 1] then the cell mask (4 channels)."""
    arrays = [
        np.concatenate([c.rgb.astype(np.float32) / 255.0, c.cell[..., None].astype(np.float32)], axis=2)
        for c in crops
    ]
    if not arrays:
        return np.zeros((0, 4, CROP_PX, CROP_PX), np.float32)
    return np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))
