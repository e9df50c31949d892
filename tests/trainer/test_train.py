"""A tiny model trained for real in seconds: the loop, the checkpoint, the losses."""

from __future__ import annotations

import json

import pytest
import torch

from blastq.core.errors import InvalidConfig
from blastq.core.unet import load_checkpoint
from blastq.trainer.losses import segmentation_loss
from blastq.trainer.train import TrainConfig, train


def test_tiny_training_learns_and_writes_a_loadable_checkpoint(tmp_path):
    cfg = TrainConfig(
        out=tmp_path / "tiny.pt", version="tiny", synth_train=4, synth_val=2, synth_size_px=192, depth=3, width=8,
        patch_px=64, batch_size=4, steps_per_epoch=15, max_epochs=3, patience=5, lr=5e-3,
    )  # fmt: skip
    result = train(cfg, progress=lambda _: None)
    assert len(result.history) == 3
    assert result.history[-1].train_loss < result.history[0].train_loss
    model, info = load_checkpoint(result.checkpoint)
    assert info.version == "tiny" and info.mpp == 0.2 and model.width == 8
    history = json.loads((tmp_path / "tiny.history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_nothing_to_train_on_is_refused(tmp_path):
    with pytest.raises(InvalidConfig):
        TrainConfig(out=tmp_path / "x.pt", synth_train=0)
    with pytest.raises(InvalidConfig, match="multiple"):
        TrainConfig(out=tmp_path / "x.pt", patch_px=100)


def test_ignored_pixels_do_not_change_the_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 16, 16)
    cls = torch.randint(0, 3, (2, 16, 16), dtype=torch.uint8)
    nuc = torch.randint(0, 2, (2, 16, 16), dtype=torch.uint8)
    mrk = torch.randint(0, 2, (2, 16, 16), dtype=torch.uint8)
    base, _ = segmentation_loss(logits, cls, nuc, mrk)
    cls2, nuc2, mrk2 = cls.clone(), nuc.clone(), mrk.clone()
    logits2 = logits.clone()
    for t in (cls2, nuc2, mrk2):
        t[:, :, 12:] = 255
    logits2[:, :, :, 12:] = 100.0  # wild predictions where nothing is known
    cut, _ = segmentation_loss(logits2, cls2, nuc2, mrk2)
    ref, _ = segmentation_loss(logits[:, :, :, :12], cls[:, :, :12], nuc[:, :, :12], mrk[:, :, :12])
    assert torch.isclose(cut, ref, rtol=1e-4) and not torch.isclose(cut, base)


def test_perfect_prediction_has_lower_loss_than_wrong_one():
    cls = torch.zeros(1, 8, 8, dtype=torch.uint8)
    cls[:, 2:6, 2:6] = 2
    nuc = (cls == 2).to(torch.uint8)
    good = torch.full((1, 5, 8, 8), -8.0)
    good[:, 0] = torch.where(cls[0] == 0, 8.0, -8.0)
    good[:, 2] = torch.where(cls[0] == 2, 8.0, -8.0)
    good[:, 3] = torch.where(nuc[0] == 1, 8.0, -8.0)
    good[:, 4] = good[:, 3]
    bad = -good
    assert segmentation_loss(good, cls, nuc, nuc)[0] < 0.1 < segmentation_loss(bad, cls, nuc, nuc)[0]
