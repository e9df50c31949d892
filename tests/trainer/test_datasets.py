from __future__ import annotations

import numpy as np
import pytest

from blastq.core.preprocess import PreprocessConfig
from blastq.trainer.augment import random_patch
from blastq.trainer.datasets import (
    IGNORE,
    Sample,
    marker_from_instances,
    read_wbc_mask,
    segmentation_wbc_items,
    wbc_sample,
    wbc_split,
)


def test_split_rule_is_the_written_one():
    assert [wbc_split(n) for n in (5, 10, 300)] == ["test"] * 3
    assert [wbc_split(n) for n in (1, 11, 21)] == ["val"] * 3
    assert [wbc_split(n) for n in (2, 3, 4, 6, 12)] == ["train"] * 5


def test_real_split_sizes_and_test_never_in_train(wbc_root):
    test = segmentation_wbc_items(wbc_root, "test")
    train = segmentation_wbc_items(wbc_root, "train")
    val = segmentation_wbc_items(wbc_root, "val")
    assert (
        sum(i.dataset == "dataset1" for i in test) == 60 and sum(i.dataset == "dataset2" for i in test) == 20
    )
    assert len(test) + len(train) + len(val) == 400
    assert not {(i.dataset, i.number) for i in test} & {(i.dataset, i.number) for i in train + val}


def test_stray_mask_values_snap_to_the_nearest_level(tmp_path):
    import cv2

    raw = np.array([[0, 20, 100, 128], [200, 255, 60, 70]], np.uint8)
    cv2.imwrite(str(tmp_path / "m.png"), raw)
    assert read_wbc_mask(tmp_path / "m.png").tolist() == [[0, 0, 1, 1], [2, 2, 0, 1]]


def test_real_crop_becomes_a_white_cell_sample_at_model_scale(wbc_root):
    item = segmentation_wbc_items(wbc_root, "train", ("dataset2",))[0]
    s = wbc_sample(item, 0.2, PreprocessConfig())
    expected = round(300 * item.mpp / 0.2)
    assert abs(s.image.shape[0] - expected) <= 1 and s.classes.shape == s.image.shape[:2]
    assert set(np.unique(s.classes)) == {0, 1}  # no blast labels from normal cells
    assert s.nucleus.sum() > 0 and (s.marker <= (s.classes == 1)).all()


def test_markers_of_touching_cells_are_separate_blobs():
    from scipy import ndimage as ndi

    inst = np.zeros((60, 100), np.int32)
    yy, xx = np.ogrid[:60, :100]
    inst[(yy - 30) ** 2 + (xx - 30) ** 2 <= 400] = 1
    inst[((yy - 30) ** 2 + (xx - 68) ** 2 <= 400) & (inst == 0)] = 2
    marker = marker_from_instances(inst)
    _, n = ndi.label(marker)
    assert n == 2 and marker[30, 30] == 1 and marker[30, 68] == 1 and marker[30, 49] == 0


def test_augmented_patch_keeps_image_and_labels_aligned():
    img = np.full((200, 200, 3), 245, np.uint8)
    cls = np.zeros((200, 200), np.uint8)
    img[80:120, 60:100] = (90, 40, 140)
    cls[80:120, 60:100] = 1
    sample = Sample(img, cls, cls.copy(), cls.copy(), "test")
    rng = np.random.default_rng(0)
    for _ in range(10):
        pimg, pcls, pnuc, _ = random_patch(sample, 96, rng)
        assert pimg.shape == (96, 96, 3) and pcls.shape == (96, 96)
        inside = pcls == 1
        if inside.sum() > 50:
            # stained pixels sit under the label (colour jitter changes colour, not place)
            dark = pimg.astype(int).sum(2) < 600
            assert (dark[inside]).mean() > 0.9 and (dark[pcls == 0]).mean() < 0.1
        assert set(np.unique(pcls)) <= {0, 1, IGNORE} and np.array_equal(pcls, pnuc)


@pytest.mark.parametrize("bad", ["nope"])
def test_a_folder_without_the_layout_is_refused(tmp_path, bad):
    from blastq.core.errors import InvalidDataset

    with pytest.raises(InvalidDataset, match="dataset1"):
        segmentation_wbc_items(tmp_path / bad)
