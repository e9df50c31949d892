"""A tiny model trained for real in seconds: the loop, the checkpoint, the losses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from blastq.core.common.errors import InvalidConfig
from blastq.core.segment.unet import UNet
from blastq.trainer.losses import segmentation_loss
from blastq.trainer.train import TrainConfig, train


def test_tiny_training_learns_and_writes_a_loadable_checkpoint(tmp_path):
    cfg = TrainConfig(
        out=tmp_path / "tiny.pt", version="tiny", synth_train=4, synth_val=2, synth_size_px=192, depth=3, width=8,
        patch_px=64, batch_size=4, steps_per_epoch=15, max_epochs=3, patience=5, lr=5e-3, threads=1,
    )  # fmt: skip
    result = train(cfg, progress=lambda _: None)
    assert len(result.history) == 3
    assert result.history[-1].train_loss < result.history[0].train_loss
    model, info = UNet.from_checkpoint(result.checkpoint)
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


def test_blast_or_white_on_a_cell_of_unknown_kind_cost_the_same():
    cls = torch.zeros(1, 8, 8, dtype=torch.uint8)
    cls[:, 2:6, 2:6] = 255  # a cell, kind unknown
    fg = (cls == 255).to(torch.uint8)
    nuc = torch.zeros_like(cls)

    def predicting(channel: int) -> torch.Tensor:
        logits = torch.full((1, 5, 8, 8), -6.0)
        logits[:, 0] = torch.where(cls[0] == 0, 6.0, -6.0)
        logits[:, channel] = torch.where(cls[0] == 255, 6.0, logits[0, channel])
        return logits

    as_white = segmentation_loss(predicting(1), cls, nuc, nuc, fg)[0]
    as_blast = segmentation_loss(predicting(2), cls, nuc, nuc, fg)[0]
    as_background = segmentation_loss(predicting(0), cls, nuc, nuc, fg)[0]
    assert torch.isclose(as_white, as_blast) and as_background > as_white + 1.0
    # without the foreground target the cell teaches nothing about classes
    assert torch.isclose(
        segmentation_loss(predicting(0), cls, nuc, nuc)[0], segmentation_loss(predicting(1), cls, nuc, nuc)[0]
    )


def test_a_foreground_target_with_nothing_partial_leaves_the_loss_exactly_as_before():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 16, 16)
    cls = torch.randint(0, 3, (2, 16, 16), dtype=torch.uint8)
    cls[:, :4] = 255
    nuc = torch.randint(0, 2, (2, 16, 16), dtype=torch.uint8)
    fg = torch.full_like(cls, 255)
    assert (
        segmentation_loss(logits, cls, nuc, nuc, fg)[0].item()
        == segmentation_loss(logits, cls, nuc, nuc)[0].item()
    )


def test_partial_cross_entropy_equals_the_classic_one_on_known_pixels():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 16, 16)
    cls = torch.randint(0, 3, (2, 16, 16), dtype=torch.uint8)
    nuc = torch.randint(0, 2, (2, 16, 16), dtype=torch.uint8)
    fg = torch.full_like(cls, 255)
    cls2, fg2 = cls.clone(), fg.clone()
    cls2[0, 0, 0], fg2[0, 0, 0] = 255, 1  # one partial pixel switches to the partial formula
    logits2 = logits.clone()
    logits2[0, :3, 0, 0] = torch.tensor([-50.0, 50.0, 0.0])  # ... which it predicts as a cell: ~0 cost
    n = cls.numel()
    classic = torch.nn.functional.cross_entropy(logits[:, :3], cls.long(), reduction="none")
    classic[0, 0, 0] = 0.0
    expected = classic.sum() / n
    parts = segmentation_loss(logits2, cls2, nuc, nuc, fg2)[1]
    assert abs(parts["ce"] - expected.item()) < 1e-5


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # threads=1 keeps the tiny runs fast on a busy shared CPU; train() sets it process-wide.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _tiny(out, **kw) -> TrainConfig:
    base = dict(
        out=out, version="tiny", synth_train=2, synth_val=1, synth_size_px=128, depth=3, width=8,
        patch_px=64, batch_size=2, steps_per_epoch=3, max_epochs=2, patience=5, threads=1,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _losses(result):
    return [(h.epoch, h.train_loss, h.val_loss) for h in result.history]


def test_a_run_records_config_split_and_versions_beside_its_checkpoint(tmp_path):
    cfg = _tiny(tmp_path / "a.pt")
    result = train(cfg, progress=lambda _: None)
    record = json.loads((tmp_path / "a.run.json").read_text())
    assert result.run_record == tmp_path / "a.run.json" and record["format"] == "blastq-run/1"
    assert TrainConfig.from_run(tmp_path / "a.run.json") == cfg
    assert TrainConfig.from_json(tmp_path / "a.run.json") == cfg
    assert record["seed"] == 0 and record["code"]["blastq"] and record["timing"]["seconds"] >= 0
    assert record["split"]["synthetic"]["train"] == {"first_seed": 0, "count": 2}
    assert record["split"]["synthetic"]["val"] == {"first_seed": 1_000_000, "count": 1}
    assert record["result"]["best_epoch"] == result.best_epoch and len(record["history"]) == 2
    _, info = UNet.from_checkpoint(result.checkpoint)
    assert record["split"]["sha256"][:16] in info.trained_on and "a.run.json" in info.trained_on
    assert record["result"]["checkpoint_sha256"] == info.sha256


def test_a_recorded_run_retrains_to_the_same_losses_and_refuses_changed_data(tmp_path):
    import cv2

    from blastq.core.common.errors import InvalidDataset
    from blastq.trainer.train import retrain

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "labelmap.json").write_text(
        json.dumps({"classes": {"0": "background", "1": "white_cell"}, "mpp": 0.2, "blast_unknown": True})
    )
    for k, i in enumerate((0, 1, 2, 3, 4, 35)):
        img = np.full((96, 96, 3), 235, np.uint8)
        mask = np.zeros((96, 96), np.uint8)
        cv2.circle(img, (30 + 6 * k, 48), 25, (150, 60, 110), -1)
        cv2.circle(mask, (30 + 6 * k, 48), 25, 1, -1)
        cv2.imwrite(str(pairs / f"p{i}.png"), img)
        cv2.imwrite(str(pairs / f"p{i}_mask.png"), mask)
    first = train(_tiny(tmp_path / "a.pt", pairs_dirs=(pairs,)), progress=lambda _: None)
    record = json.loads((tmp_path / "a.run.json").read_text())
    assert [sorted(record["split"]["pairs"][0][sp]["ids"]) for sp in ("train", "val", "test")] == [
        ["p0.png", "p2.png", "p3.png", "p4.png"], ["p35.png"], ["p1.png"]
    ]  # fmt: skip
    again = retrain(tmp_path / "a.run.json", tmp_path / "b.pt", progress=lambda _: None)
    assert _losses(again) == _losses(first)
    cv2.imwrite(str(pairs / "p9.png"), np.full((96, 96, 3), 235, np.uint8))
    cv2.imwrite(str(pairs / "p9_mask.png"), np.zeros((96, 96), np.uint8))
    with pytest.raises(InvalidDataset, match="no longer gives the split"):
        retrain(tmp_path / "a.run.json", tmp_path / "c.pt", progress=lambda _: None)
    with pytest.raises(InvalidConfig, match="overwrite"):
        retrain(tmp_path / "a.run.json", tmp_path / "a.pt", progress=lambda _: None)


def test_configs_round_trip_through_json_and_refuse_what_they_do_not_know(tmp_path):
    cfg = _tiny(tmp_path / "x.pt", pairs_dirs=(tmp_path / "p",), wbc_root=tmp_path / "w")
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_json(path) == cfg
    assert TrainConfig.from_json(path, out=tmp_path / "y.pt").out == tmp_path / "y.pt"
    with pytest.raises(InvalidConfig, match="unknown training setting"):
        TrainConfig.from_dict({"out": "x.pt", "epochs": 3})
    with pytest.raises(InvalidConfig, match="depth"):
        TrainConfig.from_dict({"out": "x.pt", "depth": "4"})
    with pytest.raises(InvalidConfig, match="needs 'out'"):
        TrainConfig.from_dict({"depth": 4})
    assert TrainConfig.from_dict({"out": "x.pt", "lr": 1}).lr == 1.0


def test_the_split_manifest_lists_segmentation_wbc_by_the_written_rule(tmp_path, wbc_root):
    from blastq.trainer.train import split_manifest

    split = split_manifest(_tiny(tmp_path / "x.pt", wbc_root=wbc_root))
    wbc = split["segmentation_wbc"]
    assert [wbc[sp]["count"] for sp in ("train", "val", "test")] == [280, 40, 80]
    assert "dataset1/005.bmp" in wbc["test"]["ids"] and "dataset2/011.bmp" in wbc["val"]["ids"]
    moved = split_manifest(_tiny(tmp_path / "y.pt", wbc_root=wbc_root, version="other"))
    assert moved["sha256"] == split["sha256"]  # the split, not the run's other settings


def test_one_source_left_out_is_never_in_the_split(tmp_path, wbc_root):
    from blastq.trainer.train import split_manifest

    split = split_manifest(_tiny(tmp_path / "x.pt", wbc_root=wbc_root, wbc_datasets=("dataset1",)))
    wbc = split["segmentation_wbc"]
    assert [wbc[sp]["count"] for sp in ("train", "val", "test")] == [210, 30, 60]
    assert not any(name.startswith("dataset2/") for sp in ("train", "val", "test") for name in wbc[sp]["ids"])
    cfg = _tiny(tmp_path / "x.pt", wbc_root=wbc_root, wbc_datasets=("dataset1",))
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_json(path).wbc_datasets == ("dataset1",)
    with pytest.raises(InvalidConfig, match="wbc_datasets"):
        _tiny(tmp_path / "x.pt", wbc_datasets=("dataset3",))


def test_fine_tuning_starts_from_the_given_checkpoint_and_records_it(tmp_path):
    first = train(_tiny(tmp_path / "a.pt"), progress=lambda _: None)
    start, _ = UNet.from_checkpoint(first.checkpoint)
    # lr 0: the weights do not move (batch-norm statistics still do), so they are the start's.
    tuned = train(
        _tiny(tmp_path / "b.pt", init_from=first.checkpoint, lr=0.0, max_epochs=1), progress=lambda _: None
    )
    model, info = UNet.from_checkpoint(tuned.checkpoint)
    weights = dict(model.named_parameters())
    for name, tensor in start.named_parameters():
        assert torch.equal(weights[name], tensor), name
    assert "fine-tuned from" in info.trained_on
    fresh, _ = UNet.from_checkpoint(
        train(_tiny(tmp_path / "c.pt", lr=0.0, max_epochs=1), progress=lambda _: None).checkpoint
    )
    fresh_weights = dict(fresh.named_parameters())
    assert not all(torch.equal(fresh_weights[n], t) for n, t in start.named_parameters())
    record = json.loads((tmp_path / "b.run.json").read_text())
    assert record["config"]["init_from"] == str(first.checkpoint.absolute())
    assert TrainConfig.from_run(tmp_path / "b.run.json").init_from == first.checkpoint.absolute()


def test_fine_tuning_refuses_a_checkpoint_of_another_shape(tmp_path):
    first = train(_tiny(tmp_path / "a.pt"), progress=lambda _: None)
    with pytest.raises(InvalidConfig, match="width 8"):
        train(_tiny(tmp_path / "b.pt", init_from=first.checkpoint, width=4), progress=lambda _: None)


def test_wide_synthetic_training_fields_come_at_the_models_scale_with_consistent_targets():
    from blastq.core.image.preprocessing import PreprocessConfig
    from blastq.trainer.datasets import synth_sample

    with pytest.raises(InvalidConfig, match="synth_variety"):
        _tiny("x.pt", synth_variety="fancy")
    for seed, variety in [(0, "wide"), (1, "wide"), (2, "mixed"), (3, "mixed")]:
        sample = synth_sample(seed, 160, 0.2, PreprocessConfig(), variety)
        assert abs(sample.image.shape[0] - 160) <= 2 and sample.image.shape[:2] == sample.classes.shape
        assert sample.nucleus.shape == sample.classes.shape == sample.marker.shape
        # Nuclei and markers lie inside cells, as the generator drew them, after resampling too.
        assert not np.any(sample.nucleus.astype(bool) & (sample.classes == 0))
        assert not np.any((sample.marker == 1) & (sample.classes == 0))


def test_wide_training_fields_can_leave_stain_families_and_magnifications_out():
    from blastq.core.image.preprocessing import PreprocessConfig
    from blastq.trainer.datasets import synth_sample

    with pytest.raises(InvalidConfig, match="synth_families"):
        _tiny("x.pt", synth_families=("giemsa-ish",))
    with pytest.raises(InvalidConfig, match="synth_families"):
        _tiny("x.pt", synth_families=())
    with pytest.raises(InvalidConfig, match="synth_mpp"):
        _tiny("x.pt", synth_mpp_min=0.3, synth_mpp_max=0.1)
    cfg = _tiny("x.pt", synth_variety="wide", synth_families=("mgg", "wright"), synth_mpp_min=0.1)
    again = TrainConfig.from_dict(cfg.to_dict())  # kept in the run record, read back the same
    assert (again.synth_families, again.synth_mpp_min) == (("mgg", "wright"), 0.1)
    # One field in two families: the same cells, other colours.
    wright = synth_sample(4, 160, 0.2, PreprocessConfig(), "wide", families=("wright",))
    leishman = synth_sample(4, 160, 0.2, PreprocessConfig(), "wide", families=("leishman",))
    assert np.array_equal(wright.classes, leishman.classes)
    assert np.abs(wright.image.astype(float) - leishman.image.astype(float)).mean() > 1.0
    # A magnification range of one value renders every field there: the same field size at 0.1 um/px
    # as at 0.1..0.1, and a different one from 0.25 um/px.
    fine = synth_sample(4, 160, 0.2, PreprocessConfig(), "wide", mpp_range=(0.1, 0.1))
    coarse = synth_sample(4, 160, 0.2, PreprocessConfig(), "wide", mpp_range=(0.25, 0.25))
    assert fine.classes.shape == coarse.classes.shape
    assert not np.array_equal(fine.classes, coarse.classes)
