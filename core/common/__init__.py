"""common: what every room shares: the error hierarchy (errors), files written whole with their sha256
(files), whether a process still runs (processes), and the seconds each stage of a slide took (timing)."""

from blastq.core import room_api

__all__, __getattr__, __dir__, _PUBLIC = room_api(
    __name__,
    {
        "errors": (
            "BlastqError",
            "DatabaseUnavailable",
            "InvalidConfig",
            "InvalidDataset",
            "InvalidSlide",
            "ModelInvalid",
            "ModelNotFound",
            "NoWorker",
            "NotAllowed",
            "NotFound",
            "ReviewConflict",
            "SlideTooLarge",
            "StoreUnavailable",
            "TransientError",
        ),
        "files": ("PART_SUFFIX", "atomic_path", "atomic_write", "file_sha256", "is_part_file"),
        "processes": ("pid_running",),
        "timing": ("STAGES", "StageTimes", "current_times", "recording", "stage", "timed"),
    },
)
