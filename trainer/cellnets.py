"""Training and running the deep cell classifiers: the crop CNN and the frozen U-Net encoder.

Crops are normalised `CellCrop`s (core.cells.cellcrops), or the NCHW float32 array `crops_to_array` makes
of them. Training is seeded: the same crops, labels and seed give the same weights on one machine
(torch's global generator is forked for the fit, so callers' random streams are not disturbed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from blastq.core.cells import CELL_TYPES, CellCrop, CropCNN, EncoderFeatures, crops_to_array
from blastq.core.common import InvalidConfig
from blastq.core.segment import UNet

Crops = Sequence[CellCrop] | np.ndarray

CNN_EPOCHS = 30  # 5-fold on the real cells, 40 epochs gave no better macro F1 (0.76 vs 0.77, one seed)
CNN_WIDTH = 16
CNN_BATCH = 32
CNN_LR = 3e-3
CNN_WEIGHT_DECAY = 1e-2
# Part of every target spread over the classes present in the training labels. segmentation_wbc's
# authors say some labels were never checked by an expert: a confident wrong label then costs less.
LABEL_SMOOTHING = 0.1
_PREDICT_BATCH = 128
# Torch threads for fitting and prediction here. The convolutions are small: on a 2-core machine busy
# with other work, a fit with two OpenMP threads ran ~10x slower than with one, encoder features 1.6x
# (the threads wait on each other at every op). None keeps the caller's setting.
CNN_THREADS = 1


def balanced_class_weights(labels: np.ndarray, n_classes: int = len(CELL_TYPES)) -> np.ndarray:
    """n / (classes present * count) per class, as scikit-learn's "balanced"; 0 for absent classes."""
    labels = np.asarray(labels, np.int64)
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes, np.float64)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights


def fit_cnn(
    crops: Crops,
    labels: np.ndarray,
    *,
    seed: int,
    epochs: int = CNN_EPOCHS,
    class_weights: np.ndarray | Literal["balanced"] | None = "balanced",
    width: int = CNN_WIDTH,
    batch_size: int = CNN_BATCH,
    lr: float = CNN_LR,
    threads: int | None = CNN_THREADS,
) -> CropCNN:
    """Train a CropCNN over all CELL_TYPES on labelled crops; returned in eval mode.

    AdamW with a one-cycle learning rate, random flips and quarter turns per crop and epoch (a cell
    has no up or left), cross-entropy weighted per class (`class_weights`: "balanced" as
    `balanced_class_weights`, an array over CELL_TYPES, or None for equal weights) with label
    smoothing 0.1 over the classes present in `labels`, because the real labels are not all
    expert-checked. Classes absent from `labels` get no smoothing mass and so learn a probability near 0.
    After the last step the batch-norm statistics are measured afresh on the (unaugmented) training
    crops, so that a short fit does not predict with statistics that still remember its first steps.
    `threads`: torch threads for the fit (restored after), None for the current setting.
    """
    labels = np.asarray(labels, np.int64)
    n_classes = len(CELL_TYPES)
    if labels.ndim != 1 or len(labels) == 0:
        raise InvalidConfig(f"fit_cnn needs a non-empty 1-D label array, got shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise InvalidConfig(
            f"labels must index CELL_TYPES (0..{n_classes - 1}), got {labels.min()}..{labels.max()}"
        )
    if epochs < 1 or batch_size < 2:
        raise InvalidConfig(f"fit_cnn needs epochs >= 1 and batch_size >= 2, got {epochs} and {batch_size}")
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise InvalidConfig(f"class_weights={class_weights!r}: expected 'balanced', an array or None")
        weights = balanced_class_weights(labels, n_classes)
    elif class_weights is None:
        weights = np.ones(n_classes)
    else:
        weights = np.asarray(class_weights, np.float64)
        if weights.shape != (n_classes,) or not np.all(np.isfinite(weights)) or (weights < 0).any():
            raise InvalidConfig(
                f"class_weights must be {n_classes} finite weights >= 0, got {class_weights!r}"
            )
    present = np.bincount(labels, minlength=n_classes) > 0
    targets = np.zeros((len(labels), n_classes), np.float32)
    targets[:, present] = LABEL_SMOOTHING / present.sum()
    targets[np.arange(len(labels)), labels] += 1.0 - LABEL_SMOOTHING
    sample_weight = weights[labels].astype(np.float32)

    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]), _torch_threads(threads):
        torch.manual_seed(seed)
        model = CropCNN(n_classes, width=width)
        x = _shrunk(model, crops)
        if len(x) != len(labels):
            raise InvalidConfig(f"{len(x)} crops but {len(labels)} labels")
        y, w = torch.from_numpy(targets), torch.from_numpy(sample_weight)
        steps_per_epoch = -(-len(x) // batch_size)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=CNN_WEIGHT_DECAY)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
        model.train()
        for _ in range(epochs):
            order = rng.permutation(len(x))
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                if len(idx) < 2:  # batch norm cannot train on one crop
                    sched.step()
                    continue
                idx_t = torch.from_numpy(idx)
                xb = _dihedral(x[idx_t], rng)
                log_p = F.log_softmax(model(xb), dim=1)
                wb = w[idx_t]
                loss = (wb * -(y[idx_t] * log_p).sum(dim=1)).sum() / wb.sum().clamp_min(1e-12)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        _recalibrate_batch_norm(model, x, batch_size)
    return model.eval()


def predict_cnn(model: CropCNN, crops: Crops, threads: int | None = CNN_THREADS) -> np.ndarray:
    """(N, len(CELL_TYPES)) float64 class probabilities of each crop."""
    if model.n_classes != len(CELL_TYPES):
        raise InvalidConfig(f"the CNN has {model.n_classes} outputs, CELL_TYPES {len(CELL_TYPES)}")
    model.eval()
    out = [np.zeros((0, model.n_classes))]
    with torch.inference_mode(), _torch_threads(threads):
        for batch in _batches(crops, _PREDICT_BATCH):
            out.append(torch.softmax(model(batch), dim=1).double().numpy())
    return np.concatenate(out)


def encoder_features(
    unet: UNet | EncoderFeatures, crops: Crops, batch_size: int = 64, threads: int | None = CNN_THREADS
) -> np.ndarray:
    """(N, D) float32 features of the frozen U-Net encoder (`EncoderFeatures`) per crop."""
    encoder = unet if isinstance(unet, EncoderFeatures) else EncoderFeatures(unet)
    out = [np.zeros((0, encoder.dim), np.float32)]
    with torch.inference_mode(), _torch_threads(threads):
        for batch in _batches(crops, batch_size):
            out.append(encoder(batch).float().numpy())
    return np.concatenate(out)


def _recalibrate_batch_norm(model: CropCNN, x: torch.Tensor, batch_size: int) -> None:
    """Batch-norm running statistics as the plain average over `x` with the final weights.

    The running averages of training (momentum 0.1) still hold 0.9**steps of their start values and
    of earlier weights: after a few dozen steps that was enough to turn a perfect classifier into chance.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            model(x[start : start + batch_size])
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _batches(crops: Crops, size: int):
    """NCHW float32 tensors of at most `size` crops; lists are converted batch by batch (memory)."""
    for start in range(0, len(crops), size):
        chunk = crops[start : start + size]
        array = chunk if isinstance(chunk, np.ndarray) else crops_to_array(chunk)
        yield torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _shrunk(model: CropCNN, crops: Crops) -> torch.Tensor:
    """All crops at the CNN's input size, made once: shrinking every epoch would repeat the same work."""
    parts = [model.shrink(b) for b in _batches(crops, 256)]
    return torch.cat(parts) if parts else torch.zeros((0, 4, model.input_px, model.input_px))


def _dihedral(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Each crop of the batch turned by a random multiple of 90 degrees and maybe mirrored."""
    turns = rng.integers(0, 4, len(x))
    flips = rng.random(len(x)) < 0.5
    out = x.clone()
    for k in range(4):
        for flip in (False, True):
            sel = np.flatnonzero((turns == k) & (flips == flip))
            if len(sel):
                sel_t = torch.from_numpy(sel)
                part = torch.rot90(x[sel_t], k, dims=(2, 3))
                out[sel_t] = torch.flip(part, dims=(3,)) if flip else part
    return out
