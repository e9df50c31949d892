from __future__ import annotations

import numpy as np
import pytest
import torch

from blastq.core.common.errors import ModelInvalid, ModelNotFound
from blastq.core.segment.unet import N_OUTPUTS, ModelInfo, UNet, save_checkpoint, to_model_input


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
    loaded, loaded_info = UNet.from_checkpoint(tmp_path / "m.pt")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded_info.version == "t1" and loaded_info.sha256 == sha and loaded_info.mpp == 0.2


def test_missing_checkpoint_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFound, match="not found"):
        UNet.from_checkpoint(tmp_path / "nope.pt")


def test_garbage_checkpoint_is_model_invalid(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ModelInvalid, match="bad.pt"):
        UNet.from_checkpoint(bad)


def test_foreign_torch_file_is_refused(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ModelInvalid, match="not a blastq model"):
        UNet.from_checkpoint(other)


def test_model_input_is_nchw_float32_centred():
    rgb = np.zeros((2, 8, 8, 3), np.uint8)
    rgb[..., 0] = 255
    x = to_model_input(rgb)
    assert x.shape == (2, 3, 8, 8) and x.dtype == np.float32
    assert x[:, 0].min() == pytest.approx(2.0) and x[:, 1].max() == pytest.approx(-2.0)


def _format_1(model: UNet, info: ModelInfo) -> dict:
    """A checkpoint as blastq-unet 1.0-2.2 were written: one flat module (down/up/dec/head)."""
    old = {"encoder.blocks.": "down.", "decoder.up.": "up.", "decoder.blocks.": "dec."}
    state = {}
    for key, value in model.state_dict().items():
        for new, was in old.items():
            if key.startswith(new):
                key = was + key.removeprefix(new)
        state[key] = value
    return {
        "format": "blastq-unet/1",
        "arch": model.arch(),
        "state_dict": state,
        "info": {"version": info.version, "mpp": info.mpp, "preprocess": info.preprocess},
    }


def test_a_checkpoint_of_the_old_flat_format_loads_with_the_same_weights(tmp_path):
    torch.manual_seed(3)
    model = UNet(depth=3, width=8).eval()
    torch.save(_format_1(model, ModelInfo(version="old", mpp=0.2, preprocess={})), tmp_path / "old.pt")
    loaded, info = UNet.from_checkpoint(tmp_path / "old.pt")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert info.version == "old"
    save_checkpoint(tmp_path / "new.pt", loaded, info)  # written again: the current format, same tensors
    assert torch.load(tmp_path / "new.pt", weights_only=True)["format"] == "blastq-unet/2"
    assert torch.equal(UNet.from_checkpoint(tmp_path / "new.pt")[0](x), model(x))


def test_the_shipped_models_load_and_a_checkpoint_of_an_unknown_format_is_refused(tmp_path):
    from blastq.core.segment.unet import default_model_path

    for path in sorted(default_model_path().parent.glob("blastq-unet-*.pt")):
        model, info = UNet.from_checkpoint(path)
        assert info.version and model.encoder.channels[0] == model.width
    payload = _format_1(UNet(depth=2, width=4), ModelInfo(version="x", mpp=0.2, preprocess={}))
    torch.save({**payload, "format": "blastq-unet/9"}, tmp_path / "future.pt")
    with pytest.raises(ModelInvalid, match="not a blastq model checkpoint"):
        UNet.from_checkpoint(tmp_path / "future.pt")


def test_the_encoder_gives_every_levels_features_the_decoder_joins():
    model = UNet(depth=4, width=8).eval()
    features = model.encoder(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1:] for f in features] == [(8, 64, 64), (16, 32, 32), (32, 16, 16), (64, 8, 8)]
    assert model.decoder(features).shape == (1, 8, 64, 64)
