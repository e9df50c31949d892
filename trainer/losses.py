"""Cross-entropy + Dice for the classes, BCE + Dice for the nucleus, BCE for the markers; 255 = ignore."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blastq.core.unet import MARKER_CHANNEL, N_CLASSES, NUCLEUS_CHANNEL

IGNORE = 255


def soft_dice_loss(
    prob: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, eps: float = 1.0
) -> torch.Tensor:
    """1 - Dice over the batch for one probability map (N,H,W) against a binary target."""
    prob, target = prob * valid, target * valid
    inter = (prob * target).sum()
    return 1 - (2 * inter + eps) / (prob.sum() + target.sum() + eps)


def _masked_bce(logit: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    valid = (target != IGNORE).float()
    t = torch.where(target == IGNORE, torch.zeros_like(target), target).float()
    bce = F.binary_cross_entropy_with_logits(logit, t, reduction="none")
    return (bce * valid).sum() / valid.sum().clamp_min(1), valid


def segmentation_loss(
    logits: torch.Tensor, classes: torch.Tensor, nucleus: torch.Tensor, marker: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts, for NCHW logits and N,H,W uint8/long targets."""
    cls_logits = logits[:, :N_CLASSES]
    ce = F.cross_entropy(cls_logits, classes.long(), ignore_index=IGNORE)
    if not torch.isfinite(ce):  # a batch with every pixel ignored
        ce = cls_logits.sum() * 0
    probs = cls_logits.softmax(1)
    valid = (classes != IGNORE).float()
    dice = sum(soft_dice_loss(probs[:, c], (classes == c).float(), valid) for c in range(1, N_CLASSES)) / (
        N_CLASSES - 1
    )
    nuc_bce, nuc_valid = _masked_bce(logits[:, NUCLEUS_CHANNEL], nucleus)
    nuc_dice = soft_dice_loss(torch.sigmoid(logits[:, NUCLEUS_CHANNEL]), (nucleus == 1).float(), nuc_valid)
    mrk_bce, _ = _masked_bce(logits[:, MARKER_CHANNEL], marker)
    total = ce + dice + nuc_bce + nuc_dice + mrk_bce
    parts = {
        "ce": ce.item(),
        "dice": dice.item(),
        "nucleus": (nuc_bce + nuc_dice).item(),
        "marker": mrk_bce.item(),
    }
    return total, parts
