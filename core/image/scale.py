"""The pixel size (mpp, microns per pixel) of a smear photo, measured on its red cells (7.5 um each).

Three measures of the red-cell diameter in pixels, each strong where another is weak:

- **circles**: Hough circles on the red-cell edges. An edge arc is enough, so cells that touch,
  overlap or are cut by the image border still count: the measure for crowded and thick areas.
- **granulometry**: the opening spectrum of the red-cell mask. Opening by a disc keeps every disc at
  least as large, overlapping unions of them included, so the spectrum peaks at the cell radius
  without any cell being split from its neighbours. Weak where the mask covers the whole field.
- **round cells**: the diameters of isolated, round, whole red cells (`core.image.slide`'s estimator),
  the most direct measure where a monolayer has cells apart.

The field is first measured coarsely (circles on a copy at most `_COARSE_PX` wide) and then at a
scale where a red cell is about `_WORK_CELL_PX` wide, so the cost does not grow with the magnification.
The estimate is the weighted median of the measures in log diameter; the confidence says how many
cells back it and how well the measures agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import filters, measure, segmentation
from skimage.feature import peak_local_max

from blastq.core.common import InvalidSlide

# The diameter of a red cell on a dried smear, the yardstick of every estimate.
RED_CELL_DIAMETER_UM = 7.5
ROUND_CELLS = "round cells"
# Below this confidence an estimate rests on a handful of red cells or on measures that disagree: say so.
LOW_CONFIDENCE = 0.2


@dataclass(frozen=True)
class ScaleEstimate:
    """The estimated pixel size and how far to trust it."""

    mpp: float  # microns per pixel
    confidence: float  # 0..1: cells measured x agreement of the measures
    method: str  # the measures that agree with the estimate, "+"-joined (e.g. "circles+granulometry")
    n_measured: int  # red cells behind the estimate (the best-supported measure's count)
    detail: str  # one line: every measure's diameter (px) and count

    @property
    def red_cell_px(self) -> float:
        """The red-cell diameter in pixels the estimate rests on."""
        return RED_CELL_DIAMETER_UM / self.mpp


@dataclass(frozen=True)
class _Measure:
    name: str
    diameter_px: float  # at full resolution
    n: int  # cells (or cell-sized peaks) measured
    weight: float  # 0..1: the measure's own support and sharpness


# The coarse pass looks at a copy at most this wide: red cells of 15 px (0.5 um/px) stay >= 5 px there
# in a 1024 px field, enough to place the fine pass.
_COARSE_PX = 384
# The fine pass works where a red cell is about this wide: Hough radii and the opening spectrum are
# accurate to a pixel or two there (2-5%), and the work no longer grows with the magnification.
_WORK_CELL_PX = 28.0
# ...and on a central window at most this wide (at the work scale): dozens of red cells at any density.
_WORK_WINDOW_PX = 768
# Below this red-cell diameter (px) pixelation and noise dominate (so mpp <= 0.75 is measurable).
_MIN_CELL_PX = 8.0
# Red-cell-coloured pixels (green OD above this, not nucleus-coloured) a field must have: one red cell
# in a field of 100 x 100 um is 0.4%.
_MIN_RED_OD = 0.08
_MIN_RED_SHARE = 0.002
# Relative to the plasma, nuclei and blue cytoplasm absorb red clearly more than blue; red cells do not
# (core.image.slide measures +0.02 for red cells on dataset2, below -0.2 for white cells).
_WHITE_CELL_BLUE_MINUS_RED = -0.12
# Measures further apart than this (in diameter) disagree: the estimate keeps those near the median.
# White-cell cytoplasm reaches this far (share of a red-cell diameter) beyond the nucleus's colour.
_CYTOPLASM_MARGIN = 0.3
# A pixel this much denser (green OD) than the typical red-cell pixel is a nucleus.
_NUCLEUS_DENSITY = 3.0
# A circle with more white-cell pixels than this inside is a white cell or its nucleus.
_MAX_WHITE_SHARE = 0.1
_AGREE_LOG = math.log(1.15)
# Cells a measure needs to confirm another; the worth of a measure no other confirms.
_MIN_CONFIRMING = 3
_ALONE = 0.25
# Green OD by which a ring just inside a circle may be paler than one just outside and the circle still be a
# red cell's edge (overlapping neighbours make the outside dense too); paler still, it is a pale centre.
_PALLOR_EDGE_OD = 0.03
# Cells behind a measure at which its support is about 63% of full.
_SUPPORT_CELLS = 12.0


def estimate_scale(rgb: np.ndarray) -> ScaleEstimate:
    """Estimate mpp from the red cells of a smear photo (HWC uint8 RGB), sparse, touching or crowded.

    Raises InvalidSlide only when there is nothing to measure: no contrast, or no red cells."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InvalidSlide(f"expected HWC uint8 RGB, got shape {rgb.shape} dtype {rgb.dtype}")
    height, width = rgb.shape[:2]
    coarse = max(1, math.ceil(max(height, width) / _COARSE_PX))
    small = _shrink(rgb, coarse)
    contrast = float(np.ptp(cv2.GaussianBlur(np.ascontiguousarray(small[:, :, 1]), (0, 0), 1.0)))
    if contrast < _MIN_CONTRAST:
        raise InvalidSlide(
            f"no red cells to measure the pixel size by (green varies by only {contrast:.0f} levels)"
        )
    od = _optical_density(small)
    nuclei = _nucleus_pixels(od)
    share = float(np.mean((od[:, :, 1] > _MIN_RED_OD) & ~nuclei))
    if share < _MIN_RED_SHARE:
        raise InvalidSlide(
            f"no red cells to measure the pixel size by ({share:.2%} of pixels are red-cell coloured)"
        )
    # Two first looks: the whole field shrunk (large cells), and its centre at full resolution (small
    # cells, which shrinking blurs into one another where they crowd). Each look's guess places a fine
    # pass; the pass whose measures agree best wins. Counting circles would not do: the pale centres of
    # red cells and clumps of them make circles too, at half and twice the size.
    views = [(od, nuclei, coarse, math.inf)]
    if coarse > 1:
        centre = _optical_density(_central(rgb, 2 * _COARSE_PX))
        # Only for cells the shrunk field shows under 16 px across; larger ones it measures well itself.
        views.append((centre, _nucleus_pixels(centre), 1, 8.0 * coarse))
    guesses: list[float] = []
    for i, (view, view_nuclei, view_factor, max_radius) in enumerate(views):
        found = _coarse_diameter(view, view_nuclei, max_radius)
        if found is None or (i > 0 and found[1] < 3):  # the centre: only where circles show small cells
            continue
        if all(abs(math.log(found[0] * view_factor / g)) > _AGREE_LOG for g in guesses):
            guesses.append(found[0] * view_factor)
    estimates = []
    for guess_px in guesses:
        try:
            estimates.append(_fine_estimate(rgb, guess_px))
        except InvalidSlide as exc:
            failure = exc
    if not guesses:
        raise InvalidSlide(
            "no red cells to measure the pixel size by (no round cell edges or cell-sized regions)"
        )
    if not estimates:
        raise failure
    return max(estimates, key=lambda e: e.confidence)


def _fine_estimate(rgb: np.ndarray, guess_px: float) -> ScaleEstimate:
    """The estimate from the fine pass around a first guess of the red-cell diameter (px)."""
    factor = max(1, int(guess_px // _WORK_CELL_PX))
    work = _central(_shrink(rgb, factor), _WORK_WINDOW_PX)
    measures = _measure(work, guess_px / factor)
    return _combine([_Measure(m.name, m.diameter_px * factor, m.n, m.weight) for m in measures])


def _coarse_diameter(od: np.ndarray, nuclei: np.ndarray, max_radius: float) -> tuple[float, int] | None:
    """A first red-cell diameter (px) within about 25%, and the circles behind it: the commonest circle,
    else (0 circles) the opening spectrum's peak."""
    largest = min(min(od.shape[:2]) / 3, max_radius)
    radii = _circle_radii(od, nuclei, max(2.5, 0.5 * _MIN_CELL_PX / 2), largest)
    if radii.size >= 3:
        radius, n = _mode_median(radii, math.log(1.25))
        return 2.0 * radius, n
    spectrum = _granulometry(od, nuclei, np.geomspace(2.0, max(largest, 2.5), 48), largest)
    if spectrum is not None and spectrum.n >= 1:
        return spectrum.diameter_px, 0
    return (2.0 * float(np.median(radii)), 0) if radii.size else None


def _measure(work: np.ndarray, guess_px: float) -> list[_Measure]:
    """The three measures of the red-cell diameter (px at the work scale) near a coarse guess."""
    od = _optical_density(work)
    radius = 0.5 * guess_px
    # White cells (a nucleus and the cytoplasm around it) are no red cells, whatever their outline.
    nuclei = _nucleus_pixels(od)
    margin = max(1, int(round(_CYTOPLASM_MARGIN * guess_px)))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    white = cv2.dilate(nuclei.astype(np.uint8), disc).astype(bool)
    found = []
    radii = _circle_radii(od, white, max(0.5 * _MIN_CELL_PX, 0.65 * radius), 1.5 * radius)
    if radii.size:
        r, n = _mode_median(radii, math.log(1.15))
        found.append(_Measure("circles", 2 * r, n, _support(n) * n / radii.size))
    # Pallor is at most about 3/4 of the cell across; the plasma between touching cells is larger.
    spectrum = _granulometry(
        od, white, np.arange(max(1.0, 0.5 * radius), 1.8 * radius, 0.25), 0.75 * guess_px
    )
    if spectrum is not None:
        found.append(spectrum)
    red_only = work.copy()
    red_only[white] = np.percentile(work.reshape(-1, 3), 99.0, axis=0).astype(np.uint8)
    diameters = _red_cell_diameters(red_only)
    diameters = diameters[(diameters > 0.5 * guess_px) & (diameters < 2.0 * guess_px)]
    if diameters.size:
        found.append(
            _Measure(ROUND_CELLS, float(np.median(diameters)), int(diameters.size), _support(diameters.size))
        )
    return found


def _combine(measures: list[_Measure]) -> ScaleEstimate:
    detail = ", ".join(f"{m.name} {m.diameter_px:.1f} px (n={m.n})" for m in measures) or "no measure"
    usable = [m for m in measures if m.weight > 0 and m.diameter_px >= _MIN_CELL_PX]
    if not usable:
        raise InvalidSlide(f"no red cells to measure the pixel size by ({detail})")
    logs = np.log([m.diameter_px for m in usable])
    weights = np.array([m.weight for m in usable])
    centre = _weighted_median(logs, weights)
    agree = np.abs(logs - centre) <= _AGREE_LOG
    kept = [m for m, a in zip(usable, agree, strict=True) if a]
    log_d = float(np.average(logs[agree], weights=weights[agree]))
    # Whole isolated cells measured one by one are the direct measure; edges (circles) and openings
    # (granulometry) sit a few percent inside a soft-edged cell. Where enough round cells confirm the
    # others, they give the size; the others are there for the fields where they are too few.
    direct = [m for m in kept if m.name == ROUND_CELLS and m.n >= _SUPPORT_CELLS]
    if direct:
        log_d = math.log(direct[0].diameter_px)
    diameter = math.exp(log_d)
    # Agreement: the share of the total weight that sits near the estimate, and, when a second measure
    # confirms it, how close they are. One measure alone is worth less than two that agree.
    share = float(weights[agree].sum() / weights.sum())
    spread = float(np.sqrt(np.average((logs[agree] - log_d) ** 2, weights=weights[agree])))
    # A measure confirms only with a few cells behind it: one or two circles agree with anything. A
    # single measure can mistake the pale centres of red cells, or clumps of them, for cells.
    confirmed = sum(1 for m in kept if m.n >= _MIN_CONFIRMING) >= 2
    agreement = share * (math.exp(-((spread / 0.1) ** 2)) if confirmed else _ALONE)
    support = max(m.weight for m in kept)
    confidence = float(np.clip(support * agreement, 0.0, 1.0))
    return ScaleEstimate(
        mpp=RED_CELL_DIAMETER_UM / diameter,
        confidence=round(confidence, 3),
        method="+".join(m.name for m in kept),
        n_measured=max(m.n for m in kept),
        detail=f"red cell {diameter:.1f} px from {detail}",
    )


# --- the measures -----------------------------------------------------------------------------------


def _shrink(rgb: np.ndarray, factor: int) -> np.ndarray:
    if factor <= 1:
        return rgb
    height, width = rgb.shape[:2]
    size = (max(1, width // factor), max(1, height // factor))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def _central(rgb: np.ndarray, size: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    return rgb[top : top + size, left : left + size]


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    """HWC float32 optical density relative to the plasma (the brightest 1% per channel), blurred by 1 px."""
    img = rgb.astype(np.float32)
    plasma = np.percentile(img.reshape(-1, 3), 99.0, axis=0)
    od = -np.log(np.maximum(img, 1.0) / np.maximum(plasma, 1.0))
    return cv2.GaussianBlur(np.maximum(od, 0.0), (0, 0), 1.0)


def _nucleus_pixels(od: np.ndarray) -> np.ndarray:
    """White-cell pixels by colour: blue-purple (absorbing red more than blue), or far denser than red cells."""
    green = od[:, :, 1]
    bluish = (od[:, :, 2] - od[:, :, 0]) < _WHITE_CELL_BLUE_MINUS_RED
    stained = green[(green > _MIN_RED_OD) & ~bluish]
    # The typical density of a red cell: the median of the pixels Otsu puts with the cells, not the plasma.
    typical = _MIN_RED_OD
    if stained.size >= 16 and float(np.ptp(stained)) > 0:
        typical = float(np.median(stained[stained > filters.threshold_otsu(stained)]))
    # Some stains (segmentation_wbc dataset1) colour white-cell cytoplasm like red cells, but no stain
    # makes a red cell as dense as a nucleus.
    return (bluish & (green > _MIN_RED_OD)) | (green > _NUCLEUS_DENSITY * typical)


def _circle_radii(od: np.ndarray, white: np.ndarray, min_radius: float, max_radius: float) -> np.ndarray:
    """Radii (px) of the circles on red-cell edges, none centred on or over a white cell."""
    green = np.where(white, 0.0, od[:, :, 1])
    top = float(np.percentile(green, 99.5))
    if top <= 0 or max_radius < min_radius:
        return np.empty(0)
    # Scaled to the field's own red-cell density, so a pale stain gives the same edges as a deep one.
    grey = np.clip(green / top * 255.0, 0, 255).astype(np.uint8)
    circles = cv2.HoughCircles(
        grey,
        cv2.HOUGH_GRADIENT_ALT,
        dp=1,
        # Overlapping red cells have centres closer than a diameter; half a radius apart still counts.
        minDist=max(2.0, 0.5 * min_radius),
        param1=150,
        # How complete and round an edge must be (1 = a perfect circle): arcs of overlapped cells pass.
        param2=0.7,
        minRadius=max(2, int(min_radius)),
        maxRadius=max(3, int(math.ceil(max_radius))),
    )
    if circles is None:
        return np.empty(0)
    x, y, r = circles[0].astype(np.float64).T
    # The share of white-cell pixels inside each circle (its inscribed square, from an integral image).
    table = cv2.integral(white.astype(np.uint8)).astype(np.float64)
    height, width = white.shape
    half = r / math.sqrt(2.0)
    x0 = np.clip(np.round(x - half), 0, width).astype(int)
    x1 = np.clip(np.round(x + half), 0, width).astype(int)
    y0 = np.clip(np.round(y - half), 0, height).astype(int)
    y1 = np.clip(np.round(y + half), 0, height).astype(int)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    covered = (table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]) / area
    # A red cell's edge is dense inside and no denser outside; the edge of its pale centre is the
    # reverse (pale inside, the cell's dense body outside): those circles are half a cell, not a cell.
    angles = np.linspace(0.0, 2.0 * math.pi, 24, endpoint=False)
    inside = _ring_mean(green, x, y, 0.8 * r, angles)
    outside = _ring_mean(green, x, y, 1.25 * r, angles)
    cell_edge = inside >= outside - _PALLOR_EDGE_OD
    return r[(covered < _MAX_WHITE_SHARE) & cell_edge]


def _ring_mean(
    image: np.ndarray, x: np.ndarray, y: np.ndarray, radius: np.ndarray, angles: np.ndarray
) -> np.ndarray:
    """The mean of `image` on a ring of `radius` around each (x, y) (nearest pixels, clipped to the image)."""
    height, width = image.shape
    xs = np.clip(np.round(x[:, None] + radius[:, None] * np.cos(angles)), 0, width - 1).astype(int)
    ys = np.clip(np.round(y[:, None] + radius[:, None] * np.sin(angles)), 0, height - 1).astype(int)
    return image[ys, xs].mean(axis=1)


def _granulometry(od: np.ndarray, white: np.ndarray, steps: np.ndarray, pallor_px: float) -> _Measure | None:
    """The opening spectrum of the red-cell mask over the radii `steps`: its peak radius, as a diameter.

    Holes up to `pallor_px` across are the pale centres of red cells and are filled."""
    green = od[:, :, 1]
    candidates = green[~white]
    if candidates.size < 16 or float(np.ptp(candidates)) <= 0:
        return None
    mask = (green > filters.threshold_otsu(candidates)) & ~white
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, _DISC3).astype(bool)
    mask = _fill_pallor(mask, math.pi * (0.5 * pallor_px) ** 2)
    cover = float(mask.mean())
    # A mask over (nearly) the whole field has no plasma to size cells against: thick areas, or a
    # threshold between one and two layers of red cells. The circles measure those.
    if cover > 0.8 or cover < _MIN_RED_SHARE:
        return None
    inside = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    kept = []
    for r in steps:
        centres = inside >= r
        if not centres.any():
            kept.append(0)
            continue
        # Opening by a disc of radius r: the union of the discs of radius r that fit in the mask.
        reach = cv2.distanceTransform((~centres).astype(np.uint8), cv2.DIST_L2, 5)
        kept.append(int(np.count_nonzero((reach <= r) & mask)))
    spectrum = np.maximum(-np.diff(np.asarray(kept, np.float64)), 0.0)
    if spectrum.sum() <= 0:
        return None
    peak = int(np.argmax(ndi.convolve1d(spectrum, [1.0, 2.0, 1.0], mode="constant")))
    lo, hi = max(0, peak - 3), min(spectrum.size, peak + 4)
    near = spectrum[lo:hi]
    r_peak = float((steps[lo:hi] * near).sum() / near.sum())
    n = int(round(near.sum() / (math.pi * r_peak**2)))
    sharpness = float(near.sum() / spectrum.sum())
    return _Measure("granulometry", 2.0 * r_peak, n, _support(n) * min(1.0, 2.0 * sharpness))


def _fill_pallor(mask: np.ndarray, max_area: float) -> np.ndarray:
    """Fill the pale centres of red cells (holes up to a cell's pallor in area), not the plasma between cells."""
    holes = ndi.binary_fill_holes(mask) & ~mask
    labels, n = ndi.label(holes)
    if n == 0:
        return mask
    small = np.bincount(labels.ravel()) <= max_area
    small[0] = False
    return mask | small[labels]


def _mode_median(values: np.ndarray, width: float) -> tuple[float, int]:
    """The median of the values within `width` (log) of their densest mode, and how many those are."""
    logs = np.log(values)
    edges = np.arange(logs.min() - 0.05, logs.max() + 0.1, 0.05)
    counts, edges = np.histogram(logs, bins=edges)
    peak = int(np.argmax(ndi.convolve1d(counts, [1, 2, 1], mode="constant")))
    mode = 0.5 * (edges[peak] + edges[peak + 1])
    near = values[np.abs(logs - mode) <= width]
    return float(np.median(near)), int(near.size)


def _support(n: float) -> float:
    return 1.0 - math.exp(-n / _SUPPORT_CELLS)


# --- round cells: isolated, whole red cells measured one by one --------------------------------------


# Red cells must be at least this wide to be measured (so the estimate is limited to mpp <= 0.75):
# below it pixelation dominates the diameter, and blobs of smoothed noise reach 6..9 px.
_MIN_CELL_DIAMETER_PX = 10.0
# Cells must differ from the plasma by this many grey levels in green; less is a blank or noise image.
_MIN_CONTRAST = 12.0
# A central window this wide holds dozens of red cells at any plausible mpp (>= 0.05); more only
# costs time (under 1 s for 1024 x 1024 on one core).
_ESTIMATE_WINDOW_PX = 1024
_DISC3 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))


def _red_cell_diameters(rgb: np.ndarray) -> np.ndarray:
    """Equivalent diameters (px) of the round, whole, red-cell-coloured objects in the image."""
    height, width = rgb.shape[:2]
    top, left = max(0, (height - _ESTIMATE_WINDOW_PX) // 2), max(0, (width - _ESTIMATE_WINDOW_PX) // 2)
    rgb = rgb[top : top + _ESTIMATE_WINDOW_PX, left : left + _ESTIMATE_WINDOW_PX]
    # Haemoglobin and eosin absorb green most, so green separates red cells from plasma best.
    green = cv2.GaussianBlur(np.ascontiguousarray(rgb[:, :, 1]), (0, 0), 1.0)
    if int(green.max()) - int(green.min()) < _MIN_CONTRAST:
        return np.empty(0)
    # Two-class Otsu separates plasma from all cells when red cells are well stained, but white cells
    # from everything else when red cells are pale; the upper three-class threshold catches the
    # latter. Keep whichever finds more round red cells: a wrong threshold gives ragged blobs.
    thresholds = [filters.threshold_otsu(green)]
    if np.unique(green).size >= 3:
        thresholds.append(filters.threshold_multiotsu(green, classes=3)[1])
    best = np.empty(0)
    for threshold in thresholds:
        foreground = green < threshold
        if not foreground.any() or foreground.all():
            continue
        if float(green[~foreground].mean()) - float(green[foreground].mean()) < _MIN_CONTRAST:
            continue
        diameters = _round_cell_diameters(rgb, foreground)
        if diameters.size > best.size:
            best = diameters
    return best


def _round_cell_diameters(rgb: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Split a cell mask into cells and return the diameters of those that look like whole red cells."""
    height, width = foreground.shape
    # The pale central pallor falls on the plasma side of the threshold: fill it back in.
    opened = cv2.morphologyEx(foreground.astype(np.uint8), cv2.MORPH_OPEN, _DISC3)
    foreground = ndi.binary_fill_holes(opened)
    if foreground.all():
        # No plasma left to measure from: the distance map would have no zero, its peaks no size.
        return np.empty(0)
    components, n = ndi.label(foreground)
    if n == 0:
        return np.empty(0)
    distance = cv2.distanceTransform(foreground.astype(np.uint8), cv2.DIST_L2, 5)
    # Touching cells are split at the necks of the distance map. The peak spacing comes from the
    # typical inscribed radius of a component (a chain of red cells is one cell wide): the median by
    # count, once specks far below the area-weighted radius are set aside.
    radii = np.asarray(ndi.maximum(distance, components, np.arange(1, n + 1)))
    areas = np.bincount(components.ravel(), minlength=n + 1)[1:].astype(np.float64)
    radii = radii[radii >= max(_MIN_CELL_DIAMETER_PX / 2, 0.25 * _weighted_median(radii, areas))]
    if radii.size == 0:
        return np.empty(0)
    radius = float(np.median(radii))
    peaks = peak_local_max(
        distance,
        min_distance=max(2, int(0.6 * radius)),
        threshold_abs=0.5 * radius,
        labels=components,
        exclude_border=False,
    )
    markers = np.zeros(components.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    cells = segmentation.watershed(-distance, markers, mask=foreground)

    plasma = np.median(rgb[~foreground], axis=0) if (~foreground).any() else np.full(3, 255.0)
    plasma = np.maximum(plasma.astype(np.float64), 1.0)
    rows = []  # diameter px, whole and round (0/1), optical density in R, G, B relative to the plasma
    for region in measure.regionprops(cells, intensity_image=rgb):
        r0, c0, r1, c1 = region.bbox
        diameter = region.equivalent_diameter_area
        # A cell cut by the image edge has an unknown size. Cheap tests first: shape measures cost.
        usable = (
            r0 > 0
            and c0 > 0
            and r1 < height
            and c1 < width
            and diameter >= _MIN_CELL_DIAMETER_PX
            and region.eccentricity < 0.75
            and region.solidity > 0.9
        )
        colour = np.asarray(region.intensity_mean, np.float64) if usable else plasma
        rows.append((diameter, usable, *(-np.log(np.maximum(colour, 1.0) / plasma))))
    diameter, usable, od_red, od_green, od_blue = np.asarray(rows, dtype=np.float64).reshape(-1, 5).T
    candidate = usable > 0
    if not candidate.any():
        return np.empty(0)
    # Relative to the plasma, red cells absorb blue about as much as red (haemoglobin, eosin), while
    # nuclei and blue cytoplasm absorb red clearly more: on dataset2 (CellaVision) the blue-minus-red
    # density is about +0.02 for red cells and below -0.2 for 95% of white cells. By count, so that a
    # large white cell cannot set it, a density far above the typical one is a nucleus too.
    keep = candidate & (od_blue - od_red > -0.15) & (od_green <= 1.5 * np.median(od_green[candidate]))
    diameter = diameter[keep]
    if diameter.size == 0:
        return diameter
    # Unsplit doublets and fragments sit far from the typical red-cell size.
    typical = np.median(diameter)
    return diameter[(diameter > 0.75 * typical) & (diameter < 1.33 * typical)]


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])
