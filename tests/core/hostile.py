"""Builders of hostile and odd image files for the reader tests (imported by test_wsi and test_wholeslide)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def sparse_tiff(
    path: Path,
    width: int,
    height: int,
    *,
    tile: int = 512,
    tiles: dict[tuple[int, int], np.ndarray] | None = None,
    mpp: float | None = None,
) -> Path:
    """A tiled RGB TIFF claiming width x height whose tiles have offset and byte count 0 (never scanned),
    except `tiles` {(column, row): HWC uint8 tile}, stored uncompressed. 100000 x 100000 is ~300 KB."""
    tiles = tiles or {}
    across, down = -(-width // tile), -(-height // tile)
    n = across * down
    entries = 14 if mpp is not None else 11
    ifd = 8
    after_ifd = ifd + 2 + entries * 12 + 4
    bits_at = after_ifd
    res_at = bits_at + 6
    offsets_at = res_at + 16
    counts_at = offsets_at + 4 * n
    data_at = counts_at + 4 * n
    offsets = np.zeros(n, "<u4")
    counts = np.zeros(n, "<u4")
    blobs = []
    for (tx, ty), arr in sorted(tiles.items()):
        block = np.zeros((tile, tile, 3), np.uint8)
        block[: arr.shape[0], : arr.shape[1]] = arr[:tile, :tile]
        offsets[ty * across + tx] = data_at + sum(len(b) for b in blobs)
        counts[ty * across + tx] = block.nbytes
        blobs.append(block.tobytes())

    def entry(tag: int, kind: int, count: int, value: int) -> bytes:
        if kind == 3 and count == 1:
            return struct.pack("<HHIHH", tag, kind, count, value, 0)
        return struct.pack("<HHII", tag, kind, count, value)

    fields = [
        entry(256, 4, 1, width),
        entry(257, 4, 1, height),
        entry(258, 3, 3, bits_at),
        entry(259, 3, 1, 1),
        entry(262, 3, 1, 2),
        entry(277, 3, 1, 3),
    ]
    if mpp is not None:
        fields += [entry(282, 5, 1, res_at), entry(283, 5, 1, res_at + 8)]
    fields.append(entry(284, 3, 1, 1))
    if mpp is not None:
        fields.append(entry(296, 3, 1, 3))  # centimetre
    fields += [
        entry(322, 4, 1, tile),
        entry(323, 4, 1, tile),
        entry(324, 4, n, offsets_at),
        entry(325, 4, n, counts_at),
    ]
    assert len(fields) == entries
    px_per_cm = round(10_000 / mpp * 1000) if mpp is not None else 0
    with path.open("wb") as fh:
        fh.write(b"II*\x00" + struct.pack("<I", ifd))
        fh.write(struct.pack("<H", entries) + b"".join(fields) + struct.pack("<I", 0))
        fh.write(struct.pack("<HHH", 8, 8, 8))
        fh.write(struct.pack("<IIII", px_per_cm, 1000, px_per_cm, 1000))
        fh.write(offsets.tobytes() + counts.tobytes())
        fh.write(b"".join(blobs))
    return path
