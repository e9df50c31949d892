from __future__ import annotations

import numpy as np
import pytest
import torch

from blastq.core.segment.stitch import Stitcher, logits_to_probabilities
from blastq.core.segment.tiling import (
    Tile,
    axis_layout,
    fit_to_stain,
    is_empty_tile,
    iter_batches,
    needed_blocks,
    pad_to_stride,
    plan_tiles,
)
from blastq.core.segment.unet import UNet, receptive_radius, to_model_input


@pytest.mark.parametrize("length", [8, 64, 256, 1024, 1032, 1920, 2048, 3000 // 8 * 8, 4096, 20000])
@pytest.mark.parametrize(
    "tile_px,overlap_px,stride", [(1024, 128, 8), (256, 128, 8), (128, 32, 32), (96, 52, 4)]
)
def test_axis_layout_owns_every_pixel_once_with_the_margin_from_every_cut(
    length, tile_px, overlap_px, stride
):
    length = -(-length // stride) * stride
    layout = axis_layout(length, tile_px, overlap_px, stride)
    owned = np.zeros(length, int)
    sizes = {size for _, size, _, _ in layout}
    assert len(sizes) == 1 and sizes.pop() <= max(tile_px, length if length <= tile_px else 0)
    for i, (start, size, own0, own1) in enumerate(layout):
        assert start % stride == 0 and size % stride == 0 and start >= 0 and start + size <= length
        assert start <= own0 < own1 <= start + size
        owned[own0:own1] += 1
        if i > 0:  # a cut edge: at least half the overlap of context on the inside
            assert own0 - start >= overlap_px // 2
        if i < len(layout) - 1:
            assert start + size - own1 >= overlap_px // 2
    assert (owned == 1).all()
    if length > tile_px:  # as few tiles as the tile size allows, each no bigger than it needs
        assert len(layout) <= -(-(length - overlap_px) // (tile_px - overlap_px)) + 1


def test_larger_tiles_compute_fewer_pixels_for_the_same_output():
    def computed(tile_px):
        return sum(size for _, size, _, _ in axis_layout(4096, tile_px, 128, 8)) ** 2 / 4096**2

    assert computed(256) > 3.5 and computed(1024) < 1.3  # each output pixel computed 3.75x vs 1.28x


def test_bad_tiling_parameters_are_refused():
    with pytest.raises(ValueError):
        plan_tiles(128, 128, 64, 64, 8)
    with pytest.raises(ValueError, match="multiple"):
        plan_tiles(128, 128, 100, 10, 8)
    with pytest.raises(ValueError, match="multiple of the stride"):
        axis_layout(100, 64, 16, 8)


def test_padding_reaches_the_stride_and_the_smallest_side_with_plasma():
    out = pad_to_stride(np.zeros((50, 70, 3), np.uint8), 32, min_side=0)
    assert out.shape == (64, 96, 3) and out[60, 90, 0] == 245 and out[10, 10, 0] == 0
    assert pad_to_stride(np.zeros((120, 300, 3), np.uint8), 8).shape == (256, 304, 3)  # a small crop: 256
    img = np.zeros((256, 264, 3), np.uint8)
    assert pad_to_stride(img, 8) is img


def test_plain_plasma_tile_is_empty_and_a_cell_is_not():
    tile = np.full((128, 128, 3), 245, np.uint8)
    assert is_empty_tile(tile)
    tile[40:80, 40:80] = (120, 60, 150)
    assert not is_empty_tile(tile)


@pytest.mark.parametrize("depth", [2, 3])
def test_receptive_radius_is_where_a_pixel_stops_mattering(depth):
    """Changing one input pixel r + 1 away never changes an output pixel; r away it does (some phase, some
    sign: a max-pool passes only the larger of its inputs)."""
    r, stride = receptive_radius(depth), 2 ** (depth - 1)
    side = 8 * stride * 4 + 2 * r
    side -= side % stride
    changed_at_r = False
    for seed in range(3):
        torch.manual_seed(seed)
        model = UNet(depth=depth, width=4).eval()
        x = torch.rand(1, 3, side, side)
        with torch.no_grad():
            base = model(x)
        centre = side // 2 // stride * stride
        for phase in range(stride):
            p = centre + phase
            for d, q, delta in ((d, p + s * d, v) for d in (r, r + 1) for s in (-1, 1) for v in (5.0, -5.0)):
                y = x.clone()
                y[0, :, p, q] += delta  # one pixel d columns away, on the same row
                with torch.no_grad():
                    moved = (model(y) - base)[0, :, p, p].abs().max().item()
                if d > r:
                    assert moved == 0.0, f"a pixel {d} away changed the output (phase {phase})"
                changed_at_r = changed_at_r or moved > 0
    assert changed_at_r


class TorchCpuEngine:
    """A tiny random U-Net as an engine (fp32 torch on CPU)."""

    name = "tiny"

    def __init__(self, depth=3):
        torch.manual_seed(0)
        self.model = UNet(depth=depth, width=4).eval()
        with torch.no_grad():  # larger weights: a random net's output then depends on its input visibly
            for p in self.model.parameters():
                p.mul_(2.0)
        self.stride = self.model.stride

    def infer(self, batch):
        with torch.no_grad():
            return self.model(torch.from_numpy(batch)).numpy()


def stitched(engine, work, tile_px, overlap_px, shrink=False):
    padded = pad_to_stride(work, engine.stride)
    stitcher = Stitcher(5, *padded.shape[:2])
    tiles = plan_tiles(*padded.shape[:2], tile_px, overlap_px, engine.stride)
    if shrink:
        needed = needed_blocks(padded, overlap_px // 2)
        tiles = [t for t in (fit_to_stain(t, needed, overlap_px // 2, engine.stride) for t in tiles) if t]
    for batch in iter_batches(tiles, 3):
        logits = engine.infer(to_model_input(np.stack([padded[t.slices] for t in batch])))
        for t, y in zip(batch, logits, strict=True):
            stitcher.add_logits(t, y)
    return stitcher.result(), padded, tiles


def test_tiles_overlapping_by_twice_the_context_give_the_whole_image_answer():
    engine = TorchCpuEngine(depth=3)
    work = np.random.default_rng(1).integers(0, 256, (300, 260, 3), dtype=np.uint8)
    r = receptive_radius(3)
    got, padded, tiles = stitched(engine, work, 96, 2 * r)
    whole = logits_to_probabilities(engine.infer(to_model_input(padded[None])))[0]
    assert len(tiles) > 20 and got.shape == whole.shape
    # The same up to float summation order (convolution kernels differ with the input's shape).
    assert np.abs(got - whole).max() < 1e-3
    short, _, _ = stitched(engine, work, 96, 2 * r - 8)  # 4 px less context than the model sees: seams
    assert np.abs(short - whole).max() > 0.1


def test_plasma_far_from_stain_is_background_and_tiles_shrink_to_their_stain():
    engine = TorchCpuEngine(depth=3)
    work = np.full((512, 512, 3), 245, np.uint8)
    work[300:340, 60:110] = (120, 60, 150)  # one stained patch, bottom left
    r = receptive_radius(3)
    full, padded, _ = stitched(engine, work, 256, 2 * r)
    got, _, run = stitched(engine, work, 256, 2 * r, shrink=True)
    tiles = plan_tiles(512, 512, 256, 2 * r, engine.stride)
    assert len(run) < len(tiles)  # tiles of plain plasma did not run
    assert any(t.height * t.width < 256 * 256 for t in run)  # and the one with the patch ran cut down
    near, far = np.zeros((512, 512), bool), np.ones((512, 512), bool)
    near[300 - r : 340 + r, 60 - r : 110 + r] = True
    reach = r + 2 * 16  # the stain is looked for in 16 px blocks: up to a block more on either side
    far[300 - reach : 340 + reach, 60 - reach : 110 + reach] = False
    assert np.abs(got - full)[:, near].max() < 1e-3  # near the stain: the model's own answer
    assert (got[0, far] == 1).all() and (got[1:, far] == 0).all()  # far from it: background


def test_a_tile_with_no_stain_near_its_own_pixels_is_not_needed():
    work = np.full((256, 256, 3), 245, np.uint8)
    needed = needed_blocks(work, 32)
    assert not needed.any()
    assert fit_to_stain(Tile(0, 0, 256, 256, (0, 256, 0, 256)), needed, 32, 8) is None


def test_probabilities_sum_to_one_over_classes():
    logits = np.random.default_rng(0).normal(size=(2, 5, 8, 8)).astype(np.float32) * 10
    p = logits_to_probabilities(logits)
    assert np.allclose(p[:, :3].sum(1), 1, atol=1e-5) and (p[:, 3:] >= 0).all() and (p[:, 3:] <= 1).all()


def test_stitcher_keeps_each_tiles_own_pixels_and_hands_the_map_over_once():
    s = Stitcher(5, 100, 160)
    tile = Tile(0, 0, 64, 64, (8, 40, 0, 64))
    logits = (np.random.default_rng(2).normal(size=(5, 64, 64)) * 20).astype(np.float32)  # some past +-30
    s.add_logits(tile, logits)
    with pytest.raises(ValueError, match="shape"):
        s.add_logits(tile, logits[:, :-1])
    out = s.result()
    # In place, the very numbers of logits_to_probabilities (softmax; sigmoid clipped at +-30).
    assert np.array_equal(out[:, 8:40, :64], logits_to_probabilities(logits[None])[0][:, 8:40])
    assert (out[0, :8] == 1).all() and (out[1:, :8] == 0).all() and (out[0, 40:] == 1).all()
    with pytest.raises(RuntimeError, match="twice"):
        s.result()


def test_batches_hold_tiles_of_one_shape():
    tiles = [
        Tile(0, 0, 64, 64, (0, 1, 0, 1)),
        Tile(0, 0, 32, 64, (0, 1, 0, 1)),
        Tile(0, 64, 64, 64, (0, 1, 0, 1)),
    ]
    assert [[t.shape for t in b] for b in iter_batches(tiles, 8)] == [[(64, 64), (64, 64)], [(32, 64)]]


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
