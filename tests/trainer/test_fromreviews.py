"""Learning from the lab's labelled cells: the split by sample, the refit, the verdict, and the whole loop from
signed-off reviews to a classifier file."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from blastq.core.cells import CELL_TYPES, CellCrop, load_cell_classifier
from blastq.core.common import InvalidConfig, InvalidDataset
from blastq.trainer.celldata import synthetic_cells
from blastq.trainer.fromreviews import (
    LabCells,
    adapt,
    figures,
    fine_tune,
    held_out_group,
    not_worse,
    split,
    type_labels,
)


def lab_from(cells, source="reviews", tint=None) -> LabCells:
    """trainer.celldata cells as a lab's: one sample per field, optionally in another lab's stain."""
    crops = []
    for c in cells.crops:
        rgb = c.rgb if tint is None else tint(c.rgb, c.cell)
        crops.append(CellCrop(rgb, c.cell, c.nucleus, c.mpp))
    return LabCells(
        crops,
        [CELL_TYPES[int(i)] for i in cells.labels],
        [f"sample-{int(g)}" for g in cells.groups],
        list(cells.names),
        source,
    )


def other_stain(rgb: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """A stain the shipped classifier never saw: the cell's colours rotated (purple nuclei turn teal)."""
    out = rgb.copy()
    out[cell] = rgb[cell][:, [1, 2, 0]]
    return out


@pytest.fixture(scope="module")
def anchors():
    return synthetic_cells(4, seed=5_000_000, variety="mixed")


@pytest.fixture(scope="module")
def lab_cells():
    return synthetic_cells(10, seed=8_100_000, variety="classic")


def test_a_sample_is_wholly_on_one_side_and_its_side_does_not_depend_on_the_others(lab_cells):
    lab = lab_from(lab_cells)
    train, held, described = split(lab, 0.3)
    assert set(train.groups).isdisjoint(held.groups)
    assert len(train) + len(held) == len(lab)
    assert described["heldout_groups"] == sorted(set(held.groups)) and described["unit"] == "sample"
    fewer = lab.subset([g != described["train_groups"][0] for g in lab.groups])
    _, held_again, _ = split(fewer, 0.3)
    assert set(held_again.groups) == set(held.groups)  # per-sample hash: others leaving changes nothing
    assert all(held_out_group(g, 0.3) for g in described["heldout_groups"])


def test_a_split_needs_two_samples_and_a_share_between_0_and_1(lab_cells):
    lab = lab_from(lab_cells)
    one = lab.subset([g == lab.groups[0] for g in lab.groups])
    with pytest.raises(InvalidDataset, match="at least two"):
        split(one, 0.5)
    with pytest.raises(InvalidConfig):
        split(lab, 1.0)
    two = lab.subset([g in (lab.groups[0], lab.groups[-1]) for g in lab.groups])
    train, held, _ = split(two, 0.01)  # the share rounds to no sample: one is held out anyway
    assert len(set(train.groups)) == 1 and len(set(held.groups)) == 1


def test_other_cells_take_the_base_classifiers_normal_type(lab_cells):
    base = load_cell_classifier("default")
    lab = lab_from(lab_cells)
    lab = LabCells(lab.crops[:12], ["other"] * 12, lab.groups[:12], lab.names[:12], "reviews")
    labels = type_labels(base, lab)
    assert (labels != CELL_TYPES.index("blast")).all()
    probs = base.predict_proba(lab.crops)
    probs[:, CELL_TYPES.index("blast")] = -1
    assert (labels == probs.argmax(axis=1)).all()


def test_refitting_on_a_labs_stain_does_better_on_its_held_out_samples(anchors, lab_cells):
    base = load_cell_classifier("default")
    lab = lab_from(lab_cells, tint=other_stain)
    adaptation = adapt(base, lab, anchors, {"synthetic": anchors}, heldout_share=0.4, lab_weight=3.0)
    before, after = adaptation.heldout["base"], adaptation.heldout["candidate"]
    assert after["macro_f1"] > before["macro_f1"] + 0.1, (before, after)
    assert after["blast_sensitivity"] >= before["blast_sensitivity"]
    written = adaptation.classifier.info.metrics
    assert written["split"]["heldout_groups"] == adaptation.split["heldout_groups"]
    assert written["lab_heldout"]["candidate"] == after


def test_not_worse_compares_macro_f1_and_blast_sensitivity():
    base = {"macro_f1": 0.8, "blast_sensitivity": 0.9}
    assert not_worse({"macro_f1": 0.8, "blast_sensitivity": 0.9}, base)[0]
    assert not not_worse({"macro_f1": 0.79, "blast_sensitivity": 0.95}, base)[0]
    assert not_worse({"macro_f1": 0.795, "blast_sensitivity": 0.9}, base, tolerance=0.01)[0]
    assert "blast sensitivity" in not_worse({"macro_f1": 0.9, "blast_sensitivity": 0.8}, base)[1]
    assert not_worse({"macro_f1": 0.9, "blast_sensitivity": None}, base)[0]


def test_only_feature_classifiers_are_refit(anchors, lab_cells):
    from dataclasses import replace

    from blastq.core.cells import CellClassifier

    base = load_cell_classifier("default")
    cnn = CellClassifier(replace(base.info, kind="cnn"), torch_model=object())
    with pytest.raises(InvalidConfig, match="cannot be refit"):
        fine_tune(cnn, lab_from(lab_cells), anchors)


def test_figures_count_blast_calls_on_other_cells_too(lab_cells):
    base = load_cell_classifier("default")
    lab = lab_from(lab_cells)
    f = figures(base, lab.crops, ["other" if l != "blast" else l for l in lab.labels])
    assert f.typed_cells == lab.labels.count("blast") and f.cells == len(lab)
    assert f.blast_specificity is not None and 0 <= f.blast_specificity <= 1


@pytest.mark.slow
def test_train_from_reviews_end_to_end(tmp_path, monkeypatch, smear):
    """Pipeline -> two samples -> review (reclassify, complete, sign off) -> `blastq classifier train
    --from-reviews` -> a classifier file that loads, with the split and both sets of figures in it."""
    import cv2

    from blastq.cli.main import main
    from blastq.core.adapters import (
        Settings,
        complete_review,
        reclassify,
        sample_review,
        sign_off,
    )
    from blastq.core.pipeline import LocalRunner
    from blastq.core.synth.field import generate_field

    settings = Settings(data_dir=tmp_path / "data")
    runner = LocalRunner.from_settings(settings)
    for k in range(4):
        field = generate_field(8_200_000 + k, 512, 512, mpp=0.2, wbc_per_10k_um2=14.0, blast_fraction=0.3)
        path = tmp_path / f"f{k}.png"
        cv2.imwrite(str(path), field.image[..., ::-1])
        runner.run(path, mpp=0.2, sample=f"S{k}")
    for k in range(4):
        review = sample_review(runner.db, f"S{k}")
        first = review.cells[0]
        reclassify(runner.db, f"S{k}", [(first.result_id, first.cell_id)], "smudge", "ana")
        complete_review(runner.db, f"S{k}", "ana")
        sign_off(runner.db, f"S{k}", "pat")
    monkeypatch.setenv("BLASTQ_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "lab.pt"
    result = CliRunner().invoke(
        main,
        ["classifier", "train", "--from-reviews", "--out", str(out), "--anchor-fields", "3", "--test-fields", "1",
         "--heldout", "0.5", "--version", "lab-test", "--register"],
    )  # fmt: skip
    assert result.exit_code in (0, 1), result.output
    assert "lab held-out" in result.output and f"wrote {out}" in result.output
    assert "registered classifier lab-test as a candidate" in result.output
    listed = CliRunner().invoke(main, ["classifier", "list"])
    assert listed.output.startswith("lab-test\tcandidate\tbase blastq-cells-")
    trained = load_cell_classifier(str(out))
    assert trained.info.version == "lab-test"
    split_written = trained.info.metrics["split"]
    assert split_written["unit"] == "sample"
    assert set(split_written["train_groups"]) | set(split_written["heldout_groups"]) == {
        "S0",
        "S1",
        "S2",
        "S3",
    }
    # Smudges teach no type: every cell but the four smudges was learnt from or held out.
    total = sum(len(sample_review(runner.db, f"S{k}").cells) for k in range(4))
    assert split_written["train_cells"] + split_written["heldout_cells"] == total - 4

    # The blast / not-blast call from the same reviews: a caller file the pipeline reads.
    from blastq.core.cells.blastcall import read_caller

    caller_path = tmp_path / "caller.json"
    fitted = CliRunner().invoke(main, ["blast-caller", "fit", "--from-reviews", "--out", str(caller_path)])
    assert fitted.exit_code == 0, fitted.output
    assert "from 4 samples" in fitted.output
    caller = read_caller(caller_path)
    assert caller.trained_on == f"{total - 4} reviewed cells from 4 signed-off samples"
    both = CliRunner().invoke(
        main, ["blast-caller", "fit", "--from-reviews", str(caller_path), "--out", "x.json"]
    )
    assert both.exit_code == 2 and "one of them" in both.output


def test_the_command_says_what_is_missing(tmp_path):
    from blastq.cli.main import main

    for args, message in (
        ([], "--from-reviews or --cells"),
        (["--from-reviews", "--cells", str(tmp_path)], "--from-reviews or --cells"),
        (["--cells", str(tmp_path)], "--mpp"),
    ):
        result = CliRunner().invoke(main, ["classifier", "train", *args, "--out", str(tmp_path / "x.pt")])
        assert result.exit_code == 2 and message in result.output


def test_a_cells_folder_must_hold_class_folders(tmp_path):
    from blastq.cli.main import main

    (tmp_path / "cells" / "platelet").mkdir(parents=True)
    result = CliRunner().invoke(
        main,
        [
            "classifier",
            "train",
            "--cells",
            str(tmp_path / "cells"),
            "--mpp",
            "0.2",
            "--out",
            str(tmp_path / "x.pt"),
        ],
    )
    assert result.exit_code == 2 and "not cell classes" in result.output


def test_the_swapped_split_holds_out_exactly_what_the_rule_trains_on(lab_cells):
    lab = lab_from(lab_cells)
    train, held, described = split(lab, 0.5)
    train_swapped, held_swapped, swapped = split(lab, 0.5, swap=True)
    assert set(held_swapped.groups) == set(train.groups) and set(train_swapped.groups) == set(held.groups)
    assert ">= 0.5" in swapped["rule"] and "< 0.5" in described["rule"]
