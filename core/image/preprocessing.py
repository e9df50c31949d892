"""The study's preprocessing: flat-field correction, optional stain normalisation, CLAHE on lightness.

Each step is switchable through PreprocessConfig; DEFAULT_PREPROCESS is the setting the models are
trained with. Sizes that matter (background blocks, CLAHE tiles) are given in microns so that the
result does not depend on the image size or the objective. Also here: resampling between pixel sizes.
Arrays are HWC uint8 RGB unless stated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from scipy import ndimage as ndi

from blastq.core.common import InvalidConfig, InvalidSlide

StainMethod = Literal["none", "reinhard", "macenko"]
STAIN_METHODS: tuple[str, ...] = ("none", "reinhard", "macenko")

# Flat-field target for the plasma: white, with headroom so that bright specks do not clip.
BACKGROUND_LEVEL = 245.0
# A background estimate darker than this is an empty or black image, not plasma; dividing by it
# would only amplify noise.
MIN_BACKGROUND = 32.0
# Plasma is the brightest thing on a smear: a high percentile of a block is its plasma level even
# when cells cover most of the block, yet is robust to a few saturated specks.
BACKGROUND_PERCENTILE = 95.0

# Targets for stain normalisation: medians over the 100 dataset2 images of segmentation_wbc
# (CellaVision, May-Gruenwald-Giemsa) after flat-field at mpp 0.11 (their red-cell estimate), so that
# other stains are brought towards a well-stained, evenly lit smear.
REINHARD_TARGET_MEAN: tuple[float, float, float] = (197.9, 141.5, 115.3)  # cv2 8-bit LAB
REINHARD_TARGET_STD: tuple[float, float, float] = (49.0, 14.3, 16.7)
# Optical-density unit vectors, rows: the nuclear (azure/methylene blue) stain, then eosin; cols: R, G, B.
MACENKO_TARGET: tuple[tuple[float, float, float], tuple[float, float, float]] = (
    (0.504, 0.857, 0.109),
    (0.378, 0.759, 0.530),
)
MACENKO_TARGET_MAX_CONC: tuple[float, float] = (2.03, 0.69)
# Fewer stained pixels than this give no stable stain plane: the image is returned unchanged.
MACENKO_MIN_PIXELS = 500

# Rows per strip when applying per-pixel maps, so that float intermediates of a whole slide never
# exist at once.
_STRIP_ROWS = 512
# Samples per block side when estimating the background: enough for a stable percentile, cheap.
_BLOCK_SAMPLES = 32
# Pixels used to fit Macenko stain vectors; a strided sample of a large image is as good as all.
_MACENKO_SAMPLE = 250_000


# --- checks -------------------------------------------------------------------------------------------


def check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        shape = getattr(rgb, "shape", None)
        raise InvalidSlide(
            f"expected an HWC uint8 RGB array, got shape {shape} dtype {getattr(rgb, 'dtype', None)}"
        )
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise InvalidSlide(f"empty image of shape {rgb.shape}")


def _check_positive(value: float, name: str) -> None:
    if isinstance(value, bool) or not (isinstance(value, int | float | np.floating | np.integer)):
        raise InvalidConfig(f"{name}={value!r} must be a positive number")
    if not (math.isfinite(value) and value > 0):
        raise InvalidConfig(f"{name}={value!r} must be a positive number")


@dataclass(frozen=True)
class PreprocessConfig:
    """Which preprocessing steps run, and their sizes in microns."""

    flatfield: bool = True  # divide by the smooth plasma background: plasma white, light even
    stain: StainMethod = "none"
    clahe: bool = True  # CLAHE on the lightness (L of LAB) channel only
    clahe_clip: float = 1.5
    clahe_tile_um: float = 40.0  # tile size in microns, so the result does not depend on image size
    background_block_um: float = 40.0

    def __post_init__(self) -> None:
        if self.stain not in STAIN_METHODS:
            raise InvalidConfig(f"stain={self.stain!r} is not one of {', '.join(STAIN_METHODS)}")
        _check_positive(self.clahe_clip, "clahe_clip")
        _check_positive(self.clahe_tile_um, "clahe_tile_um")
        _check_positive(self.background_block_um, "background_block_um")


DEFAULT_PREPROCESS = PreprocessConfig()


def preprocess(rgb: np.ndarray, mpp: float, config: PreprocessConfig = DEFAULT_PREPROCESS) -> np.ndarray:
    """Run flat-field -> stain normalisation -> CLAHE as configured; same size, HWC uint8 RGB."""
    check_rgb(rgb)
    _check_positive(mpp, "mpp")
    out = rgb
    if config.flatfield:
        out = flatfield(out, mpp, config.background_block_um)
    if config.stain == "reinhard":
        out = reinhard(out)
    elif config.stain == "macenko":
        out = macenko(out)
    if config.clahe:
        out = clahe_lightness(out, mpp, config.clahe_clip, config.clahe_tile_um)
    return out.copy() if out is rgb else out


# --- flat-field ---------------------------------------------------------------------------------------


def estimate_background(rgb: np.ndarray, mpp: float, block_um: float = 40.0) -> np.ndarray:
    """Smooth per-channel plasma intensity, HWC float32 at full size."""
    small = _background_grid(rgb, mpp, block_um)
    height, width = rgb.shape[:2]
    return _upsample_rows(small, width, height, 0, height)


def flatfield(rgb: np.ndarray, mpp: float, block_um: float = 40.0) -> np.ndarray:
    """Divide each channel by its smooth background so plasma is ~245 and neutral everywhere."""
    small = _background_grid(rgb, mpp, block_um)
    gain = (BACKGROUND_LEVEL / small).astype(np.float32)
    height, width = rgb.shape[:2]
    out = np.empty_like(rgb)
    for y0 in range(0, height, _STRIP_ROWS):
        y1 = min(height, y0 + _STRIP_ROWS)
        strip = rgb[y0:y1].astype(np.float32)
        strip *= _upsample_rows(gain, width, height, y0, y1)
        # convertTo rounds and saturates to 0..255 in one pass.
        out[y0:y1] = cv2.convertScaleAbs(strip)
    return out


def _background_grid(rgb: np.ndarray, mpp: float, block_um: float) -> np.ndarray:
    """Background at low resolution (_BLOCK_SAMPLES px per block), smoothed, float32 HWC."""
    check_rgb(rgb)
    _check_positive(mpp, "mpp")
    _check_positive(block_um, "block_um")
    height, width = rgb.shape[:2]
    block_px = max(4.0, block_um / mpp)
    grid_h = max(1, round(height / block_px))
    grid_w = max(1, round(width / block_px))
    size = (grid_w * _BLOCK_SAMPLES, grid_h * _BLOCK_SAMPLES)
    shrinking = size[0] <= width and size[1] <= height
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    blocks = small.reshape(grid_h, _BLOCK_SAMPLES, grid_w, _BLOCK_SAMPLES, 3).transpose(0, 2, 1, 3, 4)
    grid = np.percentile(blocks.reshape(grid_h, grid_w, -1, 3), BACKGROUND_PERCENTILE, axis=2)
    # A block covered by cells has no plasma and reads dark; its neighbours' median replaces it.
    grid = ndi.median_filter(grid, size=(3, 3, 1), mode="nearest").astype(np.float32)
    low, high = grid.min(axis=(0, 1)), grid.max(axis=(0, 1))
    smooth = cv2.resize(grid, size, interpolation=cv2.INTER_CUBIC)
    # Cubic interpolation overshoots between blocks; the blur removes the block pattern.
    smooth = np.clip(smooth, low, high)
    smooth = cv2.GaussianBlur(smooth, (0, 0), _BLOCK_SAMPLES / 2, borderType=cv2.BORDER_REFLECT)
    return np.maximum(smooth, MIN_BACKGROUND)


def _upsample_rows(small: np.ndarray, width: int, height: int, y0: int, y1: int) -> np.ndarray:
    """Rows y0..y1 of `small` bilinearly resized to (height, width), without building the rest."""
    sx = small.shape[1] / width
    sy = small.shape[0] / height
    # Pixel-centre mapping as cv2.resize uses: src = (dst + 0.5) * scale - 0.5.
    matrix = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, (y0 + 0.5) * sy - 0.5]], np.float64)
    return cv2.warpAffine(
        small,
        matrix,
        (width, y1 - y0),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


# --- stain normalisation ------------------------------------------------------------------------------


def reinhard(
    rgb: np.ndarray,
    target_mean: Sequence[float] = REINHARD_TARGET_MEAN,
    target_std: Sequence[float] = REINHARD_TARGET_STD,
) -> np.ndarray:
    """Match the per-channel mean and std in cv2 8-bit LAB to the target (Reinhard et al. 2001)."""
    check_rgb(rgb)
    target_mean_arr = np.asarray(target_mean, np.float64)
    target_std_arr = np.asarray(target_std, np.float64)
    if target_mean_arr.shape != (3,) or target_std_arr.shape != (3,) or np.any(target_std_arr < 0):
        raise InvalidConfig(
            f"reinhard target mean {target_mean} / std {target_std} must be 3 values, std >= 0"
        )
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    mean, std = (v.ravel() for v in cv2.meanStdDev(lab))
    # The transfer is linear per channel, so it is a 256-entry table per channel: no float image.
    levels = np.arange(256, dtype=np.float64)[:, None]
    lut = (levels - mean) * (target_std_arr / np.maximum(std, 1e-6)) + target_mean_arr
    lut = np.clip(np.rint(lut), 0, 255).astype(np.uint8).reshape(256, 1, 3)
    return cv2.cvtColor(cv2.LUT(lab, lut), cv2.COLOR_LAB2RGB)


def macenko(
    rgb: np.ndarray,
    target_stain_matrix: Sequence[Sequence[float]] | np.ndarray = MACENKO_TARGET,
    target_max_conc: Sequence[float] = MACENKO_TARGET_MAX_CONC,
    io: float = 240.0,
    alpha: float = 1.0,
    beta: float = 0.15,
) -> np.ndarray:
    """Macenko stain normalisation in optical density; the input back if too few stained pixels."""
    check_rgb(rgb)
    target = np.asarray(target_stain_matrix, np.float64)
    max_ref = np.asarray(target_max_conc, np.float64)
    if target.shape != (2, 3) or max_ref.shape != (2,):
        raise InvalidConfig(
            f"macenko target must be a 2x3 stain matrix and 2 max concentrations, got {target.shape}"
            f" and {max_ref.shape}"
        )
    _check_positive(io, "io")
    target = target / np.linalg.norm(target, axis=1, keepdims=True)
    # Optical density of each 8-bit level; +1 keeps log finite for black pixels.
    od_lut = (-np.log((np.arange(256, dtype=np.float64) + 1.0) / io)).astype(np.float32)

    flat = rgb.reshape(-1, 3)
    sample_od = od_lut[flat[:: max(1, flat.shape[0] // _MACENKO_SAMPLE)]]
    # Stained: OD above beta in some channel. The classic every-channel rule drops pure eosin,
    # which barely absorbs red, and with it one of the two stains.
    stained = sample_od[sample_od.max(axis=1) > beta]
    if stained.shape[0] < MACENKO_MIN_PIXELS:
        return rgb.copy()
    stains = _macenko_stain_vectors(stained.astype(np.float64), alpha)
    if stains is None:
        return rgb.copy()
    # Concentrations C solve OD = C @ stains (least squares); each is scaled so its 99th percentile
    # matches the target, then the image is re-made from the target stains alone.
    unmix = np.linalg.pinv(stains)  # 3x2
    max_conc = np.percentile(sample_od.astype(np.float64) @ unmix, 99, axis=0)
    if np.any(max_conc <= 1e-6):
        return rgb.copy()
    to_conc = (unmix * (max_ref / max_conc)).T.astype(np.float32)  # 2x3, for cv2.transform
    to_od = target.T.astype(np.float32)  # 3x2
    lut = od_lut.reshape(256, 1, 1).repeat(3, axis=2)
    height = rgb.shape[0]
    out = np.empty_like(rgb)
    for y0 in range(0, height, _STRIP_ROWS):
        y1 = min(height, y0 + _STRIP_ROWS)
        conc = cv2.transform(cv2.LUT(rgb[y0:y1], lut), to_conc)
        # Pixels outside the stain cone (saturated nuclei, glare) get negative amounts of a stain,
        # which would re-image as spots brighter than the plasma.
        np.maximum(conc, 0.0, out=conc)
        out[y0:y1] = cv2.convertScaleAbs(cv2.exp(-cv2.transform(conc, to_od)), alpha=io)
    return out


def _macenko_stain_vectors(od: np.ndarray, alpha: float) -> np.ndarray | None:
    """Two unit stain vectors (rows, nuclear stain first) spanning the OD plane of stained pixels."""
    # The stain model OD = C @ stains passes through the origin, so the plane comes from the
    # uncentred second moments (the SVD of the paper); a centred covariance tilts it and drops the
    # blue absorption of red cells under Romanowsky stains.
    _, eigvecs = np.linalg.eigh(od.T @ od / od.shape[0])
    plane = eigvecs[:, [2, 1]].copy()  # the two largest eigenvalues, largest first
    # Eigenvector signs are arbitrary; point the main one into positive OD so angles do not wrap.
    if plane[:, 0].sum() < 0:
        plane[:, 0] *= -1
    projected = od @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, [alpha, 100 - alpha])
    v1 = plane @ np.array([math.cos(low), math.sin(low)])
    v2 = plane @ np.array([math.cos(high), math.sin(high)])
    v1, v2 = v1 / np.linalg.norm(v1), v2 / np.linalg.norm(v2)
    if abs(float(v1 @ v2)) > 0.999:
        return None  # one stain only: no plane to normalise in
    # The nuclear stain (azure, methylene blue, haematoxylin) absorbs red and passes blue; eosin the
    # reverse, so red-minus-blue absorption tells them apart.
    return np.stack([v1, v2] if v1[0] - v1[2] > v2[0] - v2[2] else [v2, v1])


# --- contrast -----------------------------------------------------------------------------------------


def clahe_lightness(rgb: np.ndarray, mpp: float, clip: float = 1.5, tile_um: float = 40.0) -> np.ndarray:
    """CLAHE on the L channel of LAB with tiles of tile_um microns; colour is left as it is."""
    check_rgb(rgb)
    _check_positive(mpp, "mpp")
    _check_positive(clip, "clip")
    _check_positive(tile_um, "tile_um")
    height, width = rgb.shape[:2]
    # Tiles below 8 px hold too few pixels for a histogram at all.
    tile_px = max(8.0, tile_um / mpp)
    grid = (max(1, round(width / tile_px)), max(1, round(height / tile_px)))
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    clahe = cv2.createCLAHE(clipLimit=clip, tileGridSize=grid)
    lab[:, :, 0] = clahe.apply(np.ascontiguousarray(lab[:, :, 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


# --- resampling ---------------------------------------------------------------------------------------


def resampled_shape(height: int, width: int, src_mpp: float, dst_mpp: float) -> tuple[int, int]:
    """(height, width) that `resample` gives, known before any pixel is resized (to bound the work)."""
    scale = _scale(src_mpp, dst_mpp)
    if abs(scale - 1.0) <= 0.01:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def resample(rgb: np.ndarray, src_mpp: float, dst_mpp: float) -> np.ndarray:
    """Resize an image from src_mpp to dst_mpp (area when shrinking, linear when enlarging)."""
    scale = _scale(src_mpp, dst_mpp)
    if abs(scale - 1.0) <= 0.01:
        return rgb  # within 1%: resampling would only blur
    height, width = resampled_shape(*rgb.shape[:2], src_mpp, dst_mpp)
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def resample_labels(labels: np.ndarray, src_mpp: float, dst_mpp: float) -> np.ndarray:
    """Resize a label or mask image (any integer dtype or bool) by nearest neighbour."""
    scale = _scale(src_mpp, dst_mpp)
    if abs(scale - 1.0) <= 0.01:
        return labels
    height, width = labels.shape[:2]
    return _nearest(labels, max(1, round(height * scale)), max(1, round(width * scale)))


def resample_to_shape(arr: np.ndarray, height: int, width: int, *, labels: bool = False) -> np.ndarray:
    """Resize to exactly (height, width), e.g. back to the input size; nearest if labels."""
    if height <= 0 or width <= 0:
        raise InvalidConfig(f"target shape {height}x{width} must be positive")
    if arr.shape[:2] == (height, width):
        return arr
    if labels:
        return _nearest(arr, height, width)
    shrinking = height <= arr.shape[0] and width <= arr.shape[1]
    return cv2.resize(arr, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def _nearest(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    # Index arithmetic works for every dtype (cv2 has no int64, uint32 or bool) and maps pixel centres.
    rows = np.minimum(((np.arange(height) + 0.5) * (arr.shape[0] / height)).astype(np.intp), arr.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * (arr.shape[1] / width)).astype(np.intp), arr.shape[1] - 1)
    return arr[rows[:, None], cols[None, :]]


def _scale(src_mpp: float, dst_mpp: float) -> float:
    _check_positive(src_mpp, "src_mpp")
    _check_positive(dst_mpp, "dst_mpp")
    return src_mpp / dst_mpp
