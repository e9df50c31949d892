from __future__ import annotations

import numpy as np
import pytest

from blastq.core.cells import extract_cells, split_instances


def disc(shape, cy, cx, r):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def probs_for(cells, shape=(200, 300), marker_r=8):
    """Probability maps for discs given as (cy, cx, r, blast_share, nucleus_r)."""
    p = np.zeros((5, *shape), np.float32)
    p[0] = 1
    for cy, cx, r, blast, nuc_r in cells:
        m = disc(shape, cy, cx, r)
        p[0][m], p[1][m], p[2][m] = 0.02, 0.98 * (1 - blast), 0.98 * blast
        p[3][disc(shape, cy, cx, nuc_r)] = 0.95
        p[4][disc(shape, cy, cx, marker_r)] = 0.95
    return p


def test_touching_cells_are_split_at_their_markers():
    p = probs_for([(100, 100, 30, 0, 15), (100, 155, 30, 0, 15)])
    inst = split_instances(p[1] + p[2] > p[0], p[4], mpp=0.2)
    assert inst.max() == 2
    assert inst[100, 90] != inst[100, 165]
    # the cut runs near the neck, midway between the centres
    assert inst[100, 120] == inst[100, 100] and inst[100, 135] == inst[100, 155]


def test_a_blob_without_marker_still_becomes_a_cell():
    p = probs_for([(100, 100, 30, 0, 15)])
    p[4] = 0
    inst = split_instances(p[1] + p[2] > p[0], p[4], mpp=0.2)
    assert inst.max() == 1


def test_specks_smaller_than_a_cell_are_dropped():
    p = probs_for([(100, 100, 30, 0, 15), (20, 250, 3, 0, 1)])
    maps = extract_cells(p, np.full((200, 300, 3), 200, np.uint8), mpp=0.2)
    assert len(maps.cells) == 1 and maps.instances[20, 250] == 0


def test_cell_label_comes_from_its_pixels_and_paints_the_class_map():
    p = probs_for([(100, 60, 30, 0.9, 20), (100, 200, 30, 0.1, 12)])
    maps = extract_cells(p, np.full((200, 300, 3), 200, np.uint8), mpp=0.2)
    by_x = sorted(maps.cells, key=lambda c: c.centroid_x)
    assert [c.label for c in by_x] == ["blast", "white_cell"]
    assert by_x[0].blast_probability == pytest.approx(0.9, abs=0.01)
    assert maps.classes[100, 60] == 2 and maps.classes[100, 200] == 1 and maps.classes[5, 5] == 0
    assert set(np.unique(maps.instances[maps.classes > 0])) == {1, 2}


def test_measurements_are_in_microns_and_consistent():
    p = probs_for([(100, 150, 30, 0, 15)])
    rgb = np.zeros((200, 300, 3), np.uint8)
    rgb[..., 2] = 180
    (cell,) = extract_cells(p, rgb, mpp=0.25).cells
    assert cell.area_px == disc((200, 300), 100, 150, 30).sum()
    assert cell.area_um2 == pytest.approx(cell.area_px * 0.0625, rel=1e-3)
    assert cell.nc_ratio == pytest.approx((15 / 30) ** 2, abs=0.03)
    assert 0.85 < cell.circularity <= 1.0
    assert (cell.bbox_x0, cell.bbox_y0, cell.bbox_x1, cell.bbox_y1) == (120, 70, 181, 131)
    assert (cell.centroid_x, cell.centroid_y) == pytest.approx((150, 100), abs=0.1)
    assert cell.mean_b == pytest.approx(180) and cell.mean_r == 0


def test_no_foreground_gives_no_cells():
    p = np.zeros((5, 50, 50), np.float32)
    p[0] = 1
    maps = extract_cells(p, np.zeros((50, 50, 3), np.uint8), mpp=0.2)
    assert maps.cells == () and maps.instances.max() == 0 and maps.classes.max() == 0
