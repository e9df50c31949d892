"""Putting the tiles' predictions together into one probability map.

Each tile decides the pixels of its `own` region (core.segment.tiling): the map is written, not blended,
and with the tiles' overlap at least twice the model's context it equals the model run on the whole image.
Pixels no tile decides (plain plasma the engine was spared) are certain background.
"""

from __future__ import annotations

import numpy as np

from blastq.core.segment.tiling import Tile
from blastq.core.segment.unet import N_CLASSES


def logits_to_probabilities(logits: np.ndarray) -> np.ndarray:
    """NCHW logits -> NCHW probabilities: softmax over the class channels, sigmoid for the rest."""
    cls = logits[:, :N_CLASSES]
    cls = np.exp(cls - cls.max(axis=1, keepdims=True))
    cls /= cls.sum(axis=1, keepdims=True)
    rest = 1.0 / (1.0 + np.exp(-np.clip(logits[:, N_CLASSES:], -30, 30)))
    return np.concatenate([cls, rest], axis=1).astype(np.float32)


def background_map(channels: int, height: int, width: int) -> np.ndarray:
    """A (C, H, W) float32 map of certain background: class 0 at 1, every other channel 0."""
    out = np.zeros((channels, height, width), np.float32)
    out[0] = 1.0
    return out


class Stitcher:
    """Writes each tile's CHW probabilities over the pixels it owns into one (C, H, W) map."""

    def __init__(self, channels: int, height: int, width: int):
        self.map: np.ndarray | None = background_map(channels, height, width)

    def add(self, tile: Tile, probs: np.ndarray) -> None:
        """Add one tile's CHW probabilities (its whole window; only its own pixels are kept)."""
        if probs.shape[1:] != tile.shape:
            raise ValueError(f"tile {tile.shape} got probabilities of shape {probs.shape[1:]}")
        self.add_own(tile, probs[(slice(None), *tile.own_in_tile)])

    def add_logits(self, tile: Tile, logits: np.ndarray) -> None:
        """Add one tile's CHW logits: turned into probabilities over its own pixels only, written in place
        (the same numbers as `logits_to_probabilities`, without its three copies of the tile)."""
        if logits.shape[1:] != tile.shape:
            raise ValueError(f"tile {tile.shape} got logits of shape {logits.shape[1:]}")
        if self.map is None:
            raise RuntimeError("Stitcher.add() after result(): the map was handed over already")
        own = logits[(slice(None), *tile.own_in_tile)]
        out = self.map[(slice(None), *tile.own_slices)]
        cls, rest = out[:N_CLASSES], out[N_CLASSES:]
        np.subtract(own[:N_CLASSES], own[:N_CLASSES].max(axis=0, keepdims=True), out=cls)
        np.exp(cls, out=cls)
        cls /= cls.sum(axis=0, keepdims=True)
        np.negative(own[N_CLASSES:], out=rest)
        np.clip(rest, -30, 30, out=rest)  # the bounds are symmetric: -clip(x) == clip(-x)
        np.exp(rest, out=rest)
        rest += 1.0
        np.reciprocal(rest, out=rest)

    def add_own(self, tile: Tile, probs: np.ndarray) -> None:
        """Add the CHW probabilities of the pixels the tile owns (shape: its own region)."""
        if self.map is None:
            raise RuntimeError("Stitcher.add() after result(): the map was handed over already")
        self.map[(slice(None), *tile.own_slices)] = probs

    def result(self) -> np.ndarray:
        """The (C, H, W) map; handed over once (a 4096 px slide's map is 335 MB, never copied)."""
        if self.map is None:
            raise RuntimeError("Stitcher.result() was called twice: the map was handed over already")
        out, self.map = self.map, None
        return out
