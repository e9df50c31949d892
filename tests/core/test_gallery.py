"""The cell gallery: one square per cell, read back as the crop the classifiers see."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from blastq.core.cells import (
    CROP_MPP,
    blank_outside,
    build_gallery,
    crops_from_instances,
    gallery_crop,
    load_cell_classifier,
    normalise_crop,
)
from blastq.core.cells.gallery import GALLERY_COLUMNS, MAX_GALLERY_CELLS
from blastq.core.synth.field import generate_field


@pytest.fixture(scope="module")
def field():
    return generate_field(21, 384, 512, wbc_per_10k_um2=12.0, blast_fraction=0.4)


def test_each_cell_has_its_square_with_its_masks(field):
    ids = [c.cell_id for c in field.cells]
    gallery = build_gallery(field.instances, field.nuclei, ids, field.image, 0.2)
    assert gallery.cell_ids == tuple(ids)
    rows = -(-len(ids) // GALLERY_COLUMNS)
    assert gallery.rgb.shape == (rows * 128, GALLERY_COLUMNS * 128, 3)
    raw = crops_from_instances(field.image, field.instances, field.nuclei, 0.2, ids)
    for index, crop in enumerate(raw):
        expected = normalise_crop(crop, blank=False)
        got = gallery_crop(gallery.rgb, gallery.labels, index)
        assert np.array_equal(got.rgb, expected.rgb)
        assert np.array_equal(got.cell, expected.cell) and np.array_equal(got.nucleus, expected.nucleus)
        assert got.mpp == CROP_MPP


def test_a_gallery_square_blanked_is_the_crop_the_classifiers_saw(field):
    """Learning from reviews reads crops from the gallery: they must be what typing the cell used."""
    ids = [c.cell_id for c in field.cells]
    gallery = build_gallery(field.instances, field.nuclei, ids, field.image, 0.2)
    raw = crops_from_instances(field.image, field.instances, field.nuclei, 0.2, ids)
    seen = [normalise_crop(c) for c in raw]
    read = [blank_outside(gallery_crop(gallery.rgb, gallery.labels, i)) for i in range(len(ids))]
    same = [np.array_equal(a.rgb, b.rgb) for a, b in zip(seen, read, strict=True)]
    assert sum(same) >= len(same) - 1  # only a cell cut at the window's edge may differ
    classifier = load_cell_classifier("default")
    np.testing.assert_allclose(classifier.predict_proba(read), classifier.predict_proba(seen), atol=0.02)


def test_a_cell_that_cannot_be_cropped_keeps_a_blank_square_and_the_others_are_drawn(field):
    ids = [c.cell_id for c in field.cells]
    gallery = build_gallery(field.instances, field.nuclei, [*ids, 10_000], field.image, 0.2)
    last = gallery_crop(gallery.rgb, gallery.labels, len(ids))
    assert not last.cell.any() and (last.rgb == 255).all()
    assert gallery_crop(gallery.rgb, gallery.labels, 0).cell.any()
    with pytest.raises(IndexError):
        gallery_crop(gallery.rgb, gallery.labels, 10 * GALLERY_COLUMNS * 128)


def test_the_gallery_stops_at_its_limit():
    instances = np.zeros((8, 8), np.int32)
    ids = range(1, MAX_GALLERY_CELLS + 50)
    gallery = build_gallery(instances, np.zeros((8, 8), bool), ids, np.full((8, 8, 3), 200, np.uint8), 0.2)
    assert len(gallery.cell_ids) == MAX_GALLERY_CELLS


def test_a_field_result_writes_its_gallery_with_an_index(shipped_engine, smear):
    from blastq.core.image import Slide
    from blastq.core.outputs import render_artifacts
    from blastq.core.pipeline import process_slide

    engine, info = shipped_engine
    slide = Slide(smear.image, 0.2, "user", "s.png", "0" * 64)
    result = process_slide(slide, engine, info)
    files = {a.name: a.data for a in render_artifacts(result, smear.image)}
    index = json.loads(files["gallery.json"])
    assert index["cell_ids"] == [c.cell_id for c in result.maps.cells] and index["px"] == 128
    sheet = cv2.imdecode(np.frombuffer(files["gallery.png"], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    labels = cv2.imdecode(np.frombuffer(files["gallery-labels.png"], np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(sheet, result.gallery.rgb) and np.array_equal(labels, result.gallery.labels)
    assert all(gallery_crop(sheet, labels, i).cell.any() for i in range(len(index["cell_ids"])))
