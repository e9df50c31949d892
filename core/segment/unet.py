"""The U-Net: an encoder-decoder with skip connections and several per-pixel heads.

Output channels, in order (NCHW logits):
  0..2  class logits: background, white cell (non-blast), blast
  3     nucleus logit
  4     marker logit: the inner core of each white cell, one blob per cell, used as watershed seeds to
        split touching cells (a boundary channel alone leaves thin necks between cells ambiguous)
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
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
# Format 2: encoder / decoder / head modules; format 1 (one flat module: blastq-unet 1.0 to 2.2) still loads.
CHECKPOINT_FORMAT = "blastq-unet/2"
READABLE_FORMATS = ("blastq-unet/1", CHECKPOINT_FORMAT)


def _block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class Encoder(nn.Module):
    """`depth` levels of two 3x3 conv-BN-ReLU layers, `width` channels at the top doubling per level, a 2x
    max-pool between levels. forward -> every level's features, finest first (the decoder's skips; the
    cell descriptors of core.cells.cellnets)."""

    def __init__(self, in_channels: int, depth: int, width: int):
        super().__init__()
        self.channels = tuple(width * 2**i for i in range(depth))
        self.blocks = nn.ModuleList()
        prev = in_channels
        for ch in self.channels:
            self.blocks.append(_block(prev, ch))
            prev = ch
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for i, block in enumerate(self.blocks):
            x = block(self.pool(x) if i else x)
            features.append(x)
        return features


class Decoder(nn.Module):
    """From the coarsest level up: 2x bilinear upsampling and a 1x1 conv, joined with the encoder's skip at
    that level, then a conv block. Bilinear + conv rather than a transposed conv: no checkerboard artefacts,
    which would show as a grid in stitched masks."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        self.up = nn.ModuleList()
        self.blocks = nn.ModuleList()
        prev = channels[-1]
        for ch in reversed(channels[:-1]):
            self.up.append(
                nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(prev, ch, 1))
            )
            self.blocks.append(_block(2 * ch, ch))
            prev = ch
        self.out_channels = prev

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for up, block, skip in zip(self.up, self.blocks, reversed(features[:-1]), strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return x


def receptive_radius(depth: int) -> int:
    """The farthest input pixel any output pixel of a `depth`-level U-Net depends on, in input pixels.

    Exact for this architecture: the interval of input pixels behind one output pixel is followed back
    through every layer (3x3 convs widen it by one pixel at their level, a 2x max-pool maps it to its
    2x-finer window, 2x bilinear upsampling to the two coarser pixels it reads, the skip joins both
    paths), for each of the stride's phases. Tiles overlapping by twice this, cut in the middle, give the
    whole-image answer (core.segment.tiling)."""

    def encoder(level: int, lo: int, hi: int) -> tuple[int, int]:
        lo, hi = lo - 2, hi + 2  # the level's two 3x3 convs
        return (lo, hi) if level == 0 else encoder(level - 1, 2 * lo, 2 * hi + 1)

    def decoder(level: int, lo: int, hi: int) -> tuple[int, int]:
        if level == depth - 1:
            return encoder(level, lo, hi)
        lo, hi = lo - 2, hi + 2  # the level's two 3x3 convs, over the skip and the upsampled path
        skip = encoder(level, lo, hi)
        # align_corners=False: output j reads coarse floor((j + 0.5) / 2 - 0.5) and the one after it.
        up = decoder(level + 1, (2 * lo - 1) // 4, (2 * hi - 1) // 4 + 1)
        return min(skip[0], up[0]), max(skip[1], up[1])

    stride = 2 ** (depth - 1)
    base = 16 * stride * 2**depth  # far from index 0: floor divisions act the same on every phase
    radius = 0
    for p in range(base, base + stride):
        lo, hi = decoder(0, p, p)
        radius = max(radius, p - lo, hi - p)
    return radius


# State-dict names of checkpoint format 1 (one flat module) and where they live now.
_FORMAT_1_NAMES = (("down.", "encoder.blocks."), ("up.", "decoder.up."), ("dec.", "decoder.blocks."))


class UNet(nn.Module):
    """U-Net with `depth` resolution levels, `width` channels at the top: encoder -> decoder -> head, the
    head a 1x1 conv giving the N_OUTPUTS per-pixel logits (class, nucleus, marker channels)."""

    def __init__(self, in_channels: int = 3, depth: int = 4, width: int = 16, n_outputs: int = N_OUTPUTS):
        super().__init__()
        if depth < 2 or width < 4:
            raise ValueError(f"U-Net needs depth >= 2 and width >= 4, got depth={depth} width={width}")
        self.depth, self.width, self.in_channels, self.n_outputs = depth, width, in_channels, n_outputs
        self.encoder = Encoder(in_channels, depth, width)
        self.decoder = Decoder(self.encoder.channels)
        self.head = nn.Conv2d(self.decoder.out_channels, n_outputs, 1)

    @property
    def stride(self) -> int:
        """Input sides must be multiples of this."""
        return 2 ** (self.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)))

    @property
    def context_px(self) -> int:
        """Receptive-field radius: how far from an output pixel an input pixel can change it (58 at depth 4)."""
        return receptive_radius(self.depth)

    def arch(self) -> dict[str, int]:
        return {
            "in_channels": self.in_channels,
            "depth": self.depth,
            "width": self.width,
            "n_outputs": self.n_outputs,
        }

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """nn.Module's, also taking the names of checkpoint format 1 (blastq-unet 1.0-2.2 and the cell
        classifiers built on them), which held the same tensors in one flat module."""
        if any(key.startswith("down.") for key in state_dict):
            state_dict = {_format_2_name(key): value for key, value in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> tuple[UNet, ModelInfo]:
        """The U-Net and what its checkpoint says of itself, in eval mode. Only plain data is read
        (weights_only); ModelNotFound for no file, ModelInvalid for a file that is not a blastq U-Net of a
        format this version reads, or whose weights do not fit the architecture it states."""
        path = Path(path)
        if not path.is_file():
            raise ModelNotFound("model file not found", path=path)
        data = path.read_bytes()
        payload = load_plain(data, "model checkpoint", path)
        if not isinstance(payload, dict) or payload.get("format") not in READABLE_FORMATS:
            raise ModelInvalid(
                f"not a blastq model checkpoint (expected format {CHECKPOINT_FORMAT})", path=path
            )
        try:
            model = cls(**payload["arch"])
            model.load_state_dict(payload["state_dict"])
            raw = dict(payload["info"])
            raw["class_names"] = tuple(raw.get("class_names", CLASS_NAMES))
            info = ModelInfo(**raw, sha256=hashlib.sha256(data).hexdigest())
        except (KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise ModelInvalid(
                f"model checkpoint does not match the blastq U-Net ({exc})", path=path
            ) from exc
        model.eval()
        return model, info


def _format_2_name(key: str) -> str:
    for old, new in _FORMAT_1_NAMES:
        if key.startswith(old):
            return new + key.removeprefix(old)
    return key


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


def load_plain(data: bytes, what: str, path: str | Path) -> Any:
    """What a torch file holds, read with weights_only=True: tensors and plain data only, nothing the file
    names is called. ModelInvalid ("not a <what>") for bytes that are no such file. The one reader of
    blastq's torch files: U-Net checkpoints, cell classifiers, a training run's resume state."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ModelInvalid(f"not a {what} ({type(exc).__name__})", path=path) from exc


def default_model_path() -> Path:
    """The model shipped inside the package."""
    return Path(__file__).parents[1] / "weights" / "blastq-unet-default.pt"
