"""synth: synthetic May-Grunwald-Giemsa smears with exact truth, for tests and training.

field (one smear photo, its masks and cell types) -> slide (a mosaic of fields as a pyramidal whole-slide
TIFF).
"""

from blastq.core import room_api

__all__, __getattr__, __dir__, _PUBLIC = room_api(
    __name__,
    {
        "field": (
            "DECOY_KINDS",
            "LOOKS",
            "STAIN_FAMILIES",
            "SynthField",
            "TRUTH_FOLDER",
            "VARIETIES",
            "find_truth",
            "generate_field",
            "read_field_masks",
            "write_dataset",
        ),
        "slide": ("write_synthetic_slide",),
    },
)
