"""Torch modules that classify or describe normalised cell crops (core.cells.cellcrops).

Both take what `crops_to_array` gives: NCHW float32, RGB in [0, 1] then the cell mask, 128 px at
0.2 um/px. `CropCNN` is a small network trained from scratch (trainer.cellnets.fit_cnn);
`EncoderFeatures` reuses the segmentation U-Net's encoder, frozen, as a fixed feature extractor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blastq.core.segment import UNet

CNN_INPUT_PX = 64  # 0.4 um/px: nucleus lobes and cytoplasm colour survive; 4x less work than 128 px


def _conv_block(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class CropCNN(nn.Module):
    """A small CNN on 4-channel crops; returns (N, n_classes) logits.

    conv-bn-relu blocks of width w, 2w, 4w, 8w: a stride-2 stem (64 -> 32 px), a block at 32 px,
    max-pool, a block at 16 px, max-pool, a block at 8 px (receptive field 37 px = 15 um), then
    global average pool, dropout and a linear layer. The strided stem rather than a full-size first block:
    on a CPU the 64 px activations cost more than the convolutions, and 5-fold accuracy on the real
    cells was no worse. Input larger than `input_px` is area-averaged down to it first, so the
    pipeline can pass full 128 px crops; training passes crops already shrunk once (`shrink`).
    """

    def __init__(self, n_classes: int, width: int = 16, input_px: int = CNN_INPUT_PX, dropout: float = 0.2):
        super().__init__()
        if n_classes < 2 or width < 4 or input_px < 16:
            raise ValueError(
                f"CropCNN needs n_classes >= 2, width >= 4, input_px >= 16; got {n_classes}, {width}, {input_px}"
            )
        self.n_classes, self.width, self.input_px, self.dropout = n_classes, width, input_px, dropout
        self.features = nn.Sequential(
            _conv_block(4, width, stride=2),
            _conv_block(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_block(2 * width, 4 * width),
            nn.MaxPool2d(2),
            _conv_block(4 * width, 8 * width),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(8 * width, n_classes))

    def arch(self) -> dict[str, Any]:
        """Constructor arguments besides n_classes: `CropCNN(n_classes, **model.arch())` rebuilds it."""
        return {"width": self.width, "input_px": self.input_px, "dropout": self.dropout}

    def shrink(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW crops at the network's input size (area average; a no-op when already that small)."""
        if x.shape[-1] <= self.input_px and x.shape[-2] <= self.input_px:
            return x
        return F.interpolate(x, size=(self.input_px, self.input_px), mode="area")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.shrink(x))
        return self.head(x.mean(dim=(2, 3)))


class EncoderFeatures(nn.Module):
    """The frozen encoder of a segmentation U-Net as a per-cell descriptor.

    forward(NCHW 4-channel crops) -> (N, D): for each encoder level, the mean of its activations
    weighted by the cell mask (area-averaged to that level's size), levels concatenated; D is the sum
    of the level widths (240 for the shipped depth-4, width-16 U-Net). The RGB channels get the U-Net's
    own input scaling (`unet.to_model_input`: (v/255 - 0.5) * 4). A crop with an empty mask gives zeros.
    The encoder always runs in eval mode without gradients: it is a fixed feature extractor, and the
    U-Net object it comes from (which the pipeline also segments with) is left as it was.
    """

    def __init__(self, unet: UNet):
        super().__init__()
        if unet.in_channels != 3:
            raise ValueError(f"EncoderFeatures needs an RGB U-Net (in_channels=3), got {unet.in_channels}")
        self.unet = unet

    @property
    def dim(self) -> int:
        """Length of one cell's feature vector."""
        return sum(self.unet.encoder.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = (x[:, :3] - 0.5) * 4.0  # to_model_input on the float RGB crops_to_array already gives
        mask = x[:, 3:4]
        out = []
        # Eval mode for the call only: batch norm must use the U-Net's trained statistics, never update
        # them, whatever mode the caller's U-Net is in.
        was_training = self.unet.training
        self.unet.eval()
        try:
            with torch.no_grad():
                for h in self.unet.encoder(rgb):
                    m = F.adaptive_avg_pool2d(mask, h.shape[-2:])
                    # An empty mask gives 0 / eps = 0 rather than NaN.
                    out.append((h * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp_min(1e-6))
        finally:
            self.unet.train(was_training)
        return torch.cat(out, dim=1)
