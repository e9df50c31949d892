"""Cross-entropy + Dice for the classes, BCE + Dice for the nucleus, BCE for the markers; 255 = ignore.

Partial class labels: where classes is 255 but the foreground target is 1 ("a white cell or a blast,
which one unknown"), the pixel's cross-entropy term is -log(p_white + p_blast), averaged with the
other pixels' -log p_class. Calling such a cell white or blast costs the same; calling it background
costs. Without a foreground target (or with no such pixel in the batch) the loss is exactly the
classic one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blastq.core.segment import MARKER_CHANNEL, N_CLASSES, NUCLEUS_CHANNEL

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


def _partial_cross_entropy(
    cls_logits: torch.Tensor, classes: torch.Tensor, foreground: torch.Tensor, partial: torch.Tensor
) -> torch.Tensor:
    """Mean NLL over known pixels (-log p_class) and partial ones (-log p_white+blast or -log p_bg)."""
    log_p = cls_logits.log_softmax(1)
    known = classes != IGNORE
    nll_known = -log_p.gather(1, torch.where(known, classes, 0).long().unsqueeze(1)).squeeze(1)
    log_cell = torch.logsumexp(log_p[:, 1:], dim=1)  # log(p_white + p_blast)
    nll_partial = -torch.where(foreground == 1, log_cell, log_p[:, 0])
    nll = torch.where(known, nll_known, torch.where(partial, nll_partial, torch.zeros_like(nll_known)))
    return nll.sum() / (known | partial).sum()


def segmentation_loss(
    logits: torch.Tensor,
    classes: torch.Tensor,
    nucleus: torch.Tensor,
    marker: torch.Tensor,
    foreground: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts, for NCHW logits and N,H,W uint8/long targets (foreground optional)."""
    cls_logits = logits[:, :N_CLASSES]
    partial = None
    if foreground is not None:
        partial = (classes == IGNORE) & (foreground != IGNORE)
        if not partial.any():
            partial = None
    if partial is None:
        ce = F.cross_entropy(cls_logits, classes.long(), ignore_index=IGNORE)
    else:
        ce = _partial_cross_entropy(cls_logits, classes, foreground, partial)
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
