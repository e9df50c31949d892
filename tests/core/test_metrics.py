from __future__ import annotations

import math

import numpy as np
import pytest

from blastq.trainer import metrics
from blastq.trainer.metrics import (
    ClassReport,
    ObjectCounts,
    PixelCounts,
    SegmentationReport,
    match_instances,
    mean_per_image,
    pixel_counts,
    segmentation_report,
)

CLASSES = ("background", "cell", "blast")


def _random_labels(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    return rng.integers(0, n, size=shape)


def _square_grid(rng: np.random.Generator, cells: int, cell_px: int, side_px: int) -> np.ndarray:
    """Instance map with one side_px square per cell_px grid cell, at a random offset in its cell."""
    size = cells * cell_px
    offsets = rng.integers(0, cell_px - side_px + 1, size=(cells, cells, 2))
    coord = np.arange(size) % cell_px
    cell = np.arange(size) // cell_px
    off_y = offsets[cell[:, None], cell[None, :], 0]
    off_x = offsets[cell[:, None], cell[None, :], 1]
    inside = (
        (coord[:, None] >= off_y)
        & (coord[:, None] < off_y + side_px)
        & (coord[None, :] >= off_x)
        & (coord[None, :] < off_x + side_px)
    )
    ids = (cell[:, None] * cells + cell[None, :] + 1).astype(np.int32)
    return np.where(inside, ids, 0)


# ---------------------------------------------------------------- pixel counts


def test_perfect_prediction_scores_one_everywhere():
    rng = np.random.default_rng(0)
    mask = rng.random((20, 30)) > 0.5
    counts = pixel_counts(mask, mask)
    assert (counts.fp, counts.fn) == (0, 0)
    for value in (counts.dice, counts.iou, counts.precision, counts.recall, counts.f1, counts.accuracy):
        assert value == 1.0

    labels = _random_labels(rng, (20, 30), 3)
    report = segmentation_report(labels, labels, CLASSES)
    assert report.pixel_accuracy == 1.0
    assert report.mean_dice == report.mean_iou == report.mean_f1 == 1.0
    assert all(c.dice == c.iou == c.precision == c.recall == c.f1 == 1.0 for c in report.classes)

    instances = _square_grid(rng, cells=4, cell_px=16, side_px=8)
    objects = match_instances(instances, instances)
    assert (objects.tp, objects.fp, objects.fn) == (16, 0, 0)
    assert objects.precision == objects.recall == objects.f1 == objects.mean_matched_iou == 1.0
    assert objects.panoptic_quality == 1.0


def test_hand_counted_example_gives_exact_ratios():
    truth = np.array(
        [
            [1, 1, 1, 0],
            [1, 1, 0, 0],
            [0, 0, 0, 0],
        ],
        dtype=bool,
    )
    pred = np.array(
        [
            [1, 1, 0, 0],
            [1, 0, 0, 1],
            [0, 0, 0, 0],
        ],
        dtype=bool,
    )
    counts = pixel_counts(pred, truth)
    assert counts == PixelCounts(tp=3, fp=1, fn=2, tn=6)
    assert counts.total == 12
    assert counts.dice == pytest.approx(6 / 9)
    assert counts.iou == pytest.approx(3 / 6)
    assert counts.precision == pytest.approx(3 / 4)
    assert counts.recall == pytest.approx(3 / 5)
    assert counts.f1 == pytest.approx(2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))
    assert counts.accuracy == pytest.approx(9 / 12)


def test_nonzero_integer_masks_count_as_foreground():
    assert pixel_counts(np.array([[0, 2], [7, 0]]), np.array([[0, 1], [0, 1]])) == PixelCounts(1, 1, 1, 1)


@pytest.mark.parametrize("seed", range(5))
def test_iou_equals_dice_over_two_minus_dice(seed: int):
    rng = np.random.default_rng(seed)
    pred = rng.random((16, 16)) > rng.random()
    truth = rng.random((16, 16)) > rng.random()
    counts = pixel_counts(pred, truth)
    assert counts.iou == pytest.approx(counts.dice / (2 - counts.dice))


@pytest.mark.parametrize(
    "counts",
    [PixelCounts(0, 0, 0, 5), PixelCounts(0, 3, 0, 5), PixelCounts(0, 0, 3, 5), PixelCounts(4, 0, 0, 0)],
)
def test_iou_dice_relation_and_f1_hold_in_empty_cases(counts: PixelCounts):
    assert counts.iou == pytest.approx(counts.dice / (2 - counts.dice))
    assert counts.f1 == counts.dice


def test_counts_add_across_images():
    rng = np.random.default_rng(1)
    pred_a, truth_a = rng.random((8, 10)) > 0.4, rng.random((8, 10)) > 0.6
    pred_b, truth_b = rng.random((8, 12)) > 0.7, rng.random((8, 12)) > 0.3
    joined = pixel_counts(np.hstack([pred_a, pred_b]), np.hstack([truth_a, truth_b]))
    assert pixel_counts(pred_a, truth_a) + pixel_counts(pred_b, truth_b) == joined
    assert sum([pixel_counts(pred_a, truth_a), pixel_counts(pred_b, truth_b)]) == joined


def test_segmentation_reports_add_like_concatenated_images():
    rng = np.random.default_rng(2)
    pred_a, truth_a = _random_labels(rng, (9, 7), 3), _random_labels(rng, (9, 7), 3)
    pred_b, truth_b = _random_labels(rng, (9, 5), 3), _random_labels(rng, (9, 5), 3)
    valid_a, valid_b = rng.random((9, 7)) > 0.2, rng.random((9, 5)) > 0.2
    summed = segmentation_report(pred_a, truth_a, CLASSES, valid=valid_a) + segmentation_report(
        pred_b, truth_b, CLASSES, valid=valid_b
    )
    joined = segmentation_report(
        np.hstack([pred_a, pred_b]),
        np.hstack([truth_a, truth_b]),
        CLASSES,
        valid=np.hstack([valid_a, valid_b]),
    )
    assert summed == joined
    assert summed.pixel_accuracy == joined.pixel_accuracy
    reports = [segmentation_report(pred_a, truth_a, CLASSES), segmentation_report(pred_b, truth_b, CLASSES)]
    whole = segmentation_report(np.hstack([pred_a, pred_b]), np.hstack([truth_a, truth_b]), CLASSES)
    assert sum(reports) == whole


def test_adding_reports_of_different_classes_raises():
    labels = np.zeros((2, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match="different classes"):
        segmentation_report(labels, labels, CLASSES) + segmentation_report(labels, labels, ("bg", "cell"))
    with pytest.raises(ValueError, match="different classes"):
        segmentation_report(labels, labels, CLASSES) + segmentation_report(
            labels, labels, CLASSES, background=None
        )


def test_valid_mask_excludes_pixels():
    truth = np.zeros((4, 4), dtype=bool)
    truth[:2, :2] = True
    pred = truth.copy()
    pred[3, 3] = True  # a false positive
    pred[0, 0] = False  # a false negative
    valid = np.ones((4, 4), dtype=bool)
    valid[3, 3] = valid[0, 0] = False
    assert pixel_counts(pred, truth) == PixelCounts(tp=3, fp=1, fn=1, tn=11)
    assert pixel_counts(pred, truth, valid) == PixelCounts(tp=3, fp=0, fn=0, tn=11)

    labels_truth = truth.astype(np.uint8)
    labels_pred = pred.astype(np.uint8)
    report = segmentation_report(labels_pred, labels_truth, ("bg", "cell"), valid=valid)
    assert (report.correct_px, report.total_px) == (14, 14)
    assert report.by_name("cell").counts == PixelCounts(tp=3, fp=0, fn=0, tn=11)


def test_no_valid_pixels_counts_nothing_and_scores_one():
    mask = np.ones((3, 3), dtype=bool)
    counts = pixel_counts(mask, ~mask, np.zeros((3, 3), dtype=bool))
    assert counts == PixelCounts(0, 0, 0, 0)
    assert counts.accuracy == counts.dice == 1.0


def test_both_empty_scores_one():
    empty = np.zeros((5, 5), dtype=bool)
    counts = pixel_counts(empty, empty)
    assert counts == PixelCounts(tp=0, fp=0, fn=0, tn=25)
    assert counts.dice == counts.iou == counts.precision == counts.recall == counts.f1 == 1.0


def test_empty_prediction_of_nonempty_truth_scores_zero():
    truth = np.zeros((5, 5), dtype=bool)
    truth[2, 2] = True
    counts = pixel_counts(np.zeros_like(truth), truth)
    assert counts == PixelCounts(tp=0, fp=0, fn=1, tn=24)
    assert counts.dice == counts.iou == counts.precision == counts.recall == counts.f1 == 0.0
    assert counts.accuracy == pytest.approx(24 / 25)


def test_prediction_on_empty_truth_scores_zero():
    pred = np.zeros((5, 5), dtype=bool)
    pred[1, 1] = True
    counts = pixel_counts(pred, np.zeros_like(pred))
    assert counts == PixelCounts(tp=0, fp=1, fn=0, tn=24)
    assert counts.dice == counts.iou == counts.precision == counts.recall == counts.f1 == 0.0


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="shape"):
        pixel_counts(np.zeros((2, 3), dtype=bool), np.zeros((3, 2), dtype=bool))
    with pytest.raises(ValueError, match="valid"):
        pixel_counts(np.zeros((2, 3), dtype=bool), np.zeros((2, 3), dtype=bool), np.ones((3, 3), dtype=bool))


# ---------------------------------------------------------------- multi-class report


def test_multiclass_report_scores_each_class_and_macro_mean_excludes_background():
    truth = np.array([[0, 0, 1, 1], [0, 2, 2, 1]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 1, 2]])
    report = segmentation_report(pred, truth, CLASSES)
    assert [c.name for c in report.classes] == list(CLASSES)
    assert report.by_name("background").counts == PixelCounts(tp=2, fp=0, fn=1, tn=5)
    assert report.by_name("cell").counts == PixelCounts(tp=2, fp=2, fn=1, tn=3)
    assert report.by_name("blast").counts == PixelCounts(tp=1, fp=1, fn=1, tn=5)
    assert (report.correct_px, report.total_px) == (5, 8)
    assert report.pixel_accuracy == pytest.approx(5 / 8)

    cell_dice, blast_dice = 4 / 7, 2 / 4
    assert report.by_name("cell").dice == pytest.approx(cell_dice)
    assert report.mean_dice == pytest.approx((cell_dice + blast_dice) / 2)
    assert report.mean_iou == pytest.approx((2 / 5 + 1 / 3) / 2)
    assert report.mean_f1 == pytest.approx(report.mean_dice)
    assert report.scored_classes == report.classes[1:]

    all_classes = segmentation_report(pred, truth, CLASSES, background=None)
    assert all_classes.classes == report.classes
    assert all_classes.mean_dice == pytest.approx((4 / 5 + cell_dice + blast_dice) / 3)


def test_class_report_delegates_to_its_counts():
    report = ClassReport("blast", PixelCounts(tp=1, fp=1, fn=2, tn=4))
    assert (report.dice, report.iou, report.precision, report.recall, report.f1) == (
        pytest.approx(2 / 5),
        pytest.approx(1 / 4),
        pytest.approx(1 / 2),
        pytest.approx(1 / 3),
        pytest.approx(2 / 5),
    )


def test_macro_mean_of_background_only_report_is_nan():
    labels = np.zeros((2, 2), dtype=np.uint8)
    report = segmentation_report(labels, labels, ("background",))
    assert isinstance(report, SegmentationReport)
    assert math.isnan(report.mean_dice)


def test_labels_without_a_class_name_raise():
    truth = np.array([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="3 class names"):
        segmentation_report(truth, truth, CLASSES)
    with pytest.raises(ValueError, match="integer"):
        segmentation_report(truth.astype(float), truth, CLASSES)
    with pytest.raises(ValueError, match="background index"):
        segmentation_report(truth, truth, CLASSES + ("other",), background=4)


def test_unknown_class_name_raises_key_error():
    labels = np.zeros((2, 2), dtype=np.uint8)
    with pytest.raises(KeyError, match="myeloid"):
        segmentation_report(labels, labels, CLASSES).by_name("myeloid")


# ---------------------------------------------------------------- object matching


def _two_objects() -> np.ndarray:
    labels = np.zeros((20, 20), dtype=np.int32)
    labels[2:6, 2:6] = 1
    labels[10:18, 10:18] = 2
    return labels


def test_identical_instance_maps_match_every_object():
    labels = _two_objects()
    assert match_instances(labels, labels) == ObjectCounts(tp=2, fp=0, fn=0, matched_iou_sum=2.0)


def test_object_shifted_below_half_iou_is_one_fp_and_one_fn():
    truth = np.zeros((20, 20), dtype=np.int32)
    truth[4:10, 4:10] = 1
    pred = np.zeros_like(truth)
    pred[4:10, 7:13] = 1  # overlap 18 px, union 54 px: IoU 1/3
    counts = match_instances(pred, truth)
    assert counts == ObjectCounts(tp=0, fp=1, fn=1, matched_iou_sum=0.0)
    assert counts.precision == counts.recall == counts.f1 == counts.panoptic_quality == 0.0
    assert math.isnan(counts.mean_matched_iou)
    assert match_instances(pred, truth, iou_threshold=0.3).tp == 1


def test_object_shifted_above_half_iou_matches_with_its_iou():
    truth = np.zeros((20, 20), dtype=np.int32)
    truth[4:10, 4:10] = 5
    pred = np.zeros_like(truth)
    pred[4:10, 5:11] = 9  # overlap 30 px, union 42 px
    counts = match_instances(pred, truth)
    assert (counts.tp, counts.fp, counts.fn) == (1, 0, 0)
    assert counts.mean_matched_iou == pytest.approx(30 / 42)
    assert counts.panoptic_quality == pytest.approx(30 / 42)


def test_two_touching_truths_merged_into_one_prediction_match_once():
    truth = np.zeros((10, 20), dtype=np.int32)
    truth[2:8, 2:8] = 1
    truth[2:8, 8:14] = 2
    pred = (truth > 0).astype(np.int32)  # IoU with each truth exactly 0.5
    counts = match_instances(pred, truth)
    assert (counts.tp, counts.fp, counts.fn) == (1, 0, 1)
    assert counts.matched_iou_sum == pytest.approx(0.5)
    assert match_instances(pred, truth, iou_threshold=0.51) == ObjectCounts(0, 1, 2, 0.0)


def test_two_separate_truths_merged_with_the_gap_match_nothing():
    truth = np.zeros((10, 20), dtype=np.int32)
    truth[2:8, 2:7] = 1
    truth[2:8, 9:14] = 2
    pred = np.zeros_like(truth)
    pred[2:8, 2:14] = 1  # covers both and the gap: IoU 30/72 each
    assert match_instances(pred, truth) == ObjectCounts(tp=0, fp=1, fn=2, matched_iou_sum=0.0)


def test_one_truth_split_in_two_predictions_is_one_tp_and_one_fp():
    truth = np.zeros((10, 20), dtype=np.int32)
    truth[2:8, 2:14] = 1
    pred = np.zeros_like(truth)
    pred[2:8, 2:8] = 1
    pred[2:8, 8:14] = 2
    counts = match_instances(pred, truth)
    assert (counts.tp, counts.fp, counts.fn) == (1, 1, 0)


def test_low_threshold_matches_greedily_by_highest_iou():
    truth = np.zeros((10, 30), dtype=np.int32)
    truth[0:10, 0:10] = 1
    truth[0:10, 10:30] = 2
    pred = np.zeros_like(truth)
    pred[0:10, 0:14] = 1  # IoU 10/14 with truth 1, 40/300 with truth 2
    pred[0:10, 14:22] = 2  # IoU 8/20 with truth 2 only
    counts = match_instances(pred, truth, iou_threshold=0.1)
    assert (counts.tp, counts.fp, counts.fn) == (2, 0, 0)
    assert counts.matched_iou_sum == pytest.approx(10 / 14 + 8 / 20)


def test_relabelled_instance_ids_give_the_same_result():
    rng = np.random.default_rng(3)
    truth = _square_grid(rng, cells=6, cell_px=20, side_px=10)
    pred = np.roll(truth, shift=(1, 1), axis=(0, 1))
    pred[pred == 7] = 0  # one missed object
    expected = match_instances(pred, truth)
    assert (expected.fp, expected.fn) == (0, 1)

    perm = np.concatenate([[0], rng.permutation(np.arange(1, 37))])
    assert match_instances(perm[pred], truth) == expected
    assert match_instances(pred, perm[truth]) == expected
    # Sparse, huge ids (e.g. hashes) take the np.unique path and agree too.
    big = np.where(truth > 0, truth.astype(np.uint64) * 1_000_003 + 2**40, 0)
    assert match_instances(pred, big) == expected


def test_empty_instance_maps_have_no_objects():
    empty = np.zeros((8, 8), dtype=np.uint16)
    counts = match_instances(empty, empty)
    assert counts == ObjectCounts(0, 0, 0, 0.0)
    assert counts.precision == counts.recall == counts.f1 == counts.panoptic_quality == 1.0
    assert math.isnan(counts.mean_matched_iou)
    assert match_instances(_two_objects(), np.zeros((20, 20), dtype=np.int32)) == ObjectCounts(0, 2, 0, 0.0)
    assert match_instances(np.zeros((20, 20), dtype=np.int32), _two_objects()) == ObjectCounts(0, 0, 2, 0.0)


def test_object_counts_add_across_images():
    a = match_instances(_two_objects(), _two_objects())
    b = ObjectCounts(tp=1, fp=2, fn=3, matched_iou_sum=0.75)
    assert a + b == ObjectCounts(tp=3, fp=2, fn=3, matched_iou_sum=2.75)
    assert sum([a, b]) == a + b
    assert (a + b).precision == pytest.approx(3 / 5)
    assert (a + b).recall == pytest.approx(3 / 6)
    assert (a + b).f1 == pytest.approx(6 / 11)


def test_invalid_instance_inputs_raise():
    labels = _two_objects()
    with pytest.raises(ValueError, match="iou_threshold"):
        match_instances(labels, labels, iou_threshold=1.5)
    with pytest.raises(ValueError, match="negative"):
        match_instances(labels - 1, labels)
    with pytest.raises(ValueError, match="integer"):
        match_instances(labels.astype(np.float32), labels)
    with pytest.raises(ValueError, match="shape"):
        match_instances(labels, labels[:10])


def test_thousand_objects_on_a_2048_map_match(monkeypatch: pytest.MonkeyPatch):
    rng = np.random.default_rng(4)
    truth = _square_grid(rng, cells=32, cell_px=64, side_px=40)
    pred = np.roll(truth, shift=(1, 2), axis=(0, 1))  # IoU 38*39 / (2*1600 - 38*39) per object
    counts = match_instances(pred, truth)
    assert (counts.tp, counts.fp, counts.fn) == (1024, 0, 0)
    assert counts.mean_matched_iou == pytest.approx(1482 / (3200 - 1482))

    # The sorted sparse contingency (used for very many objects) gives the same answer.
    monkeypatch.setattr(metrics, "_DENSE_PAIR_TABLE_MAX", 0)
    assert match_instances(pred, truth) == counts


# ---------------------------------------------------------------- helpers


def test_mean_per_image_ignores_nan():
    assert mean_per_image([1.0, math.nan, 0.5]) == pytest.approx(0.75)
    assert math.isnan(mean_per_image([math.nan]))
    assert math.isnan(mean_per_image([]))
