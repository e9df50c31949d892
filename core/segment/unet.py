"""The U-Net: an encoder-decoder with skip connections and several per-pixel heads.

Output channels, in order (NCHW logits):
  0..2  class logits: background, white cell (non-blast), blast
  3     nucleus logit
  4     marker logit: the inner core of each white cell, one blob per cell, used as watershed seeds to
        split touching cells (a boundary channel alone leaves thin necks between cells ambiguous)
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blastq.core.common import ModelInvalid, ModelNotFound, atomic_path, file_sha256

CLASS_NAMES: tuple[str, ...] = ("background", "white_cell", "blast")
N_CLASSES = len(CLASS_NAMES)
NUCLEUS_CHANNEL = N_CLASSES
MARKER_CHANNEL = N_CLASSES + 1
N_OUTPUTS = N_CLASSES + 2
CHECKPOINT_FORMAT = "blastq-unet/1"


def _block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with `depth` resolution levels, `width` channels at the top, doubling per level."""

    def __init__(self, in_channels: int = 3, depth: int = 4, width: int = 16, n_outputs: int = N_OUTPUTS):
        super().__init__()
        if depth < 2 or width < 4:
            raise ValueError(f"U-Net needs depth >= 2 and width >= 4, got depth={depth} width={width}")
        self.depth, self.width, self.in_channels, self.n_outputs = depth, width, in_channels, n_outputs
        chans = [width * 2**i for i in range(depth)]
        self.down = nn.ModuleList()
        prev = in_channels
        for ch in chans:
            self.down.append(_block(prev, ch))
            prev = ch
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for ch in reversed(chans[:-1]):
            # Bilinear upsampling + conv instead of transposed conv: no checkerboard artefacts,
            # which would show as a grid in stitched masks.
            self.up.append(
                nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(prev, ch, 1))
            )
            self.dec.append(_block(2 * ch, ch))
            prev = ch
        self.head = nn.Conv2d(prev, n_outputs, 1)

    @property
    def stride(self) -> int:
        """Input sides must be multiples of this."""
        return 2 ** (self.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth - 1:
                skips.append(x)
                x = self.pool(x)
        for up, dec in zip(self.up, self.dec, strict=True):
            x = up(x)
            x = dec(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)

    def arch(self) -> dict[str, int]:
        return {
            "in_channels": self.in_channels,
            "depth": self.depth,
            "width": self.width,
            "n_outputs": self.n_outputs,
        }


@dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint says about itself; the pipeline takes scale and preprocessing from here."""

    version: str
    mpp: float  # the scale the model was trained at, microns per pixel
    preprocess: dict[str, Any]  # PreprocessConfig fields the model was trained with
    class_names: tuple[str, ...] = CLASS_NAMES
    trained_on: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    sha256: str = ""  # of the checkpoint file; filled on load


def to_model_input(rgb_batch: Any) -> Any:
    """NHWC uint8 RGB (numpy) -> NCHW float32, scaled to about [-2, 2]."""
    import numpy as np

    x = np.ascontiguousarray(rgb_batch.transpose(0, 3, 1, 2), dtype=np.float32)
    x *= 1.0 / 255.0
    x -= 0.5
    x *= 4.0
    return x


def save_checkpoint(path: Path, model: UNet, info: ModelInfo) -> str:
    """Write weights + architecture + info; return the file's sha256."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": model.arch(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "info": {k: v for k, v in asdict(info).items() if k != "sha256"},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return file_sha256(path)


def load_checkpoint(path: Path) -> tuple[UNet, ModelInfo]:
    """Load a blastq checkpoint safely (weights_only) and check it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"model file not found: {path}")
    data = path.read_bytes()
    try:
        import io

        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ModelInvalid(f"not a readable model checkpoint: {path} ({type(exc).__name__})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ModelInvalid(f"not a blastq model checkpoint (expected format {CHECKPOINT_FORMAT}): {path}")
    try:
        model = UNet(**payload["arch"])
        model.load_state_dict(payload["state_dict"])
        raw = dict(payload["info"])
        raw["class_names"] = tuple(raw.get("class_names", CLASS_NAMES))
        info = ModelInfo(**raw, sha256=hashlib.sha256(data).hexdigest())
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise ModelInvalid(f"model checkpoint does not match the blastq U-Net: {path} ({exc})") from exc
    model.eval()
    return model, info


def default_model_path() -> Path:
    """The model shipped inside the package."""
    return Path(__file__).parents[1] / "weights" / "blastq-unet-default.pt"
