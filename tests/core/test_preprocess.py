"""The study's preprocessing: flat-field, stain normalisation, CLAHE, and resampling between pixel sizes."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from blastq.core.common.errors import InvalidConfig, InvalidSlide
from blastq.core.image.preprocessing import (
    BACKGROUND_LEVEL,
    DEFAULT_PREPROCESS,
    PreprocessConfig,
    clahe_lightness,
    estimate_background,
    flatfield,
    macenko,
    preprocess,
    reinhard,
    resample,
    resample_labels,
    resample_to_shape,
)

YELLOW_PLASMA = (235, 225, 160)


def _disc_mask(shape: tuple[int, int], cy: float, cx: float, radius: float) -> np.ndarray:
    y, x = np.ogrid[: shape[0], : shape[1]]
    return (y - cy) ** 2 + (x - cx) ** 2 <= radius**2


def _scene(size: int = 256, plasma: tuple[int, int, int] = (230, 228, 226), seed: int = 0):
    """Float RGB of plasma with red cells and one white cell, and the plasma mask."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.float64)
    img[:] = plasma
    cells = np.zeros((size, size), bool)
    for cy in range(20, size, 45):
        for cx in range(20, size, 45):
            disc = _disc_mask(img.shape[:2], cy + rng.uniform(-4, 4), cx + rng.uniform(-4, 4), 14)
            img[disc] = img[disc] * (0.92, 0.55, 0.62)  # red cells transmit red, absorb green
            cells |= disc
    white = _disc_mask(img.shape[:2], size / 2, size / 2, size / 8)
    img[white] = img[white] * (0.45, 0.35, 0.65)
    cells |= white
    return img, ~cells


def _to_uint8(img: np.ndarray, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, 1.5, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


# --- flat-field -------------------------------------------------------------------------------------


def test_flatfield_removes_a_multiplicative_illumination_gradient() -> None:
    # A 384 um field (768 px at 0.5 um/px) lit 45% less on the left and 20% less at the top.
    img, plasma = _scene(768)
    ramp = (
        np.linspace(0.55, 1.0, img.shape[1])[None, :, None]
        * np.linspace(0.8, 1.0, img.shape[0])[:, None, None]
    )
    uneven = _to_uint8(img * ramp)
    flat = flatfield(uneven, mpp=0.5)
    before = uneven[plasma].astype(float).std(axis=0)
    after = flat[plasma].astype(float).std(axis=0)
    assert np.all(after < before / 5), (before, after)
    assert np.abs(flat[plasma].mean(axis=0) - BACKGROUND_LEVEL).max() < 6


def test_flatfield_makes_yellow_plasma_neutral_white() -> None:
    img, plasma = _scene(256, plasma=YELLOW_PLASMA)
    flat = flatfield(_to_uint8(img), mpp=0.25)
    mean = flat[plasma].mean(axis=0)
    assert np.abs(mean - BACKGROUND_LEVEL).max() < 6, mean
    assert mean.max() - mean.min() < 4, mean


@pytest.mark.parametrize("mpp", [0.1, 0.33, 1.0])
def test_flatfield_works_on_a_single_cell_crop(mpp: float) -> None:
    # 120 x 120 crop, a white cell covering a third of it; at mpp 1.0 the 40 um blocks are 40 px,
    # so the middle block is all cell and must not be taken for plasma.
    img = np.empty((120, 120, 3), np.float64)
    img[:] = YELLOW_PLASMA
    cell = _disc_mask((120, 120), 60, 60, 39)
    img[cell] = (120, 80, 150)
    flat = flatfield(_to_uint8(img), mpp=mpp)
    assert np.abs(flat[~cell].mean(axis=0) - BACKGROUND_LEVEL).max() < 8
    assert flat[cell].mean() < 190  # the cell stays a cell, not lifted to white


def test_estimate_background_is_smooth_full_size_float32() -> None:
    img, _ = _scene(256)
    background = estimate_background(_to_uint8(img), mpp=0.25)
    assert background.shape == (256, 256, 3) and background.dtype == np.float32
    # The white cell in the middle does not dent the plasma estimate.
    assert np.abs(background - np.array([230, 228, 226])).max() < 6


def test_flatfield_of_black_image_stays_black() -> None:
    out = flatfield(np.zeros((64, 64, 3), np.uint8), mpp=0.25)
    assert out.max() == 0


# --- stain normalisation ------------------------------------------------------------------------------


def test_reinhard_matches_the_target_lab_statistics() -> None:
    img, _ = _scene(256)
    target_mean, target_std = (190.0, 140.0, 118.0), (40.0, 12.0, 14.0)
    out = reinhard(_to_uint8(img), target_mean, target_std)
    mean, std = (v.ravel() for v in cv2.meanStdDev(cv2.cvtColor(out, cv2.COLOR_RGB2LAB)))
    np.testing.assert_allclose(mean, target_mean, atol=3)
    np.testing.assert_allclose(std, target_std, rtol=0.15)


def _stained(stains: np.ndarray, amount: float, seed: int = 0) -> np.ndarray:
    """One synthetic field (nuclei with stain 0, red cells with stain 1) imaged with given stains."""
    size = 192
    conc = np.zeros((size, size, 2))
    for cy, cx in [(48, 48), (140, 60), (70, 150)]:
        conc[_disc_mask((size, size), cy, cx, 22), 0] = 1.4
    for cy, cx in [(140, 140), (30, 110), (110, 100), (170, 20)]:
        conc[_disc_mask((size, size), cy, cx, 16), 1] = 0.6
    conc[..., 1] += 0.15 * conc[..., 0]  # cytoplasm takes up some eosin too
    conc *= amount
    od = conc @ (stains / np.linalg.norm(stains, axis=1, keepdims=True))
    return _to_uint8(240.0 * np.exp(-od), seed)


TINT_A = np.array([[0.49, 0.86, 0.14], [0.41, 0.76, 0.50]])  # CellaVision-like
TINT_B = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])  # haematoxylin-eosin-like, different hue


def test_macenko_keeps_shape_and_dtype() -> None:
    img = _stained(TINT_A, 1.0)
    out = macenko(img)
    assert out.shape == img.shape and out.dtype == np.uint8


def test_macenko_brings_two_tints_of_the_same_field_closer() -> None:
    a, b = _stained(TINT_A, 1.0, seed=1), _stained(TINT_B, 1.4, seed=2)
    before = np.abs(a.astype(float) - b).mean()
    after = np.abs(macenko(a).astype(float) - macenko(b)).mean()
    assert after < 0.5 * before, (before, after)


def test_macenko_returns_the_input_when_too_few_stained_pixels() -> None:
    blank = np.full((64, 64, 3), 238, np.uint8)
    np.testing.assert_array_equal(macenko(blank), blank)


# --- contrast -------------------------------------------------------------------------------------------


def test_clahe_raises_local_contrast_of_a_low_contrast_image() -> None:
    y, x = np.mgrid[0:256, 0:256]
    texture = 150 + 6 * np.sin(x / 4.0) * np.cos(y / 5.0)
    img = np.stack([texture, texture * 0.9, texture * 1.05], axis=2).astype(np.uint8)
    out = clahe_lightness(img, mpp=0.25)
    lightness = lambda rgb: cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[:, :, 0].astype(float)  # noqa: E731
    assert lightness(out).std() > 1.5 * lightness(img).std()


def test_clahe_leaves_colour_channels_alone() -> None:
    img, _ = _scene(128)
    rgb = _to_uint8(img)
    before = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)[:, :, 1:].astype(int)
    after = cv2.cvtColor(clahe_lightness(rgb, mpp=0.25), cv2.COLOR_RGB2LAB)[:, :, 1:].astype(int)
    assert np.abs(after - before).mean() < 2


def test_clahe_tiles_are_sized_in_microns() -> None:
    # The same field at two sizes and matching pixel sizes gives the same result, up to resampling.
    img, _ = _scene(256)
    rgb = _to_uint8(img)
    small = cv2.resize(rgb, (128, 128), interpolation=cv2.INTER_AREA)
    full = clahe_lightness(rgb, mpp=0.25)
    half = clahe_lightness(small, mpp=0.5)
    shrunk = cv2.resize(full, (128, 128), interpolation=cv2.INTER_AREA)
    assert np.abs(shrunk.astype(float) - half).mean() < 4


# --- the pipeline -----------------------------------------------------------------------------------------


def test_all_steps_off_is_identity() -> None:
    img, _ = _scene(96)
    rgb = _to_uint8(img)
    off = PreprocessConfig(flatfield=False, stain="none", clahe=False)
    out = preprocess(rgb, 0.25, off)
    np.testing.assert_array_equal(out, rgb)
    assert out is not rgb


@pytest.mark.parametrize("stain", ["none", "reinhard", "macenko"])
def test_preprocess_keeps_size_and_dtype(stain: str) -> None:
    img, _ = _scene(200)
    rgb = _to_uint8(img)[:150]
    out = preprocess(rgb, 0.25, PreprocessConfig(stain=stain))
    assert out.shape == rgb.shape and out.dtype == np.uint8


def test_default_preprocess_of_2048_square_is_fast() -> None:
    rgb = cv2.resize(_to_uint8(_scene(256)[0]), (2048, 2048), interpolation=cv2.INTER_LINEAR)
    preprocess(rgb[:256, :256], 0.25)  # warm up OpenCV
    started = time.perf_counter()
    preprocess(rgb, 0.25, DEFAULT_PREPROCESS)
    # Typically about 0.1 s; the bound leaves room for a loaded shared machine.
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    "config",
    [
        {"stain": "vahadane"},
        {"clahe_clip": 0.0},
        {"clahe_tile_um": -1.0},
        {"background_block_um": float("nan")},
    ],
)
def test_invalid_config_values_are_refused(config: dict) -> None:
    with pytest.raises(InvalidConfig):
        PreprocessConfig(**config)


def test_nonpositive_mpp_is_invalid_config() -> None:
    with pytest.raises(InvalidConfig, match="mpp"):
        preprocess(np.zeros((8, 8, 3), np.uint8), 0.0)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32)],
)
def test_non_rgb_uint8_input_is_invalid_slide(bad: np.ndarray) -> None:
    with pytest.raises(InvalidSlide):
        preprocess(bad, 0.25)


# --- resampling -------------------------------------------------------------------------------------------


def test_resample_halves_the_size_when_mpp_doubles() -> None:
    rgb = np.zeros((60, 100, 3), np.uint8)
    assert resample(rgb, 0.1, 0.2).shape == (30, 50, 3)


def test_resample_doubles_the_size_when_mpp_halves() -> None:
    rgb = np.zeros((60, 100, 3), np.uint8)
    assert resample(rgb, 0.2, 0.1).shape == (120, 200, 3)


def test_resample_within_one_percent_returns_the_input() -> None:
    rgb = np.zeros((60, 100, 3), np.uint8)
    assert resample(rgb, 0.25, 0.252) is rgb


def test_resample_averages_when_shrinking() -> None:
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    rgb = np.repeat(checker[:, :, None], 3, axis=2)
    assert np.abs(resample(rgb, 0.1, 0.2).astype(int) - 128).max() <= 1


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, np.uint32, np.bool_])
def test_resample_labels_keeps_the_label_set_and_dtype(dtype) -> None:
    labels = np.zeros((120, 100), np.int64)
    for value, (cy, cx) in enumerate([(30, 30), (30, 70), (90, 30), (90, 70)], start=1):
        labels[_disc_mask(labels.shape, cy, cx, 15)] = value if dtype != np.bool_ else 1
    labels = labels.astype(dtype)
    for dst in (0.2, 0.05):
        out = resample_labels(labels, 0.1, dst)
        assert out.dtype == labels.dtype
        assert set(np.unique(out)) == set(np.unique(labels))
    assert resample_labels(labels, 0.1, 0.2).shape == (60, 50)


def test_resample_to_shape_restores_the_input_size() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (75, 101, 3), dtype=np.uint8)
    small = resample(rgb, 0.1, 0.25)
    assert resample_to_shape(small, 75, 101).shape == (75, 101, 3)
    labels = (rgb[:, :, 0] > 128).astype(np.int32) * 7
    back = resample_to_shape(resample_labels(labels, 0.1, 0.25), 75, 101, labels=True)
    assert back.shape == (75, 101) and set(np.unique(back)) <= {0, 7}


def test_resample_refuses_nonpositive_mpp() -> None:
    with pytest.raises(InvalidConfig):
        resample(np.zeros((4, 4, 3), np.uint8), 0.0, 0.25)


@pytest.mark.parametrize(
    ("src", "dst"), [(0.2, 0.2), (0.201, 0.2), (0.5, 0.2), (0.1, 0.2), (5.0, 0.2), (0.07, 0.33)]
)
def test_resampled_shape_is_what_resample_gives_without_resizing(src: float, dst: float) -> None:
    from blastq.core.image.preprocessing import resampled_shape

    rgb = np.zeros((37, 53, 3), np.uint8)
    assert resampled_shape(37, 53, src, dst) == resample(rgb, src, dst).shape[:2]
