"""`blastq evaluate` and training read `blastq synth` folders: truth in truth/, or beside the image (older)."""

from __future__ import annotations

import pytest

from blastq.core.common.errors import InvalidDataset
from blastq.core.synth.field import truth_paths, write_dataset
from blastq.trainer.datasets import load_synth_truth, synth_folder_items


def test_a_synth_folder_lists_its_images_with_truth_in_either_layout(tmp_path):
    new = write_dataset(tmp_path / "new", 2, height_px=64, width_px=64)
    assert synth_folder_items(tmp_path / "new") == new
    old = write_dataset(tmp_path / "old", 2, seed=5, height_px=64, width_px=64)
    for image in old:  # as `blastq synth` wrote them before truth/
        for path in truth_paths(image):
            path.rename(image.parent / path.name)
    assert synth_folder_items(tmp_path / "old") == old  # the masks beside them are not images
    assert load_synth_truth(old[1])[0].shape == (64, 64)


def test_a_folder_of_images_without_truth_is_not_a_synth_folder(tmp_path):
    (image,) = write_dataset(tmp_path, 1, height_px=64, width_px=64)
    for path in truth_paths(image):
        path.unlink()
    with pytest.raises(InvalidDataset, match="truth/NAME.mask.png"):
        synth_folder_items(tmp_path)
