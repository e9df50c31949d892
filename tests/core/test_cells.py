from __future__ import annotations

import numpy as np
import pytest

from blastq.core.cells.instances import extract_cells, split_instances


def disc(shape, cy, cx, r):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def probs_for(cells, shape=(200, 300), marker_r=8):
    """Probability maps for discs given as (cy, cx, r, blast_share, nucleus_r)."""
    p = np.zeros((5, *shape), np.float32)
    p[0] = 1
    for cy, cx, r, blast, nuc_r in cells:
        m = disc(shape, cy, cx, r)
        p[0][m], p[1][m], p[2][m] = 0.02, 0.98 * (1 - blast), 0.98 * blast
        p[3][disc(shape, cy, cx, nuc_r)] = 0.95
        p[4][disc(shape, cy, cx, marker_r)] = 0.95
    return p


def test_touching_cells_are_split_at_their_markers():
    p = probs_for([(100, 100, 30, 0, 15), (100, 155, 30, 0, 15)])
    inst = split_instances(p[1] + p[2] > p[0], p[4], mpp=0.2)
    assert inst.max() == 2
    assert inst[100, 90] != inst[100, 165]
    # the cut runs near the neck, midway between the centres
    assert inst[100, 120] == inst[100, 100] and inst[100, 135] == inst[100, 155]


def test_a_blob_without_marker_still_becomes_a_cell():
    p = probs_for([(100, 100, 30, 0, 15)])
    p[4] = 0
    inst = split_instances(p[1] + p[2] > p[0], p[4], mpp=0.2)
    assert inst.max() == 1


def test_an_object_without_a_nucleus_is_no_white_cell_and_the_ids_stay_consecutive():
    # A cell, then a red-cell-like blob with no nucleus, then a cell with a small (lymphocyte-sized) one.
    p = probs_for([(60, 60, 30, 0, 15), (60, 160, 30, 0, 0), (150, 240, 30, 0, 8)])
    maps = extract_cells(p, np.full((200, 300, 3), 200, np.uint8), mpp=0.2)
    assert len(maps.cells) == 2 and maps.instances.max() == 2
    assert [c.cell_id for c in maps.cells] == [1, 2]
    assert maps.instances[60, 160] == 0 and maps.classes[60, 160] == 0
    assert maps.instances[60, 60] == 1 and maps.instances[150, 240] == 2


def test_the_screening_threshold_calls_a_doubtful_blast_and_marks_it_for_review():
    rgb = np.full((200, 300, 3), 200, np.uint8)
    p = probs_for([(60, 60, 30, 0.3, 15), (140, 200, 30, 0.9, 15), (60, 240, 30, 0.02, 15)])
    even = extract_cells(p, rgb, mpp=0.2)
    # Ids in raster order of the markers: (60, 60), (60, 240), (140, 200).
    assert [c.label for c in even.cells] == ["white_cell", "white_cell", "blast"]
    assert not any(c.review for c in even.cells)
    screening = extract_cells(p, rgb, mpp=0.2, blast_threshold=0.2)
    assert [c.label for c in screening.cells] == ["blast", "white_cell", "blast"]
    doubtful, normal, confident = screening.cells
    assert doubtful.review and "screening threshold (blast share 0.30)" in doubtful.review_reason
    assert not confident.review and not normal.review
    assert screening.classes[60, 60] == 2


def test_the_blast_cell_threshold_reaches_the_pipeline_from_the_settings(monkeypatch):
    from blastq.core.adapters.settings import load_settings
    from blastq.core.pipeline.field import pipeline_config

    monkeypatch.setenv("BLASTQ_BLAST_CELL_THRESHOLD", "0.15")
    assert pipeline_config(load_settings()).blast_cell_threshold == 0.15


def test_a_cell_with_a_small_nucleus_is_kept():
    # A nucleus of 6% of the cell (a thin lymphocyte cut, a neutrophil's lobe in view) is still one.
    p = probs_for([(100, 150, 40, 0, 10)])
    assert len(extract_cells(p, np.full((200, 300, 3), 200, np.uint8), mpp=0.2).cells) == 1


def test_specks_smaller_than_a_cell_are_dropped():
    p = probs_for([(100, 100, 30, 0, 15), (20, 250, 3, 0, 1)])
    maps = extract_cells(p, np.full((200, 300, 3), 200, np.uint8), mpp=0.2)
    assert len(maps.cells) == 1 and maps.instances[20, 250] == 0


def test_cell_label_comes_from_its_pixels_and_paints_the_class_map():
    p = probs_for([(100, 60, 30, 0.9, 20), (100, 200, 30, 0.1, 12)])
    maps = extract_cells(p, np.full((200, 300, 3), 200, np.uint8), mpp=0.2)
    by_x = sorted(maps.cells, key=lambda c: c.centroid_x)
    assert [c.label for c in by_x] == ["blast", "white_cell"]
    assert by_x[0].blast_probability == pytest.approx(0.9, abs=0.01)
    assert maps.classes[100, 60] == 2 and maps.classes[100, 200] == 1 and maps.classes[5, 5] == 0
    assert set(np.unique(maps.instances[maps.classes > 0])) == {1, 2}


def test_measurements_are_in_microns_and_consistent():
    p = probs_for([(100, 150, 30, 0, 15)])
    rgb = np.zeros((200, 300, 3), np.uint8)
    rgb[..., 2] = 180
    (cell,) = extract_cells(p, rgb, mpp=0.25).cells
    assert cell.area_px == disc((200, 300), 100, 150, 30).sum()
    assert cell.area_um2 == pytest.approx(cell.area_px * 0.0625, rel=1e-3)
    assert cell.nc_ratio == pytest.approx((15 / 30) ** 2, abs=0.03)
    assert 0.85 < cell.circularity <= 1.0
    assert (cell.bbox_x0, cell.bbox_y0, cell.bbox_x1, cell.bbox_y1) == (120, 70, 181, 131)
    assert (cell.centroid_x, cell.centroid_y) == pytest.approx((150, 100), abs=0.1)
    assert cell.mean_b == pytest.approx(180) and cell.mean_r == 0


def test_no_foreground_gives_no_cells():
    p = np.zeros((5, 50, 50), np.float32)
    p[0] = 1
    maps = extract_cells(p, np.zeros((50, 50, 3), np.uint8), mpp=0.2)
    assert maps.cells == () and maps.instances.max() == 0 and maps.classes.max() == 0


# --- the blob-by-blob split against the whole-image one it replaced ---------------------------------


def whole_image_split(foreground, marker_prob, mpp, marker_threshold=0.5):
    """split_instances as it was: every step over the whole image (the reference for the blob-wise one)."""
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    from blastq.core.cells.instances import MIN_CELL_AREA_UM2, MIN_MARKER_AREA_UM2

    def drop_small(labels, min_px):
        small = np.bincount(labels.ravel()) < min_px
        small[0] = False
        return np.where(small[labels], 0, labels)

    px_per_um2 = 1.0 / (mpp * mpp)
    seeds, _ = ndi.label((marker_prob > marker_threshold) & foreground)
    seeds = drop_small(seeds, MIN_MARKER_AREA_UM2 * px_per_um2)
    blobs, n_blobs = ndi.label(foreground)
    if n_blobs == 0:
        return np.zeros(foreground.shape, np.int32)
    seeded = np.zeros(n_blobs + 1, bool)
    seeded[np.unique(blobs[seeds > 0])] = True
    unseeded = ~seeded[blobs] & foreground
    seeds = np.where(unseeded, blobs + int(seeds.max()), seeds)
    labels = watershed(-ndi.distance_transform_edt(foreground), seeds, mask=foreground)
    labels = drop_small(labels, MIN_CELL_AREA_UM2 * px_per_um2)
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max()) + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[labels]


def probs_from_truth(field, rng):
    """Probability maps from a synthetic field's truth: markers are the cells' cores, some missing, plus specks."""
    from scipy import ndimage as ndi

    inst = field.instances
    shape = inst.shape
    p = np.zeros((5, *shape), np.float32)
    cells = inst > 0
    p[0] = np.where(cells, 0.1, 0.9)
    p[1] = np.where(cells, 0.9, 0.05)
    p[3] = field.nuclei * 0.9
    # The core of each cell, away from its own edge and from its neighbours.
    alone = (ndi.grey_erosion(inst, size=3) == ndi.grey_dilation(inst, size=3)) & cells
    core = ndi.distance_transform_edt(alone) > 6
    missed = rng.random(int(inst.max()) + 1) < 0.25  # cells the marker head missed
    p[4] = core & ~missed[inst]
    specks = rng.random(shape) < 2e-4  # single-pixel foreground and marker specks
    p[1][specks], p[0][specks], p[4][np.roll(specks, 7)] = 0.9, 0.1, 0.9
    return p


def same_cells(a, b):
    return len(a.cells) == len(b.cells) and all(x == y for x, y in zip(a.cells, b.cells, strict=True))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_blob_wise_split_matches_the_whole_image_split_on_a_smear(seed, monkeypatch):
    from blastq.core.cells import instances as cells_module
    from blastq.core.synth.field import generate_field

    field = generate_field(seed, 512, 512, mpp=0.2, wbc_per_10k_um2=25.0, touching_fraction=0.7)
    p = probs_from_truth(field, np.random.default_rng(seed))
    foreground = p[1] + p[2] > p[0]
    got = split_instances(foreground, p[4], mpp=0.2)
    want = whole_image_split(foreground, p[4], mpp=0.2)
    assert want.max() > 10
    assert got.dtype == np.int32 and np.array_equal(got, want)  # same ids too, not only the same cells
    maps = extract_cells(p, field.image, mpp=0.2)
    monkeypatch.setattr(cells_module, "split_instances", whole_image_split)
    reference = extract_cells(p, field.image, mpp=0.2)
    assert np.array_equal(maps.instances, reference.instances) and same_cells(maps, reference)


def test_blob_wise_split_matches_the_whole_image_split_on_touching_discs_but_for_ties():
    """Equal discs on whole pixels: many equally deep marker pixels, where watershed ties decide the cut.

    One watershed per blob (only blobs with several markers need one) breaks ties by that blob alone."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        cells = []
        for _ in range(int(rng.integers(2, 8))):
            cy, cx = int(rng.integers(0, 200)), int(rng.integers(0, 300))
            r = int(rng.choice([22, 22, int(rng.integers(6, 30))]))
            cells.append((cy, cx, r, 0.0, r // 2))
        for cy, cx in ((60, 40), (140, 200)):  # pairs touching edge to edge, one of them on the border
            cells += [(cy, cx, 22, 0.0, 10), (cy, cx + 40, 22, 0.0, 10)]
        p = probs_for(cells, marker_r=int(rng.integers(3, 9)))
        p[4][rng.random(p[4].shape) < 0.3] *= rng.random() < 0.5  # ragged markers, sometimes
        foreground = p[1] + p[2] > p[0]
        for mpp in (0.2, 0.4):
            got, want = split_instances(foreground, p[4], mpp), whole_image_split(foreground, p[4], mpp)
            assert got.max() == want.max()  # the same cells, in the same order
            for i in range(1, want.max() + 1):  # a tie between equally deep pixels moves a few
                assert ((got == i) & (want == i)).sum() >= 0.95 * ((got == i) | (want == i)).sum()


def test_a_blobs_split_depends_on_that_blob_alone():
    """Two touching cells split alike whatever else is in the image (whole-slide windows rely on it)."""
    pair = [(100, 100, 22, 0.0, 10), (100, 140, 22, 0.0, 10)]
    others = [(40, 250, 25, 0.0, 12), (170, 240, 20, 0.0, 9), (30, 30, 15, 0.0, 7)]
    alone, crowded = probs_for(pair), probs_for(pair + others)
    split_alone = split_instances(alone[1] + alone[2] > alone[0], alone[4], 0.2)
    split_crowded = split_instances(crowded[1] + crowded[2] > crowded[0], crowded[4], 0.2)
    box = (slice(60, 140), slice(60, 180))
    assert split_alone.max() == 2 and split_crowded.max() == 5
    ids = np.unique(split_crowded[box][split_alone[box] > 0])
    assert len(ids) == 2  # the pair's cells, under their numbers in the crowded image
    lut = np.zeros(6, np.int32)
    lut[ids] = [1, 2]
    assert np.array_equal(lut[split_crowded[box]], split_alone[box])


def test_cells_touching_the_image_edge_are_measured_as_before(monkeypatch):
    from blastq.core.cells import instances as cells_module

    p = probs_for(
        [(0, 0, 30, 0.5, 15), (199, 150, 30, 0.2, 12), (100, 299, 25, 0.9, 10), (100, 250, 25, 0, 10)]
    )
    rgb = np.random.default_rng(1).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    maps = extract_cells(p, rgb, mpp=0.2)
    monkeypatch.setattr(cells_module, "split_instances", whole_image_split)
    assert len(maps.cells) == 4 and same_cells(maps, extract_cells(p, rgb, mpp=0.2))


def test_a_cell_whose_outline_fails_is_kept_for_review_and_the_others_are_measured(monkeypatch):
    from blastq.core.cells import instances as cells_module

    p = probs_for([(100, 60, 30, 0.9, 20), (100, 200, 30, 0.1, 12)])
    rgb = np.full((200, 300, 3), 200, np.uint8)
    before = extract_cells(p, rgb, mpp=0.2).cells
    real = cells_module._outline

    def fails_for_cell_2(region):
        if region.label == 2:
            raise ValueError("a degenerate outline\nover two lines")
        return real(region)

    monkeypatch.setattr(cells_module, "_outline", fails_for_cell_2)
    first, second = extract_cells(p, rgb, mpp=0.2).cells
    assert first == before[0] and not first.review
    assert second.review and second.review_reason == (
        "measurement failed: ValueError: a degenerate outline over two lines"
    )
    # What the pixels give alone is still there; only the outline's measures are missing.
    old = before[1]
    for name in (
        "cell_id",
        "label",
        "area_px",
        "area_um2",
        "nucleus_area_px",
        "nc_ratio",
        "blast_probability",
    ):
        assert getattr(second, name) == getattr(old, name)
    assert (second.bbox_x0, second.bbox_y0, second.bbox_x1, second.bbox_y1) == (
        old.bbox_x0,
        old.bbox_y0,
        old.bbox_x1,
        old.bbox_y1,
    )
    assert second.centroid_x == pytest.approx(old.centroid_x, abs=0.01)
    assert second.centroid_y == pytest.approx(old.centroid_y, abs=0.01)
    assert second.perimeter_um == 0 and second.circularity == 0


def test_a_failure_reason_is_one_bounded_line():
    from blastq.core.cells.instances import failure_reason

    reason = failure_reason("features", RuntimeError("OpenCV(5.1.0) error:\n" + "x" * 500))
    assert reason.startswith("features failed: RuntimeError: OpenCV(5.1.0) error: xxx")
    assert "\n" not in reason and len(reason) <= len("features failed: ") + 200


def test_the_review_reason_is_a_column_of_cells_csv_and_a_geojson_property():
    import csv
    import io
    import json
    from dataclasses import replace

    from blastq.core.outputs.artifacts import cells_csv_bytes, geojson_bytes

    p = probs_for([(100, 60, 30, 0.9, 20), (100, 200, 30, 0.1, 12)])
    first, second = extract_cells(p, np.full((200, 300, 3), 200, np.uint8), mpp=0.2).cells
    reason = "features failed: ValueError: zero-size array"
    cells = (first, replace(second, review=True, review_reason=reason))
    rows = list(csv.DictReader(io.StringIO(cells_csv_bytes(cells).decode())))
    assert [r["review_reason"] for r in rows] == ["", reason]
    ring = [[0, 0], [1, 0], [1, 1], [0, 0]]
    features = json.loads(geojson_bytes(cells, [ring, ring]))["features"]
    assert [f["properties"]["review_reason"] for f in features] == ["", reason]
