"""int8 U-Nets: made from a checkpoint, tied to it, run by `onnx-int8`, chosen by `auto` where shipped, keyed apart."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from blastq.core.common import InvalidConfig, ModelInvalid
from blastq.core.pipeline import PipelineConfig, prepare_image, process_slide
from blastq.core.segment import (
    OnnxEngine,
    UNet,
    default_int8_path,
    default_model_path,
    load_engine,
    logits_to_probabilities,
    planned_precision,
    probe_batch,
    quantize_int8,
    save_checkpoint,
    to_model_input,
)
from blastq.core.segment.engines import INT8_MIN_MASK_AGREEMENT, INT8_PROB_TOLERANCE, check_engine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small random U-Net saved as a checkpoint, and its info."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    _, shipped = UNet.from_checkpoint(default_model_path())  # its scale and preprocessing
    save_checkpoint(path, UNet(depth=3, width=8), replace(shipped, version="tiny-1", sha256=""))
    return UNet.from_checkpoint(path) + (path,)


def test_an_int8_file_is_tied_to_its_checkpoint_and_close_to_fp32(tiny, smear, tmp_path):
    model, info, _ = tiny
    work = prepare_image(smear.image[:256, :256], 0.2, info)
    batches = [to_model_input(work[None])]
    out = quantize_int8(model, info, tmp_path / "tiny.int8.onnx", batches, "one 256 px smear tile")
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["blastq.precision"] == "int8" and meta["blastq.checkpoint_sha256"] == info.sha256
    assert meta["blastq.calibration"] == "one 256 px smear tile"
    engine = OnnxEngine(out, info, threads=1)
    assert engine.precision == "int8" and engine.name == "onnx-cpu-int8"
    x = to_model_input(prepare_image(smear.image[256:512, 256:512], 0.2, info)[None])
    with torch.no_grad():
        want = logits_to_probabilities(model(torch.from_numpy(x)).numpy())
    got = logits_to_probabilities(engine.infer(x))
    assert got.shape == want.shape and np.isfinite(got).all()
    assert np.abs(got - want).mean() < 0.02  # 8 bits, calibrated on another tile of the same smear
    other = replace(info, sha256="0" * 64)
    with pytest.raises(ModelInvalid, match="re-export"):
        OnnxEngine(out, other)  # made from another checkpoint: refused


def test_a_checkpoint_without_an_int8_file_says_how_to_make_one(tiny, tmp_path):
    _, info, path = tiny
    assert planned_precision("auto", "cpu", info.sha256, tmp_path) == ""
    with pytest.raises(InvalidConfig, match="python -m blastq.trainer.quantize"):
        load_engine(path, kind="onnx-int8", cache_dir=tmp_path)
    engine, _ = load_engine(path, cache_dir=tmp_path)  # auto: fp32 ONNX for it
    assert engine.precision == "fp32"


def test_the_shipped_model_runs_int8_by_default_on_cpu_and_agrees_with_fp32(smear, tmp_path):
    assert default_int8_path().is_file()
    _, info = UNet.from_checkpoint(default_model_path())
    assert planned_precision("auto", "cpu", info.sha256, None) == "int8"
    assert planned_precision("onnx", "cpu", info.sha256, None) == ""
    assert planned_precision("auto", "cuda", info.sha256, None) == ""
    int8, _ = load_engine(cache_dir=tmp_path)
    fp32, _ = load_engine(kind="onnx", cache_dir=tmp_path)
    assert (int8.name, int8.precision, fp32.precision) == ("onnx-cpu-int8", "int8", "fp32")
    x = to_model_input(prepare_image(smear.image[:512, :512], 0.2, info)[None])
    a, b = logits_to_probabilities(fp32.infer(x)), logits_to_probabilities(int8.infer(x))
    assert (a[:, :3].argmax(1) == b[:, :3].argmax(1)).mean() > 0.999


def test_int8_results_are_keyed_apart_from_fp32_ones(smear, tmp_path):
    from blastq.core.image import Slide

    slide = Slide(smear.image, 0.2, "user", "smear.png", "0" * 64)
    int8, info = load_engine(cache_dir=tmp_path)
    fp32, _ = load_engine(kind="onnx", cache_dir=tmp_path)
    a = process_slide(slide, int8, info, PipelineConfig())
    b = process_slide(slide, fp32, info, PipelineConfig())
    assert a.params_key != b.params_key
    assert process_slide(slide, int8, info, PipelineConfig(precision="int8")).params_key == a.params_key
    assert abs(a.stats.white_cells - b.stats.white_cells) <= 1


def test_a_broken_int8_file_is_refused_not_quietly_replaced(tiny, tmp_path):
    """An int8 file whose numbers are wrong (here: another model's weights under this one's sha256)."""
    model, info, path = tiny
    torch.manual_seed(99)
    impostor = UNet(depth=3, width=8)
    rng = np.random.default_rng(0)
    batches = [rng.uniform(-2, 2, (1, 3, 64, 64)).astype(np.float32)]
    target = tmp_path / info.sha256 / "model.int8.onnx"
    target.parent.mkdir()
    quantize_int8(impostor, info, target, batches, "random")
    with pytest.raises(ModelInvalid, match="int8 model disagrees"):
        load_engine(path, kind="onnx-int8", cache_dir=tmp_path)


def test_the_engine_probe_is_a_smear_with_white_cells_that_the_shipped_int8_reproduces(tmp_path):
    """The probe must hold cells (an all-background probe judges nothing), and the shipped int8 file must pass
    on this machine's CPU: the former one, quantised without reduce_range, agreed on 89.5% of it on an AVX2
    AMD EPYC."""
    probe = probe_batch()
    assert probe.shape == (1, 3, 256, 256) and probe.dtype == np.float32
    fp32, _ = load_engine(kind="torch")
    want = fp32.infer(probe)[:, :3].argmax(1)
    shares = np.bincount(want.ravel(), minlength=3) / want.size
    assert shares[1] > 0.02 and shares[2] > 0.02  # cytoplasm and nucleus pixels, not only background
    int8, _ = load_engine(kind="onnx-int8", cache_dir=tmp_path)
    assert (int8.infer(probe)[:, :3].argmax(1) == want).mean() >= INT8_MIN_MASK_AGREEMENT


def test_an_int8_engine_right_on_random_pixels_but_wrong_on_a_smear_is_refused(
    tiny, smear, tmp_path, monkeypatch
):
    model, info, path = tiny
    work = prepare_image(smear.image[:256, :256], 0.2, info)
    target = tmp_path / info.sha256 / "model.int8.onnx"
    target.parent.mkdir()
    quantize_int8(model, info, target, [to_model_input(work[None])], "one 256 px smear tile")
    right = OnnxEngine.infer

    def smear_blind(self, batch):  # as a saturating kernel: fine on the random check, wrong on a smear
        out = right(self, batch)
        return out if batch.shape[-1] < 256 else out[:, [1, 2, 0, 3, 4]]

    monkeypatch.setattr(OnnxEngine, "infer", smear_blind)
    reference, _ = load_engine(path, kind="torch")
    on_random = check_engine(
        OnnxEngine(target, info, threads=1), reference, INT8_PROB_TOLERANCE, min_mask_agreement=0.99
    )
    assert on_random.passed  # what the load check alone used to see
    with pytest.raises(ModelInvalid, match="int8 model disagrees"):
        load_engine(path, kind="onnx-int8", cache_dir=tmp_path)
