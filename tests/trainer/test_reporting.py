"""The evaluation report: loss curves, best and worst examples, Table I, the HTML page, `evaluate --report`."""

from __future__ import annotations

import io
import json
import re

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from blastq.cli.main import main
from blastq.core.segment.unet import CLASS_NAMES, ModelInfo
from blastq.trainer.datasets import segmentation_wbc_items
from blastq.trainer.evaluate import (
    WBC_CASE_LABELS,
    CaseKeeper,
    ImageCase,
    SynthEvaluation,
    WbcEvaluation,
    case_view,
    combine_wbc,
    evaluate_wbc,
    pick_cases,
)
from blastq.trainer.metrics import ObjectCounts, PixelCounts, segmentation_report
from blastq.trainer.report import EvaluationReport, history_path
from blastq.trainer.reporting import (
    REPORT_FILES,
    best_epoch,
    examples_grid_png,
    grid_size_px,
    load_history,
    loss_curve_png,
    report_plots_png,
    table_one,
    write_report,
)
from blastq.trainer.train import EpochLog


def decode(png: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not a decodable PNG"
    return image


def fake_case(name: str, dice: float, size: int = 24, labels=CLASS_NAMES) -> ImageCase:
    rng = np.random.default_rng(len(name))
    truth = np.zeros((size, size), np.uint8)
    truth[4:12, 4:12] = 2
    return ImageCase(
        name=name,
        dice=dice,
        metric="blast Dice",
        image=rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
        truth=truth,
        pred=np.roll(truth, 2, axis=1),
        label_names=labels,
    )


HISTORY = [
    EpochLog(1, 2.0, 1.5, 3.0),
    EpochLog(2, 1.0, 0.9, 3.0),
    EpochLog(3, 0.6, 0.7, 3.0),
    EpochLog(4, 0.5, 0.7, 3.0),  # ties the best: the first one is kept, as train() keeps it
    EpochLog(5, 0.4, 0.8, 3.0),
]


def test_loss_curve_is_a_png_with_the_best_epoch_marked():
    png = loss_curve_png(HISTORY)
    assert decode(png).shape == (400, 640, 3)
    assert best_epoch(HISTORY) == 3
    assert Image.open(io.BytesIO(png)).text["blastq:best_epoch"] == "3"


def test_history_rows_from_json_give_the_same_curve(tmp_path):
    path = tmp_path / "m.history.json"
    path.write_text(json.dumps([{**h.__dict__, "lr": 0.001} for h in HISTORY]))  # unknown fields are skipped
    assert load_history(path) == tuple(HISTORY)
    assert best_epoch([h.__dict__ for h in HISTORY]) == 3


def test_shipped_model_has_its_training_history():
    history = load_history(history_path(None))
    assert len(history) >= 1 and best_epoch(history) in {h.epoch for h in history}


def test_best_and_worst_are_the_k_highest_and_lowest_dice():
    dice = np.random.default_rng(0).permutation(np.linspace(0.1, 0.99, 30))
    picked = pick_cases((fake_case(f"im{i}", float(d)) for i, d in enumerate(dice)), k=4, title="t")
    ranked = sorted(dice)
    assert [c.dice for c in picked.best] == pytest.approx(ranked[::-1][:4])
    assert [c.dice for c in picked.worst] == pytest.approx(ranked[:4])
    assert picked.images == 30 and picked.title == "t"


def test_the_keeper_never_holds_more_than_2k_images():
    keeper = CaseKeeper(k=3)
    for i in range(50):
        keeper.add(fake_case(f"im{i}", (i * 37 % 50) / 50))
        assert len(keeper) <= 6


def test_equal_dice_never_puts_one_image_among_both_best_and_worst():
    picked = pick_cases([fake_case(f"im{i}", 0.5) for i in range(8)], k=4)
    assert {c.name for c in picked.best}.isdisjoint(c.name for c in picked.worst)
    assert [c.name for c in picked.best] == ["im0", "im1", "im2", "im3"]


def test_few_images_are_split_between_best_and_worst():
    picked = pick_cases([fake_case("a", 0.9), fake_case("b", 0.2), fake_case("c", 0.5)], k=4)
    assert [c.name for c in picked.best] == ["a", "c"] and [c.name for c in picked.worst] == ["b"]
    one = pick_cases([fake_case("a", 0.9)], k=4)
    assert len(one.best) == 1 and one.worst == ()


def test_large_images_are_cropped_to_the_window_with_most_focus():
    rgb = np.zeros((600, 500, 3), np.uint8)
    truth = np.zeros((600, 500), np.uint8)
    truth[500:540, 400:450] = 2
    image, t, p = case_view(rgb, truth, truth.copy(), truth == 2, size_px=100)
    assert image.shape == (100, 100, 3) and t.shape == p.shape == (100, 100)
    assert (t == 2).sum() == 40 * 50  # the whole object is inside the window
    small = case_view(rgb[:50, :50], truth[:50, :50], truth[:50, :50], truth[:50, :50] > 0, size_px=100)
    assert small[0].shape == (50, 50, 3)


def test_examples_grid_has_a_row_of_three_panels_per_case():
    picked = pick_cases([fake_case(f"im{i}", i / 10) for i in range(10)], k=2, title="synthetic")
    grid = decode(examples_grid_png(picked))
    assert grid.shape[:2] == grid_size_px(rows=4)
    wbc = pick_cases([fake_case("w", 0.8, labels=WBC_CASE_LABELS)], k=4, title="real")
    both = decode(examples_grid_png([picked, wbc]))
    assert both.shape[:2] == grid_size_px(rows=4, groups=2)
    # The prediction panel of the first row shows blast red (RGB 230, 0, 0; BGR in OpenCV).
    assert ((grid[..., 2] > 200) & (grid[..., 1] < 30) & (grid[..., 0] < 30)).any()


def fake_evaluations() -> dict[str, EvaluationReport]:
    def wbc(dice: float, acc: float) -> WbcEvaluation:
        return WbcEvaluation(
            dataset="dataset1", images=10, cell_dice=dice, cell_dice_all_pixels=dice - 0.01, cell_iou=dice - 0.05,
            nucleus_dice=0.9, nucleus_iou=0.82, pixel_accuracy=acc, cell=PixelCounts(90, 5, 5, 900),
            nucleus=PixelCounts(40, 4, 6, 950), pixels=1000,
        )  # fmt: skip

    truth = np.zeros((20, 20), np.uint8)
    truth[2:8, 2:8], truth[10:16, 10:16] = 1, 2
    pred = truth.copy()
    pred[10:12, 10:16] = 0
    synth = SynthEvaluation(
        fields=3, blast_dice=0.8571, blast_iou=0.75, white_cell_dice=1.0, pixel_accuracy=0.97,
        blast_objects=ObjectCounts(3, 1, 0, 2.4), cell_objects=ObjectCounts(8, 1, 1, 7.0),
        blast_percent_abs_error=1.25, report=segmentation_report(pred, truth, CLASS_NAMES),
    )  # fmt: skip
    return {
        "train": EvaluationReport("v1", "data", "train", wbc=(wbc(0.9876, 0.975),)),
        "val": EvaluationReport("v1", "data", "val", wbc=(wbc(0.9512, 0.9634),)),
        "test": EvaluationReport("v1", "data", "test", wbc=(wbc(0.9401, 0.951),), synthetic=synth),
    }


def test_table_one_has_the_splits_side_by_side():
    table = table_one(fake_evaluations())
    assert table.columns == ("train", "val", "test")
    dice = next(r for r in table.rows if r.metric == "whole-cell Dice")
    assert dice.formatted() == ("0.988", "0.951", "0.940")
    blast_f1 = next(r for r in table.rows if r.metric == "blast detection F1")
    assert blast_f1.formatted() == ("–", "–", "0.857")
    assert "| whole-cell Dice | 0.988 | 0.951 | 0.940 |" in table.as_markdown()


def test_write_report_writes_the_page_plots_and_figures(tmp_path):
    cases = pick_cases([fake_case(f"field{i}", i / 5) for i in range(6)], k=2, title="synthetic test")
    page = write_report(
        tmp_path / "r",
        model_info=ModelInfo(version="v1", mpp=0.2, preprocess={}, sha256="abc"),
        evaluations_by_split=fake_evaluations(),
        history=HISTORY,
        cases=cases,
    )
    assert sorted(p.name for p in page.parent.iterdir()) == sorted(REPORT_FILES)
    text = page.read_text()
    for figure in ("0.988", "0.951", "0.940", "97.5%", "96.3%", "95.1%", "0.857", "1.25"):
        assert figure in text
    assert 'src="loss_curve.png"' in text and 'src="examples.png"' in text and "field5" in text
    figures = json.loads((page.parent / "metrics.json").read_text())
    assert (
        figures["best_epoch"] == 3
        and figures["splits"]["val"]["segmentation_wbc"]["dataset1"]["cell_dice"] == 0.9512
    )
    assert [e["name"] for e in figures["examples"]] == ["field5", "field4", "field0", "field1"]
    plots = decode(report_plots_png(HISTORY, cases, rows_per_kind=1))
    assert plots.shape[0] == grid_size_px(rows=2)[0]


@pytest.mark.realdata
def test_split_by_split_figures_combine_to_the_figures_of_all_images(wbc_root, shipped_engine):
    engine, info = shipped_engine
    items = [it for it in segmentation_wbc_items(wbc_root, None, ("dataset1",)) if it.number <= 5]
    keeper = CaseKeeper(k=1)
    together = evaluate_wbc(engine, info, items, cases=keeper)
    parts = evaluate_wbc(engine, info, items[:2]) + evaluate_wbc(engine, info, items[2:])
    (combined,) = combine_wbc(parts)
    (expected,) = together
    assert combined.images == expected.images == len(items) and combined.cell == expected.cell
    assert combined.cell_dice == pytest.approx(expected.cell_dice)
    assert combined.pixel_accuracy == pytest.approx(expected.pixel_accuracy)
    cases = keeper.result()
    assert cases.best[0].dice >= cases.worst[0].dice
    assert all(
        re.fullmatch(r"dataset1/\d{3}\.bmp \((train|val|test)\)", c.name) for c in cases.best + cases.worst
    )


def test_evaluate_writes_a_report_for_a_synth_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("BLASTQ_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("BLASTQ_MODEL", raising=False)
    runner = CliRunner()
    fields = tmp_path / "fields"
    args = ["synth", "--count", "2", "--size", "256", "--blast-fraction", "0.6", "--out", str(fields)]
    assert runner.invoke(main, args).exit_code == 0
    result = runner.invoke(main, ["evaluate", str(fields), "--json", "--report", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["synthetic"]["fields"] == 2
    page = tmp_path / "out" / "report.html"
    assert "blast" in page.read_text() and (tmp_path / "out" / "examples.png").is_file()
    # The shipped model has its training history beside it: the report shows its loss curve.
    assert (tmp_path / "out" / "loss_curve.png").is_file()
