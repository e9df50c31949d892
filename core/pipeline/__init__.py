"""pipeline: one image start to end, on the rooms above.

field (one smear photo: scale -> preprocess -> tiles -> engine -> stitch -> cells -> stats), wholeslide (the
same chunk by chunk in bounded memory), resultkey (what a result is keyed by, known before any pixel is
decoded), scratch (spool folders), runner (run slides on this machine: process, store, record).
"""

from blastq.core import room_api

__all__, __getattr__, __dir__, _PUBLIC = room_api(
    __name__,
    {
        "field": (
            "PipelineConfig",
            "SlideResult",
            "config_for_engine",
            "pipeline_config",
            "prepare_image",
            "process_slide",
            "segment_prepared",
            "segment_probabilities",
        ),
        "resultkey": (
            "ModelIdentity",
            "classifier_file_sha256",
            "file_result_key",
        ),
        "runner": (
            "LocalRunner",
            "SAMPLE_FILE_PREFIX",
            "classifier_file",
            "model_checkpoint",
            "persist_result",
            "store_files",
            "write_sample",
        ),
        "wholeslide": (
            "WholeSlideConfig",
            "WholeSlideResult",
            "process_whole_slide",
            "whole_slide_config",
        ),
    },
)
