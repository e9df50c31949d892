"""Held-out conditions: wide fields in a named stain family and magnification, run as a user would."""

from __future__ import annotations

from blastq.core.synth.field import generate_field
from blastq.trainer.heldout import FIELD_UM, HELDOUT_SEED0, condition_figures, figures_table


def test_a_condition_is_counted_against_the_fields_truth(shipped_engine):
    engine, info = shipped_engine
    f = condition_figures(engine, info, "leishman", 0.3, 1)
    size = round(FIELD_UM / 0.3)
    truth = generate_field(
        HELDOUT_SEED0,
        size,
        size,
        mpp=0.3,
        variety="wide",
        stain_family="leishman",
        blast_fraction=0.4,
        wbc_per_10k_um2=15.0,
        rbc_coverage=0.5,
        rbc_overlap=0.5,
    )
    assert f.true_cells == len(truth.cells) > 0 and f.decoys == len(truth.decoys)
    assert f.matched == f.blasts + f.normals <= min(f.found_cells, f.true_cells)
    assert f.blasts <= sum(c.is_blast for c in truth.cells)
    assert 0.0 <= f.precision <= 1.0 and 0.0 <= f.recall <= 1.0
    assert f.f1 == 2 * f.matched / (f.found_cells + f.true_cells)
    line = figures_table([("m", f)]).splitlines()[1]
    assert "leishman" in line and f"{f.blasts_called}/{f.blasts}" in line
