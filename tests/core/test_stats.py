from __future__ import annotations

import dataclasses

import pytest

from blastq.core.cells.instances import CellRecord
from blastq.core.cells.stats import (
    DEFAULT_MIN_WHITE_CELLS,
    VERDICT_FLAGGED,
    VERDICT_INSUFFICIENT,
    VERDICT_NOT_FLAGGED,
    SampleImage,
    check_sample_name,
    pooled_stats,
    sample_result,
    slide_stats,
)
from blastq.core.common.errors import InvalidConfig

BASE = CellRecord(1, "white_cell", 0, 0, 0, 0, 1, 1, 1, 0.04, 0.8, 1.0, 1, 0.04, 1.0, 0, 0, 0, 0.1)


def cells(n_white: int, n_blast: int, cell_type: str = "") -> list[CellRecord]:
    out = [dataclasses.replace(BASE, cell_id=i + 1, cell_type=cell_type) for i in range(n_white)]
    out += [
        dataclasses.replace(BASE, cell_id=n_white + i + 1, label="blast", cell_type=cell_type and "blast")
        for i in range(n_blast)
    ]
    return out


def test_blasts_are_counted_among_white_cells():
    s = slide_stats(cells(70, 30))
    assert (s.white_cells, s.blasts, s.blast_percent) == (100, 30, 30.0) and s.flagged


def test_flag_at_exactly_the_threshold():
    assert slide_stats(cells(4, 1), threshold_percent=20.0, min_white_cells=5).flagged
    assert not slide_stats(cells(5, 1), threshold_percent=20.0, min_white_cells=5).flagged


@pytest.mark.parametrize("threshold", [5.0, 50.0])
def test_threshold_is_configurable(threshold):
    assert slide_stats(cells(80, 20), threshold).flagged is (threshold <= 20.0)


def test_no_cells_is_zero_percent_and_no_verdict():
    s = slide_stats([])
    assert (s.white_cells, s.blasts, s.blast_percent, s.flagged) == (0, 0, 0.0, False)
    assert s.verdict == VERDICT_INSUFFICIENT
    assert slide_stats([], min_white_cells=0).verdict == VERDICT_INSUFFICIENT  # 0 of 0 is no verdict


@pytest.mark.parametrize("n_blast", [0, 1, 3])
def test_too_few_white_cells_give_no_verdict_either_way(n_blast):
    # One cell read "0.0% blasts" (clear); three blasts "100% FLAGGED".
    s = slide_stats(cells(1 if n_blast == 0 else 0, n_blast))
    assert s.verdict == VERDICT_INSUFFICIENT and not s.flagged
    assert s.min_white_cells == DEFAULT_MIN_WHITE_CELLS == 100
    assert "insufficient cells" in s.describe() and "%" not in s.describe()


def test_the_minimum_is_a_setting_and_counts_blasts_as_white_cells():
    assert slide_stats(cells(9, 1), min_white_cells=10).verdict == VERDICT_NOT_FLAGGED
    assert slide_stats(cells(8, 1), min_white_cells=10).verdict == VERDICT_INSUFFICIENT
    assert slide_stats(cells(5, 5), min_white_cells=10).verdict == VERDICT_FLAGGED


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


def test_a_sample_pools_the_cells_of_its_images_into_one_verdict():
    # Three fields of 40 cells each: none has a verdict alone; together 120 cells, 30 blasts.
    parts = [slide_stats(cells(30, 10, "neutrophil")) for _ in range(3)]
    assert {p.verdict for p in parts} == {VERDICT_INSUFFICIENT}
    pooled = pooled_stats(parts)
    assert (pooled.white_cells, pooled.blasts, pooled.blast_percent) == (120, 30, 25.0)
    assert pooled.verdict == VERDICT_FLAGGED and pooled.flagged
    assert pooled.differential["neutrophil"] == {"count": 90, "percent": 75.0}
    assert pooled.differential["blast"] == {"count": 30, "percent": 25.0}


def test_pooled_percentages_come_from_counts_not_from_averaging_images():
    small, big = slide_stats(cells(0, 2), min_white_cells=0), slide_stats(cells(98, 0), min_white_cells=0)
    pooled = pooled_stats([small, big])
    assert pooled.blast_percent == 2.0  # the mean of 100% and 0% would be 50%
    assert pooled.verdict == VERDICT_NOT_FLAGGED


def test_a_sample_without_enough_cells_has_no_verdict_and_order_does_not_matter():
    parts = [slide_stats(cells(20, 10)), slide_stats(cells(30, 0))]
    a, b = pooled_stats(parts), pooled_stats(parts[::-1])
    assert a == b and a.verdict == VERDICT_INSUFFICIENT and not a.flagged


def test_the_pooled_differential_needs_every_counted_image_typed():
    typed, untyped = slide_stats(cells(60, 0, "lymphocyte")), slide_stats(cells(60, 0))
    assert pooled_stats([typed, untyped]).differential == {}
    assert pooled_stats([typed, slide_stats([])]).differential["lymphocyte"]["count"] == 60


def test_a_sample_result_names_its_images_and_what_is_missing():
    images = [
        SampleImage("a.png", "a" * 64, slide_stats(cells(50, 0))),
        SampleImage("b.png", "b" * 64, slide_stats(cells(50, 0))),
    ]
    sample = sample_result("P1", images, pending=1, failed=1)
    assert sample.stats.white_cells == 100 and sample.stats.verdict == VERDICT_NOT_FLAGGED
    assert sample.describe().startswith("sample P1: 2 image(s) (1 pending, 1 failed), 100 white cells")


@pytest.mark.parametrize("name", ["", "   ", "x" * 201, "a\nb"])
def test_sample_names_must_be_printable_and_short(name):
    with pytest.raises(InvalidConfig, match="sample name"):
        check_sample_name(name)
