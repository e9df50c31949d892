"""Every engine present agrees with the torch model; derived engines are cached, checked, and refused clearly.

Tolerance, fp32 engines: probabilities within 1e-3 of torch's and >= 99.9% of pixels in the same class.
fp16 engines (TensorRT): probabilities within 5e-2 and >= 99.5% of pixels in the same class.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import sys

import numpy as np
import pytest
import torch

from blastq.core.common.errors import InvalidConfig, ModelInvalid
from blastq.core.image.slide import Slide
from blastq.core.pipeline.field import process_slide
from blastq.core.segment import engines
from blastq.core.segment.engines import (
    FP16_PROB_TOLERANCE,
    FP32_PROB_TOLERANCE,
    TENSORRT_HINT,
    OnnxEngine,
    ShapeProfile,
    TensorRTEngine,
    TorchEngine,
    check_engine,
    load_engine,
    onnx_cache_path,
    tensorrt_available,
    tensorrt_cache_key,
)
from blastq.core.segment.stitch import logits_to_probabilities
from blastq.core.segment.unet import N_CLASSES, N_OUTPUTS, UNet, default_model_path, to_model_input


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def torch_engine():
    return load_engine(kind="torch")


@pytest.fixture(scope="module")
def onnx_engine(cache_dir):
    return load_engine(kind="onnx", cache_dir=cache_dir, threads=2)


@pytest.fixture(scope="module")
def smear_tiles(smear) -> np.ndarray:
    """Six 256x256 tiles of a synthetic smear as model input (NCHW float32)."""
    img = smear.image
    return to_model_input(np.stack([img[r : r + 256, c : c + 256] for r in (0, 256) for c in (0, 256, 512)]))


def assert_same_masks(got_logits, want_logits, prob_tol, min_agreement):
    got, want = logits_to_probabilities(got_logits), logits_to_probabilities(want_logits)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < prob_tol
    agreement = (got[:, :N_CLASSES].argmax(1) == want[:, :N_CLASSES].argmax(1)).mean()
    assert agreement >= min_agreement


def test_onnx_engine_gives_the_torch_mask_on_the_same_tiles(onnx_engine, torch_engine, smear_tiles):
    engine, _ = onnx_engine
    assert engine.name == "onnx-cpu" and engine.stride == torch_engine[0].stride
    assert_same_masks(
        engine.infer(smear_tiles), torch_engine[0].infer(smear_tiles), FP32_PROB_TOLERANCE, 0.999
    )


def test_tensorrt_engine_gives_the_torch_mask_on_the_same_tiles(torch_engine, smear_tiles, cache_dir):
    if not tensorrt_available():
        pytest.skip("TensorRT needs torch-tensorrt and a CUDA GPU; neither is here")
    engine, _ = load_engine(kind="tensorrt", device="cuda", cache_dir=cache_dir)
    assert engine.name.startswith("tensorrt")
    assert_same_masks(
        engine.infer(smear_tiles), torch_engine[0].infer(smear_tiles), FP16_PROB_TOLERANCE, 0.995
    )


def test_pipeline_with_onnx_finds_the_same_cells_as_torch(onnx_engine, torch_engine):
    from blastq.core.synth.field import generate_field

    field = generate_field(4242, 512, 512, mpp=0.2, blast_fraction=0.4)
    slide = Slide(rgb=field.image, mpp=0.2, mpp_source="user", name="f.png", sha256="0" * 64)
    by_onnx = process_slide(slide, *onnx_engine)
    by_torch = process_slide(slide, *torch_engine)
    assert by_torch.stats.white_cells > 0
    assert by_onnx.stats == by_torch.stats
    assert (by_onnx.maps.classes == by_torch.maps.classes).mean() >= 0.999
    assert [c.label for c in by_onnx.maps.cells] == [c.label for c in by_torch.maps.cells]
    for a, b in zip(by_onnx.maps.cells, by_torch.maps.cells, strict=True):
        assert abs(a.centroid_x - b.centroid_x) < 0.5 and abs(a.centroid_y - b.centroid_y) < 0.5
        assert abs(a.area_px - b.area_px) <= max(2, 0.01 * b.area_px)


def test_onnx_export_is_made_once_and_reused(tmp_path, monkeypatch):
    exports = []
    real_export = engines.export_onnx_file
    monkeypatch.setattr(
        engines, "export_onnx_file", lambda *a, **k: exports.append(a) or real_export(*a, **k)
    )
    first, info = load_engine(kind="onnx", cache_dir=tmp_path)
    path = onnx_cache_path(tmp_path, info.sha256)
    assert path.is_file() and first.path == path
    mtime = path.stat().st_mtime_ns
    second, _ = load_engine(kind="onnx", cache_dir=tmp_path)
    assert len(exports) == 1 and path.stat().st_mtime_ns == mtime and second.path == path
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary files left behind"


def test_a_damaged_cached_export_is_made_again(tmp_path, caplog):
    _, info = UNet.from_checkpoint(default_model_path())
    path = onnx_cache_path(tmp_path, info.sha256)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="blastq.core.segment.engines"):
        engine, _ = load_engine(kind="onnx", cache_dir=tmp_path)
    assert engine.name == "onnx-cpu" and path.stat().st_size > 1000 and "exporting it again" in caplog.text


def test_onnx_file_from_another_checkpoint_is_refused(onnx_engine):
    engine, info = onnx_engine
    with pytest.raises(ModelInvalid, match="re-export"):
        OnnxEngine(engine.path, dataclasses.replace(info, sha256="f" * 64))


def test_auto_on_cpu_takes_onnx_runtime_and_torch_without_it(cache_dir, monkeypatch):
    engine, _ = load_engine(kind="auto", cache_dir=cache_dir)
    assert engine.name == "onnx-cpu-int8"  # the shipped model has an int8 file (tests/core/test_quantize.py)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a),
    )
    engine, _ = load_engine(kind="auto", cache_dir=cache_dir)
    assert engine.name == "torch-cpu"
    with pytest.raises(InvalidConfig, match="pip install --force-reinstall onnx onnxruntime"):
        load_engine(kind="onnx", cache_dir=cache_dir)


def test_unknown_engine_or_device_is_a_config_error():
    with pytest.raises(InvalidConfig, match="unknown engine 'tflite'"):
        load_engine(kind="tflite")
    with pytest.raises(InvalidConfig, match="unknown device"):
        load_engine(device="gpu7")


def test_tensorrt_without_torch_tensorrt_names_the_install_hint(monkeypatch, cache_dir):
    model, info = UNet.from_checkpoint(default_model_path())
    if not torch.cuda.is_available():
        with pytest.raises(InvalidConfig, match="CUDA"):
            load_engine(kind="tensorrt", device="cuda")
    with pytest.raises(InvalidConfig, match=r"pip install blastq\[tensorrt\]"):
        load_engine(kind="tensorrt", device="cpu", cache_dir=cache_dir)
    # A CUDA GPU but no torch-tensorrt: the import is what fails.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    with pytest.raises(InvalidConfig) as err:
        TensorRTEngine(model, info, "cuda", cache_dir=cache_dir)
    assert str(err.value) == TENSORRT_HINT


class ZeroEngine:
    """What a broken fp16 build was seen to do: all-zero logits, so all-background-ish masks."""

    name, stride, precision = "zeros", 8, "fp32"

    def __init__(self, *args, **kwargs):
        pass

    def infer(self, batch):
        return np.zeros((batch.shape[0], N_OUTPUTS, *batch.shape[2:]), np.float32)


def test_an_engine_that_disagrees_with_torch_is_replaced_by_torch(monkeypatch, cache_dir, caplog):
    monkeypatch.setattr(engines, "OnnxEngine", ZeroEngine)
    with caplog.at_level(logging.WARNING, logger="blastq.core.segment.engines"):
        engine, _ = load_engine(kind="onnx", cache_dir=cache_dir)
    assert isinstance(engine, TorchEngine) and engine.name == "torch-cpu"
    assert "zeros disagrees with the torch model" in caplog.text and "falling back to torch" in caplog.text


def test_check_engine_passes_torch_against_itself_and_fails_zeros(torch_engine):
    engine, _ = torch_engine
    same = check_engine(engine, engine)
    assert same.passed and same.max_prob_diff == 0 and same.mask_agreement == 1
    zeros = check_engine(ZeroEngine(), engine, FP16_PROB_TOLERANCE)
    assert not zeros.passed and zeros.max_prob_diff > 0.1


def test_check_engine_reports_a_crashing_engine_instead_of_raising(torch_engine):
    class Crashing(ZeroEngine):
        def infer(self, batch):
            raise RuntimeError("engine exploded")

    check = check_engine(Crashing(), torch_engine[0])
    assert not check.passed and "engine exploded" in check.error


def test_torch_engine_runs_eagerly_when_compilation_fails(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: broken)
    model, _ = UNet.from_checkpoint(default_model_path())
    engine = TorchEngine(model, "cpu", compile=True)
    assert engine.name == "torch-cpu-compiled"
    x = np.zeros((1, 3, 64, 64), np.float32)
    with caplog.at_level(logging.WARNING, logger="blastq.core.segment.engines"):
        y = engine.infer(x)
    assert (
        y.shape == (1, N_OUTPUTS, 64, 64)
        and engine.name == "torch-cpu"
        and "torch.compile failed" in caplog.text
    )
    assert not TorchEngine(model, "cpu").compiled, "compile is off by default on CPU"


def test_tensorrt_cache_key_changes_with_each_thing_the_engine_depends_on():
    base = dict(
        model_sha256="a" * 64,
        trt_version="10.3.0",
        gpu_arch="sm_90",
        shape_profile=ShapeProfile(),
        precision="fp16",
    )
    key = tensorrt_cache_key(**base)
    assert key == tensorrt_cache_key(**base) and len(key) == 64 and int(key, 16) >= 0
    changes = {
        "model_sha256": "b" * 64,
        "trt_version": "10.4.0",
        "gpu_arch": "sm_89",
        "shape_profile": ShapeProfile(max=(16, 3, 512, 512)),
        "precision": "fp32",
    }
    keys = {tensorrt_cache_key(**{**base, name: value}) for name, value in changes.items()}
    assert len(keys) == len(changes) and key not in keys


def test_shape_profile_admits_only_shapes_between_min_and_max():
    profile = ShapeProfile()
    assert profile.admits((8, 3, 256, 256)) and profile.admits((1, 3, 64, 64))
    assert not profile.admits((64, 3, 256, 256)) and not profile.admits((1, 3, 32, 32))
    assert not profile.admits((3, 256, 256))


def test_without_a_cache_folder_derived_engines_live_in_a_folder_of_this_process(monkeypatch, tmp_path):
    import tempfile

    from blastq.core.segment.engines import process_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))  # no longer consulted by anything
    folder = process_cache_dir()
    assert folder == process_cache_dir() and folder.is_relative_to(tempfile.gettempdir())
    engine, info = load_engine(kind="onnx")
    assert any(folder.rglob("*.onnx")) and not (tmp_path / "home-cache").exists()
