"""Inference engines: one small interface, several back ends.

An engine takes a batch of NCHW float32 tiles (already scaled by `unet.to_model_input`) and returns
NCHW float32 logits with `unet.N_OUTPUTS` channels. Callers never know which back end runs: the torch
engine is here now; ONNX Runtime and TensorRT engines implement the same two members.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from blastq.core.errors import InvalidConfig
from blastq.core.unet import ModelInfo, UNet, default_model_path, load_checkpoint


class Engine(Protocol):
    name: str
    stride: int  # tile sides must be multiples of this

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """NCHW float32 in, NCHW float32 logits out."""
        ...


class TorchEngine:
    """Eager PyTorch on CPU or CUDA (fp16 autocast on CUDA when asked)."""

    def __init__(self, model: UNet, device: str = "cpu", fp16: bool = False):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidConfig(f"device {device} asked for, but this torch build sees no CUDA GPU")
        # channels_last: oneDNN/cuDNN convolutions run faster in NHWC; results are the same.
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.fp16 = fp16 and self.device.type == "cuda"
        self.stride = model.stride
        self.name = f"torch-{self.device.type}{'-fp16' if self.fp16 else ''}"

    @torch.inference_mode()
    def infer(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, enabled=self.fp16, dtype=torch.float16):
            y = self.model(x)
        return y.float().cpu().numpy()


ENGINE_KINDS = ("auto", "torch")


def load_engine(
    model_path: str | Path | None = None, *, kind: str = "auto", device: str = "cpu"
) -> tuple[Engine, ModelInfo]:
    """Load a checkpoint (the shipped default when None) into the engine `kind` on `device`."""
    if kind not in ENGINE_KINDS:
        raise InvalidConfig(f"unknown engine {kind!r}; choose one of {', '.join(ENGINE_KINDS)}")
    model, info = load_checkpoint(Path(model_path) if model_path else default_model_path())
    return TorchEngine(model, device=device, fp16=device.startswith("cuda")), info
