"""The screening operating point: the sweep, the rule that chooses a threshold, and the held-out shares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blastq.trainer.operating import (
    MAX_REAL_FALSE_BLAST,
    TARGET_SENSITIVITY,
    BlastShares,
    choose,
    real_normal_shares,
    sweep,
    sweep_text,
    synthetic_shares,
)


def _shares(blasts, normals, real) -> BlastShares:
    return BlastShares({"blast:blast_l1": tuple(blasts), "normal:lymphocyte": tuple(normals)}, tuple(real))


def test_the_sweep_counts_the_share_of_each_group_called_blast():
    points = sweep(_shares([0.9, 0.6, 0.3, 0.1], [0.0, 0.2], [0.0, 0.01, 0.06]), thresholds=(0.5, 0.05))
    assert [p.synthetic_sensitivity for p in points] == [0.5, 1.0]
    assert [p.synthetic_false_blast for p in points] == [0.0, 0.5]
    assert points[1].real_false_blast == pytest.approx(1 / 3)
    assert points[1].by_group == {"blast:blast_l1": 1.0, "normal:lymphocyte": 0.5}


def test_the_highest_threshold_that_catches_the_target_share_of_blasts_is_chosen():
    blasts = np.linspace(0.05, 1.0, 100)  # 0.9 of them reach 0.145
    points = sweep(_shares(blasts, [0.0] * 50, [0.0] * 80))
    chosen = choose(points)
    assert chosen.synthetic_sensitivity >= TARGET_SENSITIVITY
    assert chosen.threshold == 0.1  # 0.15 catches 0.89 of them; 0.1 is the highest that reaches 0.9
    assert "<- chosen" in sweep_text(points, chosen).splitlines()[points.index(chosen) + 1]


def test_a_threshold_calling_too_many_real_normal_cells_blast_is_never_chosen():
    blasts = [0.08] * 95 + [0.9] * 5  # only a very low threshold would catch them
    real = [0.0] * 90 + [0.07] * 10  # ...and it calls 10% of real normal cells blast
    chosen = choose(sweep(_shares(blasts, [0.0] * 10, real)))
    assert chosen.real_false_blast <= MAX_REAL_FALSE_BLAST
    # 0.05 and below would catch them all but are over the limit; above, all catch the same 5%, and
    # the highest of those is the most specific.
    assert chosen.threshold == 0.5


def test_the_shares_come_from_held_out_fields_and_real_crops(shipped_engine, wbc_root: Path):
    engine, info = shipped_engine
    synthetic = synthetic_shares(engine, info, 1)
    assert sum(len(v) for v in synthetic.values()) >= 5
    assert all(k.split(":")[0] in ("blast", "normal") for k in synthetic)
    assert all(0.0 <= v <= 1.0 for vs in synthetic.values() for v in vs)
    test, other = real_normal_shares(engine, info, wbc_root)
    assert (len(test), len(other)) == (80, 320)  # every crop's labelled cell is found
