"""Cutting an image into overlapping tiles, and telling empty background tiles apart."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    """A tile_px x tile_px window at (y0, x0) of the (padded) image."""

    y0: int
    x0: int
    size: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y0 + self.size), slice(self.x0, self.x0 + self.size)


def _starts(length: int, tile_px: int, step: int) -> list[int]:
    if length <= tile_px:
        return [0]
    starts = list(range(0, length - tile_px, step))
    starts.append(length - tile_px)  # last tile flush with the edge, never past it
    return starts


def tile_grid(height: int, width: int, tile_px: int, overlap_px: int) -> list[Tile]:
    """Tiles covering a height x width image (padded to at least tile_px) with >= overlap_px overlap."""
    if tile_px <= 0 or not 0 <= overlap_px < tile_px:
        raise ValueError(f"need tile_px > overlap_px >= 0, got tile_px={tile_px} overlap_px={overlap_px}")
    step = tile_px - overlap_px
    return [
        Tile(y, x, tile_px)
        for y in _starts(max(height, tile_px), tile_px, step)
        for x in _starts(max(width, tile_px), tile_px, step)
    ]


def pad_to_tiles(rgb: np.ndarray, tile_px: int, fill: int = 245) -> np.ndarray:
    """Pad an HWC image at the bottom/right to at least tile_px per side with plasma-coloured pixels."""
    h, w = rgb.shape[:2]
    ph, pw = max(0, tile_px - h), max(0, tile_px - w)
    if ph == 0 and pw == 0:
        return rgb
    return np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="constant", constant_values=fill)


def stained_fraction(rgb_tile: np.ndarray) -> float:
    """Fraction of pixels that carry stain (not bright, neutral plasma) in a preprocessed HWC uint8 tile."""
    # Channel planes with np.maximum/np.minimum: reducing over the last axis of an HWC array is ~30x
    # slower (benchmarks/bench_efficiency.py), and max >= min keeps uint8 subtraction from wrapping.
    r, g, b = rgb_tile[..., 0], rgb_tile[..., 1], rgb_tile[..., 2]
    high = np.maximum(np.maximum(r, g), b)
    low = np.minimum(np.minimum(r, g), b)
    return float(np.count_nonzero(((high - low) > 25) | (low < 170)) / low.size)


def is_empty_tile(rgb_tile: np.ndarray, min_stained_fraction: float = 0.002) -> bool:
    """True for tiles of plain plasma: no cell can be there, so the engine need not see them."""
    return stained_fraction(rgb_tile) < min_stained_fraction


def iter_batches(items: list[Tile], batch_size: int) -> Iterator[list[Tile]]:
    for i in range(0, len(items), batch_size):
        yield items[i : i + batch_size]
