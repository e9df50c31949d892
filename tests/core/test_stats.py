from __future__ import annotations

import dataclasses

import pytest

from blastq.core.cells import CellRecord
from blastq.core.stats import slide_stats

BASE = CellRecord(1, "white_cell", 0, 0, 0, 0, 1, 1, 1, 0.04, 0.8, 1.0, 1, 0.04, 1.0, 0, 0, 0, 0.1)


def cells(n_white: int, n_blast: int) -> list[CellRecord]:
    out = [dataclasses.replace(BASE, cell_id=i + 1) for i in range(n_white)]
    out += [dataclasses.replace(BASE, cell_id=n_white + i + 1, label="blast") for i in range(n_blast)]
    return out


def test_blasts_are_counted_among_white_cells():
    s = slide_stats(cells(7, 3))
    assert (s.white_cells, s.blasts, s.blast_percent) == (10, 3, 30.0) and s.flagged


def test_flag_at_exactly_the_threshold():
    assert slide_stats(cells(4, 1), threshold_percent=20.0).flagged
    assert not slide_stats(cells(5, 1), threshold_percent=20.0).flagged


@pytest.mark.parametrize("threshold", [5.0, 50.0])
def test_threshold_is_configurable(threshold):
    assert slide_stats(cells(8, 2), threshold).flagged is (threshold <= 20.0)


def test_no_cells_is_zero_percent_not_flagged():
    s = slide_stats([])
    assert (s.white_cells, s.blasts, s.blast_percent, s.flagged) == (0, 0, 0.0, False)


def test_the_differential_counts_each_type_among_all_white_cells():
    typed = [dataclasses.replace(c, cell_type="neutrophil") for c in cells(6, 0)]
    typed += [
        dataclasses.replace(BASE, cell_id=10 + i, cell_type="lymphocyte", review=i == 0) for i in range(3)
    ]
    typed += [dataclasses.replace(BASE, cell_id=20, label="blast", cell_type="blast")]
    s = slide_stats(typed)
    assert s.differential["neutrophil"] == {"count": 6, "percent": 60.0}
    assert s.differential["lymphocyte"] == {"count": 3, "percent": 30.0}
    assert s.differential["blast"]["percent"] == s.blast_percent == 10.0
    assert s.differential["basophil"]["count"] == 0
    assert sum(d["count"] for d in s.differential.values()) == s.white_cells
    assert s.review_cells == 1


def test_untyped_cells_give_no_differential():
    s = slide_stats(cells(3, 1))
    assert s.differential == {} and s.review_cells == 0
