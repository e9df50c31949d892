"""The blastq error hierarchy.

Raised at the point of knowledge with the path or value in the message. The CLI turns a BlastqError
into one line and a non-zero exit; the worker turns it into a failed job row. TransientError marks
faults worth retrying (network, database, store); everything else is the input's fault and is not
retried.
"""

from __future__ import annotations


class BlastqError(Exception):
    """Base class of every error blastq raises on purpose."""


class InvalidSlide(BlastqError):
    """The image cannot be read or used: missing, unreadable, truncated, empty, not an image."""


class SlideTooLarge(InvalidSlide):
    """The image has more pixels than the configured maximum (decompression-bomb guard)."""


class InvalidConfig(BlastqError):
    """A setting or parameter has a value blastq cannot use."""


class ModelNotFound(BlastqError):
    """A model checkpoint is missing, unreadable, or not a blastq model."""


class InvalidDataset(BlastqError):
    """A training or evaluation folder has no usable image/mask pairs."""


class TransientError(BlastqError):
    """A fault that may pass (network, database, object store): retry with backoff."""


class StoreUnavailable(TransientError):
    """The object store did not answer."""


class DatabaseUnavailable(TransientError):
    """The database did not answer."""


class NoWorker(BlastqError):
    """Jobs wait in a queue that no running worker takes jobs from."""
