"""Exported files reproduce the checkpoint they came from, at any batch and tile size."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from blastq.core.segment.unet import UNet, default_model_path
from blastq.trainer.export import export_onnx, export_torchscript

SHAPES = [(1, 64, 64), (3, 128, 128), (2, 64, 128)]  # batch, height, width: none of them the traced one


@pytest.fixture(scope="module")
def shipped():
    model, info = UNet.from_checkpoint(default_model_path())
    return model, info


def torch_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def tiles(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-2, 2, (batch, 3, height, width)).astype(np.float32)


def test_onnx_export_passes_the_checker_and_records_its_source(shipped, tmp_path):
    model, info = shipped
    path = export_onnx(default_model_path(), tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["blastq.checkpoint_sha256"] == info.sha256
    assert info.sha256 == hashlib.sha256(default_model_path().read_bytes()).hexdigest()
    assert meta["blastq.stride"] == str(model.stride) and meta["blastq.depth"] == str(model.depth)
    assert [i.name for i in proto.graph.input] == ["tiles"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    assert not list(tmp_path.glob("*.tmp")), "the atomic write left its temporary file"


def test_onnx_export_matches_torch_at_any_batch_and_size(shipped, tmp_path):
    model, _ = shipped
    session = ort.InferenceSession(str(export_onnx(default_model_path(), tmp_path / "m.onnx")))
    for b, h, w in SHAPES:
        x = tiles(b, h, w)
        (y,) = session.run(["logits"], {"tiles": x})
        assert y.shape == (b, 5, h, w) and y.dtype == np.float32
        np.testing.assert_allclose(y, torch_logits(model, x), atol=1e-3)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_export_loads_without_blastq_and_matches(shipped, tmp_path):
    model, info = shipped
    path = export_torchscript(default_model_path(), tmp_path / "m.ts")
    extra = {"blastq.checkpoint_sha256": ""}
    loaded = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    assert extra["blastq.checkpoint_sha256"] in (info.sha256, info.sha256.encode())
    for b, h, w in SHAPES:
        x = tiles(b, h, w, seed=1)
        with torch.inference_mode():
            y = loaded(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(y, torch_logits(model, x), atol=1e-4)
