"""The screening operating point of the per-cell blast call, chosen on data the model never trained on.

A cell is a blast when its mean blast share reaches a threshold (`core.cells.instances`, BLASTQ_BLAST_CELL_THRESHOLD).
A screening tool wants the blasts first: the threshold is the highest one at which the held-out blasts
are caught at `TARGET_SENSITIVITY`, as long as normal cells stay below the false-blast limits; the
`review` flag carries the doubt of the blasts called below even odds.

Data: blasts and their look-alikes from the wide synthetic generator (seeds from WIDE_TEST_SEED0, which no
training pool draws from), and the labelled normal white cell of every real segmentation_wbc crop (the
test split, never trained on, and the rest, reported apart). No real blast images were available.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from blastq.core.cells import CellRecord
from blastq.core.image import Slide, read_slide
from blastq.core.pipeline import PipelineConfig, process_slide
from blastq.core.segment import Engine, ModelInfo
from blastq.core.synth import generate_field
from blastq.trainer.datasets import WBC_DATASETS, read_wbc_mask, segmentation_wbc_items, wbc_split
from blastq.trainer.metrics import matched_pairs

WIDE_TEST_SEED0 = 9_100_000
WIDE_TEST_SIZE_PX = 768
THRESHOLDS = (0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05, 0.02)
TARGET_SENSITIVITY = 0.9
MAX_REAL_FALSE_BLAST = 0.02  # the target for normal white cells called blast
MAX_SYNTH_FALSE_BLAST = 0.1  # look-alikes drawn to be hard: a looser limit
# Blast shares are kept for every cell: the lowest threshold the sweep tries decides nothing here.
_KEEP_ALL = PipelineConfig(blast_cell_threshold=0.001)


@dataclass(frozen=True)
class BlastShares:
    """Mean blast shares of cells whose truth is known, by group ("blast:blast_l1", "normal:plasma_cell")."""

    synthetic: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    real_test: tuple[float, ...] = ()  # segmentation_wbc test split: normal cells, never trained on
    real_other: tuple[float, ...] = ()  # the train and validation splits: normal cells the model saw

    def synthetic_group(self, prefix: str) -> np.ndarray:
        values = [v for k, vs in self.synthetic.items() if k.startswith(prefix) for v in vs]
        return np.asarray(values, np.float64)


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    synthetic_sensitivity: float  # held-out synthetic blasts called blast
    synthetic_false_blast: float  # held-out synthetic normal cells called blast
    real_false_blast: float  # real normal cells (test split) called blast
    by_group: Mapping[str, float]  # share called blast per synthetic group


def synthetic_cells(
    engine: Engine,
    info: ModelInfo,
    seeds: Iterable[int],
    tick: Callable[[], None] | None = None,
    config: PipelineConfig = _KEEP_ALL,
) -> list[tuple[str, CellRecord, int]]:
    """(group, measured cell, field seed) of every found cell of wide synthetic fields whose truth is known:
    group "blast:<look>" or "normal:<look>"."""
    out = []
    for seed in seeds:
        truth = generate_field(
            seed, WIDE_TEST_SIZE_PX, WIDE_TEST_SIZE_PX, mpp=info.mpp, variety="wide", blast_fraction=0.4
        )
        slide = Slide(rgb=truth.image, mpp=info.mpp, mpp_source="user", name=f"wide_{seed}", sha256="")
        result = process_slide(slide, engine, info, config)
        cells = {c.cell_id: c for c in result.maps.cells}
        for predicted, true_id in matched_pairs(result.maps.instances, truth.instances):
            cell = truth.cells[true_id - 1]
            out.append(
                (f"{'blast' if cell.is_blast else 'normal'}:{cell.look or cell.kind}", cells[predicted], seed)
            )
        if tick:
            tick()
    return out


def synthetic_shares(
    engine: Engine, info: ModelInfo, n_fields: int, tick: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Blast shares of the matched cells of held-out wide synthetic fields, by truth and look."""
    shares: dict[str, list[float]] = defaultdict(list)
    for group, cell, _ in synthetic_cells(
        engine, info, range(WIDE_TEST_SEED0, WIDE_TEST_SEED0 + n_fields), tick
    ):
        shares[group].append(cell.blast_probability)
    return shares


def real_normal_cells(
    engine: Engine,
    info: ModelInfo,
    wbc_root: Path,
    tick: Callable[[], None] | None = None,
    config: PipelineConfig = _KEEP_ALL,
    datasets: Sequence[str] = WBC_DATASETS,
) -> list[tuple[str, CellRecord, str]]:
    """(split, measured cell, "dataset/number") of the labelled white cell of each segmentation_wbc crop
    of `datasets` (the found cell overlapping it most; crops where none was found are left out)."""
    out = []
    for item in segmentation_wbc_items(wbc_root, datasets=tuple(datasets)):
        slide = read_slide(item.image_path, mpp=item.mpp)
        result = process_slide(slide, engine, info, config)
        truth = read_wbc_mask(item.mask_path) > 0  # the labelled white cell
        overlaps = [
            (int(np.count_nonzero((result.maps.instances == c.cell_id) & truth)), c)
            for c in result.maps.cells
        ]
        found = [o for o in overlaps if o[0] > 0]
        if found:
            cell = max(found, key=lambda o: o[0])[1]
            out.append((wbc_split(item.number), cell, f"{item.dataset}/{item.number}"))
        if tick:
            tick()
    return out


def real_normal_shares(
    engine: Engine, info: ModelInfo, wbc_root: Path, tick: Callable[[], None] | None = None
) -> tuple[list[float], list[float]]:
    """The blast share of the labelled white cell of each segmentation_wbc crop: (test split, the rest)."""
    cells = real_normal_cells(engine, info, wbc_root, tick)
    test = [c.blast_probability for split, c, _ in cells if split == "test"]
    other = [c.blast_probability for split, c, _ in cells if split != "test"]
    return test, other


def sweep(shares: BlastShares, thresholds: Iterable[float] = THRESHOLDS) -> list[OperatingPoint]:
    """The share of each group called blast at each threshold."""
    blasts, normals = shares.synthetic_group("blast:"), shares.synthetic_group("normal:")
    real = np.asarray(shares.real_test, np.float64)
    points = []
    for t in thresholds:
        points.append(
            OperatingPoint(
                threshold=t,
                synthetic_sensitivity=_called(blasts, t),
                synthetic_false_blast=_called(normals, t),
                real_false_blast=_called(real, t),
                by_group={k: _called(np.asarray(v), t) for k, v in sorted(shares.synthetic.items())},
            )
        )
    return points


def choose(points: Sequence[OperatingPoint]) -> OperatingPoint:
    """The highest threshold reaching TARGET_SENSITIVITY within the false-blast limits; else, within the
    limits, the most sensitive one; else even odds (0.5)."""
    allowed = [
        p
        for p in points
        if p.real_false_blast <= MAX_REAL_FALSE_BLAST and p.synthetic_false_blast <= MAX_SYNTH_FALSE_BLAST
    ]
    sensitive = [p for p in allowed if p.synthetic_sensitivity >= TARGET_SENSITIVITY]
    if sensitive:
        return max(sensitive, key=lambda p: p.threshold)
    if allowed:
        return max(allowed, key=lambda p: (p.synthetic_sensitivity, p.threshold))
    return next(p for p in points if p.threshold == 0.5)


def sweep_text(points: Sequence[OperatingPoint], chosen: OperatingPoint) -> str:
    """The sweep as a fixed-width table, the chosen row marked."""
    groups = list(points[0].by_group) if points else []
    head = "threshold  sensitivity  false blast (synthetic)  false blast (real test)  " + "  ".join(groups)
    rows = [head]
    for p in points:
        mark = " <- chosen" if p is chosen else ""
        cells = "  ".join(f"{p.by_group[g]:>{len(g)}.2f}" for g in groups)
        rows.append(
            f"{p.threshold:>9.2f}  {p.synthetic_sensitivity:>11.3f}  {p.synthetic_false_blast:>23.3f}  "
            f"{p.real_false_blast:>23.3f}  {cells}{mark}"
        )
    return "\n".join(rows)


def _called(values: np.ndarray, threshold: float) -> float:
    return float(np.mean(values >= threshold)) if values.size else float("nan")
