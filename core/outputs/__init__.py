"""outputs: a result -> the files a person or program reads.

artifacts (masks, overlay, cells.csv/geojson, summary.json, report.html of a field, a whole slide or a
sample) and tiffout (big label maps as tiled pyramidal TIFF in bounded memory).
"""

from blastq.core import room_api

__all__, __getattr__, __dir__, _PUBLIC = room_api(
    __name__,
    {
        "artifacts": (
            "ARTIFACT_NAMES",
            "Artifact",
            "COLOUR_BLAST",
            "COLOUR_WHITE_CELL",
            "blastq_version",
            "cells_csv_bytes",
            "gallery_artifacts",
            "geojson_bytes",
            "overlay",
            "png_bytes",
            "read_gallery",
            "render_artifacts",
            "report_html",
            "sample_artifacts",
            "sample_summary_dict",
            "summary_dict",
        ),
        "pages": ("render_page",),
        "tiffout": ("PyramidTiffSink", "write_levels"),
    },
)
