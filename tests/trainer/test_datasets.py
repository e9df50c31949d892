from __future__ import annotations

import numpy as np
import pytest

from blastq.core.image.preprocessing import PreprocessConfig
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
    from blastq.core.common.errors import InvalidDataset

    with pytest.raises(InvalidDataset, match="dataset1"):
        segmentation_wbc_items(tmp_path / bad)


# --- folders of image/mask pairs with a label map -------------------------------------------------


def _write_pairs(folder, labelmap, masks, *, fmt="json", image_ext=".png"):
    """A pairs folder: one RGB image per mask (cells drawn dark where the mask is not 0), a label map."""
    import json

    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    suffix = labelmap.get("mask_suffix", "_mask.png")
    for stem, mask in masks.items():
        img = np.full((*mask.shape, 3), 235, np.uint8)
        img[mask > 0] = (150, 60, 110)
        cv2.imwrite(str(folder / f"{stem}{image_ext}"), img)
        cv2.imwrite(str(folder / f"{stem}{suffix}"), mask)
    if fmt == "json":
        (folder / "labelmap.json").write_text(json.dumps(labelmap))
    else:
        (folder / "labelmap.toml").write_text(fmt)
    return folder


def _cells_mask():
    """64x64: a white cell (cytoplasm 128, nucleus 255) on the left, a blast (2) on the right, 7 = ignore."""
    m = np.zeros((64, 64), np.uint8)
    m[10:30, 4:24] = 128
    m[15:25, 9:19] = 255
    m[10:30, 36:56] = 2
    m[50:60, 50:60] = 7
    return m


LABELMAP = {
    "classes": {"0": "background", "128": "white_cell", "2": "blast"},
    "nucleus": [255],
    "ignore": [7],
    "mpp": 0.2,
    "labels": ["classes", "nucleus"],
}


def test_labelmap_json_and_toml_say_the_same(tmp_path):
    from blastq.trainer.datasets import read_labelmap

    _write_pairs(tmp_path / "j", LABELMAP, {"a": _cells_mask()})
    toml = 'mpp = 0.2\nnucleus = [255]\nignore = [7]\nlabels = ["classes", "nucleus"]\n'
    toml += '[classes]\n"0" = "background"\n"128" = "white_cell"\n"2" = "blast"\n'
    _write_pairs(tmp_path / "t", LABELMAP, {"a": _cells_mask()}, fmt=toml)
    j, t = read_labelmap(tmp_path / "j"), read_labelmap(tmp_path / "t")
    assert j.classes == t.classes == ((0, 0), (2, 2), (128, 1)) and j.nucleus == t.nucleus == ((255, 1),)
    assert j.ignore == t.ignore == {7} and j.labels == t.labels == {"classes", "nucleus"} and j.mpp == 0.2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"classes": {"0": "background", "1": "lymphoblast"}}, "unknown class 'lymphoblast'"),
        ({"classes": {"0": "background", "x": "blast"}}, "class key 'x'"),
        ({"ignore": [0]}, "mask value 0 is listed twice"),
        ({"mpp": None}, "'mpp'"),
        ({"labels": ["classes", "edges"]}, "unknown target"),
        ({"labels": ["nucleus"]}, "must include 'classes'"),
        ({"nucleus": [], "labels": ["classes", "nucleus"]}, "no mask value is listed as nucleus"),
        ({"ignored": [3]}, "unknown key"),
        ({"blast_unknown": "yes"}, "blast_unknown"),
    ],
)
def test_a_wrong_label_map_is_refused_naming_the_file(tmp_path, change, message):
    from blastq.core.common.errors import InvalidDataset
    from blastq.trainer.datasets import pairs_items

    lm = {**LABELMAP, **change}
    _write_pairs(tmp_path, {k: v for k, v in lm.items() if v is not None}, {"a": _cells_mask()})
    with pytest.raises(InvalidDataset, match=message) as err:
        pairs_items(tmp_path)
    assert "labelmap.json" in str(err.value)


def test_mask_values_missing_from_the_label_map_are_refused_with_value_and_file(tmp_path):
    from blastq.core.common.errors import InvalidDataset
    from blastq.trainer.datasets import pairs_items

    mask = _cells_mask()
    mask[0, 0] = 99
    _write_pairs(tmp_path, LABELMAP, {"a": _cells_mask(), "b": mask})
    with pytest.raises(InvalidDataset, match=r"mask value\(s\) 99 in .*b_mask\.png"):
        pairs_items(tmp_path)


def test_missing_unreadable_and_misfit_masks_are_refused_naming_the_file(tmp_path):
    import cv2

    from blastq.core.common.errors import InvalidDataset
    from blastq.trainer.datasets import pairs_items

    folder = _write_pairs(tmp_path / "missing", LABELMAP, {"a": _cells_mask()})
    cv2.imwrite(str(folder / "lonely.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(InvalidDataset, match="no mask for .*lonely.png: expected lonely_mask.png"):
        pairs_items(folder)

    folder = _write_pairs(tmp_path / "broken", LABELMAP, {"a": _cells_mask()})
    (folder / "a_mask.png").write_bytes(b"not a png")
    with pytest.raises(InvalidDataset, match="cannot read mask.*a_mask.png"):
        pairs_items(folder)

    folder = _write_pairs(tmp_path / "size", LABELMAP, {"a": _cells_mask()})
    cv2.imwrite(str(folder / "a_mask.png"), _cells_mask()[:32])
    with pytest.raises(InvalidDataset, match="a_mask.png is 64x32 px but a.png is 64x64"):
        pairs_items(folder)

    with pytest.raises(InvalidDataset, match="no labelmap.json or labelmap.toml"):
        pairs_items(tmp_path)


def test_pair_targets_follow_the_label_map_and_ignore_values_are_ignored_everywhere(tmp_path):
    from blastq.trainer.datasets import pairs_items, pairs_sample

    _write_pairs(tmp_path, LABELMAP, {"a": _cells_mask()})
    s = pairs_sample(pairs_items(tmp_path)[0], 0.2, PreprocessConfig())
    assert s.foreground is None and s.source == f"pairs:{tmp_path.name}"
    assert (
        s.classes[20, 10] == 1 and s.classes[20, 14] == 1 and s.classes[20, 40] == 2 and s.classes[40, 5] == 0
    )
    assert (
        s.nucleus[20, 14] == 1 and s.nucleus[11, 5] == 0 and s.nucleus[20, 40] == 0 and s.nucleus[40, 5] == 0
    )
    # marker not declared: unknown inside cells, known to be 0 on background
    assert s.marker[20, 14] == IGNORE and s.marker[20, 40] == IGNORE and s.marker[40, 5] == 0
    for target in (s.classes, s.nucleus, s.marker):
        assert (target[50:60, 50:60] == IGNORE).all()


def test_declared_marker_and_unsupported_nucleus(tmp_path):
    from blastq.trainer.datasets import pairs_items, pairs_sample

    lm = {**LABELMAP, "labels": ["classes", "marker"]}
    _write_pairs(tmp_path, lm, {"a": _cells_mask()})
    s = pairs_sample(pairs_items(tmp_path)[0], 0.2, PreprocessConfig())
    assert s.marker[20, 14] == 1 and s.marker[20, 46] == 1 and s.marker[11, 5] == 0 and s.marker[40, 5] == 0
    assert s.nucleus[20, 14] == IGNORE and s.nucleus[20, 40] == IGNORE and s.nucleus[40, 5] == 0


def test_blast_unknown_cells_teach_foreground_never_not_blast(tmp_path):
    from blastq.trainer.datasets import pairs_items, pairs_sample

    _write_pairs(tmp_path, {**LABELMAP, "blast_unknown": True}, {"a": _cells_mask()})
    s = pairs_sample(pairs_items(tmp_path)[0], 0.2, PreprocessConfig())
    white = _cells_mask() >= 128
    assert (s.classes[white] == IGNORE).all() and (s.foreground[white] == 1).all()
    assert s.classes[20, 40] == 2 and s.foreground[20, 40] == 1  # a labelled blast stays a blast
    assert s.classes[40, 5] == 0 and s.foreground[40, 5] == 0
    assert s.foreground[55, 55] == IGNORE and s.nucleus[20, 14] == 1


def test_pairs_are_brought_to_the_model_scale(tmp_path):
    from blastq.trainer.datasets import pairs_items, pairs_sample

    _write_pairs(tmp_path, {**LABELMAP, "mpp": 0.1}, {"a": _cells_mask()})
    s = pairs_sample(pairs_items(tmp_path)[0], 0.2, PreprocessConfig())
    assert s.image.shape == (32, 32, 3) and s.classes.shape == (32, 32)
    assert s.classes[10, 5] == 1 and s.classes[10, 22] == 2


def test_name_split_is_a_stable_hash_of_the_file_name():
    from blastq.trainer.datasets import name_split

    names = [f"img_{i:04d}.png" for i in range(2000)]
    splits = [name_split(n) for n in names]
    assert splits == [name_split(n) for n in names]
    assert 0.17 < splits.count("test") / 2000 < 0.23 and 0.08 < splits.count("val") / 2000 < 0.12
    # pinned: a change to the rule would silently move images between train and test
    assert splits[:8] == ["train", "test", "test", "test", "train", "train", "train", "test"]


def test_pairs_items_split_by_name_and_partition_the_folder(tmp_path):
    from blastq.trainer.datasets import name_split, pairs_items

    _write_pairs(tmp_path, LABELMAP, {f"im{i:02d}": _cells_mask() for i in range(12)})
    every = pairs_items(tmp_path)
    parts = {sp: pairs_items(tmp_path, sp) for sp in ("train", "val", "test")}
    assert sorted(it.name for p in parts.values() for it in p) == sorted(it.name for it in every)
    assert all(name_split(it.name) == sp for sp, p in parts.items() for it in p)


def test_patches_move_the_foreground_with_the_classes():
    img = np.full((120, 120, 3), 245, np.uint8)
    cls = np.zeros((120, 120), np.uint8)
    fg = np.zeros((120, 120), np.uint8)
    cls[40:80, 40:80], fg[40:80, 40:80] = IGNORE, 1
    sample = Sample(img, cls, cls.copy(), cls.copy(), "t", foreground=fg)
    rng = np.random.default_rng(1)
    for _ in range(5):
        patch = random_patch(sample, 64, rng)
        assert len(patch) == 5
        _, pcls, _, _, pfg = patch
        assert ((pfg == 1) <= (pcls == IGNORE)).all() and ((pcls == 0) <= (pfg == 0)).all()
