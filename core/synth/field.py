"""Synthetic May-Grunwald-Giemsa blood-smear fields with exact pixel ground truth.

A field is rendered as optical density (Beer-Lambert: stains absorb, overlapping red cells add up)
and exposed through a simulated microscope at the end. Geometry is planned in microns, so cell sizes
in pixels follow `mpp`. White cells are drawn last and own every pixel they cover; red cells,
platelets and plasma are background. Optical artefacts are applied after the truth is fixed, so the
same seed with and without `artefacts` gives the same masks. Training code calls `generate_field` on
the fly; `write_dataset` stores fields for runs that want a fixed set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np
import tifffile
from scipy.spatial import cKDTree

from blastq.core.common import InvalidConfig
from blastq.core.image import TRUTH_SUFFIXES

CELL_KINDS: tuple[str, ...] = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "blast")

# Relative frequencies of the normal kinds in a peripheral differential (basophils are not modelled).
_NORMAL_KINDS: tuple[str, ...] = ("neutrophil", "lymphocyte", "monocyte", "eosinophil")
_NORMAL_WEIGHTS = np.array([0.50, 0.32, 0.10, 0.08])

_DIAMETER_UM: Mapping[str, tuple[float, float]] = {
    "neutrophil": (12.0, 14.0),
    "lymphocyte": (7.0, 10.0),
    "monocyte": (14.0, 20.0),
    "eosinophil": (12.0, 15.0),
    "blast": (12.0, 20.0),
}

# Variants drawn in `variety="wide"` fields: the range of blasts (FAB L1 and L2 lymphoblasts, monoblasts;
# the kind's own renderer is a myeloblast) and the normal cells that look most like them (large and
# reactive lymphocytes, plasma cells). Size relative to red cells, chromatin texture, nucleoli and the
# nucleus-to-cell ratio are what tell them apart, as at the microscope.
_LOOK_DIAMETER_UM: Mapping[str, tuple[float, float]] = {
    "blast_l1": (10.0, 14.0),  # 1.3-1.9 red cells: small, scant cytoplasm, homogeneous chromatin
    "blast_l2": (14.0, 22.0),  # large, irregular, heterogeneous chromatin, prominent nucleoli
    "monoblast": (15.0, 22.0),  # abundant grey-blue cytoplasm, round or folded nucleus, fine chromatin
    "large_lymphocyte": (10.0, 15.0),  # more pale-blue cytoplasm, still clumped chromatin, no nucleoli
    "plasma_cell": (9.0, 14.0),  # eccentric nucleus, coarse "clock-face" chromatin, deep blue cytoplasm
    "large_granular_lymphocyte": (11.0, 15.0),  # abundant pale cytoplasm, a few coarse azurophilic granules
}
# For each kind, the looks of a wide field and their weights ("" = the kind's own renderer).
_WIDE_LOOKS: Mapping[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "blast": (("", "blast_l1", "blast_l2", "monoblast"), (0.3, 0.35, 0.2, 0.15)),
    "lymphocyte": (
        ("", "large_lymphocyte", "plasma_cell", "large_granular_lymphocyte"),
        (0.5, 0.28, 0.11, 0.11),
    ),
}
LOOKS: tuple[str, ...] = tuple(_LOOK_DIAMETER_UM)
_MONONUCLEAR = frozenset({"lymphocyte", "monocyte", "blast"})
VARIETIES = ("classic", "wide")

# Named stain families of wide fields. The generator's own colours (_STAIN_RGB) are May-Grunwald-Giemsa;
# each other family tints the two dyes' optical density per channel (R, G, B absorption): Wright stains
# nuclei bluer and red cells salmon, Leishman nuclei redder purple and red cells pink, Wright-Giemsa sits
# between. They are caricatures of each family, not measurements of one lab's: together with the depth of
# staining, the light and the camera's gamma they make colour something the model cannot rely on.
STAIN_FAMILIES: tuple[str, ...] = ("mgg", "wright", "wright_giemsa", "leishman")
_FAMILY_TINT: Mapping[str, Mapping[str, tuple[float, float, float]]] = {
    "mgg": {"azure": (1.0, 1.0, 1.0), "eosin": (1.0, 1.0, 1.0)},
    "wright": {"azure": (1.14, 0.97, 0.8), "eosin": (0.8, 1.0, 1.25)},
    "wright_giemsa": {"azure": (1.07, 1.0, 0.9), "eosin": (0.9, 1.0, 1.12)},
    "leishman": {"azure": (0.88, 1.02, 1.14), "eosin": (1.02, 0.95, 0.88)},
}
# Objects of wide fields that are not white cells, drawn as background so the model learns to leave them
# out of the count: nucleated red cells, smudge cells (broken lymphocytes), platelet clumps, stain debris.
DECOY_KINDS: tuple[str, ...] = ("nrbc", "smudge", "platelet_clump", "debris")

# Stain colours as RGB at unit density under white light, each tied to the dye that carries it so one
# per-field gain can make a whole smear eosin-heavy or azure-weak, as real staining runs do. They were
# matched to CellaVision crops after removing that camera's warm white balance (see _LIGHTS), which
# is why red cells look lilac here and salmon in the output.
_STAIN_RGB: Mapping[str, tuple[tuple[int, int, int], str]] = {
    "rbc": ((195, 140, 178), "eosin"),
    "platelet": ((140, 94, 189), "azure"),
    "precipitate": ((77, 51, 140), "azure"),
    "neutrophil_nucleus": ((99, 51, 171), "azure"),
    "neutrophil_cytoplasm": ((231, 209, 238), "eosin"),
    "neutrophil_granule": ((189, 155, 219), "azure"),
    "lymphocyte_nucleus": ((85, 42, 163), "azure"),
    "lymphocyte_cytoplasm": ((163, 189, 235), "azure"),
    "monocyte_nucleus": ((127, 85, 189), "azure"),
    "monocyte_cytoplasm": ((175, 182, 217), "azure"),
    "eosinophil_nucleus": ((99, 51, 171), "azure"),
    "eosinophil_cytoplasm": ((240, 222, 231), "eosin"),
    "eosinophil_granule": ((226, 140, 147), "eosin"),
    "blast_nucleus": ((120, 77, 185), "azure"),
    "blast_cytoplasm": ((115, 148, 210), "azure"),
    "auer_rod": ((155, 77, 171), "azure"),
}

# Transmitted light colour: neutral, warm (CellaVision-like), yellow (cheap halogen camera) and cool.
_LIGHTS: tuple[tuple[float, float, float], ...] = (
    (1.00, 0.98, 0.96),
    (1.00, 0.91, 0.81),
    (1.00, 0.98, 0.74),
    (0.95, 0.97, 1.00),
)
_LIGHT_WEIGHTS = np.array([0.35, 0.40, 0.15, 0.10])

# Plasma tint as optical density: near white, pale yellow, pale pink.
_PLASMA_OD: tuple[tuple[float, float, float], ...] = (
    (0.005, 0.008, 0.012),
    (0.004, 0.015, 0.070),
    (0.006, 0.045, 0.035),
)

# Fraction of the background's optical density that still shows through white-cell cytoplasm: cells
# are thin and translucent, so a red cell under a white cell darkens it a little.
_SHOW_THROUGH = 0.18


@dataclass(frozen=True)
class SynthCell:
    """One visible white cell of a synthetic field."""

    cell_id: int
    kind: str
    is_blast: bool
    centroid_xy: tuple[float, float]
    look: str = ""  # the variant drawn (LOOKS), e.g. "blast_l1" or "plasma_cell"; "" = the kind's own


@dataclass(frozen=True)
class SynthDecoy:
    """A drawn object that is not a white cell (DECOY_KINDS): background in every mask."""

    kind: str
    centroid_xy: tuple[float, float]  # px


# eq=False: the generated __eq__/__hash__ would compare arrays element-wise and raise.
@dataclass(frozen=True, eq=False)
class SynthField:
    """A rendered field and its ground truth; every mask is exact for the image."""

    image: np.ndarray  # HWC uint8 RGB
    classes: np.ndarray  # HW uint8: 0 background, 1 white cell, 2 blast
    nuclei: np.ndarray  # HW bool
    instances: np.ndarray  # HW int32: 0 background, 1..n
    cells: tuple[SynthCell, ...]
    mpp: float
    seed: int
    stain_family: str = ""  # STAIN_FAMILIES, or "" for a classic field's own stain
    decoys: tuple[SynthDecoy, ...] = ()


@dataclass(frozen=True)
class _Outline:
    """A star-shaped closed curve: radius times (1 + harmonics + angular bumps)."""

    radius: float
    harmonics: tuple[tuple[int, float, float], ...]  # (order, relative amplitude, phase)
    bumps: tuple[tuple[float, float, float], ...] = ()  # (angle, relative height, angular width)

    @cached_property
    def bound(self) -> float:
        extra = sum(abs(a) for _, a, _ in self.harmonics) + max((h for _, h, _ in self.bumps), default=0.0)
        return self.radius * (1.0 + extra)

    def radius_at(self, theta: np.ndarray) -> np.ndarray:
        r = np.ones_like(theta)
        for order, amp, phase in self.harmonics:
            r = r + amp * np.cos(order * theta + phase)
        for angle, height, width in self.bumps:
            dth = (theta - angle + math.pi) % (2 * math.pi) - math.pi
            r = r + height * np.exp(-((dth / width) ** 2))
        return r * self.radius

    def scaled(self, factor: float) -> _Outline:
        return _Outline(self.radius * factor, self.harmonics, self.bumps)


@dataclass(frozen=True)
class _WhiteCellPlan:
    kind: str
    is_blast: bool
    x_um: float
    y_um: float
    outline: _Outline  # in microns
    look: str = ""  # a variant of the kind (LOOKS); "" draws the kind's own renderer
    # Wide fields: the mononuclear cells draw their nucleus and cytoplasm colours from a mix of the
    # lymphocyte's, monocyte's and blast's, so that colour cannot tell a blast; morphology must.
    mixed_colours: bool = False


@dataclass(frozen=True)
class _Stain:
    od: Mapping[str, np.ndarray]  # component name -> (3,) float32 optical density at unit density
    light: np.ndarray  # (3,) transmitted light per channel, 0..1
    plasma: np.ndarray  # (3,) plasma optical density


@dataclass(frozen=True)
class _Grid:
    """Pixel coordinates of one cell's bounding box, relative to the cell centre (px)."""

    dx: np.ndarray  # (1, w)
    dy: np.ndarray  # (h, 1)
    d_cell: np.ndarray  # (h, w) signed distance to the membrane, negative inside
    radius_px: float
    mpp: float


def generate_field(
    seed: int,
    height_px: int = 512,
    width_px: int = 512,
    *,
    mpp: float = 0.2,
    blast_fraction: float = 0.3,
    wbc_per_10k_um2: float = 6.0,
    rbc_coverage: float = 0.35,
    touching_fraction: float = 0.3,
    artefacts: bool = True,
    stain_seed: int | None = None,
    rbc_overlap: float = 0.2,
    variety: str = "classic",
    stain_family: str | None = None,
) -> SynthField:
    """Render one synthetic smear field (RGB HWC uint8) with its class, nucleus and instance truth.

    `stain_seed`: take the stain from this seed instead of `seed` (the fields of one synthetic whole
    slide share one stain, as one slide does); everything else still follows `seed`. `rbc_overlap`: the
    share of red cells that may overlap others (crowded, thick areas near 1). `variety`: "classic" draws
    one look per kind; "wide" draws blasts across their range (L1, L2, myeloblasts, monoblasts) beside
    their look-alikes (large, reactive and large granular lymphocytes, plasma cells), each cell's look in
    `SynthCell.look`, in a named stain family (STAIN_FAMILIES) stained pale to heavy, through a camera
    gamma, with rouleaux and objects that are not white cells (SynthField.decoys: nucleated red cells,
    smudge cells, platelet clumps, stain debris). `stain_family`: the family to stain in; a wide field
    draws one when it is None, a classic field keeps the generator's own stain. What a wide field adds is
    drawn from streams of its own, so the red and white cells of a seed stay where they were."""
    _check_args(height_px, width_px, mpp, blast_fraction, wbc_per_10k_um2, rbc_coverage, touching_fraction)
    if not 0.0 <= rbc_overlap <= 1.0:
        raise InvalidConfig(f"rbc_overlap must be within 0..1, got {rbc_overlap}")
    if variety not in VARIETIES:
        raise InvalidConfig(f"variety must be one of {', '.join(VARIETIES)}, got {variety!r}")
    if stain_family is not None and stain_family not in STAIN_FAMILIES:
        raise InvalidConfig(f"stain_family must be one of {', '.join(STAIN_FAMILIES)}, got {stain_family!r}")
    wide = variety == "wide"
    rng = np.random.default_rng(seed)
    h_um, w_um = height_px * mpp, width_px * mpp
    stain = _sample_stain(rng)
    if stain_seed is not None:
        stain = _sample_stain(np.random.default_rng(stain_seed))
    family, gamma = "", 1.0
    if wide or stain_family is not None:
        # One slide, one staining run: the family and its depth follow the stain's seed.
        look_rng = np.random.default_rng([seed if stain_seed is None else stain_seed, 1])
        family = stain_family or str(look_rng.choice(STAIN_FAMILIES))
        stain = _in_family(stain, family, look_rng)
        gamma = float(look_rng.uniform(0.75, 1.35)) if wide else 1.0
    extra = np.random.default_rng([seed, 2])  # rouleaux and decoys of wide fields
    plans = _place_white_cells(
        rng, h_um, w_um, mpp, blast_fraction, wbc_per_10k_um2, touching_fraction, variety
    )

    od = _plasma(rng, height_px, width_px, stain)
    rbcs = _place_red_cells(rng, h_um, w_um, rbc_coverage, plans, rbc_overlap)
    if wide:
        rbcs = np.concatenate([rbcs, _rouleaux(extra, h_um, w_um, plans)])
    rbc_layer = np.zeros((height_px, width_px), np.float32)
    _draw_red_cells(rbc_layer, rbcs, mpp)
    od += rbc_layer[..., None] * stain.od["rbc"]
    del rbc_layer
    _draw_platelets(od, rng, rbcs, h_um, w_um, mpp, stain)
    decoys = _draw_decoys(od, extra, plans, h_um, w_um, mpp, stain) if wide else ()

    classes = np.zeros((height_px, width_px), np.uint8)
    nuclei = np.zeros((height_px, width_px), bool)
    instances = np.zeros((height_px, width_px), np.int32)
    boxes = []
    tints = _cytoplasm_tints(np.random.default_rng([seed, 3]), len(plans)) if wide else [None] * len(plans)
    for cell_id, (plan, tint) in enumerate(zip(plans, tints, strict=True), start=1):
        boxes.append(_paint_white_cell(od, classes, nuclei, instances, plan, cell_id, rng, mpp, stain, tint))
    cells, instances = _collect_cells(plans, boxes, instances)

    # Everything below changes pixels only, never geometry or truth.
    if artefacts:
        _draw_precipitate(od, rng, mpp, stain)
    image = _expose(od, rng, stain, mpp, artefacts, gamma)
    return SynthField(image, classes, nuclei, instances, cells, float(mpp), int(seed), family, decoys)


# Generated truth goes to a sub-folder, never beside the image: a folder or glob given to `blastq run` or
# `blastq submit` must find only smears (core.image.inputs also skips these names in folders from older
# versions, which wrote them beside the image).
TRUTH_FOLDER = "truth"


def truth_paths(image_path: Path) -> tuple[Path, Path, Path]:
    """Where write_field puts the (mask, nuclei, instances) truth of `image_path`: <folder>/truth/<stem>.*"""
    image_path = Path(image_path)
    folder = image_path.parent / TRUTH_FOLDER
    return tuple(folder / f"{image_path.stem}{suffix}" for suffix in TRUTH_SUFFIXES)  # type: ignore[return-value]


def find_truth(image_path: Path) -> tuple[Path, Path, Path] | None:
    """The truth files of `image_path`, in truth/ or (older `blastq synth`) beside it; None when absent."""
    image_path = Path(image_path)
    beside = tuple(image_path.with_name(f"{image_path.stem}{suffix}") for suffix in TRUTH_SUFFIXES)
    for paths in (truth_paths(image_path), beside):
        if paths[0].is_file():
            return paths  # type: ignore[return-value]
    return None


def write_field(field: SynthField, out_dir: Path, stem: str) -> Path:
    """Write a field as <stem>.png, and its truth as truth/<stem>.mask.png, .nuclei.png and .instances.tif.

    Returns the image path.
    """
    out_dir = Path(out_dir)
    image_path = out_dir / f"{stem}.png"
    mask_path, nuclei_path, instances_path = truth_paths(image_path)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    for path, array in (
        (image_path, cv2.cvtColor(field.image, cv2.COLOR_RGB2BGR)),
        (mask_path, field.classes.astype(np.uint8)),
        (nuclei_path, np.where(field.nuclei, 255, 0).astype(np.uint8)),
    ):
        if not cv2.imwrite(str(path), array):
            raise OSError(f"could not write {path}")
    tifffile.imwrite(instances_path, field.instances.astype(np.uint32), compression="zlib")
    return image_path


def read_field_masks(image_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read the (classes uint8, nuclei bool, instances int32) that write_field wrote for `image_path`.

    Looks in truth/ first, then beside the image (the layout of older versions).
    """
    image_path = Path(image_path)
    mask_path, nuclei_path, instances_path = find_truth(image_path) or truth_paths(image_path)
    for path in (mask_path, nuclei_path, instances_path):
        if not path.is_file():
            raise FileNotFoundError(f"missing synthetic ground truth {path}")
    classes = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
    nuclei = cv2.imread(str(nuclei_path), cv2.IMREAD_UNCHANGED)
    if classes is None or nuclei is None:
        raise FileNotFoundError(f"unreadable synthetic ground truth for {image_path} in {mask_path.parent}")
    instances = tifffile.imread(instances_path).astype(np.int32)
    return classes.astype(np.uint8), nuclei > 0, instances


def write_dataset(
    out_dir: Path,
    count: int,
    *,
    seed: int = 0,
    height_px: int = 512,
    width_px: int = 512,
    mpp: float = 0.2,
    blast_fraction: float = 0.3,
    progress: Callable[[int], None] | None = None,
    variety: str = "classic",
    stain_family: str | None = None,
) -> list[Path]:
    """Write `count` fields named synth_<seed+i:05d> (field i uses seed + i), their truth in truth/.

    Returns the image paths.
    """
    if count < 0:
        raise InvalidConfig(f"count must be >= 0, got {count}")
    paths = []
    for i in range(count):
        field = generate_field(
            seed + i,
            height_px,
            width_px,
            mpp=mpp,
            blast_fraction=blast_fraction,
            variety=variety,
            stain_family=stain_family,
        )
        paths.append(write_field(field, Path(out_dir), f"synth_{seed + i:05d}"))
        if progress is not None:
            progress(1)
    return paths


def _check_args(
    height_px: int,
    width_px: int,
    mpp: float,
    blast_fraction: float,
    wbc_per_10k_um2: float,
    rbc_coverage: float,
    touching_fraction: float,
) -> None:
    if height_px < 1 or width_px < 1:
        raise InvalidConfig(f"field size must be positive, got {height_px}x{width_px} px")
    if not 0.02 <= mpp <= 5.0:
        raise InvalidConfig(f"mpp must be within 0.02..5 microns per pixel, got {mpp}")
    for name, value in (
        ("blast_fraction", blast_fraction),
        ("rbc_coverage", rbc_coverage),
        ("touching_fraction", touching_fraction),
    ):
        if not 0.0 <= value <= 1.0:
            raise InvalidConfig(f"{name} must be within 0..1, got {value}")
    if not 0.0 <= wbc_per_10k_um2 <= 200.0:
        raise InvalidConfig(f"wbc_per_10k_um2 must be within 0..200, got {wbc_per_10k_um2}")


def _sample_stain(rng: np.random.Generator) -> _Stain:
    # A near-identity mix of the OD vectors shifts hue; scaling around the grey axis changes saturation.
    mix = np.eye(3) + rng.normal(0.0, 0.04, (3, 3))
    saturation = rng.uniform(0.8, 1.2)
    gains = {"eosin": rng.uniform(0.75, 1.2), "azure": rng.uniform(0.75, 1.2)}
    if rng.random() < 0.15:  # a weak, pale staining run
        pale = rng.uniform(0.5, 0.75)
        gains = {k: v * pale for k, v in gains.items()}
    od = {}
    for name, (rgb, dye) in _STAIN_RGB.items():
        vec = -np.log(np.asarray(rgb, np.float64) / 255.0)
        vec = vec.mean() + saturation * (vec - vec.mean())
        vec = np.clip(mix @ vec, 0.005, None) * gains[dye]
        od[name] = vec.astype(np.float32)
    light = np.asarray(_LIGHTS[rng.choice(len(_LIGHTS), p=_LIGHT_WEIGHTS)], np.float64)
    light = np.clip(light + rng.normal(0.0, 0.015, 3), 0.6, 1.0) * rng.uniform(0.92, 1.06)
    plasma = np.asarray(_PLASMA_OD[rng.integers(len(_PLASMA_OD))]) * rng.uniform(0.5, 1.6)
    return _Stain(od, light.astype(np.float32), plasma.astype(np.float32))


def _in_family(stain: _Stain, family: str, rng: np.random.Generator) -> _Stain:
    """`stain` tinted to a stain family, and stained pale (one run in five), heavy (one in seven) or
    near normal, each dye a little more or less than the other."""
    roll = rng.random()
    if roll < 0.2:
        depth = rng.uniform(0.5, 0.75)
    elif roll < 0.35:
        depth = rng.uniform(1.2, 1.5)
    else:
        depth = rng.uniform(0.85, 1.15)
    gains = {
        dye: depth * rng.uniform(0.88, 1.12) * np.asarray(tint, np.float32)
        for dye, tint in _FAMILY_TINT[family].items()
    }
    od = {name: (vec * gains[_STAIN_RGB[name][1]]).astype(np.float32) for name, vec in stain.od.items()}
    return _Stain(od, stain.light, stain.plasma)


def _sample_outline(rng: np.random.Generator, kind: str, look: str = "") -> _Outline:
    radius = rng.uniform(*(_LOOK_DIAMETER_UM[look] if look else _DIAMETER_UM[kind])) / 2.0
    # Order 2 is the ellipticity; higher orders give the smooth lumpiness of a squashed cell.
    harmonics = [(2, rng.uniform(0.0, 0.07), rng.uniform(0, 2 * math.pi))]
    lumpiness = 0.04 if kind == "monocyte" else 0.02
    harmonics += [(k, rng.uniform(0.0, lumpiness), rng.uniform(0, 2 * math.pi)) for k in (3, 4, 5)]
    bumps: list[tuple[float, float, float]] = []
    if kind == "blast" and rng.random() < 0.35:  # irregular outline with cytoplasmic blebs
        harmonics += [(k, rng.uniform(0.01, 0.035), rng.uniform(0, 2 * math.pi)) for k in (6, 7, 8)]
        bumps = [
            (rng.uniform(0, 2 * math.pi), rng.uniform(0.05, 0.12), rng.uniform(0.15, 0.35))
            for _ in range(rng.integers(1, 4))
        ]
    return _Outline(radius, tuple(harmonics), tuple(bumps))


class _Neighbours:
    """A uniform grid of placed white cells, so each overlap check looks at a few cells, not all."""

    def __init__(self, cell_um: float) -> None:
        self.cell_um = cell_um
        self.buckets: dict[tuple[int, int], list[int]] = {}
        self.plans: list[_WhiteCellPlan] = []
        self.leaning: list[int] = []  # how many cells were placed touching each cell

    def add(self, plan: _WhiteCellPlan) -> None:
        key = (int(plan.x_um // self.cell_um), int(plan.y_um // self.cell_um))
        self.buckets.setdefault(key, []).append(len(self.plans))
        self.plans.append(plan)
        self.leaning.append(0)

    def fits(self, x: float, y: float, outline: _Outline, skip: int, gap: float) -> bool:
        bx, by = int(x // self.cell_um), int(y // self.cell_um)
        for kx in (bx - 1, bx, bx + 1):
            for ky in (by - 1, by, by + 1):
                for i in self.buckets.get((kx, ky), ()):
                    other = self.plans[i]
                    reach = outline.bound + other.outline.bound + gap
                    if i != skip and math.hypot(x - other.x_um, y - other.y_um) < reach:
                        return False
        return True


def _place_white_cells(
    rng: np.random.Generator,
    h_um: float,
    w_um: float,
    mpp: float,
    blast_fraction: float,
    wbc_per_10k_um2: float,
    touching_fraction: float,
    variety: str = "classic",
) -> list[_WhiteCellPlan]:
    count = int(rng.poisson(wbc_per_10k_um2 * h_um * w_um / 1e4))
    if h_um >= 60.0 and w_um >= 60.0:
        count = max(count, 1)
    wanted = []
    for _ in range(count):
        is_blast = bool(rng.random() < blast_fraction)
        kind = "blast" if is_blast else _NORMAL_KINDS[rng.choice(len(_NORMAL_KINDS), p=_NORMAL_WEIGHTS)]
        look = ""
        if variety == "wide" and kind in _WIDE_LOOKS:
            names, weights = _WIDE_LOOKS[kind]
            look = names[rng.choice(len(names), p=np.asarray(weights) / sum(weights))]
        outline = _sample_outline(rng, kind, look)
        wanted.append((kind, is_blast, outline, bool(rng.random() < touching_fraction), look))
    # Cells not meant to touch keep this gap between bounding circles, so they never share a pixel edge.
    gap = max(1.0, 3.0 * mpp)
    edge = 1.5 * mpp
    largest = max((outline.bound for _, _, outline, _, _ in wanted), default=1.0)
    placed = _Neighbours(2 * largest + gap)
    for kind, is_blast, outline, touch, look in wanted:
        position = None
        if touch and placed.plans:
            position = _touching_position(rng, placed, outline, h_um, w_um, gap, edge, mpp)
        if position is None:
            position = _free_position(rng, placed, outline, h_um, w_um, gap, edge)
        if position is not None:  # else the field is full
            mixed = variety == "wide" and kind in _MONONUCLEAR
            placed.add(_WhiteCellPlan(kind, is_blast, position[0], position[1], outline, look, mixed))
    return placed.plans


def _free_position(
    rng: np.random.Generator,
    placed: _Neighbours,
    outline: _Outline,
    h_um: float,
    w_um: float,
    gap: float,
    edge: float,
) -> tuple[float, float] | None:
    # Cells stay whole inside the field so the truth never holds a sliver cut by the border; crops
    # taken by the trainer supply the cut cells.
    margin = outline.bound + edge
    if 2 * margin >= min(h_um, w_um):
        return None
    for _ in range(40):
        x, y = float(rng.uniform(margin, w_um - margin)), float(rng.uniform(margin, h_um - margin))
        if placed.fits(x, y, outline, -1, gap):
            return x, y
    return None


def _touching_position(
    rng: np.random.Generator,
    placed: _Neighbours,
    outline: _Outline,
    h_um: float,
    w_um: float,
    gap: float,
    edge: float,
    mpp: float,
) -> tuple[float, float] | None:
    margin = outline.bound + edge
    # At most three cells lean on one cell: each hides under 4 % of it, so none is ever half hidden.
    candidates = [i for i, n in enumerate(placed.leaning) if n < 3]
    if not candidates:
        return None
    for _ in range(20):
        j = candidates[int(rng.integers(len(candidates)))]
        other = placed.plans[j]
        phi = float(rng.uniform(0, 2 * math.pi))
        # Contact along the line of centres: the two membranes meet there, then overlap by up to
        # 15 % of the smaller radius (at least 1.5 px, so the rasterised masks always share an edge).
        reach = float(other.outline.radius_at(np.float64(phi))) + float(
            outline.radius_at(np.float64(phi + math.pi))
        )
        min_overlap = 1.5 * mpp
        max_overlap = max(min_overlap, 0.15 * min(outline.radius, other.outline.radius))
        dist = reach - float(rng.uniform(min_overlap, max_overlap))
        x, y = other.x_um + dist * math.cos(phi), other.y_um + dist * math.sin(phi)
        if not (margin <= x <= w_um - margin and margin <= y <= h_um - margin):
            continue
        if placed.fits(x, y, outline, j, gap):
            placed.leaning[j] += 1
            return x, y
    return None


def _place_red_cells(
    rng: np.random.Generator,
    h_um: float,
    w_um: float,
    coverage: float,
    plans: list[_WhiteCellPlan],
    overlap: float = 0.2,
) -> np.ndarray:
    """Red cells as rows: x_um, y_um, radius_um, ellipticity, angle, pallor, rim, density, wobble, phase.

    `overlap`: the share of red cells that may overlap others (by 8-45% of the sum of radii), as in a
    thicker area; near 1 with a high coverage gives the crowded, overlapping fields of a thick smear."""
    pad = 4.5  # red cells may be cut by the field border
    ext_area = (h_um + 2 * pad) * (w_um + 2 * pad)
    target = coverage * ext_area
    n = int(target / (math.pi * 3.75**2) * 3) + 8
    xs = rng.uniform(-pad, w_um + pad, n)
    ys = rng.uniform(-pad, h_um + pad, n)
    radius = np.clip(rng.normal(3.75, 0.25, n), 3.2, 4.4)
    # Most red cells only touch; some overlap by a share of the sum of radii, as in a thicker area.
    tolerance = np.where(rng.random(n) < overlap, rng.uniform(0.08, 0.45, n), 0.0)
    # How deep a red cell may tuck under a white cell (um): most sit beside it, some under its edge.
    tuck = np.where(rng.random(n) < 0.35, rng.uniform(0.2, 1.3, n), 0.0) * radius
    params = np.stack(
        [
            xs,
            ys,
            radius,
            rng.uniform(0.0, 0.08, n),
            rng.uniform(0.0, math.pi, n),
            rng.uniform(0.35, 0.7, n),
            rng.uniform(0.1, 0.3, n),
            rng.uniform(0.85, 1.1, n),
            rng.uniform(0.0, 0.025, n),
            rng.uniform(0.0, 2 * math.pi, n),
        ],
        axis=1,
    )
    if target <= 0:
        return params[:0]
    allowed = np.ones(n, bool)
    if plans:
        wxy = np.array([(p.x_um, p.y_um) for p in plans])
        wr = np.array([p.outline.radius for p in plans])
        near = cKDTree(np.stack([xs, ys], axis=1)).query_ball_point(
            wxy, wr + radius.max(), return_sorted=False
        )
        for k, idx in enumerate(near):
            if idx:
                idx = np.asarray(idx)
                dist = np.hypot(xs[idx] - wxy[k, 0], ys[idx] - wxy[k, 1])
                allowed[idx[dist < wr[k] + radius[idx] - tuck[idx]]] = False
    pairs = cKDTree(np.stack([xs, ys], axis=1)).query_pairs(2 * radius.max(), output_type="ndarray")
    earlier: list[list[int]] = [[] for _ in range(n)]
    if len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        d = np.hypot(xs[i] - xs[j], ys[i] - ys[j])
        clash = d < (radius[i] + radius[j]) * (1.0 - np.maximum(tolerance[i], tolerance[j]))
        for a, b in pairs[clash].tolist():
            earlier[max(a, b)].append(min(a, b))
    accepted = [False] * n
    area = 0.0
    allowed_list = allowed.tolist()
    areas = (math.pi * radius**2).tolist()
    for k in range(n):
        if not allowed_list[k] or any(accepted[m] for m in earlier[k]):
            continue
        accepted[k] = True
        area += areas[k]
        if area >= target:
            break
    return params[np.asarray(accepted)]


def _box(cx: float, cy: float, half: float, h: int, w: int) -> tuple[int, int, int, int] | None:
    x0, x1 = max(int(math.floor(cx - half)), 0), min(int(math.ceil(cx + half)) + 1, w)
    y0, y1 = max(int(math.floor(cy - half)), 0), min(int(math.ceil(cy + half)) + 1, h)
    if x0 >= x1 or y0 >= y1:
        return None
    return y0, y1, x0, x1


def _draw_red_cells(layer: np.ndarray, rbcs: np.ndarray, mpp: float) -> None:
    h, w = layer.shape
    for x, y, r_um, ecc, angle, pallor, rim, density, wobble, phase in rbcs.tolist():
        cx, cy, r = x / mpp, y / mpp, r_um / mpp
        box = _box(cx, cy, r * (1 + ecc + wobble) + 2, h, w)
        if box is None:
            continue
        y0, y1, x0, x1 = box
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
        c, s = math.cos(angle), math.sin(angle)
        u = dx * c + dy * s
        v = dy * c - dx * s
        q = np.sqrt((u / (1 + ecc)) ** 2 + (v / (1 - ecc)) ** 2) / r
        q *= 1.0 - wobble * np.cos(3 * np.arctan2(v, u) + phase)
        # A biconcave disc: thin pale centre, thick rim that reads darker, soft anti-aliased edge.
        profile = 1.0 - pallor * np.exp(-((q / 0.42) ** 4)) + rim * np.exp(-(((q - 0.82) / 0.14) ** 2))
        profile *= np.clip((1.0 - q) * r + 0.5, 0.0, 1.0)
        layer[y0:y1, x0:x1] += profile * density


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Unit-variance Gaussian-filtered white noise: the building block of every texture."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    if sigma_px > 0.25:
        noise = cv2.GaussianBlur(noise, (0, 0), sigma_px, borderType=cv2.BORDER_REFLECT)
    std = float(noise.std())
    return noise / std if std > 0 else noise


def _draw_platelets(
    od: np.ndarray,
    rng: np.random.Generator,
    rbcs: np.ndarray,
    h_um: float,
    w_um: float,
    mpp: float,
    stain: _Stain,
) -> None:
    # Roughly one platelet per 15 red cells; some gather in small clumps.
    n = int(rng.poisson(max(len(rbcs), 1) / 15.0))
    xs, ys = list(rng.uniform(0, w_um, n)), list(rng.uniform(0, h_um, n))
    for k in range(n):
        if rng.random() < 0.12:
            m = int(rng.integers(3, 9))
            xs += list(xs[k] + rng.normal(0, 1.8, m))
            ys += list(ys[k] + rng.normal(0, 1.8, m))
    for x, y in zip(xs, ys, strict=True):
        _draw_platelet(od, rng, x, y, mpp, stain.od["platelet"])


def _draw_platelet(
    od: np.ndarray, rng: np.random.Generator, x: float, y: float, mpp: float, vec: np.ndarray
) -> None:
    h, w = od.shape[:2]
    radius = rng.uniform(0.9, 1.5) / mpp
    outline = _Outline(
        radius, tuple((k, rng.uniform(0.0, 0.12), rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4))
    )
    cx, cy = x / mpp, y / mpp
    box = _box(cx, cy, outline.bound + 2, h, w)
    if box is None:
        return
    y0, y1, x0, x1 = box
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    d = np.hypot(dx, dy) - outline.radius_at(np.arctan2(dy, dx))
    alpha = np.clip(0.5 - d, 0.0, 1.0)
    # Pale hyalomere with a granular purple centre (granulomere).
    grains = np.clip(_smooth_noise(rng, alpha.shape, 0.12 / mpp) + 0.3, 0.0, None)
    centre = np.exp(-((np.hypot(dx, dy) / (0.6 * radius)) ** 2))
    density = alpha * (0.35 + 0.45 * centre * grains) * rng.uniform(0.8, 1.2)
    od[y0:y1, x0:x1] += density[..., None] * vec


def _rouleaux(rng: np.random.Generator, h_um: float, w_um: float, plans: list[_WhiteCellPlan]) -> np.ndarray:
    """Red cells stacked like coins (rows in `_place_red_cells`' layout), in a third of wide fields: 1-4
    stacks of 4-10 cells, each overlapping the last by 40-65%, their central pallor lost. They stay off
    the white cells, which are drawn over everything."""
    rows: list[list[float]] = []
    if rng.random() < 0.3:
        for _ in range(int(rng.integers(1, 5))):
            x, y, theta = rng.uniform(0, w_um), rng.uniform(0, h_um), rng.uniform(0, math.pi)
            radius = rng.uniform(3.4, 4.1)
            step = rng.uniform(0.35, 0.6) * 2 * radius
            for k in range(int(rng.integers(4, 11))):
                rows.append(
                    [
                        x + k * step * math.cos(theta),
                        y + k * step * math.sin(theta),
                        radius * rng.uniform(0.97, 1.03),
                        rng.uniform(0.0, 0.05),
                        theta + math.pi / 2,
                        rng.uniform(0.05, 0.2),
                        rng.uniform(0.05, 0.15),
                        rng.uniform(0.9, 1.1),
                        rng.uniform(0.0, 0.02),
                        rng.uniform(0.0, 2 * math.pi),
                    ]
                )
    out = np.asarray(rows, np.float64).reshape(-1, 10)
    for plan in plans:
        if len(out):
            out = out[
                np.hypot(out[:, 0] - plan.x_um, out[:, 1] - plan.y_um) >= plan.outline.bound + out[:, 2]
            ]
    return out


# Per decoy kind: the chance a wide field has any, how many per 10,000 um^2 when it does, the radius (um)
# kept clear of white cells.
_DECOY_PLAN: Mapping[str, tuple[float, float, float]] = {
    "nrbc": (0.35, 1.5, 5.0),
    "smudge": (0.3, 1.5, 9.5),
    "platelet_clump": (0.25, 0.8, 7.0),
    "debris": (0.3, 1.5, 4.5),
}


def _draw_decoys(
    od: np.ndarray,
    rng: np.random.Generator,
    plans: list[_WhiteCellPlan],
    h_um: float,
    w_um: float,
    mpp: float,
    stain: _Stain,
) -> tuple[SynthDecoy, ...]:
    """Objects that are not white cells, painted into the background (so every mask calls them
    background) clear of the white cells: the hard negatives of a count of white cells."""
    wanted: list[str] = []
    for kind, (chance, per_10k, _) in _DECOY_PLAN.items():
        if rng.random() < chance:
            wanted += [kind] * min(12, max(1, int(rng.poisson(per_10k * h_um * w_um / 1e4))))
    decoys, taken = [], [(p.x_um, p.y_um, p.outline.bound) for p in plans]
    for kind in wanted:
        clear = _DECOY_PLAN[kind][2]
        for _ in range(20):
            x, y = rng.uniform(clear, max(w_um - clear, clear)), rng.uniform(clear, max(h_um - clear, clear))
            if all(math.hypot(x - tx, y - ty) > reach + clear for tx, ty, reach in taken):
                break
        else:
            continue  # the field is full
        _DECOY_PAINTERS[kind](od, rng, x, y, mpp, stain)
        decoys.append(SynthDecoy(kind, (x / mpp, y / mpp)))
        taken.append((x, y, clear))
    return tuple(decoys)


def _decoy_shape(
    od: np.ndarray,
    rng: np.random.Generator,
    x: float,
    y: float,
    mpp: float,
    radius_um: float,
    reach: float,
    lumpiness: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """A random outline of `radius_um` centred at (x, y) um: the region of `od` around it (a view, `reach`
    radii wide), pixel offsets dx (1, w) and dy (h, 1) from the centre, and the signed distance to the
    outline (px, negative inside); None when it lies outside the field."""
    h, w = od.shape[:2]
    cx, cy = x / mpp, y / mpp
    box = _box(cx, cy, reach * radius_um / mpp + 2, h, w)
    if box is None:
        return None
    y0, y1, x0, x1 = box
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    d = _star_distance(dx, dy, 0.0, 0.0, _random_outline(rng, radius_um / mpp, lumpiness))
    return od[y0:y1, x0:x1], dx, dy, d


def _paint_nrbc(
    od: np.ndarray, rng: np.random.Generator, x: float, y: float, mpp: float, stain: _Stain
) -> None:
    """A nucleated red cell: a red-cell-sized disc of pink to pinkish-grey (orthochromatic to
    polychromatic) cytoplasm around a small, round, very dense (pyknotic) nucleus, often off centre."""
    radius = rng.uniform(3.3, 4.8)
    got = _decoy_shape(od, rng, x, y, mpp, radius, 1.2, 0.02)
    if got is None:
        return
    region, dx, dy, d_cell = got
    rn = rng.uniform(0.35, 0.55) * radius / mpp
    phi, shift = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.8) * (radius / mpp - rn)
    d_nuc = np.hypot(dx - shift * math.cos(phi), dy - shift * math.sin(phi)) - rn
    a_cell = np.clip(0.5 - d_cell, 0.0, 1.0)[..., None]
    a_nuc = np.clip(0.5 - d_nuc, 0.0, 1.0)[..., None] * a_cell
    t = rng.uniform(0.5, 1.0)
    cyt = t * stain.od["rbc"] + (1.0 - t) * 0.8 * stain.od["lymphocyte_cytoplasm"]
    dense = rng.uniform(1.2, 1.5) * (1.0 + 0.04 * _smooth_noise(rng, d_cell.shape, 0.2 / mpp))
    cell_od = cyt * (1.0 - a_nuc) + dense[..., None] * stain.od["lymphocyte_nucleus"] * a_nuc
    region *= 1.0 - 0.8 * a_cell
    region += a_cell * cell_od


def _paint_smudge(
    od: np.ndarray, rng: np.random.Generator, x: float, y: float, mpp: float, stain: _Stain
) -> None:
    """A smudge cell: the chromatin of a broken lymphocyte spread into a pale, streaky, ragged patch
    with no cytoplasm and no membrane."""
    got = _decoy_shape(od, rng, x, y, mpp, rng.uniform(4.0, 8.5), 1.35, 0.12)
    if got is None:
        return
    region, _, _, d = got
    alpha = np.clip(0.5 - d * (mpp / 0.8), 0.0, 1.0)  # a soft, frayed edge about a micron wide
    strands = np.exp(-(_smooth_noise(rng, d.shape, 0.3 / mpp) ** 2) / 0.3)
    density = alpha * (0.2 + 0.45 * strands) * rng.uniform(0.7, 1.2)
    region += density[..., None] * stain.od["lymphocyte_nucleus"]


def _paint_platelet_clump(
    od: np.ndarray, rng: np.random.Generator, x: float, y: float, mpp: float, stain: _Stain
) -> None:
    """Ten to thirty platelets heaped together: a purple, granular clump the size of a white cell."""
    spread = rng.uniform(1.5, 3.0)
    for _ in range(int(rng.integers(10, 31))):
        px, py = x + rng.normal(0.0, spread), y + rng.normal(0.0, spread)
        _draw_platelet(od, rng, px, py, mpp, stain.od["platelet"])


def _paint_debris(
    od: np.ndarray, rng: np.random.Generator, x: float, y: float, mpp: float, stain: _Stain
) -> None:
    """Stain debris: a ragged, dark, dye-coloured blob of one to four microns."""
    got = _decoy_shape(od, rng, x, y, mpp, rng.uniform(0.8, 2.2), 1.6, 0.2)
    if got is None:
        return
    region, _, _, d = got
    alpha = np.clip(0.5 - d, 0.0, 1.0)
    density = alpha * rng.uniform(0.5, 1.3) * (1.0 + 0.2 * _smooth_noise(rng, d.shape, 0.3 / mpp))
    region += np.clip(density, 0.0, None)[..., None] * stain.od["precipitate"]


_DECOY_PAINTERS: Mapping[
    str, Callable[[np.ndarray, np.random.Generator, float, float, float, _Stain], None]
] = {
    "nrbc": _paint_nrbc,
    "smudge": _paint_smudge,
    "platelet_clump": _paint_platelet_clump,
    "debris": _paint_debris,
}


def _plasma(rng: np.random.Generator, h: int, w: int, stain: _Stain) -> np.ndarray:
    # Plasma thickness varies slowly over a field; a coarse noise grid, upsampled, is enough.
    coarse = rng.normal(1.0, 0.35, (6, 6)).astype(np.float32)
    variation = np.clip(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC), 0.2, None)
    return variation[..., None] * stain.plasma


def _star_distance(dx: np.ndarray, dy: np.ndarray, cx: float, cy: float, outline: _Outline) -> np.ndarray:
    """Signed radial distance (px) to a star-shaped outline centred at (cx, cy); negative inside."""
    ex, ey = dx - np.float32(cx), dy - np.float32(cy)
    return np.hypot(ex, ey) - outline.radius_at(np.arctan2(ey, ex))


def _ellipse_distance(
    dx: np.ndarray, dy: np.ndarray, cx: float, cy: float, a: float, b: float, angle: float
) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    ex, ey = dx - np.float32(cx), dy - np.float32(cy)
    u, v = ex * c + ey * s, ey * c - ex * s
    return (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * math.sqrt(a * b)


def _segment_distance(
    dx: np.ndarray, dy: np.ndarray, p: tuple[float, float], q: tuple[float, float], half_width: float
) -> np.ndarray:
    vx, vy = q[0] - p[0], q[1] - p[1]
    t = np.clip(((dx - p[0]) * vx + (dy - p[1]) * vy) / max(vx * vx + vy * vy, 1e-6), 0.0, 1.0)
    return np.hypot(dx - (p[0] + t * vx), dy - (p[1] + t * vy)) - half_width


def _random_outline(rng: np.random.Generator, radius: float, lumpiness: float) -> _Outline:
    harmonics = [(2, rng.uniform(0.0, 0.08), rng.uniform(0, 2 * math.pi))]
    harmonics += [(k, rng.uniform(0.0, lumpiness), rng.uniform(0, 2 * math.pi)) for k in (3, 4, 5)]
    return _Outline(radius, tuple(harmonics))


def _round_nucleus(
    rng: np.random.Generator, g: _Grid, area_ratio: float, eccentricity: float, lumpiness: float
) -> tuple[np.ndarray, tuple[float, float, float]]:
    radius = g.radius_px * math.sqrt(area_ratio)
    shift = rng.uniform(0.3, 1.0) * eccentricity * (g.radius_px - radius)
    phi = rng.uniform(0, 2 * math.pi)
    cx, cy = shift * math.cos(phi), shift * math.sin(phi)
    outline = _random_outline(rng, radius, lumpiness)
    return _star_distance(g.dx, g.dy, cx, cy, outline), (cx, cy, radius)


def _lobed_nucleus(
    rng: np.random.Generator,
    g: _Grid,
    lobes: int,
    lobe_scale: tuple[float, float],
    strand_um: tuple[float, float],
) -> np.ndarray:
    """Lobes joined by thin chromatin strands along a bending path, centred in the cell."""
    r = g.radius_px
    sizes = [rng.uniform(*lobe_scale) * r for _ in range(lobes)]
    heading = rng.uniform(0, 2 * math.pi)
    centres = [(0.0, 0.0)]
    for k in range(1, lobes):
        heading += rng.normal(0.0, 1.1)
        step = sizes[k - 1] + sizes[k] + rng.uniform(*strand_um) / g.mpp
        px, py = centres[-1]
        centres.append((px + step * math.cos(heading), py + step * math.sin(heading)))
    mx = sum(c[0] for c in centres) / lobes
    my = sum(c[1] for c in centres) / lobes
    centres = [(x - mx, y - my) for x, y in centres]
    # Pull the lobes together if the path strays outside the cell.
    reach = max(math.hypot(x, y) + s for (x, y), s in zip(centres, sizes, strict=True))
    if reach > 0.85 * r:
        f = max(0.85 * r - max(sizes), 0.0) / max(reach - max(sizes), 1e-6)
        centres = [(x * f, y * f) for x, y in centres]
    d = None
    for (x, y), s in zip(centres, sizes, strict=True):
        elong = rng.uniform(1.0, 1.35)
        dk = _ellipse_distance(g.dx, g.dy, x, y, s * elong, s / elong, rng.uniform(0, math.pi))
        d = dk if d is None else np.minimum(d, dk)
    half_width = rng.uniform(0.12, 0.25) / g.mpp
    for p, q in zip(centres[:-1], centres[1:], strict=True):
        d = np.minimum(d, _segment_distance(g.dx, g.dy, p, q, half_width))
    return d


# What a kind renderer returns: nucleus signed distance (px, HW), chromatin density (HW), nucleus
# colour as optical density (3,), cytoplasm optical density (HWC).
_Look = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _disc_alpha(g: _Grid, cx: float, cy: float, radius: float) -> np.ndarray:
    return np.clip(radius + 0.5 - np.hypot(g.dx - np.float32(cx), g.dy - np.float32(cy)), 0.0, 1.0)


def _render_neutrophil(rng: np.random.Generator, g: _Grid, stain: _Stain, shape: tuple[int, int]) -> _Look:
    lobes = int(rng.choice([2, 3, 4, 5], p=[0.15, 0.45, 0.3, 0.1]))
    d_nuc = _lobed_nucleus(rng, g, lobes, (0.24, 0.31), (0.2, 0.8))
    chromatin = (
        1.0 + 0.25 * _smooth_noise(rng, shape, 0.45 / g.mpp) + 0.1 * _smooth_noise(rng, shape, 0.15 / g.mpp)
    )
    cyt = 1.0 + 0.1 * _smooth_noise(rng, shape, 1.5 / g.mpp)
    granules = np.clip(_smooth_noise(rng, shape, 0.1 / g.mpp) - 0.5, 0.0, None) * 0.35
    cyt_od = (
        cyt[..., None] * stain.od["neutrophil_cytoplasm"]
        + granules[..., None] * stain.od["neutrophil_granule"]
    )
    return d_nuc, chromatin * 0.95, stain.od["neutrophil_nucleus"], cyt_od


def _render_eosinophil(rng: np.random.Generator, g: _Grid, stain: _Stain, shape: tuple[int, int]) -> _Look:
    lobes = 2 if rng.random() < 0.85 else 3
    d_nuc = _lobed_nucleus(rng, g, lobes, (0.28, 0.34), (0.2, 0.8))
    chromatin = 1.0 + 0.22 * _smooth_noise(rng, shape, 0.45 / g.mpp)
    # Cytoplasm packed with large orange-red granules.
    granules = np.clip(0.9 + 0.45 * _smooth_noise(rng, shape, 0.14 / g.mpp), 0.0, None)
    cyt_od = 0.5 * stain.od["eosinophil_cytoplasm"] + granules[..., None] * stain.od["eosinophil_granule"]
    return d_nuc, chromatin * 0.95, stain.od["eosinophil_nucleus"], cyt_od


def _render_lymphocyte(rng: np.random.Generator, g: _Grid, stain: _Stain, shape: tuple[int, int]) -> _Look:
    d_nuc, _ = _round_nucleus(rng, g, rng.uniform(0.68, 0.88), 0.7, 0.03)
    if rng.random() < 0.25:  # a shallow indentation
        phi = rng.uniform(0, 2 * math.pi)
        notch = np.hypot(g.dx - 0.9 * g.radius_px * math.cos(phi), g.dy - 0.9 * g.radius_px * math.sin(phi))
        d_nuc = np.maximum(d_nuc, 0.35 * g.radius_px - notch)
    # Dense chromatin in coarse clumps with paler gaps.
    clumps = _smooth_noise(rng, shape, 0.45 / g.mpp)
    chromatin = 1.05 + 0.25 * np.clip(clumps, -1.2, 1.5) + 0.08 * _smooth_noise(rng, shape, 0.15 / g.mpp)
    edge = np.exp(np.minimum(g.d_cell, 0.0) * (g.mpp / 0.5))
    cyt = (0.85 + 0.08 * _smooth_noise(rng, shape, 1.0 / g.mpp)) * (1.0 + 0.6 * edge)
    return d_nuc, chromatin, stain.od["lymphocyte_nucleus"], cyt[..., None] * stain.od["lymphocyte_cytoplasm"]


def _render_monocyte(rng: np.random.Generator, g: _Grid, stain: _Stain, shape: tuple[int, int]) -> _Look:
    d_nuc, (cx, cy, rn) = _round_nucleus(rng, g, rng.uniform(0.48, 0.62), 0.8, 0.05)
    # Kidney or horseshoe shape: bite a disc out of one side of the nucleus.
    phi = rng.uniform(0, 2 * math.pi)
    bite_r = rng.uniform(0.35, 0.6) * rn
    bite_at = rng.uniform(0.85, 1.1) * rn
    bite = np.hypot(g.dx - (cx + bite_at * math.cos(phi)), g.dy - (cy + bite_at * math.sin(phi))) - bite_r
    d_nuc = np.maximum(d_nuc, -bite)
    # Lacy chromatin: dark strands along the zero crossings of smooth noise.
    lace = np.exp(-(_smooth_noise(rng, shape, 0.4 / g.mpp) ** 2) / 0.4)
    chromatin = 0.74 + 0.3 * lace + 0.06 * _smooth_noise(rng, shape, 0.15 / g.mpp)
    cyt = 1.0 + 0.12 * _smooth_noise(rng, shape, 0.8 / g.mpp)
    dust = np.clip(_smooth_noise(rng, shape, 0.12 / g.mpp) - 1.2, 0.0, None) * 0.5
    if rng.random() < 0.5:
        for _ in range(int(rng.integers(1, 7))):
            a = rng.uniform(0, 2 * math.pi)
            rr = rng.uniform(0.3, 0.85) * g.radius_px
            cyt *= 1.0 - 0.75 * _disc_alpha(
                g, rr * math.cos(a), rr * math.sin(a), rng.uniform(0.3, 0.8) / g.mpp
            )
    cyt_od = (
        cyt[..., None] * stain.od["monocyte_cytoplasm"] + dust[..., None] * stain.od["neutrophil_granule"]
    )
    return d_nuc, chromatin, stain.od["monocyte_nucleus"], cyt_od


def _render_blast(rng: np.random.Generator, g: _Grid, stain: _Stain, shape: tuple[int, int]) -> _Look:
    d_nuc, (cx, cy, rn) = _round_nucleus(rng, g, rng.uniform(0.74, 0.93), 0.6, 0.03)
    if rng.random() < 0.15:  # a cleft, as in monoblasts
        phi = rng.uniform(0, 2 * math.pi)
        cleft = np.hypot(g.dx - (cx + 1.05 * rn * math.cos(phi)), g.dy - (cy + 1.05 * rn * math.sin(phi)))
        d_nuc = np.maximum(d_nuc, 0.3 * rn - cleft)
    # Fine, evenly dispersed chromatin, lighter than a lymphocyte's, with 1-3 pale nucleoli.
    chromatin = (
        0.78 + 0.06 * _smooth_noise(rng, shape, 0.18 / g.mpp) + 0.05 * _smooth_noise(rng, shape, 0.6 / g.mpp)
    )
    for _ in range(int(rng.integers(1, 4))):
        a, rr = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.55) * rn
        nr = rng.uniform(0.6, 1.2) / g.mpp
        ex, ey = g.dx - (cx + rr * math.cos(a)), g.dy - (cy + rr * math.sin(a))
        # Soft-edged, slightly oval pale body with a thin darker chromatin ring around it.
        q = np.hypot(ex, ey * rng.uniform(0.75, 1.0)) / nr
        nucleolus = np.exp(-(q**4))
        ring = np.exp(-(((q - 1.15) / 0.25) ** 2))
        chromatin = chromatin * (1.0 - rng.uniform(0.25, 0.4) * nucleolus) + 0.1 * ring
    edge = np.exp(np.minimum(g.d_cell, 0.0) * (g.mpp / 0.5))
    cyt = (1.0 + 0.08 * _smooth_noise(rng, shape, 1.0 / g.mpp)) * (1.0 + 0.4 * edge)
    cyt_od = cyt[..., None] * stain.od["blast_cytoplasm"]
    if rng.random() < 0.3:  # a few azurophilic granules
        dots = np.clip(_smooth_noise(rng, shape, 0.12 / g.mpp) - 2.2, 0.0, None)
        cyt_od = cyt_od + dots[..., None] * stain.od["auer_rod"]
    if rng.random() < 0.08:  # an Auer rod
        a, rr = rng.uniform(0, 2 * math.pi), 0.75 * g.radius_px
        px, py = rr * math.cos(a), rr * math.sin(a)
        b = a + math.pi / 2 + rng.normal(0, 0.3)
        half = rng.uniform(1.0, 2.0) / g.mpp
        rod = _segment_distance(
            g.dx,
            g.dy,
            (px - half * math.cos(b), py - half * math.sin(b)),
            (px + half * math.cos(b), py + half * math.sin(b)),
            0.15 / g.mpp,
        )
        cyt_od = cyt_od + np.clip(0.5 - rod, 0.0, 1.0)[..., None] * stain.od["auer_rod"] * 1.5
    return d_nuc, chromatin, stain.od["blast_nucleus"], cyt_od


def _nucleoli(
    rng: np.random.Generator,
    g: _Grid,
    chromatin: np.ndarray,
    centre: tuple[float, float, float],
    count: int,
    size_um: tuple[float, float],
    paleness: tuple[float, float],
) -> np.ndarray:
    """Soft pale nucleoli, each with a thin darker chromatin ring, inside a nucleus (cx, cy, rn)."""
    cx, cy, rn = centre
    for _ in range(count):
        a, rr = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.55) * rn
        nr = rng.uniform(*size_um) / g.mpp
        ex, ey = g.dx - (cx + rr * math.cos(a)), g.dy - (cy + rr * math.sin(a))
        q = np.hypot(ex, ey * rng.uniform(0.75, 1.0)) / nr
        ring = np.exp(-(((q - 1.15) / 0.25) ** 2))
        chromatin = chromatin * (1.0 - rng.uniform(*paleness) * np.exp(-(q**4))) + 0.1 * ring
    return chromatin


def _render_blast_l1(rng: np.random.Generator, g: _Grid, stain: _Stain, shape: tuple[int, int]) -> _Look:
    """A small lymphoblast (FAB L1): a dense, dark, lymphocyte-like cell, but with homogeneous chromatin,
    a rim of cytoplasm and a size of 1.5-2 red cells; nucleoli absent or faint."""
    d_nuc, centre = _round_nucleus(rng, g, rng.uniform(0.8, 0.93), 0.4, 0.03)
    # Evenly dense: darker than a myeloblast's, without a lymphocyte's coarse clumps.
    chromatin = (
        rng.uniform(0.9, 1.05)
        + 0.04 * _smooth_noise(rng, shape, 0.15 / g.mpp)
        + 0.03 * _smooth_noise(rng, shape, 0.5 / g.mpp)
    )
    chromatin = _nucleoli(rng, g, chromatin, centre, int(rng.integers(0, 2)), (0.4, 0.8), (0.08, 0.2))
    # The nucleus colour lies between a lymphocyte's and a myeloblast's.
    t = rng.uniform(0.2, 0.8)
    nuc_vec = t * stain.od["lymphocyte_nucleus"] + (1.0 - t) * stain.od["blast_nucleus"]
    edge = np.exp(np.minimum(g.d_cell, 0.0) * (g.mpp / 0.5))
    cyt = (1.0 + 0.06 * _smooth_noise(rng, shape, 1.0 / g.mpp)) * (1.0 + 0.5 * edge)
    return d_nuc, chromatin, nuc_vec, cyt[..., None] * stain.od["blast_cytoplasm"]


def _render_blast_l2(rng: np.random.Generator, g: _Grid, stain: _Stain, shape: tuple[int, int]) -> _Look:
    """A large, heterogeneous lymphoblast (FAB L2): irregular, often cleft nucleus, uneven chromatin,
    one or more prominent nucleoli, a variable rim of cytoplasm."""
    d_nuc, (cx, cy, rn) = _round_nucleus(rng, g, rng.uniform(0.62, 0.85), 0.7, 0.08)
    if rng.random() < 0.5:  # a cleft or indentation
        phi = rng.uniform(0, 2 * math.pi)
        cleft = np.hypot(g.dx - (cx + 1.05 * rn * math.cos(phi)), g.dy - (cy + 1.05 * rn * math.sin(phi)))
        d_nuc = np.maximum(d_nuc, rng.uniform(0.2, 0.4) * rn - cleft)
    chromatin = (
        0.82 + 0.12 * _smooth_noise(rng, shape, 0.35 / g.mpp) + 0.05 * _smooth_noise(rng, shape, 0.15 / g.mpp)
    )
    chromatin = _nucleoli(rng, g, chromatin, (cx, cy, rn), int(rng.integers(1, 4)), (0.7, 1.4), (0.3, 0.5))
    edge = np.exp(np.minimum(g.d_cell, 0.0) * (g.mpp / 0.5))
    cyt = (1.0 + 0.1 * _smooth_noise(rng, shape, 0.9 / g.mpp)) * (1.0 + 0.4 * edge)
    return d_nuc, chromatin, stain.od["blast_nucleus"], cyt[..., None] * stain.od["blast_cytoplasm"]


def _render_monoblast(rng: np.random.Generator, g: _Grid, stain: _Stain, shape: tuple[int, int]) -> _Look:
    """A monoblast: large, round or gently folded nucleus of fine lacy chromatin with 1-2 prominent
    nucleoli, in abundant grey-blue cytoplasm."""
    d_nuc, (cx, cy, rn) = _round_nucleus(rng, g, rng.uniform(0.5, 0.7), 0.6, 0.05)
    if rng.random() < 0.4:  # a fold
        phi = rng.uniform(0, 2 * math.pi)
        fold = np.hypot(g.dx - (cx + 1.1 * rn * math.cos(phi)), g.dy - (cy + 1.1 * rn * math.sin(phi)))
        d_nuc = np.maximum(d_nuc, 0.35 * rn - fold)
    lace = np.exp(-(_smooth_noise(rng, shape, 0.25 / g.mpp) ** 2) / 0.5)
    chromatin = 0.72 + 0.12 * lace + 0.04 * _smooth_noise(rng, shape, 0.12 / g.mpp)
    chromatin = _nucleoli(rng, g, chromatin, (cx, cy, rn), int(rng.integers(1, 3)), (0.7, 1.3), (0.3, 0.45))
    cyt = 1.0 + 0.1 * _smooth_noise(rng, shape, 0.8 / g.mpp)
    t = rng.uniform(0.3, 0.7)
    cyt_vec = t * stain.od["monocyte_cytoplasm"] + (1.0 - t) * stain.od["blast_cytoplasm"]
    return d_nuc, chromatin, stain.od["blast_nucleus"], cyt[..., None] * cyt_vec


def _render_large_lymphocyte(
    rng: np.random.Generator, g: _Grid, stain: _Stain, shape: tuple[int, int]
) -> _Look:
    """A large or reactive lymphocyte: more, often bluer cytoplasm that the red cells indent, and the
    clumped chromatin of a lymphocyte, no nucleoli: the normal cell most often taken for a blast."""
    d_nuc, _ = _round_nucleus(rng, g, rng.uniform(0.4, 0.65), 0.7, 0.04)
    clumps = _smooth_noise(rng, shape, 0.45 / g.mpp)
    chromatin = 1.0 + 0.22 * np.clip(clumps, -1.2, 1.5) + 0.08 * _smooth_noise(rng, shape, 0.15 / g.mpp)
    edge = np.exp(np.minimum(g.d_cell, 0.0) * (g.mpp / 0.8))
    # Reactive cells darken towards the membrane ("skirt"), resting large ones stay pale.
    skirt = rng.uniform(0.3, 1.2)
    cyt = (0.8 + 0.08 * _smooth_noise(rng, shape, 1.0 / g.mpp)) * (1.0 + skirt * edge)
    return d_nuc, chromatin, stain.od["lymphocyte_nucleus"], cyt[..., None] * stain.od["lymphocyte_cytoplasm"]


def _render_plasma_cell(rng: np.random.Generator, g: _Grid, stain: _Stain, shape: tuple[int, int]) -> _Look:
    """A plasma cell: small eccentric round nucleus with coarse "clock-face" chromatin, deep blue
    cytoplasm with a pale zone (the Golgi) beside the nucleus."""
    d_nuc, (cx, cy, rn) = _round_nucleus(rng, g, rng.uniform(0.3, 0.45), 1.0, 0.03)
    clumps = np.clip(_smooth_noise(rng, shape, 0.35 / g.mpp), -1.0, 1.8)
    chromatin = 1.05 + 0.3 * clumps
    # The Golgi zone sits beside the nucleus, towards the cell centre.
    golgi = _disc_alpha(g, 0.3 * cx, 0.3 * cy, 0.9 * rn)
    cyt = (1.35 + 0.1 * _smooth_noise(rng, shape, 0.8 / g.mpp)) * (1.0 - 0.45 * golgi)
    return d_nuc, chromatin, stain.od["lymphocyte_nucleus"], cyt[..., None] * stain.od["lymphocyte_cytoplasm"]


def _render_large_granular_lymphocyte(
    rng: np.random.Generator, g: _Grid, stain: _Stain, shape: tuple[int, int]
) -> _Look:
    """A large granular lymphocyte: a lymphocyte's clumped round nucleus, often eccentric, in abundant
    pale cytoplasm holding a few coarse red-purple (azurophilic) granules."""
    d_nuc, _ = _round_nucleus(rng, g, rng.uniform(0.35, 0.55), 0.9, 0.04)
    clumps = _smooth_noise(rng, shape, 0.45 / g.mpp)
    chromatin = 1.0 + 0.22 * np.clip(clumps, -1.2, 1.5) + 0.08 * _smooth_noise(rng, shape, 0.15 / g.mpp)
    cyt = 0.7 + 0.08 * _smooth_noise(rng, shape, 1.0 / g.mpp)
    cyt_od = cyt[..., None] * stain.od["lymphocyte_cytoplasm"]
    for _ in range(int(rng.integers(3, 12))):
        a, rr = rng.uniform(0, 2 * math.pi), rng.uniform(0.3, 0.85) * g.radius_px
        grain = _disc_alpha(g, rr * math.cos(a), rr * math.sin(a), rng.uniform(0.2, 0.4) / g.mpp)
        cyt_od = cyt_od + grain[..., None] * stain.od["neutrophil_granule"] * rng.uniform(1.0, 2.0)
    return d_nuc, chromatin, stain.od["lymphocyte_nucleus"], cyt_od


_RENDERERS: Mapping[str, Callable[[np.random.Generator, _Grid, _Stain, tuple[int, int]], _Look]] = {
    "neutrophil": _render_neutrophil,
    "lymphocyte": _render_lymphocyte,
    "monocyte": _render_monocyte,
    "eosinophil": _render_eosinophil,
    "blast": _render_blast,
    "blast_l1": _render_blast_l1,
    "blast_l2": _render_blast_l2,
    "monoblast": _render_monoblast,
    "large_lymphocyte": _render_large_lymphocyte,
    "plasma_cell": _render_plasma_cell,
    "large_granular_lymphocyte": _render_large_granular_lymphocyte,
}


def _cytoplasm_tints(rng: np.random.Generator, n: int) -> list[np.ndarray | None]:
    """Per white cell of a wide field: None (the stain's own cytoplasm), or, for three cells in five,
    per-channel gains on the cytoplasm's optical density that turn it beige, grey, pink or blue, paler
    or deeper. Real cytoplasm ranges that widely between stains, lamps and cameras (a yellow-lit
    neutrophil's reads beige-brown); the membrane, not the cytoplasm's colour, is where a cell ends."""
    out: list[np.ndarray | None] = []
    for _ in range(n):
        gains = np.exp(rng.normal(0.0, 0.45, 3)) * rng.uniform(0.6, 1.4)
        out.append(gains.astype(np.float32) if rng.random() < 0.6 else None)
    return out


def _mixed_colours(rng: np.random.Generator, stain: _Stain) -> _Stain:
    """The stain with one random mix of the mononuclear cells' nucleus colours standing for all three,
    and one of their cytoplasm colours for all three (a cell's own colours, whatever its kind)."""
    od = dict(stain.od)
    for part in ("nucleus", "cytoplasm"):
        names = [f"{kind}_{part}" for kind in ("lymphocyte", "monocyte", "blast")]
        weights = rng.dirichlet(np.ones(len(names)))
        vec = sum(w * stain.od[n] for w, n in zip(weights, names, strict=True)).astype(np.float32)
        od.update({n: vec for n in names})
    return _Stain(od, stain.light, stain.plasma)


def _paint_white_cell(
    od: np.ndarray,
    classes: np.ndarray,
    nuclei: np.ndarray,
    instances: np.ndarray,
    plan: _WhiteCellPlan,
    cell_id: int,
    rng: np.random.Generator,
    mpp: float,
    stain: _Stain,
    cytoplasm_tint: np.ndarray | None = None,
) -> tuple[int, int, int, int]:
    h, w = classes.shape
    cx, cy = plan.x_um / mpp, plan.y_um / mpp
    outline = plan.outline.scaled(1.0 / mpp)
    box = _box(cx, cy, outline.bound + 2, h, w)
    assert box is not None  # placement keeps every white cell inside the field
    y0, y1, x0, x1 = box
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    d_cell = _star_distance(dx, dy, 0.0, 0.0, outline)
    grid = _Grid(dx, dy, d_cell, outline.radius, mpp)
    shape = d_cell.shape
    if plan.mixed_colours:
        stain = _mixed_colours(rng, stain)
    d_nuc, chromatin, nuc_vec, cyt_od = _RENDERERS[plan.look or plan.kind](rng, grid, stain, shape)
    if cytoplasm_tint is not None:
        cyt_od = cyt_od * cytoplasm_tint
    # A rough nuclear edge, and the nucleus kept a little inside the membrane.
    d_nuc = d_nuc + (0.12 / mpp) * _smooth_noise(rng, shape, 0.5 / mpp)
    d_nuc = np.maximum(d_nuc, d_cell + max(0.25 / mpp, 0.75))
    nuc_mask = d_nuc < 0
    cell_mask = d_cell < 0
    # Chromatin condenses under the nuclear membrane, so nuclei read darker at their rim.
    inner = cv2.distanceTransform(nuc_mask.astype(np.uint8), cv2.DIST_L2, 3)
    chromatin = np.clip(chromatin, 0.15, None) * (1.0 + 0.3 * np.exp(-inner * (mpp / 0.3)))
    a_nuc = np.clip(0.5 - d_nuc, 0.0, 1.0)[..., None]
    a_cell = np.clip(0.5 - d_cell, 0.0, 1.0)[..., None]
    density = rng.uniform(0.9, 1.1)
    cell_od = (cyt_od * (1.0 - a_nuc) + chromatin[..., None] * nuc_vec * a_nuc) * density
    region = od[y0:y1, x0:x1]
    keep = a_cell * (1.0 - _SHOW_THROUGH * (1.0 - a_nuc))
    region *= 1.0 - keep
    region += a_cell * cell_od
    instances[y0:y1, x0:x1][cell_mask] = cell_id
    classes[y0:y1, x0:x1][cell_mask] = 2 if plan.is_blast else 1
    nuclei[y0:y1, x0:x1][cell_mask] = nuc_mask[cell_mask]
    return box


def _collect_cells(
    plans: list[_WhiteCellPlan],
    boxes: list[tuple[int, int, int, int]],
    instances: np.ndarray,
) -> tuple[tuple[SynthCell, ...], np.ndarray]:
    counts = np.bincount(instances.ravel(), minlength=len(plans) + 1)
    lookup = np.zeros(len(plans) + 1, np.int32)
    cells = []
    for old_id, (plan, (y0, y1, x0, x1)) in enumerate(zip(plans, boxes, strict=True), start=1):
        if counts[old_id] == 0:
            continue  # fully hidden: placement should prevent it, but the truth must not list it
        new_id = len(cells) + 1
        lookup[old_id] = new_id
        ys, xs = np.nonzero(instances[y0:y1, x0:x1] == old_id)
        centroid = (float(xs.mean() + x0), float(ys.mean() + y0))
        cells.append(SynthCell(new_id, plan.kind, plan.is_blast, centroid, plan.look))
    if len(cells) < len(plans):
        instances = lookup[instances]
    return tuple(cells), instances


def _draw_precipitate(od: np.ndarray, rng: np.random.Generator, mpp: float, stain: _Stain) -> None:
    """Dye precipitate: tiny dark specks lying on top of everything, cells included."""
    h, w = od.shape[:2]
    n = int(rng.poisson(h * w * mpp * mpp / 2500.0))
    for _ in range(n):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        radius = max(rng.uniform(0.15, 0.45) / mpp, 0.5)
        box = _box(cx, cy, radius + 2, h, w)
        if box is None:
            continue
        y0, y1, x0, x1 = box
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
        alpha = np.clip(radius + 0.5 - np.hypot(dx, dy), 0.0, 1.0)
        od[y0:y1, x0:x1] += (alpha * rng.uniform(0.6, 1.4))[..., None] * stain.od["precipitate"]


def _illumination(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    # Built on a coarse grid and upsampled: illumination varies over hundreds of pixels, not one.
    gh, gw = max(2, min(h, 64)), max(2, min(w, 64))
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    yy, xx = yy / (gh - 1) - 0.5, xx / (gw - 1) - 0.5
    vx, vy = rng.uniform(-0.2, 0.2, 2)
    vignette = rng.uniform(0.0, 0.25) * ((xx - vx) ** 2 + (yy - vy) ** 2)
    gx, gy = rng.normal(0.0, 0.05, 2)
    coarse = 1.0 - vignette + gx * xx + gy * yy
    blotches = cv2.resize(
        rng.normal(0.0, 0.02, (4, 4)).astype(np.float32), (gw, gh), interpolation=cv2.INTER_CUBIC
    )
    coarse = (coarse + blotches).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)


def _expose(
    od: np.ndarray, rng: np.random.Generator, stain: _Stain, mpp: float, artefacts: bool, gamma: float = 1.0
) -> np.ndarray:
    h, w = od.shape[:2]
    np.negative(od, out=od)
    image = np.exp(od, out=od)
    image *= 255.0 * stain.light
    if artefacts:
        image *= _illumination(rng, h, w)[..., None]
        sigma = rng.uniform(0.04, 0.22) / mpp  # slight defocus, in microns
        if sigma > 0.3:
            image = cv2.GaussianBlur(image, (0, 0), sigma)
        read, shot = rng.uniform(0.8, 3.0), rng.uniform(0.0, 0.35)
        noise = rng.standard_normal(image.shape, dtype=np.float32)
        noise *= read + shot * np.sqrt(np.maximum(image, 0.0))
        image += noise
        if gamma != 1.0:  # the camera's tone curve
            np.clip(image, 0.0, 255.0, out=image)
            image = (255.0 * (image / 255.0) ** gamma).astype(np.float32)
    image += 0.5
    np.clip(image, 0.0, 255.0, out=image)
    image = image.astype(np.uint8)
    if artefacts:
        quality = int(rng.integers(60, 96))
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
        )
        if ok:
            image = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return image
