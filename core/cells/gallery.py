"""The cell gallery: every cell of an image as a normalised crop, in one sheet (a PNG a result keeps).

The review station shows a cell by cutting its square out of the sheet; learning from reviews reads the
same square back, with its cell and nucleus masks, as the crop the classifiers take. Crops keep their
neighbours (a person reviewing a cell wants its context); `blank_outside` gives the classifiers' view.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from blastq.core.cells.cellcrops import (
    BLANK,
    CROP_MPP,
    CROP_PX,
    CellCrop,
    crops_from_instances,
    normalise_crop,
)
from blastq.core.image import resample_to_shape

GALLERY_COLUMNS = 16
# Beyond this many cells an image's gallery stops (their rows, figures and review still count): a
# sheet of 2048 crops is 2048 x 4096 px, about 100 MB while it is drawn.
MAX_GALLERY_CELLS = 2048
# A whole slide's gallery: its first cells in chunk order (a manual differential counts 100 to 500 along
# its track), so its memory stays bounded whatever the slide's size.
WSI_GALLERY_CELLS = 1024
OUTSIDE, CELL, NUCLEUS = 0, 1, 2  # the values of the labels sheet


@dataclass(frozen=True, eq=False)
class CellGallery:
    """Crops of `cell_ids` in order, GALLERY_COLUMNS a row, `px` square each, at `mpp`.

    rgb: HWC uint8; labels: HW uint8 (OUTSIDE, CELL, NUCLEUS). A cell that could not be cropped has a
    white square and no cell pixels."""

    rgb: np.ndarray
    labels: np.ndarray
    cell_ids: tuple[int, ...]
    px: int = CROP_PX
    mpp: float = CROP_MPP

    def crop(self, cell_id: int) -> CellCrop | None:
        """Cell `cell_id`'s crop with its neighbours; None when the gallery does not hold it."""
        if cell_id not in self.cell_ids:
            return None
        return gallery_crop(self.rgb, self.labels, self.cell_ids.index(cell_id), self.px, self.mpp)

    def index(self) -> dict:
        """What a reader of the sheet needs besides its pixels (gallery.json)."""
        return {
            "columns": GALLERY_COLUMNS,
            "px": self.px,
            "mpp": self.mpp,
            "cell_ids": list(self.cell_ids),
        }


def sheet_shape(n: int, px: int = CROP_PX) -> tuple[int, int]:
    rows = max(1, -(-n // GALLERY_COLUMNS))
    return rows * px, GALLERY_COLUMNS * px


def square(index: int, px: int = CROP_PX) -> tuple[slice, slice]:
    """Where crop `index` lies in a sheet."""
    row, column = divmod(index, GALLERY_COLUMNS)
    return slice(row * px, (row + 1) * px), slice(column * px, (column + 1) * px)


class GalleryBuilder:
    """A gallery filled a few cells at a time (a whole slide's chunks), up to `limit` cells; the crops are
    kept apart until `build` lays out the sheet."""

    def __init__(self, limit: int = MAX_GALLERY_CELLS):
        self.limit = limit
        self.ids: list[int] = []
        self.squares: list[tuple[np.ndarray, np.ndarray]] = []

    @property
    def full(self) -> bool:
        return len(self.ids) >= self.limit

    def add(
        self,
        instances: np.ndarray,
        nuclei: np.ndarray,
        cell_ids: Sequence[int],
        work: np.ndarray,
        work_mpp: float,
        as_ids: Sequence[int] | None = None,
    ) -> None:
        """Crops of `cell_ids` (ids in `instances`) from `work`, the preprocessed image the classifiers
        crop from, at `work_mpp`; recorded under `as_ids` (default the same ids). Beyond the limit, none."""
        room = self.limit - len(self.ids)
        if room <= 0:
            return
        ids = list(cell_ids)[:room]
        named = list(as_ids if as_ids is not None else cell_ids)[:room]
        h, w = work.shape[:2]
        instances = resample_to_shape(instances, h, w, labels=True)
        nuclei = resample_to_shape(nuclei, h, w, labels=True)
        for name, raw in zip(
            named, crops_from_instances(work, instances, nuclei, work_mpp, ids), strict=True
        ):
            try:
                crop = normalise_crop(raw, blank=False)
            except MemoryError:
                raise
            except Exception:  # one cell that cannot be cropped keeps a white square; the others are drawn
                crop = None
            self.add_crop(name, crop)

    def add_crop(self, cell_id: int, crop: CellCrop | None) -> None:
        """One cell's normalised crop with its neighbours (None: a white square); none beyond the limit."""
        if self.full:
            return
        rgb = np.full((CROP_PX, CROP_PX, 3), BLANK, np.uint8)
        labels = np.zeros((CROP_PX, CROP_PX), np.uint8)
        if crop is not None:
            rgb = crop.rgb
            labels = np.where(crop.nucleus, NUCLEUS, np.where(crop.cell, CELL, OUTSIDE)).astype(np.uint8)
        self.ids.append(int(cell_id))
        self.squares.append((rgb, labels))

    def build(self) -> CellGallery:
        rgb = np.full((*sheet_shape(len(self.ids)), 3), BLANK, np.uint8)
        labels = np.zeros(sheet_shape(len(self.ids)), np.uint8)
        for index, (square_rgb, square_labels) in enumerate(self.squares):
            where = square(index)
            rgb[where] = square_rgb
            labels[where] = square_labels
        return CellGallery(rgb, labels, tuple(self.ids))


def build_gallery(
    instances: np.ndarray, nuclei: np.ndarray, cell_ids: Sequence[int], work: np.ndarray, work_mpp: float
) -> CellGallery:
    """The gallery of `cell_ids` (at most MAX_GALLERY_CELLS) from `work`, the preprocessed image the
    classifiers crop from, at `work_mpp`; `instances` and `nuclei` at any size (resampled to work's)."""
    builder = GalleryBuilder()
    builder.add(instances, nuclei, cell_ids, work, work_mpp)
    return builder.build()


def gallery_crop(rgb: np.ndarray, labels: np.ndarray, index: int, px: int = CROP_PX, mpp: float = CROP_MPP):
    """Crop `index` of a sheet as a CellCrop (with its neighbours: `blank_outside` for the classifiers)."""
    rows, columns = labels.shape[0] // px, labels.shape[1] // px
    if not 0 <= index < rows * columns:
        raise IndexError(f"crop {index} is outside a gallery of {rows * columns}")
    where = square(index, px)
    part = labels[where]
    return CellCrop(rgb[where].copy(), part >= CELL, part == NUCLEUS, mpp)
