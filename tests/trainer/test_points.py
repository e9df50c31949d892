"""ALL-IDB1-style point annotations: reading .xyc files, matching points to predicted blasts."""

from __future__ import annotations

from dataclasses import asdict

import cv2
import numpy as np
import pytest

from blastq.core.common.errors import InvalidDataset
from blastq.trainer.points import evaluate_points, match_points, points_items, read_points


def _discs(shape, centres, radius):
    """An instance map with one disc per centre (x, y), ids 1..n."""
    inst = np.zeros(shape, np.int32)
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    for i, (x, y) in enumerate(centres, start=1):
        inst[(xx - x) ** 2 + (yy - y) ** 2 <= radius**2] = i
    return inst


def test_xyc_files_read_as_x_y_rows(tmp_path):
    path = tmp_path / "Im001_1.xyc"
    path.write_text("1234 567\r\n\n  89\t1011.5  \n")
    assert read_points(path).tolist() == [[1234.0, 567.0], [89.0, 1011.5]]
    (tmp_path / "Im002_0.xyc").write_text("")
    assert read_points(tmp_path / "Im002_0.xyc").shape == (0, 2)


@pytest.mark.parametrize("line", ["12", "12 34 56", "x 3", "-4 5"])
def test_a_bad_xyc_line_is_refused_with_file_and_line_number(tmp_path, line):
    path = tmp_path / "bad.xyc"
    path.write_text(f"1 2\n{line}\n")
    with pytest.raises(InvalidDataset, match=r"bad\.xyc:2"):
        read_points(path)


def test_point_items_pair_images_with_their_xyc(tmp_path):
    for stem in ("Im001_1", "Im002_0"):
        cv2.imwrite(str(tmp_path / f"{stem}.jpg"), np.zeros((8, 8, 3), np.uint8))
        (tmp_path / f"{stem}.xyc").write_text("")
    cv2.imwrite(str(tmp_path / "unannotated.jpg"), np.zeros((8, 8, 3), np.uint8))
    assert [it.name for it in points_items(tmp_path)] == ["Im001_1.jpg", "Im002_0.jpg"]
    (tmp_path / "Im003_1.xyc").write_text("1 2\n")
    with pytest.raises(InvalidDataset, match="no image for .*Im003_1.xyc"):
        points_items(tmp_path)


def test_a_point_inside_a_blast_matches_even_far_from_its_centroid():
    inst = _discs((100, 100), [(50, 50)], 30)
    counts = match_points(inst, np.array([False, True]), np.array([[75.0, 50.0]]), max_distance_px=5)
    assert (counts.tp, counts.fp, counts.fn) == (1, 0, 0)


def test_a_point_near_the_centroid_matches_and_a_far_one_does_not():
    inst = _discs((100, 100), [(30, 30)], 10)
    near = match_points(inst, np.array([False, True]), np.array([[30.0, 44.0]]), max_distance_px=15)
    far = match_points(inst, np.array([False, True]), np.array([[30.0, 60.0]]), max_distance_px=15)
    assert (near.tp, near.fp, near.fn) == (1, 0, 0)
    assert (far.tp, far.fp, far.fn) == (0, 1, 1)


def test_matching_is_one_to_one_duplicates_count_once():
    inst = _discs((100, 100), [(50, 50)], 20)
    points = np.array([[50.0, 50.0], [50.0, 50.0], [52.0, 48.0]])
    counts = match_points(inst, np.array([False, True]), points, max_distance_px=10)
    assert (counts.tp, counts.fp, counts.fn) == (1, 0, 2)


def test_matching_finds_the_most_pairs_not_the_greedy_nearest():
    # blast 1 is near both points, blast 2 only near the first; nearest-first would pair 1 with it.
    inst = _discs((100, 200), [(50, 50), (70, 50)], 3)
    points = np.array([[56.0, 50.0], [38.0, 50.0]])
    counts = match_points(inst, np.array([False, True, True]), points, max_distance_px=15)
    assert (counts.tp, counts.fp, counts.fn) == (2, 0, 0)


def test_non_blast_cells_and_empty_files_score_as_they_should():
    inst = _discs((100, 200), [(50, 50), (150, 50)], 20)
    is_blast = np.array([False, False, True])
    on_white = match_points(inst, is_blast, np.array([[50.0, 50.0]]), max_distance_px=10)
    assert (on_white.tp, on_white.fp, on_white.fn) == (0, 1, 1)  # the white cell is neither hit nor fp
    empty = match_points(inst, is_blast, np.zeros((0, 2)), max_distance_px=10)
    assert (empty.tp, empty.fp, empty.fn) == (0, 1, 0) and empty.precision == 0.0
    nothing = match_points(np.zeros((10, 10), np.int32), np.array([False]), np.zeros((0, 2)), 10)
    assert (nothing.tp, nothing.fp, nothing.fn) == (0, 0, 0) and nothing.f1 == 1.0
    with pytest.raises(ValueError, match="pred_is_blast"):
        match_points(inst, np.array([False, True]), np.zeros((0, 2)), 10)


class _DarkIsBlast:
    """A stand-in engine: dark pixels are blasts (with their nucleus and marker), the rest background."""

    name, stride = "dark-is-blast", 8

    def infer(self, batch: np.ndarray) -> np.ndarray:
        dark = batch.mean(axis=1) < 0.0
        out = np.full((batch.shape[0], 5, *batch.shape[2:]), -8.0, np.float32)
        out[:, 0] = np.where(dark, -8.0, 8.0)
        out[:, 2] = np.where(dark, 8.0, -8.0)
        out[:, 3] = out[:, 2]  # a white cell without a nucleus is no white cell (core.cells.instances)
        out[:, 4] = out[:, 2]
        return out


def test_evaluate_points_runs_the_pipeline_on_each_image(tmp_path):
    from blastq.core.image.preprocessing import PreprocessConfig
    from blastq.core.segment.unet import ModelInfo

    centres = [(60, 60), (180, 70), (100, 190)]
    img = np.full((256, 256, 3), 235, np.uint8)
    img[_discs((256, 256), centres, 30) > 0] = (60, 30, 90)
    # Camera noise: a flat two-colour drawing is refused as no smear photo.
    img = np.clip(img + np.random.default_rng(0).normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "Im001_1.png"), img)
    (tmp_path / "Im001_1.xyc").write_text("60 60\n182 68\n230 230\n")  # two hits, one miss
    info = ModelInfo("stub", 0.2, asdict(PreprocessConfig(flatfield=False, clahe=False)))
    counts = evaluate_points(_DarkIsBlast(), info, points_items(tmp_path), mpp=0.2)
    assert (counts.tp, counts.fp, counts.fn) == (2, 1, 1)
