"""Per-slide statistics: white cells, blasts, blast percentage, and the leukaemia flag."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def slide_stats(
    cells: Sequence[CellRecord], threshold_percent: float = DEFAULT_BLAST_THRESHOLD_PERCENT
) -> SlideStats:
    """Count white cells and blasts; a slide with no white cells has 0% blasts and is not flagged."""
    white = len(cells)
    blasts = sum(1 for c in cells if c.label == LABEL_BLAST)
    percent = round(100.0 * blasts / white, 2) if white else 0.0
    return SlideStats(white, blasts, percent, white > 0 and percent >= threshold_percent, threshold_percent)
