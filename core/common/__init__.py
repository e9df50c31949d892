"""common: what every room shares: the error hierarchy."""

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
            "ModelNotFound",
            "NoWorker",
            "SlideTooLarge",
            "StoreUnavailable",
            "TransientError",
        ),
    },
)
