"""Cutting an image into tiles the engine sees, each deciding the pixels it is most central to.

The U-Net is fully convolutional: a pixel's output depends only on the input within its receptive field
(`UNet.context_px`, 56 px for the shipped depth-4 model) and, through the max-pools, on where the tile
starts modulo the model's stride. So tiles start on multiples of the stride, neighbours overlap by
`overlap_px`, and each tile decides only the pixels at least `overlap_px // 2` from its cut edges (its
`own` region): with `overlap_px // 2 >= context_px` the stitched map is the model run on the whole image
at once, to float rounding (tests/core/test_tiling_stitch.py), with no blending and no seams. Larger
tiles waste less: on a 4096 px image, 1024 px tiles overlapping by 128 px compute each output pixel 1.28
times, 256 px tiles with the same overlap 3.75 (the former 256 px tiles with 64 px overlap: 1.78, inexact).

Plain plasma is skipped at a finer grain than a tile: pixels farther than the margin from any stained
16 px block are background without the engine, and a tile whose pixels are mostly such is cut down to
the stained part (plus the margin) before it runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

PLASMA_FILL = 245  # padding colour: plasma after flat-field correction
# Images smaller than this are padded with plasma to it, at the bottom and right: the model was trained on
# 256 px tiles, and a 120 px crop with nothing but the convolutions' zeros around it had cells "seen" along
# its edges (segmentation_wbc dataset2 test crops: Dice over all pixels 0.942 against 0.967 when padded).
MIN_INPUT_PX = 256
# Stain is looked for in blocks of this side; a block with fewer stained pixels than this is plain plasma
# (a few stray pixels of camera noise or a speck of dust do not make a cell).
STAIN_BLOCK_PX = 16
MIN_STAINED_PX_PER_BLOCK = 4
# A tile is cut down to its stained part only when that saves at least this share of its pixels: each
# other shape is one more engine call of its own (and one more graph for shape-specialised engines).
MIN_SHRINK_SAVING = 0.25
SHRINK_ROUND_PX = 64  # shrunk sides rounded up to this, so few distinct shapes come up


@dataclass(frozen=True)
class Tile:
    """A height x width window at (y0, x0) of the padded image; it decides the pixels in `own`."""

    y0: int
    x0: int
    height: int
    width: int
    own: tuple[int, int, int, int]  # (y0, y1, x0, x1) in image coordinates, inside the window

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y0 + self.height), slice(self.x0, self.x0 + self.width)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def own_slices(self) -> tuple[slice, slice]:
        """The pixels this tile decides, in image coordinates."""
        y0, y1, x0, x1 = self.own
        return slice(y0, y1), slice(x0, x1)

    @property
    def own_in_tile(self) -> tuple[slice, slice]:
        """The same pixels in the tile's own coordinates (where to read them from its output)."""
        y0, y1, x0, x1 = self.own
        return slice(y0 - self.y0, y1 - self.y0), slice(x0 - self.x0, x1 - self.x0)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def axis_layout(length: int, tile_px: int, overlap_px: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(start, size, own start, own end) of the tiles along one axis of `length` (a multiple of stride).

    As few tiles as tile_px allows, all of one size (the smallest multiple of stride that covers the axis
    with that many), starts on multiples of stride, neighbours overlapping by at least overlap_px and cut
    in the middle of their overlap, so each owns the pixels >= overlap_px // 2 from its cut edges.
    """
    if length % stride:
        raise ValueError(f"length {length} is not a multiple of the stride {stride}")
    if length <= tile_px:
        return [(0, length, 0, length)]
    n = max(2, -(-(length - overlap_px) // (tile_px - overlap_px)))
    while True:
        size = min(tile_px, _round_up(-(-(length - overlap_px) // n) + overlap_px, stride))
        span = length - size
        starts = [(i * span // (n - 1)) // stride * stride for i in range(n)]
        starts[-1] = span
        if all(b - a <= size - overlap_px for a, b in zip(starts, starts[1:], strict=False)):
            break
        n += 1  # rounding the starts down to the stride left a gap too wide: one tile more
    cuts = [0] + [(a + size + b) // 2 for a, b in zip(starts, starts[1:], strict=False)] + [length]
    return [(s, size, cuts[i], cuts[i + 1]) for i, s in enumerate(starts)]


def plan_tiles(height: int, width: int, tile_px: int, overlap_px: int, stride: int) -> list[Tile]:
    """Tiles for a height x width image padded to multiples of stride (`pad_to_stride`), row by row."""
    if tile_px <= 0 or tile_px % stride or not 0 <= overlap_px < tile_px:
        raise ValueError(
            f"need a tile_px that is a multiple of {stride} and > overlap_px >= 0, "
            f"got tile_px={tile_px} overlap_px={overlap_px}"
        )
    rows = axis_layout(height, tile_px, overlap_px, stride)
    cols = axis_layout(width, tile_px, overlap_px, stride)
    return [
        Tile(y, x, th, tw, (oy0, oy1, ox0, ox1)) for (y, th, oy0, oy1) in rows for (x, tw, ox0, ox1) in cols
    ]


def padded_shape(height: int, width: int, stride: int, min_side: int = MIN_INPUT_PX) -> tuple[int, int]:
    """The (height, width) `pad_to_stride` gives an image of this size: at least min_side, then multiples
    of stride."""
    return _round_up(max(height, min_side), stride), _round_up(max(width, min_side), stride)


def pad_to_stride(
    rgb: np.ndarray, stride: int, fill: int = PLASMA_FILL, min_side: int = MIN_INPUT_PX
) -> np.ndarray:
    """Pad an HWC image at the bottom/right with plasma-coloured pixels to `padded_shape`."""
    h, w = rgb.shape[:2]
    ph, pw = (side - old for side, old in zip(padded_shape(h, w, stride, min_side), (h, w), strict=True))
    if ph == 0 and pw == 0:
        return rgb
    return np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="constant", constant_values=fill)


def stained_pixels(rgb: np.ndarray) -> np.ndarray:
    """HW bool: pixels that carry stain (not bright, neutral plasma) in a preprocessed HWC uint8 image."""
    # Channel planes with np.maximum/np.minimum: reducing over the last axis of an HWC array is ~30x
    # slower (benchmarks/bench_efficiency.py), and max >= min keeps uint8 subtraction from wrapping.
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high = np.maximum(np.maximum(r, g), b)
    low = np.minimum(np.minimum(r, g), b)
    return ((high - low) > 25) | (low < 170)


def stained_fraction(rgb_tile: np.ndarray) -> float:
    """Fraction of pixels that carry stain in a preprocessed HWC uint8 tile."""
    stained = stained_pixels(rgb_tile)
    return float(np.count_nonzero(stained) / stained.size)


def is_empty_tile(rgb_tile: np.ndarray, min_stained_fraction: float = 0.002) -> bool:
    """True for tiles of plain plasma: no cell can be there, so the engine need not see them."""
    return stained_fraction(rgb_tile) < min_stained_fraction


def needed_blocks(rgb: np.ndarray, margin_px: int, block: int = STAIN_BLOCK_PX) -> np.ndarray:
    """(ceil(H/block), ceil(W/block)) bool: the blocks within margin_px of a stained block.

    Outside them every pixel is farther than the margin from stain: the model's answer there is plasma,
    whatever tile it is in, so the engine need not run on it."""
    h, w = rgb.shape[:2]
    bh, bw = -(-h // block), -(-w // block)
    stained = np.zeros((bh * block, bw * block), np.uint16)
    stained[:h, :w] = stained_pixels(rgb)
    counts = stained.reshape(bh, block, bw, block).sum(axis=(1, 3))
    blocks = counts >= MIN_STAINED_PX_PER_BLOCK
    reach = -(-margin_px // block)
    if reach == 0 or not blocks.any():
        return blocks
    kernel = np.ones((2 * reach + 1, 2 * reach + 1), np.uint8)
    return cv2.dilate(blocks.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0


def fit_to_stain(tile: Tile, needed: np.ndarray, margin_px: int, stride: int) -> Tile | None:
    """The tile cut down to where it is needed (`needed_blocks`), or None when it is not needed at all.

    Its own region shrinks to the needed pixels' box, its window to that box plus the margin (starts on the
    stride, sides rounded up to SHRINK_ROUND_PX and kept inside the original window); unchanged when that
    would save less than MIN_SHRINK_SAVING of its pixels."""
    block = STAIN_BLOCK_PX
    y0, y1, x0, x1 = tile.own
    sub = needed[y0 // block : -(-y1 // block), x0 // block : -(-x1 // block)]
    if not sub.any():
        return None
    rows, cols = np.flatnonzero(sub.any(axis=1)), np.flatnonzero(sub.any(axis=0))
    by0 = max(y0, (y0 // block + int(rows[0])) * block)
    by1 = min(y1, (y0 // block + int(rows[-1]) + 1) * block)
    bx0 = max(x0, (x0 // block + int(cols[0])) * block)
    bx1 = min(x1, (x0 // block + int(cols[-1]) + 1) * block)

    def window(lo: int, hi: int, start: int, size: int) -> tuple[int, int]:
        a = max(start, (lo - margin_px) // stride * stride)
        side = min(size, _round_up(min(start + size, hi + margin_px) - a, SHRINK_ROUND_PX))
        a = min(a, start + size - side)  # rounding the side up must not leave the original window
        return a, side

    wy, wh = window(by0, by1, tile.y0, tile.height)
    wx, ww = window(bx0, bx1, tile.x0, tile.width)
    if wh * ww > (1 - MIN_SHRINK_SAVING) * tile.height * tile.width:
        return Tile(tile.y0, tile.x0, tile.height, tile.width, (by0, by1, bx0, bx1))
    return Tile(wy, wx, wh, ww, (by0, by1, bx0, bx1))


def iter_batches(items: list[Tile], batch_size: int) -> Iterator[list[Tile]]:
    """Batches of at most batch_size tiles of one shape, in the order of each shape's first tile."""
    by_shape: dict[tuple[int, int], list[Tile]] = {}
    for tile in items:
        by_shape.setdefault(tile.shape, []).append(tile)
    for group in by_shape.values():
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]
