"""The red-cell scale estimator on sparse, monolayer and crowded fields, and on real crops."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from blastq.core.common.errors import InvalidSlide
from blastq.core.image.scale import estimate_scale
from blastq.core.image.slide import decode_slide
from blastq.core.synth.field import generate_field

# Red-cell layouts a lab meets: a thin tail (sparse), the monolayer, and a thick area where red cells
# crowd and overlap (the fields the round-isolated-cell estimator refused).
LAYOUTS = {
    "sparse": {"rbc_coverage": 0.08},
    "monolayer": {"rbc_coverage": 0.35},
    "crowded": {"rbc_coverage": 1.0, "rbc_overlap": 0.9},
}


def _field(mpp: float, layout: str, seed: int) -> np.ndarray:
    # 640 x 480: the camera fields of a lab photographing through the eyepiece.
    return generate_field(seed, 480, 640, mpp=mpp, wbc_per_10k_um2=3.0, **LAYOUTS[layout]).image


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mpp", [0.05, 0.1, 0.2, 0.5])
def test_the_scale_is_estimated_within_15_to_20_percent_at_any_magnification_and_density(
    mpp: float, layout: str
) -> None:
    # At 0.05 um/px the field is 32 x 24 um: a handful of red cells, each measure backed by 2-10 of them.
    tolerance = 0.2 if mpp < 0.075 else 0.15
    for seed in (2, 3):
        estimate = estimate_scale(_field(mpp, layout, seed))
        assert estimate.mpp == pytest.approx(mpp, rel=tolerance), (mpp, layout, seed, estimate.detail)
        assert 0.0 < estimate.confidence <= 1.0
        assert estimate.n_measured >= 2


def test_confidence_grows_with_the_red_cells_there_are_to_measure() -> None:
    # 32 x 24 um at 0.05 um/px holds about ten red cells; 128 x 96 um at 0.2 holds hundreds.
    few = [estimate_scale(_field(0.05, "monolayer", seed)) for seed in (2, 3)]
    many = [estimate_scale(_field(0.2, "monolayer", seed)) for seed in (2, 3)]
    assert max(e.confidence for e in few) < min(e.confidence for e in many)
    assert max(e.n_measured for e in few) < min(e.n_measured for e in many)


def test_a_crowded_field_is_measured_where_isolated_round_cells_are_too_few() -> None:
    rgb = _field(0.075, "crowded", 1)  # a red cell 100 px across, as in the full-field photos of issue 12
    estimate = estimate_scale(rgb)
    assert estimate.mpp == pytest.approx(0.075, rel=0.15)
    assert "circles" in estimate.method


def test_an_estimated_scale_reaches_the_result_with_its_confidence() -> None:
    rgb = _field(0.2, "monolayer", 2)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    slide = decode_slide(png.tobytes(), "field.png")
    assert slide.mpp_source == "estimated" and slide.mpp == pytest.approx(0.2, rel=0.15)
    assert slide.mpp_confidence == estimate_scale(rgb).confidence
    assert decode_slide(png.tobytes(), "field.png", mpp=0.2).mpp_confidence is None


def test_a_field_without_red_cells_is_refused_naming_why() -> None:
    plasma = np.full((480, 640, 3), (236, 230, 232), np.uint8)
    with pytest.raises(InvalidSlide, match="no red cells to measure the pixel size by"):
        estimate_scale(plasma)
    # White cells alone on plasma: nothing red-cell coloured to measure.
    lone = plasma.copy()
    cv2.circle(lone, (320, 240), 60, (150, 120, 200), -1)
    cv2.circle(lone, (320, 240), 35, (80, 40, 140), -1)
    with pytest.raises(InvalidSlide, match="no red cells"):
        estimate_scale(lone)


def test_real_crops_what_the_estimator_says(wbc_root: Path) -> None:
    """segmentation_wbc dataset2 (CellaVision crops, 300 x 300 px, several red cells around one white
    cell) is estimated nearly always; its red cells measure about 65 px, i.e. about 0.115 um/px, where
    the white cells' sizes give the 0.08 um/px the project trains with (a neutrophil 160 px = 12.8 um at
    0.08): these crops show red cells small for their white cells, and the estimator says what the red
    cells say. dataset1 crops (about 120 px, a white cell filling most of it, few whole red cells) give
    little to measure, and the confidence says so."""
    paths = sorted((wbc_root / "dataset2").glob("*.bmp"))[::2]
    estimates, refused = [], 0
    for path in paths:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        try:
            estimates.append(estimate_scale(rgb))
        except InvalidSlide:
            refused += 1
    assert refused <= 0.15 * len(paths)
    mpps = np.array([e.mpp for e in estimates])
    assert 0.095 <= float(np.median(mpps)) <= 0.14
    crowded_conf = float(np.median([e.confidence for e in estimates]))
    small = []
    for path in sorted((wbc_root / "dataset1").glob("*.bmp"))[::6]:
        try:
            small.append(estimate_scale(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)).confidence)
        except InvalidSlide:
            small.append(0.0)
    assert float(np.median(small)) < 0.2
    assert float(np.median(small)) <= crowded_conf
