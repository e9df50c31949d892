"""Export a trained checkpoint for deployment: ONNX and TorchScript.

The checkpoint stays the source of truth; these files are derived from it and say so (the ONNX file
records the checkpoint's sha256). A TensorRT engine is not exported here: it is specific to one GPU and
TensorRT version, so `core.segment.engines.TensorRTEngine` builds and caches it on the machine that runs it.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from blastq.core.common import atomic_path
from blastq.core.segment import DEFAULT_OPSET, UNet, export_onnx_file


def export_onnx(model_path: str | Path, out_path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Checkpoint -> ONNX: input "tiles" NCHW float32, output "logits", batch/height/width dynamic."""
    model, info = UNet.from_checkpoint(Path(model_path))
    return export_onnx_file(model, out_path, sha256=info.sha256, version=info.version, opset=opset)


def export_torchscript(model_path: str | Path, out_path: str | Path) -> Path:
    """Checkpoint -> TorchScript (torch.jit.trace): loads with torch.jit.load, in Python or C++, no blastq.

    Traced, not scripted: the U-Net's forward has no data-dependent control flow, so a trace records
    it whole, and its shapes stay symbolic (any batch, any side that is a multiple of the stride).
    torch.jit.script rejects the model's Python (`zip(strict=True)`, int properties).
    """
    model, info = UNet.from_checkpoint(Path(model_path))
    model = copy.deepcopy(model).float().cpu().eval()
    side = max(64, model.stride)
    example = torch.zeros(2, model.in_channels, side, side)
    # torch 2.13 marks all of torch.jit deprecated (in favour of torch.export) but keeps it working.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        # A second shape proves no size was frozen into the trace.
        probe = torch.zeros(1, model.in_channels, side * 2, side * 3).uniform_(-2, 2)
        if not torch.allclose(traced(probe), model(probe), atol=1e-4):
            raise RuntimeError("TorchScript trace does not reproduce the model at a second input size")
        out_path = Path(out_path)
        # The provenance travels inside the archive: torch.jit.load(path, _extra_files={...}) reads it.
        provenance = {"blastq.checkpoint_sha256": info.sha256, "blastq.stride": str(model.stride)}
        with atomic_path(out_path) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files=provenance)
    return out_path
