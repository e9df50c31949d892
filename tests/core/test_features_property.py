"""Property tests: no mask, however degenerate, makes a cell's features or its typing fail.

Masks are drawn as the shapes real segmentations produce at their worst: single pixels, one-pixel lines,
rings, convex blobs and rectangles, blobs with holes, speckle, masks cut by or filling the crop, with a
nucleus that is absent, inside, equal to or outside the cell.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from blastq.core.cells.cellcrops import CELL_TYPES, CellCrop, normalise_crop
from blastq.core.cells.features import FEATURE_NAMES, cell_features

INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}
SHAPES = ("pixel", "hline", "vline", "diagonal", "ring", "blob", "rectangle", "holed", "speckle", "full")
NUCLEI = ("none", "inside", "equal", "outside", "speckle", "rectangle")
FAST = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def shape_mask(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(-2, h + 1), rng.uniform(-2, w + 1)  # centres may sit off the crop: cut cells
    r = rng.uniform(0.5, max(h, w))
    mask = np.zeros((h, w), bool)
    if kind == "pixel":
        mask[rng.integers(h), rng.integers(w)] = True
    elif kind == "hline":
        mask[rng.integers(h), rng.integers(w) :] = True
    elif kind == "vline":
        mask[: rng.integers(1, h + 1), rng.integers(w)] = True
    elif kind == "diagonal":
        n = min(h, w)
        mask[np.arange(n), np.arange(n)] = True
    elif kind == "ring":
        d = np.hypot(yy - cy, xx - cx)
        mask = (d <= r) & (d > r - rng.uniform(0.5, 3))
    elif kind == "blob":
        mask = ((yy - cy) / r) ** 2 + ((xx - cx) / rng.uniform(0.5, max(h, w))) ** 2 <= 1
    elif kind == "rectangle":
        y0, x0 = rng.integers(h), rng.integers(w)
        mask[y0 : rng.integers(y0, h) + 1, x0 : rng.integers(x0, w) + 1] = True
    elif kind == "holed":
        d = np.hypot(yy - cy, xx - cx)
        mask = (d <= r) & ~(rng.random((h, w)) < 0.2)
    elif kind == "speckle":
        mask = rng.random((h, w)) < rng.uniform(0.05, 0.9)
    else:  # "full": the cell fills the crop edge to edge
        mask[:] = True
    return mask


@st.composite
def crops(draw) -> CellCrop:
    h, w = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    shape, nucleus_kind = draw(st.sampled_from(SHAPES)), draw(st.sampled_from(NUCLEI))
    mpp = draw(st.sampled_from((0.05, 0.1, 0.2, 0.5, 1.0)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    cell = shape_mask(shape, h, w, rng)
    if nucleus_kind == "none":
        nucleus = np.zeros_like(cell)
    elif nucleus_kind == "inside":
        nucleus = cell & shape_mask("blob", h, w, rng)
    elif nucleus_kind == "equal":
        nucleus = cell.copy()
    elif nucleus_kind == "outside":
        nucleus = ~cell
    else:
        nucleus = shape_mask(nucleus_kind, h, w, rng)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    # CellCrop's nucleus lies inside the cell; "outside" therefore leaves none, as a crop would.
    return CellCrop(rgb, cell, nucleus & cell, mpp)


def rectangle_crop(h: int, w: int, nucleus_equal: bool) -> CellCrop:
    cell = np.zeros((h, w), bool)
    cell[2:-2, 3:-3] = True
    nucleus = cell.copy() if nucleus_equal else np.zeros_like(cell)
    if not nucleus_equal:
        nucleus[4:-4, 5:-5] = True
    return CellCrop(np.full((h, w, 3), 120, np.uint8), cell, nucleus, 0.2)


def assert_valid_features(crop: CellCrop) -> None:
    f = cell_features(crop)
    assert f.shape == (len(FEATURE_NAMES),) and f.dtype == np.float64
    assert np.isfinite(f).all()
    if crop.cell.any():
        assert f[INDEX["area_um2"]] > 0
        for name in ("circularity", "solidity", "eccentricity", "nc_ratio", "nucleus_solidity"):
            assert 0.0 <= f[INDEX[name]] <= 1.0, name
    else:
        assert not f.any()


# Pinned: a rectangular nucleus is its own hull (OpenCV 5 answers convexityDefects with an empty array).
@example(crop=rectangle_crop(20, 30, nucleus_equal=True))
@example(crop=rectangle_crop(20, 30, nucleus_equal=False))
@given(crop=crops())
@FAST
def test_any_mask_gives_finite_features_of_the_right_length(crop):
    assert_valid_features(crop)


@example(crop=rectangle_crop(20, 30, nucleus_equal=True))
@given(crop=crops())
@FAST
def test_any_mask_normalised_to_the_crop_scale_gives_finite_features(crop):
    normalised = normalise_crop(crop)
    assert normalised.rgb.shape == (128, 128, 3) and normalised.cell.shape == (128, 128)
    assert not (normalised.nucleus & ~normalised.cell).any()
    assert_valid_features(normalised)


@pytest.fixture(scope="module")
def shipped_classifier():
    from blastq.core.cells.classify import load_cell_classifier

    return load_cell_classifier("default")


@example(crop=rectangle_crop(20, 30, nucleus_equal=True))
@given(crop=crops())
@settings(
    max_examples=40,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_the_shipped_classifier_types_any_one_cell_mask(crop, shipped_classifier):
    """type_cells on a one-cell map: a type, probabilities summing to 1, no failure reason."""
    from blastq.core.cells.classify import type_cells
    from blastq.core.cells.instances import CellMaps, CellRecord

    assume(crop.cell.any())
    instances = crop.cell.astype(np.int32)
    record = CellRecord(1, "white_cell", 0.0, 0.0, 0, 0, 1, 1, 1, 0.04, 0.8, 1.0, 0, 0.0, 0.0, 0, 0, 0, 0.1)
    maps = CellMaps(instances.astype(np.uint8), crop.nucleus, instances, (record,))
    [cell] = type_cells(maps, crop.rgb, crop.mpp, shipped_classifier).cells
    assert cell.cell_type in CELL_TYPES
    p = np.array([getattr(cell, f"p_{t}") for t in CELL_TYPES])
    assert np.isfinite(p).all() and p.sum() == pytest.approx(1.0, abs=1e-3)
    # The only reason a single cell may go untyped is that it vanishes at the crop scale (0.2 um/px).
    assert cell.review_reason in ("", "too small to type: no pixels at 0.2 um/px")
    assert cell.review or not cell.review_reason
