"""A model on synthetic fields in conditions it may never have trained on: stain families and magnifications.

`blastq train --synth-families` and `--synth-mpp` leave families and magnifications out of training; this
renders wide fields (the generator's blasts across their range, look-alikes, decoys, crowded red cells) in
each named condition and runs them as a user would (the image at its own scale, resampled by the
pipeline), so a family or magnification left out shows what a lab with that stain or that microscope
gets. Seeds start at HELDOUT_SEED0, which no training pool, validation set or other test set draws from.

    python -m blastq.trainer.heldout MODEL.pt [MODEL2.pt ...] [--fields 12]

Figures per condition: white-cell detection precision, recall and F1 (a predicted cell matches a true
one at IoU >= 0.5), blasts called blast (sensitivity), normal white cells called blast, and decoys
(nucleated red cells, smudge cells, platelet clumps, debris) outlined as white cells.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from blastq.core.image import Slide
from blastq.core.pipeline import PipelineConfig, process_slide
from blastq.core.segment import Engine, ModelInfo, load_engine
from blastq.core.synth import STAIN_FAMILIES, generate_field
from blastq.trainer.metrics import matched_pairs

HELDOUT_SEED0 = 9_400_000
FIELD_UM = 100.0  # each field's side in microns, whatever its magnification
# The conditions: every family at a common magnification, then MGG across magnifications (100x oil with
# a fine camera at 0.065 um/px to 40x dry at 0.3).
CONDITIONS: tuple[tuple[str, float], ...] = (
    *((family, 0.15) for family in STAIN_FAMILIES),
    ("mgg", 0.065),
    ("mgg", 0.1),
    ("mgg", 0.3),
)


@dataclass(frozen=True)
class ConditionFigures:
    family: str
    mpp: float
    fields: int
    true_cells: int
    found_cells: int
    matched: int
    blasts: int
    blasts_called: int
    normals: int
    normals_called_blast: int
    decoys: int
    decoys_outlined: int

    @property
    def precision(self) -> float:
        return self.matched / self.found_cells if self.found_cells else float("nan")

    @property
    def recall(self) -> float:
        return self.matched / self.true_cells if self.true_cells else float("nan")

    @property
    def f1(self) -> float:
        total = self.found_cells + self.true_cells
        return 2 * self.matched / total if total else float("nan")


def condition_figures(
    engine: Engine,
    info: ModelInfo,
    family: str,
    mpp: float,
    n_fields: int,
    config: PipelineConfig = PipelineConfig(),
) -> ConditionFigures:
    size = round(FIELD_UM / mpp)
    counts = dict.fromkeys(
        (
            "true_cells",
            "found_cells",
            "matched",
            "blasts",
            "blasts_called",
            "normals",
            "normals_called_blast",
        ),
        0,
    )
    decoys = decoys_outlined = 0
    for seed in range(HELDOUT_SEED0, HELDOUT_SEED0 + n_fields):
        field = generate_field(
            seed,
            size,
            size,
            mpp=mpp,
            variety="wide",
            stain_family=family,
            blast_fraction=0.4,
            wbc_per_10k_um2=15.0,
            rbc_coverage=0.5,
            rbc_overlap=0.5,
        )
        slide = Slide(rgb=field.image, mpp=mpp, mpp_source="user", name=f"{family}_{seed}", sha256="")
        result = process_slide(slide, engine, info, config)
        found = {c.cell_id: c for c in result.maps.cells}
        counts["true_cells"] += len(field.cells)
        counts["found_cells"] += len(found)
        for predicted, true_id in matched_pairs(result.maps.instances, field.instances):
            counts["matched"] += 1
            truth, cell = field.cells[true_id - 1], found[predicted]
            group = "blasts" if truth.is_blast else "normals"
            counts[group] += 1
            if cell.label == "blast":
                counts["blasts_called" if truth.is_blast else "normals_called_blast"] += 1
        for decoy in field.decoys:
            x, y = (min(max(round(v), 0), size - 1) for v in decoy.centroid_xy)
            decoys += 1
            decoys_outlined += int(result.maps.instances[y, x] > 0)
    return ConditionFigures(family, mpp, n_fields, decoys=decoys, decoys_outlined=decoys_outlined, **counts)


def figures_table(rows: Sequence[tuple[str, ConditionFigures]]) -> str:
    head = (
        "model              family         um/px  cells  WBC precision  recall     F1  blasts called  "
        "normals called blast  decoys outlined"
    )
    lines = [head]
    for name, f in rows:
        lines.append(
            f"{name:<18} {f.family:<13} {f.mpp:>6.3f}  {f.true_cells:>5}  {f.precision:>13.3f}  {f.recall:>6.3f}  "
            f"{f.f1:>5.3f}  {f.blasts_called:>5}/{f.blasts:<7}  {f.normals_called_blast:>10}/{f.normals:<9}  "
            f"{f.decoys_outlined:>7}/{f.decoys}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--fields", type=int, default=12, help="fields per condition")
    args = parser.parse_args(argv)
    rows = []
    for path in args.models:
        engine, info = load_engine(path, kind="torch", device="cpu")
        for family, mpp in CONDITIONS:
            rows.append((info.version, condition_figures(engine, info, family, mpp, args.fields)))
            print(figures_table(rows[-1:]).splitlines()[-1], flush=True)
    print(figures_table(rows))


if __name__ == "__main__":
    main()
