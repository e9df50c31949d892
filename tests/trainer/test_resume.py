"""A run stopped after any epoch and resumed from its checkpoint state ends as if never stopped."""

from __future__ import annotations

import io

import pytest
import torch

from blastq.core.common.errors import InvalidConfig
from blastq.core.segment.unet import UNet
from blastq.trainer.train import TrainConfig, train


def tiny(out, **overrides) -> TrainConfig:
    settings = dict(
        out=out, version="tiny", synth_train=2, synth_val=2, synth_size_px=128, depth=2, width=4,
        patch_px=64, batch_size=2, steps_per_epoch=3, max_epochs=3, patience=5, lr=5e-3, threads=1,
    )  # fmt: skip
    return TrainConfig(**{**settings, **overrides})


def losses(history) -> list[tuple[int, float, float]]:
    return [(h.epoch, h.train_loss, h.val_loss) for h in history]


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True)


def test_a_run_resumed_after_its_first_epoch_gives_the_uninterrupted_history(tmp_path):
    straight = train(tiny(tmp_path / "straight.pt"), progress=lambda _: None)
    states: dict[int, dict] = {}
    first = train(
        tiny(tmp_path / "stopped.pt", max_epochs=3),
        progress=lambda _: None,
        checkpoint_hook=lambda epoch, state: states.setdefault(epoch, roundtrip(state)),
    )
    assert losses(first.history) == losses(straight.history)  # the hook changes nothing
    resumed = train(tiny(tmp_path / "resumed.pt"), progress=lambda _: None, resume_state=states[1])
    assert [h.epoch for h in resumed.history] == [1, 2, 3]
    for (e1, t1, v1), (e2, t2, v2) in zip(losses(resumed.history), losses(straight.history), strict=True):
        assert e1 == e2 and t1 == pytest.approx(t2, abs=1e-6) and v1 == pytest.approx(v2, abs=1e-6)
    assert resumed.best_epoch == straight.best_epoch and resumed.best_val_loss == straight.best_val_loss
    a, _ = UNet.from_checkpoint(resumed.checkpoint)
    b, _ = UNet.from_checkpoint(straight.checkpoint)
    for name, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[name], atol=1e-5, rtol=1e-5)


def test_the_resume_state_loads_with_weights_only_and_holds_what_resuming_needs(tmp_path):
    states: list[dict] = []
    train(
        tiny(tmp_path / "a.pt", max_epochs=1),
        progress=lambda _: None,
        checkpoint_hook=lambda epoch, state: states.append(state),
    )
    state = roundtrip(states[0])  # raises if anything in it needs full unpickling
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert {"model", "optimizer", "scheduler", "numpy_rng", "torch_rng", "best_model"} <= state.keys()
    assert isinstance(state["numpy_rng"]["state"]["state"], int)


def test_a_resume_state_of_other_settings_is_refused(tmp_path):
    states: list[dict] = []
    train(
        tiny(tmp_path / "a.pt", max_epochs=1),
        progress=lambda _: None,
        checkpoint_hook=lambda e, s: states.append(s),
    )
    with pytest.raises(InvalidConfig, match="width"):
        train(tiny(tmp_path / "b.pt", width=8), progress=lambda _: None, resume_state=states[0])
