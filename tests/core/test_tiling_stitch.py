from __future__ import annotations

import numpy as np
import pytest

from blastq.core.segment.stitch import Stitcher, blend_window, logits_to_probabilities
from blastq.core.segment.tiling import is_empty_tile, pad_to_tiles, tile_grid


@pytest.mark.parametrize(
    "h,w,tile,overlap", [(256, 256, 256, 64), (1000, 700, 256, 64), (100, 300, 128, 32), (513, 512, 256, 0)]
)
def test_tiles_cover_every_pixel_and_stay_inside(h, w, tile, overlap):
    tiles = tile_grid(h, w, tile, overlap)
    cover = np.zeros((max(h, tile), max(w, tile)), int)
    for t in tiles:
        assert t.y0 + t.size <= max(h, tile) and t.x0 + t.size <= max(w, tile)
        cover[t.slices] += 1
    assert cover.min() >= 1


def test_neighbouring_tiles_overlap_at_least_the_overlap():
    tiles = tile_grid(1000, 1000, 256, 64)
    xs = sorted({t.x0 for t in tiles})
    assert all(b - a <= 256 - 64 for a, b in zip(xs, xs[1:], strict=False))


def test_bad_tiling_parameters_are_refused():
    with pytest.raises(ValueError):
        tile_grid(100, 100, 64, 64)


def test_padding_reaches_tile_size_with_plasma():
    img = np.zeros((50, 70, 3), np.uint8)
    out = pad_to_tiles(img, 128)
    assert out.shape == (128, 128, 3) and out[100, 100, 0] == 245 and out[10, 10, 0] == 0


def test_plain_plasma_tile_is_empty_and_a_cell_is_not():
    tile = np.full((128, 128, 3), 245, np.uint8)
    assert is_empty_tile(tile)
    tile[40:80, 40:80] = (120, 60, 150)
    assert not is_empty_tile(tile)


def test_window_is_smooth_peaked_and_positive():
    w = blend_window(256)
    assert w.shape == (256, 256) and w.min() > 0
    assert w[128, 128] == pytest.approx(w.max(), rel=1e-3) and w[0, 0] < 0.01
    assert np.abs(np.diff(w, axis=0)).max() < 0.05  # no steps


def test_probabilities_sum_to_one_over_classes():
    logits = np.random.default_rng(0).normal(size=(2, 5, 8, 8)).astype(np.float32) * 10
    p = logits_to_probabilities(logits)
    assert np.allclose(p[:, :3].sum(1), 1, atol=1e-5) and (p[:, 3:] >= 0).all() and (p[:, 3:] <= 1).all()


def test_stitching_constant_tiles_gives_the_constant_without_seams():
    tiles = tile_grid(300, 300, 128, 32)
    s = Stitcher(5, 300, 300, 128)
    value = np.array([0.2, 0.3, 0.5, 0.9, 0.1], np.float32)[:, None, None]
    for t in tiles:
        s.add(t, np.broadcast_to(value, (5, 128, 128)))
    assert np.allclose(s.result(), value, atol=1e-5)


def test_skipped_tiles_become_background():
    s = Stitcher(5, 128, 128, 128)
    (t,) = tile_grid(128, 128, 128, 0)
    s.add_background(t)
    out = s.result()
    assert np.allclose(out[0], 1) and np.allclose(out[1:], 0)


def test_pixels_no_tile_covers_are_background_and_the_map_is_handed_over_once():
    s = Stitcher(5, 100, 160, 64)
    (t,) = tile_grid(64, 64, 64, 0)  # covers the top-left 64 x 64 only
    s.add(t, np.full((5, 64, 64), 0.5, np.float32))
    out = s.result()
    assert np.allclose(out[:, :64, :64], 0.5)
    assert np.allclose(out[0, 64:], 1) and np.allclose(out[1:, 64:], 0) and np.allclose(out[0, :, 64:], 1)
    with pytest.raises(RuntimeError, match="twice"):
        s.result()  # divided in place already: a second call must not divide again


def test_stained_fraction_counts_coloured_or_dark_pixels_without_uint8_wraparound():
    from blastq.core.segment.tiling import stained_fraction

    rng = np.random.default_rng(3)
    for _ in range(5):
        tile = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        wide = tile.astype(int)
        chroma, low = wide.max(axis=2) - wide.min(axis=2), wide.min(axis=2)
        assert stained_fraction(tile) == pytest.approx(np.mean((chroma > 25) | (low < 170)))
    plasma = np.full((8, 8, 3), 235, np.uint8)
    assert stained_fraction(plasma) == 0.0
    plasma[0, 0] = (240, 200, 240)  # pink: chroma 40
    plasma[0, 1] = (160, 160, 160)  # dark grey: no chroma
    assert stained_fraction(plasma) == 2 / 64
