from __future__ import annotations

import csv
import dataclasses
import io
import json

import cv2
import numpy as np
import pytest
import tifffile

from blastq.core.cells.instances import CELL_COLUMNS
from blastq.core.cells.stats import SampleImage, sample_result, slide_stats
from blastq.core.image.slide import Slide
from blastq.core.outputs.artifacts import ARTIFACT_NAMES, render_artifacts, report_html, sample_artifacts
from blastq.core.pipeline.field import process_slide


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


def test_summary_and_report_give_the_verdict_and_no_verdict_on_too_few_cells(rendered, smear):
    result, files = rendered
    summary = json.loads(files["summary.json"])
    assert summary["verdict"] == result.stats.verdict and summary["min_white_cells"] == 100
    few = dataclasses.replace(
        result, stats=slide_stats(result.maps.cells[:3], min_white_cells=100)
    )  # a crop of three cells: "100% blasts FLAGGED" before
    page = report_html(few, smear.image).decode()
    assert "insufficient cells (3 &lt; 100)" in page and "% blasts" not in page
    assert "#080" not in page  # not the green of a clear slide
    assert (
        json.loads(dict((a.name, a.data) for a in render_artifacts(few, smear.image))["summary.json"])[
            "verdict"
        ]
        == "insufficient cells"
    )


def test_a_samples_summary_and_report_pool_its_images():
    from blastq.core.cells.instances import CellRecord

    cell = CellRecord(1, "white_cell", 0, 0, 0, 0, 1, 1, 1, 0.04, 0.8, 1.0, 1, 0.04, 1.0, 0, 0, 0, 0.1)
    blast = dataclasses.replace(cell, label="blast")
    images = [
        SampleImage("a.png", "a" * 64, slide_stats([cell] * 45 + [blast] * 15), 1),
        SampleImage("b <1>.png", "b" * 64, slide_stats([cell] * 30 + [blast] * 10), 2),
    ]
    sample = sample_result("P<7>", images, pending=1)
    files = {a.name: a.data for a in sample_artifacts(sample)}
    summary = json.loads(files["summary.json"])
    assert (summary["sample"], summary["images"], summary["pending"]) == ("P<7>", 2, 1)
    assert (summary["white_cells"], summary["blasts"], summary["blast_percent"]) == (100, 25, 25.0)
    assert (
        summary["verdict"] == "flagged"
        and [m["verdict"] for m in summary["members"]] == ["insufficient cells"] * 2
    )
    page = files["report.html"].decode()
    assert "Sample P&lt;7&gt;" in page and "b &lt;1&gt;.png" in page and "1 image(s) still pending" in page
