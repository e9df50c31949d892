"""Blending overlapping tile predictions into one probability map without seams."""

from __future__ import annotations

import numpy as np

from blastq.core.segment.tiling import Tile
from blastq.core.segment.unet import N_CLASSES


def blend_window(tile_px: int, sigma_scale: float = 0.125) -> np.ndarray:
    """A Gaussian tile weight (HW float32), peak 1 at the centre, floor 1e-3 at the corners.

    Tile borders see the least context, so their predictions are the least trusted: a smooth
    weight lets each pixel be decided mostly by the tile it is most central in, and the weights change
    gradually, so no step appears where one tile's area ends (sigma = tile/8, as nnU-Net uses).
    """
    r = np.arange(tile_px, dtype=np.float64) - (tile_px - 1) / 2
    g = np.exp(-(r**2) / (2 * (sigma_scale * tile_px) ** 2))
    w = np.outer(g, g)
    w /= w.max()
    return np.maximum(w, 1e-3).astype(np.float32)


def logits_to_probabilities(logits: np.ndarray) -> np.ndarray:
    """NCHW logits -> NCHW probabilities: softmax over the class channels, sigmoid for the rest."""
    cls = logits[:, :N_CLASSES]
    cls = np.exp(cls - cls.max(axis=1, keepdims=True))
    cls /= cls.sum(axis=1, keepdims=True)
    rest = 1.0 / (1.0 + np.exp(-np.clip(logits[:, N_CLASSES:], -30, 30)))
    return np.concatenate([cls, rest], axis=1).astype(np.float32)


class Stitcher:
    """Accumulates window-weighted tile probabilities into a (C, H, W) map."""

    def __init__(self, channels: int, height: int, width: int, tile_px: int):
        self.acc = np.zeros((channels, height, width), np.float32)
        self.weight = np.zeros((height, width), np.float32)
        self.window = blend_window(tile_px)

    def add(self, tile: Tile, probs: np.ndarray) -> None:
        """Add one tile's CHW probabilities."""
        ys, xs = tile.slices
        self.acc[:, ys, xs] += probs * self.window
        self.weight[ys, xs] += self.window

    def add_background(self, tile: Tile) -> None:
        """Add a skipped (empty) tile as certain background, so neighbours blend into it smoothly."""
        ys, xs = tile.slices
        self.acc[0, ys, xs] += self.window
        self.weight[ys, xs] += self.window

    def result(self) -> np.ndarray:
        """The blended (C, H, W) map. Divides in place, without a second map-sized array (a 4096 px slide's
        map is 335 MB): call it once, after the last tile."""
        if self.acc is None:
            raise RuntimeError("Stitcher.result() was called twice: the map was handed over already")
        uncovered = self.weight == 0
        np.maximum(self.weight, 1e-12, out=self.weight)
        self.acc /= self.weight
        if uncovered.any():
            self.acc[:, uncovered] = 0.0
            self.acc[0, uncovered] = 1.0
        out, self.acc = self.acc, None
        return out
