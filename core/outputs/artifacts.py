"""A slide result as files: mask, nuclei, instances, overlay, cells.csv, cells.geojson, summary.json.

Rendered to bytes here; where the bytes go (a folder, the object store) is the caller's business.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Protocol

import cv2
import numpy as np
import tifffile
from skimage.segmentation import find_boundaries

from blastq.core.cells import (
    CELL_COLUMNS,
    LABEL_BLAST,
    VERDICT_FLAGGED,
    VERDICT_INSUFFICIENT,
    VERDICT_NOT_FLAGGED,
    CellGallery,
    CellMaps,
    CellRecord,
    SampleResult,
    SlideStats,
)
from blastq.core.common import BlastqError, timed
from blastq.core.outputs.pages import render_page


class ResultFields(Protocol):
    """What the files are made of: the fields core.pipeline's SlideResult and WholeSlideResult share. The
    outputs know a result by its fields, not by the pipeline that made it."""

    name: str
    sha256: str
    width: int
    height: int
    mpp: float
    mpp_source: str
    mpp_confidence: float | None
    model_version: str
    classifier_version: str
    params_key: str
    stats: SlideStats
    seconds: float
    tiles_total: int
    tiles_run: int
    blast_call: str


class FieldResult(ResultFields, Protocol):
    """A field's result (core.pipeline's SlideResult): the fields and the maps every file is drawn from."""

    maps: CellMaps
    gallery: CellGallery | None


ARTIFACT_NAMES = (
    "mask.png",
    "nuclei.png",
    "instances.tif",
    "overlay.png",
    "cells.csv",
    "cells.geojson",
    "summary.json",
    "report.html",
    "gallery.png",
    "gallery-labels.png",
    "gallery.json",
)
# Outline colours (RGB): blasts red, other white cells green; QuPath shows the same colours.
COLOUR_WHITE_CELL = (0, 200, 0)
COLOUR_BLAST = (230, 0, 0)


@dataclass(frozen=True)
class Artifact:
    name: str
    data: bytes
    content_type: str


def blastq_version() -> str:
    try:
        return version("blastq")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def png_bytes(arr: np.ndarray) -> bytes:
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise BlastqError("PNG encoding failed")
    return buf.tobytes()


def summary_dict(result: ResultFields) -> dict:
    """The summary.json fields (also the database row of a result)."""
    return {
        "image": result.name,
        "sha256": result.sha256,
        "width": result.width,
        "height": result.height,
        "mpp": result.mpp,
        "mpp_source": result.mpp_source,
        # 0..1 for an estimated scale (red cells measured, measures agreeing); null for a given one.
        "mpp_confidence": result.mpp_confidence,
        "model_version": result.model_version,
        "params_key": result.params_key,
        "white_cells": result.stats.white_cells,
        "blasts": result.stats.blasts,
        "blast_percent": result.stats.blast_percent,
        "flagged": result.stats.flagged,
        # "flagged", "not flagged", or "insufficient cells" (fewer white cells than min_white_cells).
        "verdict": result.stats.verdict,
        "threshold_percent": result.stats.threshold_percent,
        "min_white_cells": result.stats.min_white_cells,
        # Per type: count and percent of white cells; empty when no classifier ran.
        "differential": result.stats.differential,
        "review_cells": result.stats.review_cells,
        "classifier_version": result.classifier_version,
        "blast_call": result.blast_call,  # the rule that called blasts: the share's threshold or a caller
        "seconds": result.seconds,
        "tiles_total": result.tiles_total,
        "tiles_run": result.tiles_run,
        "blastq_version": blastq_version(),
    }


def overlay(rgb: np.ndarray, maps: CellMaps) -> np.ndarray:
    """The image with each cell's outline coloured by its label (HWC uint8 RGB)."""
    out = rgb.copy()
    edges = find_boundaries(maps.instances, mode="inner")
    # Thicken outlines on large images so they stay visible when the picture is shown scaled down.
    thick = max(1, round(max(rgb.shape[:2]) / 1500))
    if thick > 1:
        edges = cv2.dilate(edges.astype(np.uint8), np.ones((thick, thick), np.uint8)).astype(bool)
    edges &= maps.instances > 0
    out[edges & (maps.classes == 2)] = COLOUR_BLAST
    out[edges & (maps.classes == 1)] = COLOUR_WHITE_CELL
    return out


def cells_csv(maps: CellMaps) -> bytes:
    return cells_csv_bytes(maps.cells)


def cells_csv_bytes(cells: Sequence[CellRecord]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CELL_COLUMNS)
    for cell in cells:
        writer.writerow(asdict(cell).values())
    return buf.getvalue().encode()


def cells_geojson(maps: CellMaps) -> bytes:
    """Cells as polygons in input-pixel coordinates, in the GeoJSON flavour QuPath imports."""
    return geojson_bytes(maps.cells, [cell_ring(maps.instances, cell) for cell in maps.cells])


def cell_ring(instances: np.ndarray, cell: CellRecord) -> list[list[int]]:
    """The closed outline of one cell of an instance map, in its pixel coordinates."""
    crop = instances[cell.bbox_y0 : cell.bbox_y1, cell.bbox_x0 : cell.bbox_x1] == cell.cell_id
    contours, _ = cv2.findContours(crop.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    ring = []
    if contours:
        contour = max(contours, key=cv2.contourArea)[:, 0, :]
        ring = [[int(x) + cell.bbox_x0, int(y) + cell.bbox_y0] for x, y in contour]
    if len(ring) < 3:  # a one- or two-pixel-wide sliver: outline its bounding box
        x0, y0, x1, y1 = cell.bbox_x0, cell.bbox_y0, cell.bbox_x1, cell.bbox_y1
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
    ring.append(ring[0])
    return ring


def geojson_bytes(cells: Sequence[CellRecord], rings: Sequence[list]) -> bytes:
    """A FeatureCollection of cells with their outlines (closed rings), as QuPath imports detections."""
    features = []
    for cell, ring in zip(cells, rings, strict=True):
        is_blast = cell.label == LABEL_BLAST
        colour = COLOUR_BLAST if is_blast else COLOUR_WHITE_CELL
        props = asdict(cell)
        features.append(
            {
                "type": "Feature",
                "id": str(cell.cell_id),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": _class_name(cell), "color": list(colour)},
                    "measurements": {
                        k: v
                        for k, v in props.items()
                        if isinstance(v, int | float) and not isinstance(v, bool)
                    },
                    **props,
                },
            }
        )
    return json.dumps({"type": "FeatureCollection", "features": features}).encode()


def _class_name(cell) -> str:
    if cell.label == LABEL_BLAST:
        return "Blast"
    return cell.cell_type.capitalize() if cell.cell_type else "White cell"


REPORT_THUMB_PX = 1200  # longest side of the overlay picture embedded in report.html
REPORT_MAX_ROWS = 5000  # cell table rows in report.html (a whole slide has tens of thousands of cells)


def report_html(
    result: ResultFields | FieldResult, overlay_rgb: np.ndarray, cells: Sequence[CellRecord] | None = None
) -> bytes:
    """A self-contained page for a person: the figures, the overlay, and the cell table.

    `cells` defaults to the result's maps' cells (a whole slide's result has no maps); the table shows
    the first REPORT_MAX_ROWS of them, cells.csv has all."""
    cells = result.maps.cells if cells is None else cells  # type: ignore[union-attr]
    h, w = overlay_rgb.shape[:2]
    scale = min(1.0, REPORT_THUMB_PX / max(h, w))
    thumb = cv2.resize(
        overlay_rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
    )
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 88])
    picture = base64.b64encode(jpg.tobytes()).decode() if ok else ""
    summary = summary_dict(result)
    differential = summary.pop("differential")
    shown = cells[:REPORT_MAX_ROWS]
    return render_page(
        __package__,
        "report.html",
        name=result.name,
        picture=picture,
        differential=differential,
        review_cells=summary["review_cells"],
        facts=summary,
        columns=CELL_COLUMNS,
        rows=[list(asdict(c).values()) for c in shown],
        more=len(cells) if len(cells) > len(shown) else 0,
        **_verdict_context(result.stats),
    )


# Red for flagged, green for clear; grey for no verdict (too few cells), never green.
_VERDICT_COLOURS = {VERDICT_FLAGGED: "#b00", VERDICT_NOT_FLAGGED: "#080", VERDICT_INSUFFICIENT: "#555"}


def _verdict_context(s: SlideStats) -> dict:
    """What the pages' verdict line needs besides the figures: its colour, and whether there is one."""
    return {
        "stats": s,
        "verdict_colour": _VERDICT_COLOURS.get(s.verdict, "#555"),
        "insufficient": s.verdict == VERDICT_INSUFFICIENT,
    }


def sample_summary_dict(sample: SampleResult) -> dict:
    """A sample's summary.json: the pooled figures and verdict, then each image's own."""
    s = sample.stats
    return {
        "sample": sample.name,
        "images": len(sample.images),
        "pending": sample.pending,
        "failed": sample.failed,
        "white_cells": s.white_cells,
        "blasts": s.blasts,
        "blast_percent": s.blast_percent,
        "flagged": s.flagged,
        "verdict": s.verdict,
        "threshold_percent": s.threshold_percent,
        "min_white_cells": s.min_white_cells,
        "differential": s.differential,
        "review_cells": s.review_cells,
        "members": [
            {
                "image": i.image,
                "sha256": i.sha256,
                "result_id": i.result_id,
                "white_cells": i.stats.white_cells,
                "blasts": i.stats.blasts,
                "blast_percent": i.stats.blast_percent,
                "verdict": i.stats.verdict,
            }
            for i in sample.images
        ],
        "blastq_version": blastq_version(),
    }


def sample_report_html(sample: SampleResult) -> bytes:
    """A page for a person: the sample's pooled verdict and differential, and each image's figures."""
    return render_page(__package__, "sample_report.html", sample=sample, **_verdict_context(sample.stats))


def sample_artifacts(sample: SampleResult) -> list[Artifact]:
    """A sample's files: summary.json and report.html."""
    return [
        Artifact(
            "summary.json", json.dumps(sample_summary_dict(sample), indent=2).encode(), "application/json"
        ),
        Artifact("report.html", sample_report_html(sample), "text/html"),
    ]


@timed("artifacts")
def render_artifacts(result: FieldResult, rgb: np.ndarray) -> list[Artifact]:
    """All output files of one slide, in ARTIFACT_NAMES order."""
    maps = result.maps
    tif = io.BytesIO()
    tifffile.imwrite(tif, maps.instances.astype(np.uint32), compression="zlib")
    outlined = overlay(rgb, maps)
    return [
        Artifact("mask.png", png_bytes(maps.classes), "image/png"),
        Artifact("nuclei.png", png_bytes(np.where(maps.nuclei, 255, 0).astype(np.uint8)), "image/png"),
        Artifact("instances.tif", tif.getvalue(), "image/tiff"),
        Artifact("overlay.png", png_bytes(outlined), "image/png"),
        Artifact("cells.csv", cells_csv(maps), "text/csv"),
        Artifact("cells.geojson", cells_geojson(maps), "application/geo+json"),
        Artifact("summary.json", json.dumps(summary_dict(result), indent=2).encode(), "application/json"),
        Artifact("report.html", report_html(result, outlined), "text/html"),
        *gallery_artifacts(result.gallery),
    ]


def read_gallery(store, prefix: str) -> CellGallery | None:
    """The gallery a result keeps under `prefix` in an object store (what gallery_artifacts wrote); None
    when it has none (recorded before galleries) or its files do not read as one."""
    try:
        index = json.loads(store.get(f"{prefix}/gallery.json"))
        sheet = store.get(f"{prefix}/gallery.png")
        labels_png = store.get(f"{prefix}/gallery-labels.png")
    except FileNotFoundError:
        return None
    except ValueError:  # not JSON
        return None
    rgb = cv2.imdecode(np.frombuffer(sheet, np.uint8), cv2.IMREAD_COLOR)
    labels = cv2.imdecode(np.frombuffer(labels_png, np.uint8), cv2.IMREAD_UNCHANGED)
    if rgb is None or labels is None or labels.shape != rgb.shape[:2] or not isinstance(index, dict):
        return None
    try:
        ids = tuple(int(i) for i in index["cell_ids"])
        px, mpp = int(index["px"]), float(index["mpp"])
    except (KeyError, TypeError, ValueError):
        return None
    return CellGallery(np.ascontiguousarray(rgb[..., ::-1]), labels, ids, px, mpp)


def gallery_artifacts(gallery) -> list[Artifact]:
    """The gallery sheets and their index (core.cells.gallery); none for a result without one."""
    if gallery is None:
        return []
    return [
        Artifact("gallery.png", png_bytes(gallery.rgb), "image/png"),
        Artifact("gallery-labels.png", png_bytes(gallery.labels), "image/png"),
        Artifact("gallery.json", json.dumps(gallery.index()).encode(), "application/json"),
    ]
