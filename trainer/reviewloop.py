"""The learning loop on real cells, end to end through the review station's database and store.

    python -m blastq.trainer.reviewloop --wbc ../shared/data/segmentation_wbc --work /tmp/loop

1. A base classifier that never saw the lab's source: the shipped recipe (SVM on cell features) fit on
   synthetic cells (seeds 5,000,000+) and segmentation_wbc dataset1 only.
2. The "lab": segmentation_wbc dataset2 (another camera and stain), run through `blastq run`'s pipeline
   with the base classifier, its crops grouped into samples of ten, recorded in a database and store.
3. A scripted review: in every crop, the cell nearest its centre is the labelled one and is given its
   label (the dataset's); the other cells a crop cuts at its edge are called unidentified (untypable).
   A technologist account completes each sample, a pathologist account signs it off.
4. `fine-tune from reviews` (blastq.trainer.fromreviews.adapt): the lab's samples split by sample into
   training and held-out parts; figures of base and candidate on the held-out samples' cells, and on the
   shipped test cells (synthetic test fields, seeds 7,000,000+; dataset1 for retention).

Prints a table and writes WORK/loop.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wbc", type=Path, required=True, help="the segmentation_wbc folder")
    parser.add_argument("--work", type=Path, required=True, help="a folder for the database, store and files")
    parser.add_argument("--per-sample", type=int, default=10, help="crops per sample")
    parser.add_argument("--heldout", type=float, default=0.5, help="share of samples held out")
    parser.add_argument("--anchor-fields", type=int, default=60, help="synthetic anchor fields")
    parser.add_argument("--test-fields", type=int, default=20, help="synthetic test fields")
    parser.add_argument("--lab-weight", type=float, default=3.0)
    args = parser.parse_args(argv)

    from blastq.core.adapters import (
        Settings,
        add_user,
        complete_review,
        get_user,
        reclassify,
        sample_review,
        sign_off,
        store_from_settings,
    )
    from blastq.core.cells import CELL_TYPES, load_cell_classifier
    from blastq.core.pipeline import LocalRunner
    from blastq.trainer.celldata import concat_cells, read_wbc_labels, synthetic_cells, wbc_cells
    from blastq.trainer.compare import fit_final
    from blastq.trainer.datasets import segmentation_wbc_items
    from blastq.trainer.fromreviews import ANCHOR_SEED, TEST_SEED, adapt, review_cells

    started = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    print("anchor and test cells ...", flush=True)
    anchors_synth = synthetic_cells(args.anchor_fields, seed=ANCHOR_SEED, variety="mixed")
    dataset1 = wbc_cells(args.wbc, datasets=("dataset1",))
    anchors = concat_cells(anchors_synth, dataset1)
    tests = {
        "synthetic test fields": synthetic_cells(args.test_fields, seed=TEST_SEED, variety="mixed"),
        "dataset1 (retention)": dataset1,
    }
    base_path = work / "base.pt"
    fit_final("svm", {"synthetic": anchors_synth, "dataset1": dataset1}, version="base-no-dataset2").save(
        base_path
    )
    base = load_cell_classifier(str(base_path))

    settings = Settings(data_dir=work / "data", classifier=str(base_path))
    runner = LocalRunner.from_settings(settings)
    truth = read_wbc_labels(args.wbc / "labels_dataset2.csv")
    items = [i for i in segmentation_wbc_items(args.wbc, datasets=("dataset2",)) if i.number in truth]
    print(f"running {len(items)} dataset2 crops through the pipeline ...", flush=True)
    wanted: dict[str, list[tuple[tuple[int, int], str]]] = {}
    missed = 0
    for k, item in enumerate(items):
        sample = f"ds2-{k // args.per_sample:02d}"
        result = runner.run(item.image_path, mpp=item.mpp, sample=sample)
        cells = result.maps.cells
        if not cells:
            missed += 1
            continue
        h, w = result.height, result.width
        centre = min(cells, key=lambda c: (c.centroid_x - w / 2) ** 2 + (c.centroid_y - h / 2) ** 2)
        from blastq.core.adapters import find_result

        result_id = find_result(runner.db, result.sha256, result.model_version, result.params_key)
        for c in cells:
            label = CELL_TYPES[truth[item.number]] if c is centre else "unidentified"
            wanted.setdefault(sample, []).append(((result_id, c.cell_id), label))

    for name, password, role in (
        ("loop-tech", "loop-tech-password", "technologist"),
        ("loop-path", "loop-path-password", "pathologist"),
    ):
        if get_user(runner.db, name) is None:
            add_user(runner.db, name, password, role)
    changed = 0
    for sample, cells in wanted.items():
        review = sample_review(runner.db, sample)
        current = {(c.result_id, c.cell_id): c.current for c in review.cells}
        by_label: dict[str, list] = {}
        for key, label in cells:
            if current.get(key) != label:
                by_label.setdefault(label, []).append(key)
        for label, keys in by_label.items():
            reclassify(runner.db, sample, keys, label, "loop-tech")
            changed += len(keys)
        complete_review(runner.db, sample, "loop-tech")
        sign_off(runner.db, sample, "loop-path")
    print(
        f"reviewed {len(wanted)} samples, {changed} cells reclassified; training from reviews ...", flush=True
    )

    lab = review_cells(runner.db, store_from_settings(settings))
    adaptation = adapt(
        base,
        lab,
        anchors,
        tests,
        heldout_share=args.heldout,
        lab_weight=args.lab_weight,
        version="lab-from-reviews",
    )
    # The other way round too: trained on what was held out, judged on what was trained on (with a share
    # of 0.5 the two runs are a two-fold cross-validation by sample: every lab cell judged once, unseen).
    swapped = adapt(
        base,
        lab,
        anchors,
        {},
        heldout_share=args.heldout,
        lab_weight=args.lab_weight,
        version="lab-swapped",
        swap=True,
    )
    report = {
        "crops": len(items),
        "crops_without_a_cell": missed,
        "samples": len(wanted),
        "cells_reclassified": changed,
        "lab_cells": len(lab),
        **adaptation.metrics(),
        "swapped": {"lab_heldout": swapped.heldout, "split": swapped.split, "acceptable": swapped.acceptable},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (work / "loop.json").write_text(json.dumps(report, indent=2))
    print(table(report))


def table(report: dict) -> str:
    rows = [
        ("lab held-out samples", report["lab_heldout"]),
        ("lab, the other half held out", report["swapped"]["lab_heldout"]),
        *report["shipped_tests"].items(),
    ]
    lines = [
        "| cells | n | accuracy before -> after | macro F1 before -> after |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in rows:
        b, c = r["base"], r["candidate"]
        lines.append(
            f"| {name} | {r['cells']} | {b['accuracy']:.3f} -> {c['accuracy']:.3f} | {b['macro_f1']:.3f} -> {c['macro_f1']:.3f} |"
        )
    lines.append(f"acceptable: {report['acceptable']} ({'; '.join(report['reasons'])})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
