"""Training and evaluation data: synthetic smears, the real segmentation_wbc crops, folders of pairs.

Every sample is brought to the model's scale and carries three targets with 255 = ignore:
classes (0 background, 1 white cell, 2 blast), nucleus (0/1) and marker (0/1, each cell's inner core).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

from blastq.core.errors import InvalidDataset
from blastq.core.preprocess import PreprocessConfig, preprocess, resample, resample_labels
from blastq.core.synth import generate_field, read_field_masks

IGNORE = 255

# segmentation_wbc has no scale in its files. blastq sets each dataset's scale so that its median
# neutrophil is ~13 um across, as in the synthetic generator (dataset1: 76.5 px, dataset2: 160 px), so
# real and synthetic cells of one kind have one size at the model's scale. See trainer/SPLIT.md.
SEGMENTATION_WBC_MPP = {"dataset1": 0.17, "dataset2": 0.08}


@dataclass(frozen=True)
class Sample:
    """One training image at the model's scale: preprocessed RGB and its targets."""

    image: np.ndarray  # HWC uint8, preprocessed
    classes: np.ndarray  # HW uint8 {0,1,2,255}
    nucleus: np.ndarray  # HW uint8 {0,1,255}
    marker: np.ndarray  # HW uint8 {0,1,255}
    source: str


@dataclass(frozen=True)
class WbcItem:
    """One segmentation_wbc crop on disk."""

    image_path: Path
    mask_path: Path
    dataset: str
    number: int

    @property
    def mpp(self) -> float:
        return SEGMENTATION_WBC_MPP[self.dataset]


def wbc_split(number: int) -> str:
    """The fixed split of segmentation_wbc (trainer/SPLIT.md): test = n % 5 == 0, val = n % 10 == 1."""
    if number % 5 == 0:
        return "test"
    if number % 10 == 1:
        return "val"
    return "train"


def segmentation_wbc_items(
    root: Path, split: str | None = None, datasets=("dataset1", "dataset2")
) -> list[WbcItem]:
    """The crops of segmentation_wbc under `root`, optionally one split only."""
    root = Path(root)
    items = []
    for ds in datasets:
        folder = root / ds
        if not folder.is_dir():
            raise InvalidDataset(f"not a segmentation_wbc folder (no {ds}/): {root}")
        for img in sorted(folder.glob("*.bmp")):
            if not re.fullmatch(r"\d+", img.stem):
                continue
            mask = img.with_suffix(".png")
            if mask.is_file() and (split is None or wbc_split(int(img.stem)) == split):
                items.append(WbcItem(img, mask, ds, int(img.stem)))
    if not items:
        raise InvalidDataset(f"no image/mask pairs found under {root} (split={split})")
    return items


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InvalidDataset(f"cannot read image: {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_wbc_mask(path: Path) -> np.ndarray:
    """The mask as 0 background / 1 cytoplasm / 2 nucleus (stray values snapped to the nearest level)."""
    raw = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if raw is None:
        raise InvalidDataset(f"cannot read mask: {path}")
    levels = np.array([0, 128, 255])
    return np.abs(raw[..., None].astype(int) - levels).argmin(axis=2).astype(np.uint8)


def marker_from_instances(instances: np.ndarray, core_fraction: float = 0.45) -> np.ndarray:
    """Each cell's inner core: pixels deeper than core_fraction of that cell's largest inner distance.

    Distances are to the nearest pixel that is not the same cell, so two touching cells get
    separate cores with a gap between them: exactly the seeds the watershed needs.
    """
    marker = np.zeros(instances.shape, np.uint8)
    for i, sl in enumerate(ndi.find_objects(instances), start=1):
        if sl is None:
            continue
        sl = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in sl)
        cell = instances[sl] == i
        dist = ndi.distance_transform_edt(np.pad(cell, 1))[1:-1, 1:-1]
        peak = dist.max()
        if peak > 0:
            marker[sl][cell & (dist >= max(1.0, core_fraction * peak))] = 1
    return marker


def wbc_sample(item: WbcItem, model_mpp: float, config: PreprocessConfig) -> Sample:
    """A segmentation_wbc crop at the model's scale. Red cells are background there, as in blastq."""
    rgb = read_rgb(item.image_path)
    mask = read_wbc_mask(item.mask_path)
    rgb = resample(rgb, item.mpp, model_mpp)
    mask = resample_labels(mask, item.mpp, model_mpp)
    if mask.shape != rgb.shape[:2]:
        mask = cv2.resize(mask, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
    cell = mask >= 1
    instances, _ = ndi.label(cell)
    return Sample(
        image=preprocess(rgb, model_mpp, config),
        classes=cell.astype(np.uint8),  # every cell here is a normal white cell: class 1 is a true label
        nucleus=(mask == 2).astype(np.uint8),
        marker=marker_from_instances(instances.astype(np.int32)),
        source=item.dataset,
    )


def synth_sample(seed: int, size_px: int, model_mpp: float, config: PreprocessConfig) -> Sample:
    """A synthetic field with varied blast fraction and density, generated at the model's scale."""
    rng = np.random.default_rng(seed)
    field = generate_field(
        seed,
        size_px,
        size_px,
        mpp=model_mpp,
        blast_fraction=float(rng.choice([0.0, 0.15, 0.35, 0.6, 1.0])),
        wbc_per_10k_um2=float(rng.uniform(5.0, 14.0)),
        rbc_coverage=float(rng.uniform(0.15, 0.55)),
        touching_fraction=float(rng.uniform(0.2, 0.6)),
    )
    return Sample(
        image=preprocess(field.image, model_mpp, config),
        classes=field.classes,
        nucleus=field.nuclei.astype(np.uint8),
        marker=marker_from_instances(field.instances),
        source="synthetic",
    )


def synth_folder_items(folder: Path) -> list[Path]:
    """Images written by `blastq synth` (each with its .mask.png beside it)."""
    images = sorted(
        p for p in Path(folder).glob("*.png") if not p.name.endswith((".mask.png", ".nuclei.png"))
    )
    images = [p for p in images if p.with_name(p.stem + ".mask.png").is_file()]
    if not images:
        raise InvalidDataset(f"no synthetic image/mask pairs (NAME.png + NAME.mask.png) in {folder}")
    return images


def load_synth_truth(image_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return read_field_masks(image_path)
