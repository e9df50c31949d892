from __future__ import annotations

import math

import numpy as np
import pytest

from blastq.core.cells.cellcrops import CellCrop, crops_from_instances, normalise_crop
from blastq.core.cells.features import FEATURE_NAMES, cell_features, features_matrix
from blastq.core.synth.field import generate_field

INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}
YY, XX = np.mgrid[:128, :128]


def disc(cy: float, cx: float, r: float) -> np.ndarray:
    return (YY - cy) ** 2 + (XX - cx) ** 2 <= r * r


def crop_of(cell, nucleus=None, rgb=None, mpp=0.2, surround=(255, 255, 255)) -> CellCrop:
    """A crop with a grey cell (nucleus darker) unless `rgb` is given; `surround` paints the outside."""
    nucleus = np.zeros_like(cell) if nucleus is None else nucleus & cell
    if rgb is None:
        rgb = np.zeros((*cell.shape, 3), np.uint8)
        rgb[cell] = (200, 190, 220)
        rgb[nucleus] = (100, 60, 160)
    rgb = np.where(cell[..., None], rgb, np.array(surround, np.uint8)).astype(np.uint8)
    return CellCrop(rgb, cell, nucleus, mpp)


def values(crop: CellCrop, *names: str) -> list[float]:
    f = cell_features(crop)
    return [float(f[INDEX[n]]) for n in names]


def test_names_are_unique_and_match_the_vector_length():
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    f = cell_features(crop_of(disc(64, 64, 30), disc(64, 64, 15)))
    assert f.shape == (len(FEATURE_NAMES),) and f.dtype == np.float64
    groups = ("glcm_", "glrlm_", "cell_", "nucleus_r_", "cytoplasm_")
    assert all(any(n.startswith(g) for n in FEATURE_NAMES) for g in groups)


def test_features_matrix_stacks_cell_features_and_accepts_no_crops():
    crops = [crop_of(disc(64, 64, 30), disc(64, 64, 15)), crop_of(disc(60, 70, 20), disc(60, 70, 8))]
    matrix = features_matrix(crops)
    assert matrix.shape == (2, len(FEATURE_NAMES))
    np.testing.assert_array_equal(matrix[1], cell_features(crops[1]))
    assert not np.array_equal(matrix[0], matrix[1])
    assert features_matrix([]).shape == (0, len(FEATURE_NAMES))


def test_an_empty_mask_gives_zeros():
    empty = np.zeros((128, 128), bool)
    f = cell_features(CellCrop(np.full((128, 128, 3), 90, np.uint8), empty, empty, 0.2))
    np.testing.assert_array_equal(f, np.zeros(len(FEATURE_NAMES)))


@pytest.mark.parametrize(
    "cell, nucleus",
    [
        (disc(64, 64, 0.5), None),  # one pixel
        ((YY == 64) & (XX > 20) & (XX < 100), None),  # a one-pixel-wide line
        (disc(64, 64, 30), disc(64, 64, 30)),  # nucleus fills the cell: no cytoplasm
        (disc(64, 64, 30), disc(64, 64, 0.5)),  # a one-pixel nucleus
        (disc(10, 5, 30), disc(10, 5, 12)),  # cut by the crop's corner
        (disc(30, 30, 12) | disc(90, 90, 12), disc(30, 30, 5)),  # two parts
    ],
)
def test_degenerate_cells_give_finite_features(cell, nucleus):
    f = cell_features(crop_of(cell, nucleus))
    assert np.isfinite(f).all()
    assert f[INDEX["area_um2"]] > 0


def test_a_missing_region_gives_zero_colour_statistics():
    no_nucleus = cell_features(crop_of(disc(64, 64, 30)))
    all_nucleus = cell_features(crop_of(disc(64, 64, 30), disc(64, 64, 30)))
    nucleus_cols = [i for n, i in INDEX.items() if n.startswith("nucleus_") and n.endswith("_mean")]
    cytoplasm_cols = [i for n, i in INDEX.items() if n.startswith("cytoplasm_")]
    assert np.all(no_nucleus[nucleus_cols] == 0) and no_nucleus[INDEX["nucleus_lobes"]] == 0
    assert np.all(all_nucleus[cytoplasm_cols] == 0) and all_nucleus[INDEX["nc_ratio"]] == 1


def test_a_disc_is_round_convex_and_measured_in_microns():
    r_px, mpp = 30, 0.2
    area, perimeter, circ, solidity, ecc, diameter = values(
        crop_of(disc(64, 64, r_px), mpp=mpp),
        "area_um2",
        "perimeter_um",
        "circularity",
        "solidity",
        "eccentricity",
        "equivalent_diameter_um",
    )
    r_um = r_px * mpp
    assert area == pytest.approx(math.pi * r_um**2, rel=0.01)
    assert perimeter == pytest.approx(2 * math.pi * r_um, rel=0.02)
    assert circ > 0.97 and solidity > 0.97 and ecc < 0.05
    assert diameter == pytest.approx(2 * r_um, rel=0.01)


def test_measurements_scale_with_the_crops_mpp():
    cell, nucleus = disc(64, 64, 30), disc(64, 64, 12)
    names = ("area_um2", "perimeter_um", "nucleus_area_um2", "circularity", "nc_ratio")
    fine = values(crop_of(cell, nucleus, mpp=0.2), *names)
    coarse = values(crop_of(cell, nucleus, mpp=0.4), *names)
    assert coarse[0] == pytest.approx(4 * fine[0]) and coarse[2] == pytest.approx(4 * fine[2])
    assert coarse[1] == pytest.approx(2 * fine[1])
    assert coarse[3:] == pytest.approx(fine[3:])


def test_an_ellipse_is_eccentric_with_its_axes_in_microns():
    ellipse = ((YY - 64) / 15.0) ** 2 + ((XX - 64) / 30.0) ** 2 <= 1
    ecc, major, minor, circ = values(
        crop_of(ellipse), "eccentricity", "major_axis_um", "minor_axis_um", "circularity"
    )
    assert ecc == pytest.approx(math.sqrt(1 - 0.25), abs=0.01)
    assert major == pytest.approx(2 * 30 * 0.2, rel=0.03) and minor == pytest.approx(2 * 15 * 0.2, rel=0.03)
    assert 0.8 < circ < 0.95  # a 2:1 ellipse: 4*pi*A/P^2 = 0.84 (Ramanujan)


def test_a_notched_cell_is_less_solid_and_less_circular_than_a_disc():
    notched = disc(64, 64, 30) & ~disc(64, 90, 20)
    solid, circ = values(crop_of(notched), "solidity", "circularity")
    assert solid < 0.85 and circ < 0.75


@pytest.mark.parametrize(
    "nucleus, lobes",
    [
        (disc(64, 64, 18), 1),
        (((YY - 64) / 10.0) ** 2 + ((XX - 64) / 25.0) ** 2 <= 1, 1),  # elongated
        (disc(64, 64, 20) & ~disc(64, 90, 14), 1),  # kidney-shaped, like a monocyte's
        (disc(64, 46, 11) | disc(64, 82, 11) | ((abs(YY - 64) <= 1) & (XX > 46) & (XX < 82)), 2),  # strand
        (disc(64, 53, 11) | disc(64, 73, 11), 2),  # two lobes touching along a wide neck
        (disc(64, 42, 10) | disc(64, 60, 10) | disc(64, 78, 10) | disc(64, 96, 10), 4),
    ],
)
def test_nucleus_lobes_are_counted_across_strands_and_necks(nucleus, lobes):
    (n,) = values(crop_of(disc(64, 64, 45), nucleus), "nucleus_lobes")
    assert n == lobes


def test_a_kidney_nucleus_has_a_deeper_indentation_than_a_round_one():
    kidney = disc(64, 64, 20) & ~disc(64, 90, 14)
    (deep,) = values(crop_of(disc(64, 64, 45), kidney), "nucleus_max_defect_um")
    (shallow,) = values(crop_of(disc(64, 64, 45), disc(64, 64, 20)), "nucleus_max_defect_um")
    assert deep > 0.8 and shallow < 0.3


@pytest.mark.parametrize(
    "nucleus",
    [
        (abs(YY - 64) <= 10) & (abs(XX - 64) <= 10),  # a square: its outline is its hull
        (abs(YY - 64) <= 1) & (abs(XX - 64) <= 15),  # a 3-pixel-wide bar
        (YY >= 64) & (YY < 66) & (XX >= 64) & (XX < 66),  # 2x2 pixels
    ],
)
def test_a_nucleus_without_any_indentation_has_zero_defect_depth(nucleus):
    # OpenCV 5 reports "no convexity defect" on these as an empty array (OpenCV 4 as None).
    f = cell_features(crop_of(disc(64, 64, 45), nucleus))
    assert f[INDEX["nucleus_max_defect_um"]] == 0 and np.isfinite(f).all()
    assert f[INDEX["nucleus_area_um2"]] > 0


def test_both_opencv_answers_for_no_defect_give_zero_depth(monkeypatch):
    import cv2

    kidney = disc(64, 64, 20) & ~disc(64, 90, 14)  # it has a defect, so only the stub can say none
    answers = {"opencv 4": None, "opencv 5": np.zeros((0, 1, 4), np.int32)}
    for answer in answers.values():
        monkeypatch.setattr(cv2, "convexityDefects", lambda contour, hull, a=answer: a)
        assert values(crop_of(disc(64, 64, 45), kidney), "nucleus_max_defect_um") == [0.0]


def test_colour_statistics_are_per_region():
    cell, nucleus = disc(64, 64, 30), disc(64, 64, 12)
    rgb = np.zeros((128, 128, 3), np.uint8)
    rgb[cell] = (230, 210, 240)
    rgb[nucleus] = (100, 50, 170)
    f = cell_features(crop_of(cell, nucleus, rgb=rgb))
    assert f[INDEX["nucleus_r_mean"]] == pytest.approx(100) and f[INDEX["nucleus_r_std"]] == 0
    assert f[INDEX["cytoplasm_b_p50"]] == pytest.approx(240)
    share = nucleus.sum() / cell.sum()
    assert f[INDEX["cell_g_mean"]] == pytest.approx(share * 50 + (1 - share) * 210)
    assert f[INDEX["cell_g_p10"]] == pytest.approx(50) and f[INDEX["cell_g_p90"]] == pytest.approx(210)
    assert f[INDEX["nucleus_l_mean"]] < f[INDEX["cytoplasm_l_mean"]]  # Lab lightness
    assert f[INDEX["nucleus_s_mean"]] > f[INDEX["cytoplasm_s_mean"]]


def test_red_hues_either_side_of_zero_average_to_red_not_cyan():
    cell = disc(64, 64, 30)
    rgb = np.zeros((128, 128, 3), np.uint8)
    rgb[cell & (XX < 64)] = (255, 0, 42)  # hue ~350 degrees
    rgb[cell & (XX >= 64)] = (255, 42, 0)  # hue ~10 degrees
    hue_mean, hue_std = values(crop_of(cell, rgb=rgb), "cell_h_mean", "cell_h_std")
    assert hue_std < 15
    # Pure red is hue 0 before the rotation that moves the wrap onto green.
    (red_hue,) = values(crop_of(cell, rgb=np.full((128, 128, 3), (255, 0, 0), np.uint8)), "cell_h_mean")
    assert hue_mean == pytest.approx(red_hue, abs=2)


@pytest.mark.parametrize("top_left, side", [(50, 20), (0, 128)])  # the second fills the crop edge to edge
def test_a_constant_grey_cell_has_no_contrast_and_one_run_per_line(top_left, side):
    square = np.zeros((128, 128), bool)
    square[top_left : top_left + side, top_left : top_left + side] = True
    grey = np.full((128, 128, 3), 150, np.uint8)
    # A black surround: texture that leaked across the cell's edge would show as huge contrast.
    f = cell_features(crop_of(square, rgb=grey, surround=(0, 0, 0)))
    for d in (1, 2):
        assert f[INDEX[f"glcm_contrast_d{d}"]] == 0 and f[INDEX[f"glcm_dissimilarity_d{d}"]] == 0
        assert f[INDEX[f"glcm_energy_d{d}"]] == pytest.approx(1) and f[INDEX[f"glcm_asm_d{d}"]] == 1
        assert f[INDEX[f"glcm_homogeneity_d{d}"]] == pytest.approx(1)
    # Rows and columns: `side` runs of length `side`; each diagonal direction: 2*side-1 runs, 1..side..1.
    diagonal = np.array([*range(1, side + 1), *range(side - 1, 0, -1)], float)
    expected_rp = np.mean([1 / side, 1 / side, len(diagonal) / side**2, len(diagonal) / side**2])
    expected_lre = np.mean([side**2, side**2, (diagonal**2).mean(), (diagonal**2).mean()])
    assert f[INDEX["glrlm_rp"]] == pytest.approx(expected_rp)
    assert f[INDEX["glrlm_lre"]] == pytest.approx(expected_lre)
    level = 150 * 32 // 256 + 1  # grey levels are numbered 1..32
    assert f[INDEX["glrlm_hgre"]] == pytest.approx(level**2) and f[INDEX["glrlm_lgre"]] == pytest.approx(
        level**-2
    )
    expected_sre = np.mean([side**-2, side**-2, (diagonal**-2).mean(), (diagonal**-2).mean()])
    assert f[INDEX["glrlm_sre"]] == pytest.approx(expected_sre)
    # Diagonal run lengths 1..side-1 occur twice each, `side` once.
    diagonal_rln = (4 * (side - 1) + 1) / len(diagonal)
    assert f[INDEX["glrlm_rln"]] == pytest.approx(np.mean([side, side, diagonal_rln, diagonal_rln]))
    assert f[INDEX["glrlm_gln"]] == pytest.approx(np.mean([side, side, len(diagonal), len(diagonal)]))


def test_texture_ignores_what_surrounds_the_cell():
    cell = disc(64, 64, 30)
    rng = np.random.default_rng(0)
    rgb = rng.integers(80, 200, (128, 128, 3), dtype=np.uint8)
    texture = [i for n, i in INDEX.items() if n.startswith(("glcm_", "glrlm_"))]
    on_white = cell_features(crop_of(cell, rgb=rgb, surround=(255, 255, 255)))[texture]
    on_black = cell_features(crop_of(cell, rgb=rgb, surround=(0, 0, 0)))[texture]
    np.testing.assert_allclose(on_white, on_black)


def test_pixel_noise_gives_short_runs_and_contrast_a_smooth_cell_does_not():
    cell = disc(64, 64, 30)
    rng = np.random.default_rng(1)
    noisy = np.repeat(rng.integers(0, 256, (128, 128, 1), dtype=np.uint8), 3, axis=2)
    ramp = np.repeat(np.clip(XX * 2, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    rp_noise, sre_noise, contrast_noise = values(
        crop_of(cell, rgb=noisy), "glrlm_rp", "glrlm_sre", "glcm_contrast_d1"
    )
    rp_ramp, sre_ramp, contrast_ramp = values(
        crop_of(cell, rgb=ramp), "glrlm_rp", "glrlm_sre", "glcm_contrast_d1"
    )
    assert rp_noise > 0.9 and sre_noise > 0.9
    assert rp_ramp < 0.5 and sre_ramp < sre_noise
    assert contrast_noise > 50 * contrast_ramp


def synthetic_crops_by_kind(seeds=range(6)) -> dict[str, list[CellCrop]]:
    by_kind: dict[str, list[CellCrop]] = {}
    for seed in seeds:
        field = generate_field(seed, 512, 512, blast_fraction=0.0, wbc_per_10k_um2=14)
        ids = [c.cell_id for c in field.cells]
        crops = crops_from_instances(field.image, field.instances, field.nuclei, field.mpp, ids)
        for cell, crop in zip(field.cells, crops, strict=True):
            by_kind.setdefault(cell.kind, []).append(normalise_crop(crop))
    return by_kind


def test_lymphocytes_and_neutrophils_from_synthetic_fields_differ_as_they_should():
    by_kind = synthetic_crops_by_kind()
    lymph = features_matrix(by_kind["lymphocyte"])
    neut = features_matrix(by_kind["neutrophil"])
    assert len(lymph) >= 5 and len(neut) >= 5
    col = INDEX.__getitem__
    # Lymphocytes: small (7-10 um), a round nucleus filling most of the cell; neutrophils: 12-14 um,
    # a segmented nucleus in pale cytoplasm.
    assert np.median(lymph[:, col("area_um2")]) < 0.6 * np.median(neut[:, col("area_um2")])
    assert np.median(lymph[:, col("nc_ratio")]) > 1.5 * np.median(neut[:, col("nc_ratio")])
    assert np.mean(lymph[:, col("nucleus_lobes")] == 1) >= 0.9
    assert np.mean(neut[:, col("nucleus_lobes")] >= 2) >= 0.7
    assert np.isfinite(lymph).all() and np.isfinite(neut).all()


def test_glcm_properties_are_those_of_skimage_graycoprops():
    from skimage.feature import graycoprops

    from blastq.core.cells.features import GLCM_PROPS, _glcm_props

    rng = np.random.default_rng(3)
    counts = rng.integers(0, 5, (32, 32, 4)).astype(np.uint32)
    counts[:, :, 3] = 0
    counts[7, 7, 3] = 12  # one grey level only: zero spread, correlation 1 by convention
    got = _glcm_props(counts)
    for k, prop in enumerate(GLCM_PROPS):
        want = graycoprops(counts[:, :, None, :], prop)[0]
        np.testing.assert_allclose(got[k], want, rtol=1e-12, atol=1e-15)


# --- the fast outline length and lobe peaks against skimage's, which they replace ---------------------


def random_masks(seed: int, count: int):
    import cv2

    rng = np.random.default_rng(seed)
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(5, 90, 2))
        mask = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            axes = (int(rng.integers(2, 30)), int(rng.integers(2, 30)))
            cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        if rng.random() < 0.3:  # ragged: holes and specks
            mask[rng.random(mask.shape) < 0.05] ^= 1
        yield mask


def test_contour_length_is_the_length_of_skimages_contours():
    import cv2
    from skimage.measure import find_contours

    from blastq.core.cells.features import contour_length

    for mask in random_masks(0, 200):
        smooth = cv2.GaussianBlur(np.pad(mask, 3).astype(np.float32), (0, 0), 1.0)
        want = sum(float(np.hypot(*np.diff(c, axis=0).T).sum()) for c in find_contours(smooth, 0.5))
        assert contour_length(smooth, 0.5) == pytest.approx(want, rel=1e-12, abs=1e-12)
    flat = np.full((6, 6), 0.5, np.float32)  # touching the level everywhere, crossing it nowhere
    assert contour_length(flat, 0.5) == 0.0 == sum(len(c) for c in find_contours(flat, 0.5))


def test_h_maxima_marks_the_same_pixels_as_skimages():
    import cv2
    from skimage.morphology import h_maxima as skimage_h_maxima

    from blastq.core.cells.features import h_maxima

    rng = np.random.default_rng(1)
    for mask in random_masks(1, 150):
        distance = cv2.distanceTransform(np.pad(mask, 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        for h in (0.5, 1.5, 3.0):
            assert np.array_equal(h_maxima(distance, h), skimage_h_maxima(distance, h))
    noise = rng.random((40, 40)).astype(np.float32) * 5  # many maxima of every height
    for h in (0.2, 1.0, 10.0):
        assert np.array_equal(h_maxima(noise, h), skimage_h_maxima(noise, h))


def test_sorted_percentiles_are_numpys_bit_for_bit():
    from blastq.core.cells.features import sorted_percentiles

    rng = np.random.default_rng(5)
    for n in [*range(1, 30), 257, 3000]:
        for dtype in (np.float32, np.float64):
            rows = (rng.random((9, n)) * rng.choice([1.0, 100.0, 360.0])).astype(dtype)
            if n % 3 == 0:
                rows = np.round(rows)  # ties
            got = sorted_percentiles(np.sort(rows, axis=1), (10.0, 50.0, 90.0))
            assert np.array_equal(got, np.percentile(rows, (10.0, 50.0, 90.0), axis=1))


def test_colour_statistics_are_those_of_each_regions_pixels():
    """Every colour feature against its definition computed here from the region's own pixels."""
    import cv2

    rng = np.random.default_rng(6)
    cell, nucleus = disc(60, 66, 31), disc(55, 60, 14) | disc(70, 75, 9)
    rgb = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    f = cell_features(crop_of(cell, nucleus, rgb=rgb))
    rgb01 = rgb.astype(np.float32) / 255
    hsv = cv2.cvtColor(rgb01, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0] - 120) % 360
    channels = np.concatenate([rgb01 * 255, hsv, cv2.cvtColor(rgb01, cv2.COLOR_RGB2Lab)], axis=2)
    names = ("r", "g", "b", "h", "s", "v", "l", "a", "lab_b")
    for region, mask in (("cell", cell), ("nucleus", nucleus & cell), ("cytoplasm", cell & ~nucleus)):
        pixels = channels[mask].astype(np.float64)
        for c, name in enumerate(names):
            want = [
                pixels[:, c].mean(),
                pixels[:, c].std(),
                *np.percentile(channels[mask][:, c], (10, 50, 90)),
            ]
            got = [f[INDEX[f"{region}_{name}_{stat}"]] for stat in ("mean", "std", "p10", "p50", "p90")]
            assert got == pytest.approx(want, rel=1e-9, abs=1e-9), (region, name)
