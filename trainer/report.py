"""`blastq evaluate`: figures for a model on a folder, as text or JSON."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from blastq.core.engines import load_engine
from blastq.core.errors import InvalidDataset
from blastq.core.synth import read_field_masks
from blastq.trainer.datasets import read_rgb, segmentation_wbc_items, synth_folder_items
from blastq.trainer.evaluate import SynthEvaluation, WbcEvaluation, evaluate_synthetic, evaluate_wbc


@dataclass(frozen=True)
class EvaluationReport:
    model_version: str
    folder: str
    split: str
    wbc: tuple[WbcEvaluation, ...] = ()
    synthetic: SynthEvaluation | None = None

    def as_dict(self) -> dict:
        out: dict = {"model_version": self.model_version, "folder": self.folder, "split": self.split}
        if self.wbc:
            out["segmentation_wbc"] = {
                e.dataset: {
                    "images": e.images,
                    "cell_dice": round(e.cell_dice, 4),
                    "cell_dice_all_pixels": round(e.cell_dice_all_pixels, 4),
                    "cell_iou": round(e.cell_iou, 4),
                    "nucleus_dice": round(e.nucleus_dice, 4),
                    "nucleus_iou": round(e.nucleus_iou, 4),
                    "pixel_accuracy": round(e.pixel_accuracy, 4),
                    "cell_precision": round(e.cell.precision, 4),
                    "cell_recall": round(e.cell.recall, 4),
                    "cell_f1": round(e.cell.f1, 4),
                    "nucleus_precision": round(e.nucleus.precision, 4),
                    "nucleus_recall": round(e.nucleus.recall, 4),
                }
                for e in self.wbc
            }
        if s := self.synthetic:
            out["synthetic"] = {
                "fields": s.fields,
                "blast_dice": round(s.blast_dice, 4),
                "blast_iou": round(s.blast_iou, 4),
                "white_cell_dice": round(s.white_cell_dice, 4),
                "pixel_accuracy": round(s.pixel_accuracy, 4),
                "blast_detection_precision": round(s.blast_objects.precision, 4),
                "blast_detection_recall": round(s.blast_objects.recall, 4),
                "blast_detection_f1": round(s.blast_objects.f1, 4),
                "cell_detection_f1": round(s.cell_objects.f1, 4),
                "blast_percent_mean_abs_error": round(s.blast_percent_abs_error, 2),
                "per_class": {
                    c.name: {k: round(getattr(c, k), 4) for k in ("dice", "iou", "precision", "recall", "f1")}
                    for c in s.report.classes
                },
            }
        return out

    def as_text(self) -> str:
        lines = [f"model {self.model_version} on {self.folder} (split: {self.split})"]
        if self.wbc:
            lines.append(
                f"{'dataset':10} {'images':>6} {'cell Dice':>9} {'cell IoU':>8} {'nuc Dice':>8} {'nuc IoU':>8} "
                f"{'pix acc':>7} {'cell P':>6} {'cell R':>6} {'cell F1':>7} {'Dice all px':>11}"
            )
            for e in self.wbc:
                lines.append(
                    f"{e.dataset:10} {e.images:6d} {e.cell_dice:9.4f} {e.cell_iou:8.4f} {e.nucleus_dice:8.4f} "
                    f"{e.nucleus_iou:8.4f} {e.pixel_accuracy:7.4f} {e.cell.precision:6.3f} {e.cell.recall:6.3f} "
                    f"{e.cell.f1:7.4f} {e.cell_dice_all_pixels:11.4f}"
                )
        if s := self.synthetic:
            lines.append(f"synthetic fields: {s.fields}")
            lines.append(f"{'class':12} {'Dice':>7} {'IoU':>7} {'prec':>7} {'recall':>7} {'F1':>7}")
            for c in s.report.classes:
                lines.append(
                    f"{c.name:12} {c.dice:7.4f} {c.iou:7.4f} {c.precision:7.4f} {c.recall:7.4f} {c.f1:7.4f}"
                )
            lines.append(f"pixel accuracy {s.pixel_accuracy:.4f}")
            b = s.blast_objects
            lines.append(
                f"blast detection (IoU >= 0.5): precision {b.precision:.4f} recall {b.recall:.4f} F1 {b.f1:.4f}"
                f" (tp {b.tp}, fp {b.fp}, fn {b.fn})"
            )
            lines.append(f"white-cell detection F1 {s.cell_objects.f1:.4f}")
            lines.append(
                f"blast percentage: mean absolute error {s.blast_percent_abs_error:.2f} points per field"
            )
        return "\n".join(lines)


def evaluate_folder(
    folder: Path, *, model: Path | None = None, split: str = "test", mpp: float | None = None
) -> EvaluationReport:
    """Evaluate a model on a segmentation_wbc folder or a `blastq synth` folder."""
    folder = Path(folder)
    engine, info = load_engine(model)
    if (folder / "dataset1").is_dir() or (folder / "dataset2").is_dir():
        datasets = tuple(d for d in ("dataset1", "dataset2") if (folder / d).is_dir())
        items = segmentation_wbc_items(folder, None if split == "all" else split, datasets)
        with tqdm(total=len(items), desc="evaluate", unit="image", disable=None) as bar:
            wbc = evaluate_wbc(engine, info, items, tick=bar.update)
        return EvaluationReport(info.version, str(folder), split, wbc=tuple(wbc))
    try:
        images = synth_folder_items(folder)
    except InvalidDataset:
        raise InvalidDataset(
            f"{folder} is neither a segmentation_wbc folder (dataset1/, dataset2/) nor a `blastq synth` folder"
        ) from None

    def fields():
        for p in images:
            classes, _, instances = read_field_masks(p)
            yield read_rgb(p), classes, instances, mpp or 0.2

    with tqdm(total=len(images), desc="evaluate", unit="image", disable=None) as bar:
        synthetic = evaluate_synthetic(engine, info, list(fields()), tick=bar.update)
    return EvaluationReport(info.version, str(folder), "all", synthetic=synthetic)
