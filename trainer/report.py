"""`blastq evaluate`: figures for a model on a folder, as text, JSON or an HTML report.

    python -m blastq.trainer.report [MODEL.pt] --wbc ../shared/data/segmentation_wbc --out docs/report \
        --screenshot docs/report_plots.png

builds the report of a model (the shipped one by default) on every split of segmentation_wbc and the
fixed synthetic test fields.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

from blastq.core.cells import CellClassifier, load_cell_classifier
from blastq.core.common import InvalidDataset
from blastq.core.segment import Engine, ModelInfo, default_model_path, load_engine
from blastq.core.synth import generate_field, read_field_masks
from blastq.trainer.datasets import read_rgb, segmentation_wbc_items, synth_folder_items
from blastq.trainer.evaluate import (
    SYNTH_TEST_FIELDS,
    SYNTH_TEST_SIZE_PX,
    CaseKeeper,
    EvaluationReport,
    combine_wbc,
    evaluate_synthetic,
    evaluate_wbc,
    synth_truth,
    synthetic_test_fields,
)

WBC_SPLITS = ("train", "val", "test")


def _is_wbc_folder(folder: Path) -> bool:
    return (folder / "dataset1").is_dir() or (folder / "dataset2").is_dir()


def _wbc_items(folder: Path, split: str | None):
    datasets = tuple(d for d in ("dataset1", "dataset2") if (folder / d).is_dir())
    return segmentation_wbc_items(folder, split, datasets)


def _synth_images(folder: Path) -> list[Path]:
    try:
        return synth_folder_items(folder)
    except InvalidDataset:
        raise InvalidDataset(
            f"{folder} is neither a segmentation_wbc folder (dataset1/, dataset2/) nor a `blastq synth` folder"
        ) from None


# `blastq synth` names field i of a dataset synth_<seed + i>, and field i is generated from seed + i.
_SYNTH_STEM = re.compile(r"synth_(\d+)")


def synth_folder_kinds(
    image_path: Path, classes: np.ndarray, instances: np.ndarray, mpp: float
) -> Mapping[int, str] | None:
    """The true kind of each cell of a field written by `blastq synth`, or None when it cannot be known.

    The written masks hold no kinds, but the generator is deterministic: the field is generated again
    from the seed in its name (its size, `mpp`, the default blast fraction) and its kinds are taken only
    when its masks equal the written ones exactly (a renamed field, another --blast-fraction: None).
    """
    match = _SYNTH_STEM.fullmatch(Path(image_path).stem)
    if match is None:
        return None
    h, w = classes.shape
    field = generate_field(int(match.group(1)), h, w, mpp=mpp)
    if not (np.array_equal(field.classes, classes) and np.array_equal(field.instances, instances)):
        return None
    return synth_truth(field)[4]


def _evaluate_synth_folder(
    folder: Path,
    images: list[Path],
    engine: Engine,
    info: ModelInfo,
    mpp: float | None,
    tick: Callable[[int], None],
    cases: CaseKeeper | None,
    classifier: CellClassifier | None,
) -> EvaluationReport:
    def fields():  # read one field at a time: a large folder is never held in memory
        for p in images:
            classes, _, instances = read_field_masks(p)
            kinds = synth_folder_kinds(p, classes, instances, mpp or 0.2) if classifier is not None else None
            yield read_rgb(p), classes, instances, mpp or 0.2, kinds

    synthetic = evaluate_synthetic(
        engine, info, fields(), tick=tick, cases=cases, names=[p.name for p in images], classifier=classifier
    )
    return EvaluationReport(info.version, str(folder), "all", synthetic=synthetic)


def evaluate_folder(
    folder: Path,
    *,
    model: Path | None = None,
    split: str = "test",
    mpp: float | None = None,
    cases: CaseKeeper | None = None,
    classifier: str = "default",
) -> EvaluationReport:
    """Evaluate a model on a segmentation_wbc folder or a `blastq synth` folder.

    On a synth folder, `classifier` (a load_cell_classifier setting: "default", "none", a file) types
    the cells and is scored. With `cases`, every image is offered to it (the best and worst examples of
    a report).
    """
    folder = Path(folder)
    engine, info = load_engine(model)
    if _is_wbc_folder(folder):
        items = _wbc_items(folder, None if split == "all" else split)
        with tqdm(total=len(items), desc="evaluate", unit="image", disable=None) as bar:
            wbc = evaluate_wbc(engine, info, items, tick=bar.update, cases=cases)
        return EvaluationReport(info.version, str(folder), split, wbc=tuple(wbc))
    images = _synth_images(folder)
    typer = load_cell_classifier(classifier)
    with tqdm(total=len(images), desc="evaluate", unit="image", disable=None) as bar:
        return _evaluate_synth_folder(folder, images, engine, info, mpp, bar.update, cases, typer)


def history_path(model: Path | None) -> Path:
    """Where train() leaves a checkpoint's training history: `<checkpoint>.history.json`."""
    return Path(model or default_model_path()).with_suffix(".history.json")


def _history(model: Path | None):
    from blastq.trainer.reporting import load_history

    path = history_path(model)
    return load_history(path) if path.is_file() else None


def write_folder_report(
    folder: Path,
    out_dir: Path,
    *,
    model: Path | None = None,
    split: str = "test",
    mpp: float | None = None,
    k: int = 4,
    classifier: str = "default",
) -> tuple[EvaluationReport, Path]:
    """Evaluate as evaluate_folder does and write the HTML report into out_dir: (figures, report.html).

    segmentation_wbc with split "all" is evaluated split by split, so Table I shows train, val and test
    side by side (the returned figures are all of them together). The loss curve comes from the
    checkpoint's `.history.json` when there is one.
    """
    from blastq.trainer.reporting import write_report

    folder = Path(folder)
    engine, info = load_engine(model)
    if _is_wbc_folder(folder):
        splits = WBC_SPLITS if split == "all" else (split,)
        items = {s: _wbc_items(folder, s) for s in splits}
        cases = CaseKeeper(k, f"segmentation_wbc, {'all splits' if split == 'all' else split}")
        by_split = {}
        with tqdm(total=sum(map(len, items.values())), desc="evaluate", unit="image", disable=None) as bar:
            for s in splits:
                wbc = evaluate_wbc(engine, info, items[s], tick=bar.update, cases=cases)
                by_split[s] = EvaluationReport(info.version, str(folder), s, wbc=tuple(wbc))
        overall = (
            by_split[split]
            if split != "all"
            else EvaluationReport(
                info.version,
                str(folder),
                "all",
                wbc=tuple(combine_wbc(e for r in by_split.values() for e in r.wbc)),
            )
        )
    else:
        images = _synth_images(folder)
        typer = load_cell_classifier(classifier)
        cases = CaseKeeper(k, f"synthetic fields in {folder.name}/")
        with tqdm(total=len(images), desc="evaluate", unit="image", disable=None) as bar:
            overall = _evaluate_synth_folder(folder, images, engine, info, mpp, bar.update, cases, typer)
        by_split = {"all": overall}
    page = write_report(
        out_dir, model_info=info, evaluations_by_split=by_split, history=_history(model), cases=cases.result()
    )
    return overall, page


def model_report(
    out_dir: Path,
    *,
    wbc_root: Path,
    model: Path | None = None,
    synth_fields: int | None = None,
    k: int = 4,
    screenshot: Path | None = None,
) -> Path:
    """The full report of a model: every split of segmentation_wbc, the model card's synthetic test fields.

    Examples are held-out images only: the segmentation_wbc test split and the synthetic test fields.
    With `screenshot`, also writes the README picture (loss curve beside the examples) there.
    """
    # The model card's synthetic test set, so the report and the card agree (imported here: modelcard
    # imports this module).
    from blastq.trainer.reporting import report_plots_png, write_report

    engine, info = load_engine(model)
    n_fields = SYNTH_TEST_FIELDS if synth_fields is None else synth_fields
    items = {s: segmentation_wbc_items(wbc_root, s) for s in WBC_SPLITS}
    wbc_cases = CaseKeeper(k, "segmentation_wbc test")
    synth_cases = CaseKeeper(k, "synthetic test fields")
    by_split: dict[str, EvaluationReport] = {}
    with tqdm(
        total=sum(map(len, items.values())) + n_fields, desc="report", unit="image", disable=None
    ) as bar:
        for s in WBC_SPLITS:
            wbc = evaluate_wbc(
                engine, info, items[s], tick=bar.update, cases=wbc_cases if s == "test" else None
            )
            by_split[s] = EvaluationReport(info.version, str(wbc_root), s, wbc=tuple(wbc))
        synthetic = None
        if n_fields:
            fields = (synth_truth(f) for f in synthetic_test_fields(n_fields, SYNTH_TEST_SIZE_PX))
            names = [f"test field {i} ({SYNTH_TEST_SIZE_PX} px)" for i in range(n_fields)]
            synthetic = evaluate_synthetic(
                engine, info, fields, tick=bar.update, cases=synth_cases, names=names
            )
    by_split["test"] = EvaluationReport(
        info.version,
        f"{wbc_root} + synthetic test fields",
        "test",
        wbc=by_split["test"].wbc,
        synthetic=synthetic,
    )
    groups = [wbc_cases.result()] + ([synth_cases.result()] if n_fields else [])
    page = write_report(
        out_dir, model_info=info, evaluations_by_split=by_split, history=_history(model), cases=groups
    )
    if screenshot is not None:
        Path(screenshot).write_bytes(report_plots_png(_history(model), groups))
    return page


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, nargs="?", help="checkpoint (default: the shipped model)")
    ap.add_argument("--wbc", type=Path, required=True, help="segmentation_wbc folder")
    ap.add_argument("--out", type=Path, required=True, help="folder for report.html and its files")
    ap.add_argument("--fields", type=int, help="synthetic test fields (default: as the model card)")
    ap.add_argument("--screenshot", type=Path, help="also write the README picture of the plots here")
    args = ap.parse_args()
    page = model_report(
        args.out, wbc_root=args.wbc, model=args.model, synth_fields=args.fields, screenshot=args.screenshot
    )
    print(page)


if __name__ == "__main__":
    main()
