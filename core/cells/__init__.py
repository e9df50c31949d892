"""cells: probability maps -> white cells, their types, and the figures a slide or sample is judged by.

instances (touching cells split, per-cell measurements) -> cellcrops (one cell cut out at a fixed scale)
-> features / cellnets / classify (which white-cell type) and blastcall (is it a blast) -> stats (counts,
blast percentage, differential, verdicts of one image or a pooled sample).
"""

from blastq.core import room_api

__all__, __getattr__, __dir__, _PUBLIC = room_api(
    __name__,
    {
        "blastcall": (
            "BlastCaller",
            "call_rule",
            "caller_setting",
            "features_of",
            "write_caller",
        ),
        "cellcrops": (
            "CELL_TYPES",
            "CROP_MPP",
            "CellCrop",
            "blank_outside",
            "crops_from_instances",
            "crops_to_array",
            "normalise_crop",
        ),
        "cellnets": (
            "CropCNN",
            "EncoderFeatures",
        ),
        "classify": (
            "CellClassifier",
            "ClassifierInfo",
            "default_classifier_path",
            "load_cell_classifier",
            "save_classifier",
            "type_cells",
        ),
        "features": ("features_matrix",),
        "gallery": ("CellGallery", "GalleryBuilder", "WSI_GALLERY_CELLS", "build_gallery", "gallery_crop"),
        "instances": (
            "CELL_COLUMNS",
            "CellMaps",
            "CellRecord",
            "DEFAULT_BLAST_CELL_THRESHOLD",
            "LABEL_BLAST",
            "extract_cells",
        ),
        "stats": (
            "DEFAULT_BLAST_THRESHOLD_PERCENT",
            "DEFAULT_MIN_WHITE_CELLS",
            "SampleImage",
            "SampleResult",
            "SlideStats",
            "VERDICT_FLAGGED",
            "VERDICT_INSUFFICIENT",
            "VERDICT_NOT_FLAGGED",
            "NOT_COUNTED",
            "REVIEW_CLASSES",
            "SAMPLE_NAME_CHARS",
            "analyser_class",
            "check_sample_name",
            "class_stats",
            "sample_result",
            "slide_stats",
        ),
    },
)
