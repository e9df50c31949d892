"""A model on a segmentation_wbc source it never trained on: the developers' cross-source protocol.

Train with `blastq train --wbc-only dataset1` (or dataset2): the other source, a different lab and camera,
is never loaded. This scores a model on every crop of a source (all its splits: none was trained on),
segmentation as in `blastq evaluate` (the labelled cell and its nucleus), and the share of its labelled
normal white cells called blast at the shipped threshold and at lower screening thresholds:

    python -m blastq.trainer.crosssource MODEL.pt --wbc ../shared/data/segmentation_wbc --source dataset2
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from blastq.core.cells import DEFAULT_BLAST_CELL_THRESHOLD
from blastq.core.segment import load_engine
from blastq.trainer.datasets import WBC_DATASETS, segmentation_wbc_items
from blastq.trainer.evaluate import evaluate_wbc
from blastq.trainer.operating import real_normal_cells

THRESHOLDS = (DEFAULT_BLAST_CELL_THRESHOLD, 0.2, 0.05)


def cross_source_text(model: Path, wbc_root: Path, source: str) -> str:
    engine, info = load_engine(model, kind="torch", device="cpu")
    items = segmentation_wbc_items(wbc_root, datasets=(source,))
    (ev,) = evaluate_wbc(engine, info, items)
    shares = np.array(
        [c.blast_probability for _, c, _ in real_normal_cells(engine, info, wbc_root, datasets=(source,))]
    )
    called = ", ".join(f"{np.mean(shares >= t):.3f} at {t:g}" for t in THRESHOLDS)
    return (
        f"{info.version} on all {ev.images} {source} crops: cell Dice {ev.cell_dice:.3f}, IoU {ev.cell_iou:.3f}, "
        f"nucleus Dice {ev.nucleus_dice:.3f}, pixel accuracy {100 * ev.pixel_accuracy:.1f}%; "
        f"normal cells called blast: {called} (of {shares.size})"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("--wbc", type=Path, required=True)
    parser.add_argument("--source", choices=WBC_DATASETS, required=True)
    args = parser.parse_args(argv)
    print(cross_source_text(args.model, args.wbc, args.source))


if __name__ == "__main__":
    main()
