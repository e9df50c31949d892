"""The cross-source protocol's figures: every crop of one source, segmentation and false blasts."""

from __future__ import annotations

import re
from pathlib import Path

from blastq.core.segment.unet import default_model_path
from blastq.trainer.crosssource import cross_source_text


def test_a_source_is_scored_on_all_its_crops(wbc_root: Path, tmp_path: Path):
    root = tmp_path / "wbc"
    (root / "dataset2").mkdir(parents=True)
    for number in (1, 2, 3):  # a small source: three crops of dataset2
        for suffix in (".bmp", ".png"):
            (root / "dataset2" / f"{number:03d}{suffix}").symlink_to(
                wbc_root / "dataset2" / f"{number:03d}{suffix}"
            )
    text = cross_source_text(default_model_path(), root, "dataset2")
    assert "on all 3 dataset2 crops" in text and "(of 3)" in text
    dice = float(re.search(r"cell Dice ([0-9.]+)", text).group(1))
    assert dice > 0.8  # the shipped model outlines these cells (it trained on other crops of this source)
    called = [float(v) for v in re.findall(r"([0-9.]+) at ", text)]
    assert len(called) == 3 and called == sorted(called)  # lower thresholds call at least as many
