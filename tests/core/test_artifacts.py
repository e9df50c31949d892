from __future__ import annotations

import csv
import io
import json

import cv2
import numpy as np
import pytest
import tifffile

from blastq.core.artifacts import ARTIFACT_NAMES, render_artifacts
from blastq.core.cells import CELL_COLUMNS
from blastq.core.pipeline import process_slide
from blastq.core.slide import Slide


@pytest.fixture(scope="module")
def rendered(shipped_engine, smear):
    engine, info = shipped_engine
    slide = Slide(smear.image, 0.2, "user", "smear.png", "ab" * 32)
    result = process_slide(slide, engine, info)
    return result, {a.name: a.data for a in render_artifacts(result, smear.image)}


def test_every_output_file_is_rendered(rendered):
    _, files = rendered
    assert tuple(files) == ARTIFACT_NAMES


def test_mask_and_nuclei_are_input_sized_with_the_documented_values(rendered, smear):
    _, files = rendered
    mask = cv2.imdecode(np.frombuffer(files["mask.png"], np.uint8), cv2.IMREAD_UNCHANGED)
    nuclei = cv2.imdecode(np.frombuffer(files["nuclei.png"], np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == nuclei.shape == smear.image.shape[:2] and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1, 2} and set(np.unique(nuclei)) <= {0, 255}
    assert not (nuclei.astype(bool) & (mask == 0)).any()


def test_instance_ids_are_the_cell_ids_of_the_table(rendered):
    result, files = rendered
    instances = tifffile.imread(io.BytesIO(files["instances.tif"]))
    rows = list(csv.DictReader(io.StringIO(files["cells.csv"].decode())))
    assert instances.dtype == np.uint32
    assert tuple(rows[0].keys()) == CELL_COLUMNS
    assert {int(r["cell_id"]) for r in rows} == set(np.unique(instances[instances > 0]).tolist())
    for r in rows:
        ys, xs = np.nonzero(instances == int(r["cell_id"]))
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(
            int(r[k]) for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")
        )
        assert int(r["area_px"]) == len(xs) and r["label"] in ("white_cell", "blast")


def test_geojson_has_one_closed_polygon_per_cell(rendered):
    result, files = rendered
    gj = json.loads(files["cells.geojson"])
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(result.maps.cells)
    for f in gj["features"]:
        ring = f["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) >= 4
        assert f["properties"]["classification"]["name"] in ("Blast", "White cell")


def test_summary_states_the_counts_and_provenance(rendered):
    result, files = rendered
    s = json.loads(files["summary.json"])
    for key in (
        "image",
        "sha256",
        "width",
        "height",
        "mpp",
        "mpp_source",
        "model_version",
        "white_cells",
        "blasts",
        "blast_percent",
        "flagged",
        "seconds",
    ):
        assert key in s
    assert (
        s["white_cells"] == len(result.maps.cells) and s["sha256"] == "ab" * 32 and s["mpp_source"] == "user"
    )


def test_overlay_outlines_cells_in_label_colours(rendered, smear):
    result, files = rendered
    ov = cv2.cvtColor(
        cv2.imdecode(np.frombuffer(files["overlay.png"], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
    )
    changed = (ov != smear.image).any(axis=2)
    assert changed.any() == bool(result.maps.cells)
    assert not changed[result.maps.instances == 0].any()


def test_report_page_states_the_verdict_and_lists_every_cell(rendered):
    result, files = rendered
    page = files["report.html"].decode()
    assert page.startswith("<!doctype html>") and "data:image/jpeg;base64," in page
    assert f"{result.stats.white_cells} white cells, {result.stats.blasts} blasts" in page
    summary = json.loads(files["summary.json"])
    differential = summary.pop("differential")  # its own table, one row per type plus a header
    expected = len(result.maps.cells) + 1 + len(summary) + (len(differential) + 1 if differential else 0)
    assert page.count("<tr>") == expected
