"""Statistics and verdicts: white cells, blasts, blast percentage and the differential, of one image
or pooled over a sample (several images or fields of one patient).

A verdict needs enough cells: a lab counts 100 or 200 white cells before it calls a differential, so
below `min_white_cells` the verdict is "insufficient cells", neither flagged nor clear.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from blastq.core.cells.cellcrops import CELL_TYPES
from blastq.core.cells.instances import LABEL_BLAST, CellRecord

# WHO: >= 20% blasts in blood or marrow defines acute leukaemia.
DEFAULT_BLAST_THRESHOLD_PERCENT = 20.0
# The smaller of the usual manual differentials (100 or 200 white cells).
DEFAULT_MIN_WHITE_CELLS = 100

VERDICT_FLAGGED = "flagged"
VERDICT_NOT_FLAGGED = "not flagged"
VERDICT_INSUFFICIENT = "insufficient cells"
VERDICTS = (VERDICT_FLAGGED, VERDICT_NOT_FLAGGED, VERDICT_INSUFFICIENT)

# The classes a person may give a cell on review: the six types, a white cell nobody can type
# ("unidentified", still counted), and two that are not counted as white cells: a smudge (a broken
# cell, reported apart as labs do) and an artefact (not a cell: debris, stain, a red-cell clump).
UNIDENTIFIED, SMUDGE, ARTEFACT = "unidentified", "smudge", "artefact"
REVIEW_CLASSES: tuple[str, ...] = (*CELL_TYPES, UNIDENTIFIED, SMUDGE, ARTEFACT)
NOT_COUNTED: tuple[str, ...] = (SMUDGE, ARTEFACT)


@dataclass(frozen=True)
class SlideStats:
    white_cells: int  # blasts included
    blasts: int
    blast_percent: float
    flagged: bool  # the verdict is VERDICT_FLAGGED
    threshold_percent: float
    # The differential, when a classifier typed the cells: count and percent of white cells per type in
    # CELL_TYPES order (blasts as the segmentation counted them), and how many cells need a person's look.
    differential: dict[str, dict[str, float]] = field(default_factory=dict)
    review_cells: int = 0
    min_white_cells: int = DEFAULT_MIN_WHITE_CELLS
    verdict: str = ""  # one of VERDICTS; "" is filled from the figures

    def __post_init__(self) -> None:
        if not self.verdict:
            object.__setattr__(
                self,
                "verdict",
                verdict(self.white_cells, self.blast_percent, self.threshold_percent, self.min_white_cells),
            )
        object.__setattr__(self, "flagged", self.verdict == VERDICT_FLAGGED)

    def describe(self) -> str:
        """One line for a person, e.g. "120 white cells, 30 blasts, 25.0% blasts: FLAGGED".

        On too few cells it gives no percentage, which would read like a verdict."""
        counts = f"{self.white_cells} white cells, {self.blasts} blasts"
        if self.verdict == VERDICT_INSUFFICIENT:
            return f"{counts}: insufficient cells ({self.white_cells} < {max(self.min_white_cells, 1)})"
        shown = "FLAGGED" if self.verdict == VERDICT_FLAGGED else self.verdict
        return f"{counts}, {self.blast_percent:.1f}% blasts: {shown}"


def verdict(white_cells: int, blast_percent: float, threshold_percent: float, min_white_cells: int) -> str:
    """Flagged at or above the threshold; no verdict either way on fewer than `min_white_cells` cells."""
    if white_cells == 0 or white_cells < min_white_cells:
        return VERDICT_INSUFFICIENT
    return VERDICT_FLAGGED if blast_percent >= threshold_percent else VERDICT_NOT_FLAGGED


def slide_stats(
    cells: Sequence[CellRecord],
    threshold_percent: float = DEFAULT_BLAST_THRESHOLD_PERCENT,
    min_white_cells: int = DEFAULT_MIN_WHITE_CELLS,
) -> SlideStats:
    """Count white cells and blasts; a slide with no white cells has 0% blasts and no verdict."""
    white = len(cells)
    blasts = sum(1 for c in cells if c.label == LABEL_BLAST)
    differential: dict[str, dict[str, float]] = {}
    if white and all(c.cell_type for c in cells):
        differential = {name: sum(1 for c in cells if c.cell_type == name) for name in CELL_TYPES}
    return _stats(
        white, blasts, differential, sum(1 for c in cells if c.review), threshold_percent, min_white_cells
    )


def analyser_class(cell_type: str, label: str) -> str:
    """The class the analyser gave a cell, among REVIEW_CLASSES: its type, or with no classifier the
    segmentation's blast call, else unidentified."""
    if cell_type in CELL_TYPES:
        return cell_type
    return "blast" if label == LABEL_BLAST else UNIDENTIFIED


def class_stats(
    classes: Sequence[str],
    threshold_percent: float = DEFAULT_BLAST_THRESHOLD_PERCENT,
    min_white_cells: int = DEFAULT_MIN_WHITE_CELLS,
) -> SlideStats:
    """Figures from one class per cell (REVIEW_CLASSES): what review recomputes as cells are reclassified.

    Smudges and artefacts are not white cells; the differential counts every class that is, unidentified
    included, so its percentages add up to 100."""
    unknown = sorted(set(classes) - set(REVIEW_CLASSES))
    if unknown:
        raise ValueError(f"unknown cell classes {unknown} (one of {', '.join(REVIEW_CLASSES)})")
    counted = [c for c in classes if c not in NOT_COUNTED]
    names = (*CELL_TYPES, UNIDENTIFIED)
    counts = {name: sum(1 for c in counted if c == name) for name in names}
    blasts = counts["blast"]
    return _stats(len(counted), blasts, counts if counted else {}, 0, threshold_percent, min_white_cells)


def pooled_stats(
    parts: Sequence[SlideStats],
    threshold_percent: float = DEFAULT_BLAST_THRESHOLD_PERCENT,
    min_white_cells: int = DEFAULT_MIN_WHITE_CELLS,
) -> SlideStats:
    """The cells of several images counted as one: one differential and one verdict.

    The differential is pooled only when every image has one (a classifier typed all their cells);
    pooled percentages come from the pooled counts, never from averaging the images' percentages.
    """
    white = sum(p.white_cells for p in parts)
    blasts = sum(p.blasts for p in parts)
    differential: dict[str, int] = {}
    # An image without cells has no differential but changes no count: it does not block the pool.
    counted = [p for p in parts if p.white_cells]
    if counted and all(p.differential for p in counted):
        differential = {
            name: sum(int(p.differential.get(name, {}).get("count", 0)) for p in counted)
            for name in CELL_TYPES
        }
    review = sum(p.review_cells for p in parts)
    return _stats(white, blasts, differential, review, threshold_percent, min_white_cells)


def _stats(
    white: int, blasts: int, counts: dict[str, int], review: int, threshold_percent: float, min_cells: int
) -> SlideStats:
    percent = round(100.0 * blasts / white, 2) if white else 0.0
    differential = {name: {"count": n, "percent": round(100.0 * n / white, 2)} for name, n in counts.items()}
    return SlideStats(
        white_cells=white,
        blasts=blasts,
        blast_percent=percent,
        flagged=False,  # set from the verdict
        threshold_percent=threshold_percent,
        differential=differential,
        review_cells=review,
        min_white_cells=min_cells,
    )


@dataclass(frozen=True)
class SampleImage:
    """One image of a sample, with its own figures (and its result row, when recorded)."""

    image: str
    sha256: str
    stats: SlideStats
    result_id: int | None = None


@dataclass(frozen=True)
class SampleResult:
    """A sample (one patient: several images or fields): its images and their pooled figures."""

    name: str
    images: tuple[SampleImage, ...]
    stats: SlideStats  # pooled over `images`
    pending: int = 0  # images submitted and not finished yet (queued or running)
    failed: int = 0  # images submitted whose job failed (not in the pool)

    def describe(self) -> str:
        """One line for a person: the pooled figures and the verdict, and what is not in them yet."""
        missing = [f"{n} {what}" for n, what in ((self.pending, "pending"), (self.failed, "failed")) if n]
        more = f" ({', '.join(missing)})" if missing else ""
        return f"sample {self.name}: {len(self.images)} image(s){more}, {self.stats.describe()}"


def sample_result(
    name: str,
    images: Sequence[SampleImage],
    threshold_percent: float = DEFAULT_BLAST_THRESHOLD_PERCENT,
    min_white_cells: int = DEFAULT_MIN_WHITE_CELLS,
    pending: int = 0,
    failed: int = 0,
) -> SampleResult:
    """Pool the images' cells into the sample's figures and verdict."""
    stats = pooled_stats([i.stats for i in images], threshold_percent, min_white_cells)
    return SampleResult(name, tuple(images), stats, pending, failed)


SAMPLE_NAME_CHARS = 200  # the samples.name column


def check_sample_name(name: str) -> str:
    """A sample name (a patient or accession id, a watched sub-folder's name), or InvalidConfig."""
    from blastq.core.common import InvalidConfig

    if not name or not name.strip() or len(name) > SAMPLE_NAME_CHARS or not name.isprintable():
        raise InvalidConfig(
            f"sample name {name!r}: expected 1 to {SAMPLE_NAME_CHARS} printable characters, not only spaces"
        )
    return name
