"""Fitting a blast caller from labelled cells.csv files, held out by image."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from blastq.core.common.errors import InvalidDataset
from blastq.trainer.blastcaller import NEEDED_COLUMNS, fit_caller, read_labelled_cells

COLUMNS = ("cell_id", *NEEDED_COLUMNS, "truth")


def _write(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _lab_images(tmp_path: Path, n_images: int = 8, seed: int = 0) -> list[Path]:
    """A lab whose blasts the U-Net's share misses (share low for all) but whose blasts are large with a
    high nucleus-to-cell ratio, and whose large normal cells (monocytes) have a low one."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n_images):
        rows = []
        for k in range(30):
            kind = ("blast", "lymphocyte", "monocyte")[k % 3]
            area = {"blast": 180.0, "lymphocyte": 60.0, "monocyte": 190.0}[kind] * rng.uniform(0.85, 1.15)
            nc = {"blast": 0.8, "lymphocyte": 0.8, "monocyte": 0.45}[kind] + rng.normal(0, 0.04)
            rows.append(
                {
                    "cell_id": k + 1,
                    "blast_probability": rng.uniform(0.01, 0.3),
                    "area_um2": area,
                    "nc_ratio": nc,
                    "circularity": rng.uniform(0.8, 0.95),
                    "nucleus_area_um2": area * nc,
                    "truth": kind if k != 29 else "",  # the last cell of each image is unlabelled
                }
            )
        paths.append(_write(tmp_path / f"image{i}.cells.csv", rows))
    return paths


def test_a_caller_learns_the_labs_blasts_where_the_share_alone_misses_them(tmp_path):
    cells = read_labelled_cells(_lab_images(tmp_path))
    assert len(cells.is_blast) == 8 * 29 and cells.is_blast.sum() == 8 * 10  # unlabelled cells left out
    assert set(cells.group.tolist()) == set(range(8))
    caller = fit_caller(cells, version="lab", trained_on="test", sensitivity=0.9)
    m = caller.metrics
    assert m["held_out"].startswith("out-of-fold")
    assert m["sensitivity"] >= 0.9 and m["specificity"] >= 0.95
    # The share rule, at its own screening threshold, buys the same sensitivity with far more false blasts.
    assert m["share_rule"]["specificity"] < 0.5
    # Applied to a new image of the same lab, it calls its blasts and not its monocytes or lymphocytes.
    fresh = read_labelled_cells(_lab_images(tmp_path / "..", n_images=1, seed=99)[:1])
    called = caller.probability(fresh.features) >= caller.threshold
    assert called[fresh.is_blast].mean() >= 0.9 and called[~fresh.is_blast].mean() <= 0.1


def test_labelled_cells_that_cannot_be_read_say_where(tmp_path):
    no_truth = tmp_path / "a.csv"
    no_truth.write_text("cell_id,blast_probability\n1,0.2\n")
    with pytest.raises(InvalidDataset, match="no column area_um2.*truth"):
        read_labelled_cells([no_truth])
    bad = _write(tmp_path / "b.csv", [dict.fromkeys(COLUMNS, "x") | {"truth": "blast"}])
    with pytest.raises(InvalidDataset, match=r"b.csv:2: not a number"):
        read_labelled_cells([bad])
    empty = _write(tmp_path / "c.csv", [dict.fromkeys(COLUMNS, "1") | {"truth": ""}])
    with pytest.raises(InvalidDataset, match="no labelled cells"):
        read_labelled_cells([empty])
    binary = tmp_path / "d.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InvalidDataset, match="d.csv"):
        read_labelled_cells([binary])


def test_a_fit_needs_blasts_and_other_cells(tmp_path):
    only_blasts = _write(
        tmp_path / "a.csv", [dict.fromkeys(COLUMNS, "0.5") | {"truth": "blast"} for _ in range(5)]
    )
    with pytest.raises(InvalidDataset, match="both blasts and other cells"):
        fit_caller(read_labelled_cells([only_blasts]), version="x", trained_on="")


def test_with_one_image_the_figures_say_nothing_was_held_out(tmp_path):
    cells = read_labelled_cells(_lab_images(tmp_path, n_images=1))
    caller = fit_caller(cells, version="x", trained_on="")
    assert caller.metrics["held_out"].startswith("none")
    assert "sensitivity" not in caller.metrics
