"""Per-slide statistics: white cells, blasts, blast percentage, and the leukaemia flag."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from blastq.core.cellcrops import CELL_TYPES
from blastq.core.cells import LABEL_BLAST, CellRecord

# WHO: >= 20% blasts in blood or marrow defines acute leukaemia.
DEFAULT_BLAST_THRESHOLD_PERCENT = 20.0


@dataclass(frozen=True)
class SlideStats:
    white_cells: int  # blasts included
    blasts: int
    blast_percent: float
    flagged: bool  # blast_percent >= threshold_percent
    threshold_percent: float
    # The differential, when a classifier typed the cells: count and percent of white cells per type in
    # CELL_TYPES order (blasts as the segmentation counted them), and how many cells need a person's look.
    differential: dict[str, dict[str, float]] = field(default_factory=dict)
    review_cells: int = 0


def slide_stats(
    cells: Sequence[CellRecord], threshold_percent: float = DEFAULT_BLAST_THRESHOLD_PERCENT
) -> SlideStats:
    """Count white cells and blasts; a slide with no white cells has 0% blasts and is not flagged."""
    white = len(cells)
    blasts = sum(1 for c in cells if c.label == LABEL_BLAST)
    percent = round(100.0 * blasts / white, 2) if white else 0.0
    differential: dict[str, dict[str, float]] = {}
    if white and all(c.cell_type for c in cells):
        for name in CELL_TYPES:
            count = sum(1 for c in cells if c.cell_type == name)
            differential[name] = {"count": count, "percent": round(100.0 * count / white, 2)}
    return SlideStats(
        white,
        blasts,
        percent,
        white > 0 and percent >= threshold_percent,
        threshold_percent,
        differential,
        sum(1 for c in cells if c.review),
    )
