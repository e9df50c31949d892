"""Training and evaluation data: synthetic smears, the real segmentation_wbc crops, folders of pairs.

Every sample is brought to the model's scale and carries three targets with 255 = ignore:
classes (0 background, 1 white cell, 2 blast), nucleus (0/1) and marker (0/1, each cell's inner core),
plus, for datasets that mark cells without telling blasts apart, a foreground target (0/1).

Partial labels: a dataset declares which targets it supports and contributes only those losses.
A target it does not support is 255 wherever the dataset cannot know it (inside its cells; background
is still known to hold no cell, nucleus or marker). A cell whose kind is unknown ("white cell or
blast") gets classes 255 and foreground 1, so it teaches "a cell is here", never "not a blast"
(`losses.segmentation_loss`). Synthetic fields and segmentation_wbc support every target: their
class labels are true labels (segmentation_wbc's cells are normal white cells, class 1).
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi

from blastq.core.common import BlastqError, InvalidDataset, file_sha256
from blastq.core.image import (
    TRUTH_SUFFIXES,
    PreprocessConfig,
    image_size,
    preprocess,
    resample,
    resample_labels,
)
from blastq.core.segment import CLASS_NAMES
from blastq.core.synth import STAIN_FAMILIES, TRUTH_FOLDER, find_truth, generate_field, read_field_masks

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
    # HW uint8 {0,1,255}: is there a cell (white cell or blast)? Read only where classes is 255; None
    # for datasets whose classes are known wherever anything is (synthetic, segmentation_wbc).
    foreground: np.ndarray | None = None


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


WBC_DATASETS = ("dataset1", "dataset2")  # segmentation_wbc's two sources (labs, cameras, stains)


def segmentation_wbc_items(root: Path, split: str | None = None, datasets=WBC_DATASETS) -> list[WbcItem]:
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


# The magnifications wide training fields are rendered at (um/px): 40x dry to 100x oil on common cameras.
WIDE_MPP_RANGE = (0.08, 0.3)


def synth_sample(
    seed: int,
    size_px: int,
    model_mpp: float,
    config: PreprocessConfig,
    variety: str = "classic",
    *,
    families: tuple[str, ...] = STAIN_FAMILIES,
    mpp_range: tuple[float, float] = WIDE_MPP_RANGE,
) -> Sample:
    """A synthetic field with varied blast fraction and density, at the model's scale.

    "classic": generated at the model's scale. "wide" (domain randomisation): generated at a
    magnification from 40x dry to 100x oil (0.08-0.3 um/px) and resampled to the model's scale as a
    real photo is, with red cells from sparse to crowded and overlapping, and the wide generator's cell
    looks (blasts across their range beside their look-alikes, colours mixed between mononuclear cells),
    so that what the model learns is morphology, not the generator's style. "mixed": either, by field.
    `families` and `mpp_range`: the stain families and magnifications wide fields are drawn from."""
    rng = np.random.default_rng(seed)
    kwargs = {
        "blast_fraction": float(rng.choice([0.0, 0.15, 0.35, 0.6, 1.0])),
        "wbc_per_10k_um2": float(rng.uniform(5.0, 14.0)),
        "rbc_coverage": float(rng.uniform(0.15, 0.55)),
        "touching_fraction": float(rng.uniform(0.2, 0.6)),
    }
    if variety == "mixed":  # half and half, field by field
        variety = "wide" if rng.random() < 0.5 else "classic"
    if variety == "classic":
        field = generate_field(seed, size_px, size_px, mpp=model_mpp, **kwargs)
        image, classes, nuclei, instances = field.image, field.classes, field.nuclei, field.instances
    else:
        render_mpp = float(np.exp(rng.uniform(np.log(mpp_range[0]), np.log(mpp_range[1]))))
        render_px = max(16, round(size_px * model_mpp / render_mpp))
        kwargs["rbc_coverage"] = float(rng.uniform(0.05, 1.0))
        field = generate_field(
            seed,
            render_px,
            render_px,
            mpp=render_mpp,
            rbc_overlap=float(rng.uniform(0.0, 0.9)),
            variety=variety,
            # All families: the generator draws one (from its own stream); else one of those given.
            stain_family=None if set(families) == set(STAIN_FAMILIES) else str(rng.choice(families)),
            **kwargs,
        )
        image = resample(field.image, render_mpp, model_mpp)
        classes = resample_labels(field.classes, render_mpp, model_mpp)
        nuclei = resample_labels(field.nuclei.astype(np.uint8), render_mpp, model_mpp).astype(bool)
        instances = resample_labels(field.instances, render_mpp, model_mpp)
    return Sample(
        image=preprocess(image, model_mpp, config),
        classes=classes,
        nucleus=nuclei.astype(np.uint8),
        marker=marker_from_instances(instances.astype(np.int32)),
        source="synthetic",
    )


def synth_folder_items(folder: Path) -> list[Path]:
    """Images written by `blastq synth`: NAME.png with its truth in truth/ (or beside it, older layout)."""
    images = sorted(p for p in Path(folder).glob("*.png") if not p.name.endswith(TRUTH_SUFFIXES))
    images = [p for p in images if find_truth(p) is not None]
    if not images:
        raise InvalidDataset(
            f"no synthetic image/mask pairs (NAME.png + {TRUTH_FOLDER}/NAME.mask.png) in {folder}"
        )
    return images


def load_synth_truth(image_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return read_field_masks(image_path)


# --- folders of image/mask pairs with a label map ----------------------------------------------------

LABELMAP_NAMES = ("labelmap.json", "labelmap.toml")
PAIR_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Targets a pairs folder may declare in "labels". classes is always there (the mask says where cells
# are); marker only for masks whose cells never touch, since cells are told apart by connectivity.
PAIR_TARGETS = ("classes", "nucleus", "marker")
_LABELMAP_KEYS = {"mask_suffix", "classes", "nucleus", "ignore", "mpp", "labels", "blast_unknown"}
_CLASS_INDEX = {name: i for i, name in enumerate(CLASS_NAMES)}


@dataclass(frozen=True)
class LabelMap:
    """What each mask value of a pairs folder means, read from its labelmap.json / labelmap.toml."""

    path: Path
    mpp: float
    classes: tuple[tuple[int, int], ...]  # (mask value, class index in CLASS_NAMES)
    nucleus: tuple[tuple[int, int], ...] = ()  # (mask value, class index of the cell it is the nucleus of)
    ignore: frozenset[int] = frozenset()
    labels: frozenset[str] = frozenset({"classes"})
    blast_unknown: bool = False  # white_cell means "white cell or blast": no "not blast" is taught
    mask_suffix: str = "_mask.png"

    @property
    def values(self) -> frozenset[int]:
        """Every mask value the map explains."""
        return frozenset(v for v, _ in self.classes + self.nucleus) | self.ignore

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)


@dataclass(frozen=True)
class PairItem:
    """One image/mask pair of a folder with a label map."""

    image_path: Path
    mask_path: Path
    labelmap: LabelMap

    @property
    def name(self) -> str:
        """The image's file name: the pair's id within its folder, and what its split hashes."""
        return self.image_path.name

    @property
    def source(self) -> str:
        return f"pairs:{self.image_path.parent.name}"


def name_split(name: str) -> str:
    """The fixed split of a pairs folder by a stable hash of the file name (trainer/SPLIT.md)."""
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    if h % 5 == 0:
        return "test"
    if h % 10 == 1:
        return "val"
    return "train"


def read_labelmap(folder: Path) -> LabelMap:
    """The label map of a pairs folder, checked: every name known, no value with two meanings."""
    folder = Path(folder)
    found = [folder / n for n in LABELMAP_NAMES if (folder / n).is_file()]
    if not found:
        raise InvalidDataset(f"no {' or '.join(LABELMAP_NAMES)} in {folder}")
    if len(found) > 1:
        raise InvalidDataset(f"both {found[0].name} and {found[1].name} in {folder}: keep one")
    path = found[0]
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, TOMLDecodeError
        raise InvalidDataset(f"not a readable label map ({exc})", path=path) from exc
    if not isinstance(raw, dict):
        raise InvalidDataset("a label map is an object with a 'classes' table", path=path)
    unknown = sorted(set(raw) - _LABELMAP_KEYS)
    if unknown:
        raise InvalidDataset(f"unknown key(s) {unknown}; known: {sorted(_LABELMAP_KEYS)}", path=path)

    def value(key: Any, what: str) -> int:
        # JSON object keys are strings ("128"), list entries numbers; 1.5 or "1e2" is a mistake.
        if isinstance(key, int) and not isinstance(key, bool):
            v = key
        elif isinstance(key, str) and re.fullmatch(r"\s*[0-9]+\s*", key):
            v = int(key)
        else:
            v = -1
        if not 0 <= v <= 65535:
            raise InvalidDataset(f"{what} {key!r} is not a mask value (an integer 0..65535)", path=path)
        return v

    def class_index(name: Any, where: str, allowed=CLASS_NAMES) -> int:
        if name not in allowed:
            raise InvalidDataset(f"unknown class {name!r} in {where}; known: {', '.join(allowed)}", path=path)
        return _CLASS_INDEX[name]

    classes_raw = raw.get("classes")
    if not isinstance(classes_raw, dict) or not classes_raw:
        raise InvalidDataset(
            '\'classes\' must map mask values to class names, e.g. {"0": "background"}', path=path
        )
    classes = tuple(
        sorted((value(k, "class key"), class_index(n, "classes")) for k, n in classes_raw.items())
    )
    nucleus_raw = raw.get("nucleus", [])
    cells = CLASS_NAMES[1:]
    if isinstance(nucleus_raw, list):
        nucleus = tuple(sorted((value(v, "nucleus value"), _CLASS_INDEX["white_cell"]) for v in nucleus_raw))
    elif isinstance(nucleus_raw, dict):
        nucleus = tuple(
            sorted(
                (value(k, "nucleus key"), class_index(n, "nucleus", cells)) for k, n in nucleus_raw.items()
            )
        )
    else:
        raise InvalidDataset(f"'nucleus' must be a list of mask values or map values to {cells}", path=path)
    ignore_raw = raw.get("ignore", [])
    if not isinstance(ignore_raw, list):
        raise InvalidDataset("'ignore' must be a list of mask values", path=path)
    ignore = [value(v, "ignore value") for v in ignore_raw]
    seen: dict[int, str] = {}
    for what, vals in (
        ("classes", [v for v, _ in classes]),
        ("nucleus", [v for v, _ in nucleus]),
        ("ignore", ignore),
    ):
        for v in vals:
            if v in seen:
                raise InvalidDataset(f"mask value {v} is listed twice ({seen[v]} and {what})", path=path)
            seen[v] = what

    mpp = raw.get("mpp")
    if isinstance(mpp, bool) or not isinstance(mpp, int | float) or not 0.01 <= mpp <= 10.0:
        raise InvalidDataset(
            f"'mpp' (microns per pixel of the images, 0.01..10) is required, got {mpp!r}", path=path
        )
    labels_raw = raw.get("labels", ["classes", "nucleus"] if nucleus else ["classes"])
    if not isinstance(labels_raw, list) or not all(isinstance(x, str) for x in labels_raw):
        raise InvalidDataset(f"'labels' must be a list of target names from {list(PAIR_TARGETS)}", path=path)
    bad = sorted(set(labels_raw) - set(PAIR_TARGETS))
    if bad:
        raise InvalidDataset(f"unknown target(s) {bad} in 'labels'; known: {list(PAIR_TARGETS)}", path=path)
    if "classes" not in labels_raw:
        raise InvalidDataset("'labels' must include 'classes' (the masks say where cells are)", path=path)
    if "nucleus" in labels_raw and not nucleus:
        raise InvalidDataset("'labels' includes 'nucleus' but no mask value is listed as nucleus", path=path)
    blast_unknown = raw.get("blast_unknown", False)
    if not isinstance(blast_unknown, bool):
        raise InvalidDataset(f"'blast_unknown' must be true or false, got {blast_unknown!r}", path=path)
    suffix = raw.get("mask_suffix", "_mask.png")
    if not isinstance(suffix, str) or not suffix.lower().endswith(PAIR_IMAGE_SUFFIXES):
        raise InvalidDataset(f"'mask_suffix' must end with an image extension, got {suffix!r}", path=path)
    return LabelMap(
        path=path,
        mpp=float(mpp),
        classes=classes,
        nucleus=nucleus,
        ignore=frozenset(ignore),
        labels=frozenset(labels_raw),
        blast_unknown=blast_unknown,
        mask_suffix=suffix,
    )


def read_pair_mask(path: Path, labelmap: LabelMap) -> np.ndarray:
    """A pairs mask as HW integers, every value checked against the label map."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.dtype not in (np.uint8, np.uint16):
        raise InvalidDataset(f"cannot read mask (8- or 16-bit image expected): {path}")
    if raw.ndim == 3:
        # A grey mask saved as RGB is fine; real colours would need a colour map, which this is not.
        if not (raw[..., :3] == raw[..., :1]).all():
            raise InvalidDataset(f"mask is a colour image; label maps need one value per pixel: {path}")
        raw = raw[..., 0]
    stray = np.setdiff1d(np.unique(raw), np.fromiter(labelmap.values, np.int64, len(labelmap.values)))
    if stray.size:
        shown = ", ".join(str(int(v)) for v in stray[:5]) + (" ..." if stray.size > 5 else "")
        raise InvalidDataset(
            f"mask value(s) {shown} in {path} not in {labelmap.path.name} (classes, nucleus or ignore)"
        )
    return raw


def pairs_items(folder: Path, split: str | None = None) -> list[PairItem]:
    """The checked image/mask pairs of a folder with a label map, optionally one split only."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidDataset(f"not a folder: {folder}")
    labelmap = read_labelmap(folder)
    suffix = labelmap.mask_suffix.lower()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PAIR_IMAGE_SUFFIXES)
    masks = {p.name for p in files if p.name.lower().endswith(suffix)}
    orphans = set(masks)
    items = []
    for image in files:
        if image.name in masks:
            continue
        mask = image.with_name(image.stem + labelmap.mask_suffix)
        if mask.name not in masks:
            raise InvalidDataset(f"no mask for {image}: expected {mask.name}")
        orphans.discard(mask.name)
        items.append(PairItem(image, mask, labelmap))
    if orphans:
        raise InvalidDataset(f"mask(s) without an image in {folder}: {', '.join(sorted(orphans))}")
    if not items:
        raise InvalidDataset(f"no image/mask pairs (NAME.ext + NAME{labelmap.mask_suffix}) in {folder}")
    for item in items:
        mask = read_pair_mask(item.mask_path, labelmap)
        try:
            width, height = image_size(item.image_path.read_bytes(), str(item.image_path))
        except BlastqError as exc:
            raise InvalidDataset(f"cannot read image: {item.image_path} ({exc})") from exc
        if mask.shape != (height, width):
            raise InvalidDataset(
                f"mask {item.mask_path.name} is {mask.shape[1]}x{mask.shape[0]} px but "
                f"{item.image_path.name} is {width}x{height}"
            )
    return [it for it in items if split is None or name_split(it.name) == split]


def pair_targets(mask: np.ndarray, labelmap: LabelMap) -> tuple[np.ndarray, ...]:
    """(classes, nucleus, marker, foreground or None) of a checked mask, by the partial-label rule."""
    size = 1 << (8 * mask.dtype.itemsize)
    class_of = np.full(size, IGNORE, np.uint8)
    for v, c in labelmap.classes + labelmap.nucleus:
        class_of[v] = c
    is_nucleus = np.zeros(size, bool)
    is_nucleus[[v for v, _ in labelmap.nucleus]] = True
    classes = class_of[mask]
    ignored = classes == IGNORE  # only ignore values are unmapped: read_pair_mask checked the rest
    cell = (classes == 1) | (classes == 2)
    unsupported = np.where(cell | ignored, IGNORE, 0).astype(np.uint8)  # background is still known
    foreground = None
    if labelmap.blast_unknown:
        foreground = np.where(ignored, IGNORE, cell).astype(np.uint8)
        classes[classes == 1] = IGNORE
    if "nucleus" in labelmap.labels:
        nucleus = np.where(ignored, IGNORE, is_nucleus[mask]).astype(np.uint8)
    else:
        nucleus = unsupported
    if "marker" in labelmap.labels:
        instances, _ = ndi.label(cell)
        marker = marker_from_instances(instances.astype(np.int32))
        marker[ignored] = IGNORE
    else:
        marker = unsupported.copy()
    return classes, nucleus, marker, foreground


def pairs_sample(item: PairItem, model_mpp: float, config: PreprocessConfig) -> Sample:
    """An image/mask pair at the model's scale, targets by its label map (partial labels as 255)."""
    lm = item.labelmap
    rgb = read_rgb(item.image_path)
    mask = read_pair_mask(item.mask_path, lm)
    if mask.shape != rgb.shape[:2]:
        raise InvalidDataset(f"mask {item.mask_path} and image {item.image_path} differ in size")
    rgb = resample(rgb, lm.mpp, model_mpp)
    mask = resample_labels(mask, lm.mpp, model_mpp)
    if mask.shape != rgb.shape[:2]:
        mask = cv2.resize(mask, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
    classes, nucleus, marker, foreground = pair_targets(mask, lm)
    return Sample(
        image=preprocess(rgb, model_mpp, config),
        classes=classes,
        nucleus=nucleus,
        marker=marker,
        source=item.source,
        foreground=foreground,
    )
