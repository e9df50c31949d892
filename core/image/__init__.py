"""image: a file -> checked 8-bit RGB pixels at a known pixel size.

inputs (which files a command was given, checked before any work) -> slide (decode a photo, refuse what
is not a smear) or wsi (whole slides read region by region) -> scale (the pixel size measured on red cells
when no file states it) -> preprocessing (flat-field, stain normalisation, CLAHE, resampling).
"""

from blastq.core import room_api

__all__, __getattr__, __dir__, _PUBLIC = room_api(
    __name__,
    {
        "inputs": (
            "IMAGE_SUFFIXES",
            "Refused",
            "TRUTH_SUFFIXES",
            "check_image_header",
            "check_writable_folder",
            "expand_inputs",
            "output_folder_name",
        ),
        "preprocessing": (
            "DEFAULT_PREPROCESS",
            "PreprocessConfig",
            "preprocess",
            "resample",
            "resample_labels",
            "resample_to_shape",
            "resampled_shape",
        ),
        "scale": ("LOW_CONFIDENCE",),
        "slide": (
            "DEFAULT_MAX_PIXELS",
            "DEFAULT_MAX_SLIDE_PIXELS",
            "MppSource",
            "Slide",
            "check_user_mpp",
            "decode_slide",
            "estimate_checked",
            "image_size",
            "metadata_mpp",
            "read_file",
            "read_slide",
        ),
        "wsi": (
            "OUTSIDE_FILL",
            "TiffRegionReader",
            "file_sha256",
            "is_whole_slide",
            "open_slide_reader",
        ),
    },
)
