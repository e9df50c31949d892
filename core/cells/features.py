"""Hand-made features of one normalised white cell: shape, colour and texture, for the classical classifiers.

`cell_features` turns a `CellCrop` into a fixed-length float64 vector named by `FEATURE_NAMES`:

- morphology in microns (from `crop.mpp`): size, outline and the nucleus' shape and lobes;
- colour statistics of the cell, nucleus and cytoplasm pixels in RGB, HSV and CIE Lab;
- texture of the grey cell: grey-level co-occurrence (GLCM) and grey-level run-length (GLRLM) statistics,
  both counting only pixel pairs / runs inside the cell, so the blanked surround and the edge context that
  `normalise_crop` keeps never enter them.

Every value is finite: an empty region (no cell, no nucleus, a nucleus filling the cell) gives zeros.
"""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.feature import graycomatrix

from blastq.core.cells.cellcrops import CellCrop

# Nucleus lobes are counted as peaks of the nucleus' distance transform that stand at least
# LOBE_PROMINENCE_UM above the neck joining them to the rest (h-maxima): in effect an opening whose radius
# adapts to each lobe. A fixed small opening only cuts thin chromatin strands, but most segmented nuclei
# here have lobes touching along wide necks: a 0.4 um opening left 132 of 209 real (segmentation_wbc) and
# 61 of 95 synthetic neutrophils at one lobe, 0.3 um peaks only 14 and 6, while 86 of 90 real lymphocytes
# and 50 of 63 real monocytes stay at one (normalised crops of the reference masks). Deep convexity
# defects were not used for the count because a kidney-shaped monocyte or band nucleus has one and is one
# lobe; the deepest defect is its own feature instead.
LOBE_PROMINENCE_UM = 0.3

# Texture is measured on 32 grey levels over the fixed 0..255 range rather than each cell's own range:
# stretching a smooth, pale cytoplasm to full contrast would turn its camera noise into "texture".
TEXTURE_LEVELS = 32
GLCM_DISTANCES_PX = (1, 2)
_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
GLRLM_PROPS = ("sre", "lre", "gln", "rln", "rp", "lgre", "hgre")

_MORPHOLOGY = (
    "area_um2",
    "perimeter_um",
    "circularity",
    "solidity",
    "eccentricity",
    "equivalent_diameter_um",
    "major_axis_um",
    "minor_axis_um",
    "nucleus_area_um2",
    "nc_ratio",
    "nucleus_solidity",
    "nucleus_circularity",
    "nucleus_eccentricity",
    "nucleus_lobes",
    "nucleus_max_defect_um",
    "nucleus_offset",
)
_REGIONS = ("cell", "nucleus", "cytoplasm")
_CHANNELS = ("r", "g", "b", "h", "s", "v", "l", "a", "lab_b")
_STATS = ("mean", "std", "p10", "p50", "p90")
_PERCENTILES = (10.0, 50.0, 90.0)

FEATURE_NAMES: tuple[str, ...] = (
    _MORPHOLOGY
    + tuple(f"{region}_{channel}_{stat}" for region in _REGIONS for channel in _CHANNELS for stat in _STATS)
    + tuple(f"glcm_{prop.lower()}_d{d}" for d in GLCM_DISTANCES_PX for prop in GLCM_PROPS)
    + tuple(f"glrlm_{prop}" for prop in GLRLM_PROPS)
)


def cell_features(crop: CellCrop) -> np.ndarray:
    """The feature vector of one crop: float64, shape (len(FEATURE_NAMES),), always finite."""
    out = np.zeros(len(FEATURE_NAMES), np.float64)
    if not crop.cell.any():
        return out
    # Work on the cell's bounding box (plus a pixel so outlines stay closed): most cells fill a fraction of
    # the crop, and every step below scales with the pixels it sees.
    ys, xs = np.nonzero(crop.cell)
    y0, y1 = max(0, ys.min() - 1), min(crop.cell.shape[0], ys.max() + 2)
    x0, x1 = max(0, xs.min() - 1), min(crop.cell.shape[1], xs.max() + 2)
    rgb = crop.rgb[y0:y1, x0:x1]
    cell = crop.cell[y0:y1, x0:x1]
    nucleus = crop.nucleus[y0:y1, x0:x1] & cell
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    levels = (grey.astype(np.int32) * TEXTURE_LEVELS) // 256
    parts = (
        _morphology(cell, nucleus, crop.mpp),
        _colour(rgb, cell, nucleus),
        _glcm(levels, cell),
        _run_lengths(levels, cell),
    )
    vector = np.concatenate(parts)
    # Guards above keep each group finite; this only catches a degenerate case nobody foresaw.
    return np.nan_to_num(vector, nan=0.0, posinf=0.0, neginf=0.0)


def features_matrix(crops: Iterable[CellCrop]) -> np.ndarray:
    """Features of many crops as an (N, len(FEATURE_NAMES)) float64 array (N may be 0)."""
    rows = [cell_features(c) for c in crops]
    if not rows:
        return np.zeros((0, len(FEATURE_NAMES)), np.float64)
    return np.stack(rows)


def _shape(mask: np.ndarray, mpp: float) -> tuple[float, ...]:
    """(area_um2, perimeter_um, circularity, solidity, eccentricity, diameter_um, major_um, minor_um)."""
    area_px = float(np.count_nonzero(mask))
    if area_px == 0:
        return (0.0,) * 8
    perimeter_px = _perimeter_px(mask)
    # Capped: on tiny discs the pixel count outgrows the traced area and the ratio can pass 1 slightly.
    circularity = min(1.0, 4 * np.pi * area_px / perimeter_px**2) if perimeter_px > 0 else 0.0
    # The ellipse with the same second moments, as skimage's regionprops defines it (OpenCV is faster).
    m = cv2.moments(mask.astype(np.uint8), binaryImage=True)
    cov = np.array([[m["mu20"], m["mu11"]], [m["mu11"], m["mu02"]]]) / area_px
    small, large = np.clip(np.linalg.eigvalsh(cov), 0.0, None)
    eccentricity = float(np.sqrt(1.0 - small / large)) if large > 0 else 0.0
    return (
        area_px * mpp * mpp,
        perimeter_px * mpp,
        circularity,
        # The hull holds every mask pixel, so this only guards the ratio (never over 1, never 0/0).
        area_px / max(_convex_area_px(mask), area_px),
        eccentricity,
        float(np.sqrt(4 * area_px / np.pi)) * mpp,
        4 * float(np.sqrt(large)) * mpp,
        4 * float(np.sqrt(small)) * mpp,
    )


def _convex_area_px(mask: np.ndarray) -> float:
    """Pixels inside the convex hull of the mask's pixel centres, the hull's edges included."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(np.concatenate(contours))
    canvas = np.zeros(mask.shape, np.uint8)
    cv2.fillConvexPoly(canvas, hull, 1)
    return float(np.count_nonzero(canvas))


def _perimeter_px(mask: np.ndarray) -> float:
    """Length of the mask's outline(s), holes included, traced at sub-pixel precision."""
    # The pixel staircase overstates a round outline by ~10% at every size (a perfect disc would score a
    # circularity of 0.91); the half-level contour of the mask smoothed by one pixel follows the true
    # outline to within 1% for discs of 10 px radius and more.
    smooth = cv2.GaussianBlur(np.pad(mask, 3).astype(np.float32), (0, 0), 1.0)
    return contour_length(smooth, 0.5)


# Marching squares: which pairs of a 2x2 square's edge crossings are joined, by the square's case (bit 1: top
# left corner above the level, 2: top right, 4: bottom left, 8: bottom right). Saddles (6, 9) are joined as
# skimage's find_contours does by default (fully_connected="low"). Each segment is counted once.
_SEGMENT_CASES = {
    ("top", "left"): (1, 9, 14),
    ("top", "right"): (2, 6, 13),
    ("left", "right"): (3, 12),
    ("left", "bottom"): (4, 6, 11),
    ("top", "bottom"): (5, 10),
    ("right", "bottom"): (7, 8, 9),
}
_SEGMENT_OF_CASE = {pair: np.isin(np.arange(16), cases) for pair, cases in _SEGMENT_CASES.items()}


def contour_length(image: np.ndarray, level: float) -> float:
    """Total length of the iso-lines of `image` at `level`: the summed lengths of skimage's
    `find_contours(image, level)`, without assembling them into lines (which was most of its time).

    Every 2x2 square the level crosses gives one segment (two at a saddle) between the points where the
    level crosses its edges, linearly interpolated as find_contours does; a contour's length is the sum
    of its segments' (tests/core/test_features.py checks it against find_contours)."""
    a = image.astype(np.float64)
    ul, ur, ll, lr = a[:-1, :-1], a[:-1, 1:], a[1:, :-1], a[1:, 1:]
    case = (ul > level) * 1 + (ur > level) * 2 + (ll > level) * 4 + (lr > level) * 8
    crossed = (case != 0) & (case != 15)
    ul, ur, ll, lr, case = ul[crossed], ur[crossed], ll[crossed], lr[crossed], case[crossed]

    def fraction(start: np.ndarray, end: np.ndarray) -> np.ndarray:
        step = end - start
        flat = step == 0
        return np.where(flat, 0.0, (level - start) / np.where(flat, 1.0, step))

    # Crossing points in the square, (row, column) from its top-left corner: top (0, t), bottom (1, b),
    # left (l, 0), right (r, 1).
    t, b, l, r = fraction(ul, ur), fraction(ll, lr), fraction(ul, ll), fraction(ur, lr)
    lengths = {
        ("top", "left"): np.hypot(l, t),
        ("top", "right"): np.hypot(r, 1.0 - t),
        ("left", "right"): np.hypot(r - l, 1.0),
        ("left", "bottom"): np.hypot(1.0 - l, b),
        ("top", "bottom"): np.hypot(1.0, b - t),
        ("right", "bottom"): np.hypot(1.0 - r, 1.0 - b),
    }
    return float(sum(lengths[pair][_SEGMENT_OF_CASE[pair][case]].sum() for pair in _SEGMENT_CASES))


def _morphology(cell: np.ndarray, nucleus: np.ndarray, mpp: float) -> np.ndarray:
    area, perimeter, circ, solidity, ecc, diameter, major, minor = _shape(cell, mpp)
    n_area, _, n_circ, n_solidity, n_ecc, _, _, _ = _shape(nucleus, mpp)
    offset = 0.0
    if nucleus.any():
        # Nucleus centroid distance from the cell centroid, in cell radii: lymphocytes' and blasts' nuclei
        # sit off centre, segmented ones are spread around it.
        cy, cx = ndi.center_of_mass(cell)
        ny, nx = ndi.center_of_mass(nucleus)
        offset = float(np.hypot(cy - ny, cx - nx)) * mpp / max(diameter / 2, 1e-9)
    return np.array(
        [
            area,
            perimeter,
            circ,
            solidity,
            ecc,
            diameter,
            major,
            minor,
            n_area,
            n_area / area if area > 0 else 0.0,
            n_solidity,
            n_circ,
            n_ecc,
            _lobes(nucleus, mpp),
            _max_defect_um(nucleus, mpp),
            offset,
        ],
        np.float64,
    )


def _lobes(nucleus: np.ndarray, mpp: float) -> float:
    """Lobes of the nucleus: distance-transform peaks at least LOBE_PROMINENCE_UM high (0 without nucleus)."""
    if not nucleus.any():
        return 0.0
    ys, xs = np.nonzero(nucleus)
    # The padding makes the box's edge count as outside, like the rest of the nucleus' border.
    box = np.pad(nucleus[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1], 1).astype(np.uint8)
    distance = cv2.distanceTransform(box, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    peaks = h_maxima(distance, LOBE_PROMINENCE_UM / mpp)
    _, n = ndi.label(peaks, structure=np.ones((3, 3)))
    # A nucleus thinner than the prominence everywhere has no peak but is still one nucleus.
    return float(max(1, n))


def h_maxima(image: np.ndarray, h: float) -> np.ndarray:
    """skimage.morphology.h_maxima for a float image and the default 3x3 neighbourhood, pixel for pixel.

    The regional maxima at least `h` above the pass to any higher one: the image minus its reconstruction
    by dilation from itself lowered by h (Soille 2003, ch. 6), lowered by a little more to absorb rounding
    exactly as skimage does. The reconstruction runs as repeated 3x3 dilations clipped by the image until
    nothing changes (OpenCV, on a nucleus-sized box): the same result as skimage's, without its sorting
    of every pixel (tests/core/test_features.py checks them equal)."""
    if h > np.ptp(image):
        return np.zeros(image.shape, np.uint8)
    resolution = 2 * np.finfo(image.dtype).resolution * np.abs(image)
    ceiling = image.astype(np.float64)
    rebuilt = (image - h - resolution).astype(np.float64)
    square = np.ones((3, 3), np.uint8)
    while True:
        grown = cv2.dilate(rebuilt, square, borderType=cv2.BORDER_CONSTANT, borderValue=-np.inf)
        np.minimum(grown, ceiling, out=grown)
        if np.array_equal(grown, rebuilt):
            break
        rebuilt = grown
    return ((image - rebuilt) >= h).astype(np.uint8)


def _max_defect_um(nucleus: np.ndarray, mpp: float) -> float:
    """Depth of the nucleus' deepest indentation from its convex hull, in um (largest part only)."""
    contours, _ = cv2.findContours(nucleus.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return 0.0
    contour = max(contours, key=cv2.contourArea)
    if len(contour) < 4:
        return 0.0
    hull = cv2.convexHull(contour, returnPoints=False)
    try:
        defects = cv2.convexityDefects(contour, hull)
    except cv2.error:  # a self-touching contour makes the hull indices non-monotonic
        return 0.0
    # OpenCV 4 answers "no indentation" with None, OpenCV 5 with an empty array.
    if defects is None or len(defects) == 0:
        return 0.0
    # OpenCV gives the depth in fixed point with 8 fractional bits.
    return float(defects.reshape(-1, 4)[:, 3].max()) / 256.0 * mpp


def _colour(rgb: np.ndarray, cell: np.ndarray, nucleus: np.ndarray) -> np.ndarray:
    rgb01 = rgb.astype(np.float32) / 255.0
    hsv = cv2.cvtColor(rgb01, cv2.COLOR_RGB2HSV)  # H in degrees, S and V in 0..1
    # Rotate hue so that its 0/360 wrap falls on green, a colour no stained cell has: otherwise the pink-red
    # of eosin granules would straddle the wrap and average to cyan.
    hsv[..., 0] = (hsv[..., 0] - 120.0) % 360.0
    lab = cv2.cvtColor(rgb01, cv2.COLOR_RGB2Lab)  # L 0..100, a and b about -128..127
    channels = np.concatenate([rgb01 * 255.0, hsv, lab], axis=2)
    # Each channel's values sorted, (9, n): the nucleus' and the cytoplasm's on their own, the cell's by
    # merging the two (a stable sort of two sorted runs is a merge). Sorting once and reading the
    # percentiles off costs less than np.percentile's partitions for three overlapping regions.
    nucleus_values = np.sort(channels[nucleus].T, axis=1)
    cytoplasm_values = np.sort(channels[cell & ~nucleus].T, axis=1)
    cell_values = np.sort(np.concatenate([nucleus_values, cytoplasm_values], axis=1), axis=1, kind="stable")
    # Means and spreads of the parts, the cell's combined from theirs (Chan, Golub and LeVeque's pairwise
    # update: equal to numpy's two-pass std to rounding, and 0 for a cell of one colour).
    parts = [_moments(nucleus_values), _moments(cytoplasm_values)]
    (n_a, mean_a, m2_a), (n_b, mean_b, m2_b) = parts
    n = n_a + n_b
    if n_a == 0 or n_b == 0:
        whole = parts[0] if n_b == 0 else parts[1]
    else:
        delta = mean_b - mean_a
        whole = (n, mean_a + delta * (n_b / n), m2_a + m2_b + delta**2 * (n_a * n_b / n))
    out = []
    for values, (count, mean, m2) in zip(
        (cell_values, nucleus_values, cytoplasm_values), [whole, *parts], strict=True
    ):
        if count == 0:
            out.append(np.zeros(len(_CHANNELS) * len(_STATS)))
            continue
        std = np.sqrt(m2 / count)
        percentiles = sorted_percentiles(values, _PERCENTILES).T
        out.append(np.column_stack([mean, std, percentiles]).ravel())  # channel-major, as in FEATURE_NAMES
    return np.concatenate(out)


def _moments(values: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(n, mean, sum of squared deviations) of each row of a (rows, n) array, in float64."""
    count = values.shape[1]
    if count == 0:
        return 0, np.zeros(values.shape[0]), np.zeros(values.shape[0])
    mean = values.mean(1, dtype=np.float64)
    deviations = values - mean[:, None]
    return count, mean, np.einsum("ij,ij->i", deviations, deviations)


def sorted_percentiles(values: np.ndarray, percentiles: tuple[float, ...]) -> np.ndarray:
    """np.percentile(values, percentiles, axis=1) (linear method) of rows already sorted, bit for bit:
    (len(percentiles), rows) float64. `values` is (rows, n), n >= 1, sorted along each row."""
    n = values.shape[1]
    q = np.asarray(percentiles, np.float64) / 100
    virtual = (n - 1) * q  # numpy's virtual index for the linear method
    below = np.floor(virtual).astype(np.intp)
    gamma = virtual - below
    below = np.clip(below, 0, n - 1)
    above = np.clip(below + 1, 0, n - 1)
    a, b = values[:, below].T, values[:, above].T  # (len(percentiles), rows), the rows' dtype
    t = gamma[:, None]
    step = b - a
    # numpy's _lerp: from below for gamma < 0.5, from above otherwise (monotone and exact at both ends).
    return np.where(t >= 0.5, b - step * (1 - t), a + step * t)


def _glcm(levels: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """GLCM properties per distance, averaged over 4 angles; pairs with a pixel outside the cell dropped."""
    # Cell pixels get levels 1..32, the outside 0; removing row and column 0 of the matrix then removes
    # exactly the pairs that leave the cell.
    coded = np.where(cell, levels + 1, 0).astype(np.uint8)
    matrix = graycomatrix(
        coded, GLCM_DISTANCES_PX, _ANGLES, levels=TEXTURE_LEVELS + 1, symmetric=True, normed=False
    )[1:, 1:]
    pairs = matrix.sum(axis=(0, 1))  # (distances, angles)
    used = pairs > 0  # a cell thinner than the distance has no pairs at some angles
    out = np.zeros((len(GLCM_DISTANCES_PX), len(GLCM_PROPS)))
    if used.any():
        # Every used (distance, angle) matrix in one call, then each distance's mean over its angles.
        props = _glcm_props(matrix[:, :, used])  # (props, used matrices)
        which = np.nonzero(used)[0]  # the distance of each used matrix
        for d in np.unique(which):
            out[d] = props[:, which == d].mean(axis=1)
    return out.ravel()


def _glcm_props(matrices: np.ndarray) -> np.ndarray:
    """GLCM_PROPS of (L, L, A) co-occurrence counts: (len(GLCM_PROPS), A), as skimage's graycoprops.

    All six at once: graycoprops normalises the matrices again for every property, and that was most of
    the texture features' time.
    """
    p = matrices.astype(np.float64)
    p /= p.sum(axis=(0, 1), keepdims=True)  # every matrix has pairs (the caller keeps those only)
    levels = np.arange(p.shape[0], dtype=np.float64)
    i, j = levels[:, None, None], levels[None, :, None]
    contrast = np.sum(p * (i - j) ** 2, axis=(0, 1))
    dissimilarity = np.sum(p * np.abs(i - j), axis=(0, 1))
    homogeneity = np.sum(p * (1.0 / (1.0 + (i - j) ** 2)), axis=(0, 1))
    asm = np.sum(p**2, axis=(0, 1))
    diff_i = i - np.sum(i * p, axis=(0, 1))
    diff_j = j - np.sum(j * p, axis=(0, 1))
    std_i = np.sqrt(np.sum(p * diff_i**2, axis=(0, 1)))
    std_j = np.sqrt(np.sum(p * diff_j**2, axis=(0, 1)))
    cov = np.sum(p * (diff_i * diff_j), axis=(0, 1))
    flat = (std_i < 1e-15) | (std_j < 1e-15)  # one grey level: graycoprops calls that correlation 1
    correlation = np.ones_like(cov)
    correlation[~flat] = cov[~flat] / (std_i[~flat] * std_j[~flat])
    by_name = {
        "contrast": contrast,
        "dissimilarity": dissimilarity,
        "homogeneity": homogeneity,
        "energy": np.sqrt(asm),
        "correlation": correlation,
        "ASM": asm,
    }
    return np.stack([by_name[prop] for prop in GLCM_PROPS])


def _run_lengths(levels: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Grey-level run-length statistics (Galloway 1975), averaged over the 0, 45, 90 and 135 degree runs.

    A run is a maximal line of cell pixels with one grey level; the cell's edge ends a run. With runs of
    grey level i (1..32) and length j, Nr runs and Np cell pixels: short- and long-run emphasis
    SRE = mean(1/j^2), LRE = mean(j^2); grey-level and run-length non-uniformity GLN = sum_i(runs of
    level i)^2 / Nr, RLN = sum_j(runs of length j)^2 / Nr; run percentage RP = Nr / Np (M. M. Galloway,
    "Texture analysis using gray level run lengths", Computer Graphics and Image Processing 4:172-179,
    1975); low- and high-grey-level run emphasis LGRE = mean(1/i^2), HGRE = mean(i^2) (Chu, Sehgal and
    Greenleaf, Pattern Recognition Letters 11:415-419, 1990).
    """
    coded = np.where(cell, levels + 1, 0).astype(np.int32)
    n_pixels = int(cell.sum())
    if n_pixels == 0:
        return np.zeros(len(GLRLM_PROPS))
    per_direction = []
    for lines in (coded, coded.T, _diagonals(coded), _diagonals(coded[:, ::-1])):
        values, lengths = _runs(lines)
        i, j = values.astype(np.float64), lengths.astype(np.float64)
        nr = float(len(values))
        gln = float((np.bincount(values) ** 2).sum()) / nr
        rln = float((np.bincount(lengths) ** 2).sum()) / nr
        per_direction.append(
            [(1 / j**2).mean(), (j**2).mean(), gln, rln, nr / n_pixels, (1 / i**2).mean(), (i**2).mean()]
        )
    return np.mean(per_direction, axis=0)


def _diagonals(a: np.ndarray) -> np.ndarray:
    """The down-right diagonals of `a` as rows (padded with 0, which is outside the cell)."""
    h, w = a.shape
    sheared = np.zeros((h, h + w - 1), a.dtype)
    rows = np.arange(h)[:, None]
    sheared[rows, rows + np.arange(w)[None, :]] = a  # row y shifted right by y: diagonals become columns
    return sheared.T


def _runs(lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(grey level, length) of every run along the rows of `lines`, runs of 0 (outside) left out."""
    # A 0 column after each row stops runs from joining across rows.
    flat = np.pad(lines, ((0, 0), (0, 1))).ravel()
    starts = np.flatnonzero(np.diff(flat, prepend=-1))
    lengths = np.diff(np.append(starts, flat.size))
    values = flat[starts]
    inside = values > 0
    return values[inside], lengths[inside]
