"""Augmentation as in the study (rotations, flips, scaling) plus colour/stain jitter and blur.

Geometric transforms move image and targets together (targets nearest-neighbour, ignore outside);
colour transforms touch the image only.
"""

from __future__ import annotations

import cv2
import numpy as np

from blastq.trainer.datasets import IGNORE, Sample

PLASMA = 245  # preprocessed background level; padding looks like plasma, as in inference


def random_patch(sample: Sample, size: int, rng: np.random.Generator, scale_range=(0.8, 1.25)) -> tuple:
    """One augmented (image, classes, nucleus, marker) patch of size x size from a sample.

    A sample with a foreground target gets it as a fifth element, moved with the others.
    """
    img, cls, nuc, mrk = sample.image, sample.classes, sample.nucleus, sample.marker
    targets = (cls, nuc, mrk) if sample.foreground is None else (cls, nuc, mrk, sample.foreground)
    h, w = cls.shape
    scale = float(np.exp(rng.uniform(np.log(scale_range[0]), np.log(scale_range[1]))))
    angle = float(rng.uniform(0, 360))
    # Centre the patch on a random point, biased to white cells so each patch teaches something.
    cells = (cls == 1) | (cls == 2)
    if sample.foreground is not None:
        cells |= sample.foreground == 1  # cells of unknown kind (classes 255) count too
    fg = np.argwhere(cells)
    if len(fg) and rng.random() < 0.7:
        cy, cx = fg[rng.integers(len(fg))] + rng.normal(0, size / 6, 2)
    else:
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    m = cv2.getRotationMatrix2D((float(cx), float(cy)), angle, scale)
    m[:, 2] += np.array([size / 2 - cx, size / 2 - cy])
    warp = dict(dsize=(size, size), borderMode=cv2.BORDER_CONSTANT)
    img = cv2.warpAffine(img, m, flags=cv2.INTER_LINEAR, borderValue=(PLASMA,) * 3, **warp)
    labels = [cv2.warpAffine(t, m, flags=cv2.INTER_NEAREST, borderValue=IGNORE, **warp) for t in targets]
    if rng.random() < 0.5:
        img = img[:, ::-1]
        labels = [t[:, ::-1] for t in labels]
    return (colour_jitter(np.ascontiguousarray(img), rng), *[np.ascontiguousarray(t) for t in labels])


def colour_jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stain and light variation left after preprocessing: hue, saturation, brightness, gamma, blur, noise."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-8, 8)) % 180
    hsv[..., 1] *= rng.uniform(0.7, 1.3)
    hsv[..., 2] *= rng.uniform(0.88, 1.1)
    out = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    out = 255.0 * (out / 255.0) ** rng.uniform(0.8, 1.25)
    if rng.random() < 0.3:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.5, 1.3))
    if rng.random() < 0.3:
        out += rng.normal(0, rng.uniform(1, 6), out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)
