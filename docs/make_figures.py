"""Regenerate the README figures: synthetic cells beside real segmentation_wbc crops, and an overlay.

The overlay uses the shipped model, so regenerate after replacing it.

    python docs/make_figures.py [--wbc ../shared/data/segmentation_wbc]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from blastq.core.synth import generate_field

HERE = Path(__file__).parent
THUMB = 140


def _thumb(rgb: np.ndarray) -> np.ndarray:
    return cv2.resize(rgb, (THUMB, THUMB), interpolation=cv2.INTER_AREA)


def synthetic_cells(n: int) -> list[np.ndarray]:
    """Crops centred on synthetic white cells of different kinds (blasts first)."""
    crops, kinds_seen = [], set()
    for seed in range(200):
        field = generate_field(seed, 384, 384, blast_fraction=0.5)
        for cell in field.cells:
            if cell.kind in kinds_seen or len(crops) >= n:
                continue
            cx, cy = (int(v) for v in cell.centroid_xy)
            half = 60  # 24 um at 0.2 um/px: one cell and its neighbourhood
            if half <= cx < 384 - half and half <= cy < 384 - half:
                crops.append((cell.kind, field.image[cy - half : cy + half, cx - half : cx + half]))
                kinds_seen.add(cell.kind)
        if len(crops) >= n:
            break
    crops.sort(key=lambda kc: kc[0] != "blast")
    return [_thumb(c) for _, c in crops]


def wide_cells() -> list[np.ndarray]:
    """One crop per look of the wide generator: L1, L2 lymphoblasts and a monoblast, then the look-alikes
    (a large lymphocyte, a plasma cell, a large granular lymphocyte), colours mixed between mononuclear
    cells."""
    from blastq.core.synth import LOOKS

    found: dict[str, np.ndarray] = {}
    for seed in range(400):
        field = generate_field(seed, 384, 384, blast_fraction=0.5, variety="wide", wbc_per_10k_um2=20.0)
        for cell in field.cells:
            cx, cy = (int(v) for v in cell.centroid_xy)
            half = 60
            if cell.look and cell.look not in found and half <= cx < 384 - half and half <= cy < 384 - half:
                found[cell.look] = field.image[cy - half : cy + half, cx - half : cx + half]
        if len(found) == len(LOOKS):
            break
    return [_thumb(found[look]) for look in LOOKS if look in found]


def decoy_cells() -> list[np.ndarray]:
    """One crop per object of a wide field that is not a white cell (background in every mask): a
    nucleated red cell, a smudge cell, a platelet clump, stain debris; each in another stain family."""
    from blastq.core.synth import DECOY_KINDS, STAIN_FAMILIES

    found: dict[str, np.ndarray] = {}
    for seed in range(400):
        family = STAIN_FAMILIES[len(found) % len(STAIN_FAMILIES)]
        field = generate_field(
            seed, 384, 384, blast_fraction=0.5, variety="wide", wbc_per_10k_um2=2.0, stain_family=family
        )
        for decoy in field.decoys:
            cx, cy = (int(v) for v in decoy.centroid_xy)
            half = 60
            if decoy.kind not in found and half <= cx < 384 - half and half <= cy < 384 - half:
                found[decoy.kind] = field.image[cy - half : cy + half, cx - half : cx + half]
                break
        if len(found) == len(DECOY_KINDS):
            break
    return [_thumb(found[kind]) for kind in DECOY_KINDS if kind in found]


def real_cells(root: Path, numbers: list[tuple[str, int]]) -> list[np.ndarray]:
    out = []
    for ds, n in numbers:
        bgr = cv2.imread(str(root / ds / f"{n:03d}.bmp"))
        out.append(_thumb(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wbc", type=Path, default=HERE.parent.parent / "shared" / "data" / "segmentation_wbc")
    args = ap.parse_args()
    synth = synthetic_cells(5)
    wide = wide_cells()
    real = real_cells(
        args.wbc, [("dataset1", 2), ("dataset1", 7), ("dataset2", 3), ("dataset2", 8), ("dataset2", 14)]
    )
    decoys = decoy_cells()
    gap = np.full((THUMB, 6, 3), 255, np.uint8)
    rows = [np.hstack([x for im in ims for x in (im, gap)][:-1]) for ims in (synth, wide, decoys, real)]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    space = np.full((6, width, 3), 255, np.uint8)
    grid = np.vstack([x for r in rows for x in (r, space)][:-1])
    cv2.imwrite(str(HERE / "synthetic_vs_real.png"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(HERE / "example_overlay.png"), cv2.cvtColor(example_overlay(), cv2.COLOR_RGB2BGR))


def example_overlay() -> np.ndarray:
    """A synthetic smear beside the shipped model's overlay (green: white cells, red: blasts)."""
    from blastq.core.image import Slide
    from blastq.core.outputs import overlay
    from blastq.core.pipeline import process_slide
    from blastq.core.segment import load_engine

    field = generate_field(2026, 640, 640, blast_fraction=0.4, wbc_per_10k_um2=12.0)
    engine, info = load_engine()
    result = process_slide(Slide(field.image, 0.2, "user", "example", ""), engine, info)
    crop = (slice(100, 540), slice(60, 500))  # 88 um square with touching blasts, at full resolution
    both = [field.image[crop], np.full((440, 8, 3), 255, np.uint8), overlay(field.image, result.maps)[crop]]
    return np.hstack(both)


if __name__ == "__main__":
    main()
