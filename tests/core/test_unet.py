from __future__ import annotations

import numpy as np
import pytest
import torch

from blastq.core.common.errors import ModelInvalid, ModelNotFound
from blastq.core.segment.unet import (
    N_OUTPUTS,
    ModelInfo,
    UNet,
    load_checkpoint,
    save_checkpoint,
    to_model_input,
)


@pytest.mark.parametrize("depth,width", [(2, 4), (3, 8), (4, 16)])
def test_output_has_one_channel_per_head_and_input_size(depth, width):
    model = UNet(depth=depth, width=width).eval()
    x = torch.zeros(2, 3, 64, 96)
    assert model(x).shape == (2, N_OUTPUTS, 64, 96)


def test_deeper_and_wider_models_have_more_parameters():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(UNet(depth=3, width=8)) < count(UNet(depth=4, width=8)) < count(UNet(depth=4, width=16))


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = UNet(depth=3, width=8).eval()
    info = ModelInfo(version="t1", mpp=0.2, preprocess={"flatfield": True})
    sha = save_checkpoint(tmp_path / "m.pt", model, info)
    loaded, loaded_info = load_checkpoint(tmp_path / "m.pt")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded_info.version == "t1" and loaded_info.sha256 == sha and loaded_info.mpp == 0.2


def test_missing_checkpoint_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFound, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_garbage_checkpoint_is_model_not_found(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ModelInvalid, match="bad.pt"):
        load_checkpoint(bad)


def test_foreign_torch_file_is_refused(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ModelInvalid, match="not a blastq model"):
        load_checkpoint(other)


def test_model_input_is_nchw_float32_centred():
    rgb = np.zeros((2, 8, 8, 3), np.uint8)
    rgb[..., 0] = 255
    x = to_model_input(rgb)
    assert x.shape == (2, 3, 8, 8) and x.dtype == np.float32
    assert x[:, 0].min() == pytest.approx(2.0) and x[:, 1].max() == pytest.approx(-2.0)
