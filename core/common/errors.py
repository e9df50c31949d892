"""The blastq error hierarchy.

Raised at the point of knowledge. An error carries fields, as httpx's errors carry their request: `reason`
(why, one line, without the file), `path` (the file it is about, when there is one) and `value` (the value
refused, when there is one). str(error) is "path: reason", the one line the CLI prints and the worker
stores as a job's failure; code that needs a part reads the field, never the message.

The CLI turns a BlastqError into one line and a non-zero exit; the worker turns it into a failed job
row. TransientError marks faults worth retrying (network, database, store); everything else is the
input's fault and is not retried.
"""

from __future__ import annotations

import os
from typing import Any


class BlastqError(Exception):
    """Base class of every error blastq raises on purpose."""

    def __init__(self, reason: str, *, path: str | os.PathLike[str] | None = None, value: Any = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = None if path is None else os.fspath(path)
        self.value = value

    def __str__(self) -> str:
        return self.reason if self.path is None else f"{self.path}: {self.reason}"

    def reason_for(self, *names: str | os.PathLike[str]) -> str:
        """What to print after a file the caller names already: the reason alone when the error is about
        that file (by any of `names`), else the whole line, which names the other file (a model, say)."""
        return self.reason if self.path in {os.fspath(n) for n in names} else str(self)

    def __reduce__(self) -> tuple[Any, ...]:  # pickled whole (processes, Celery): the fields survive
        return (_rebuild, (type(self), self.reason, self.path, self.value))


def _rebuild(cls: type[BlastqError], reason: str, path: str | None, value: Any) -> BlastqError:
    return cls(reason, path=path, value=value)


class InvalidSlide(BlastqError):
    """The image cannot be read or used: missing, unreadable, truncated, empty, not an image."""


class SlideTooLarge(InvalidSlide):
    """The image has more pixels than the configured maximum (decompression-bomb guard)."""


class InvalidConfig(BlastqError):
    """A setting or parameter has a value blastq cannot use."""


class ModelNotFound(BlastqError):
    """A model (checkpoint, classifier, ONNX export, registered version) is not there: no such file or
    version, or its file is gone from the store."""


class ModelInvalid(BlastqError):
    """A model file is there but cannot be used: unreadable, not a blastq model, weights that do not fit
    its architecture, types blastq does not load, or bytes that do not match the registered checksum."""


class NotFound(BlastqError, LookupError):
    """No row of that kind with that key (a job, result, sample, model version, training run); `value`
    is the key."""


class ReviewConflict(BlastqError):
    """A review step that the sample's review state or the person's part does not allow: reclassifying a
    signed-off sample, signing off one nobody completed, signing off one's own review."""


class NotAllowed(BlastqError):
    """The signed-in person's role does not allow this (a viewer reclassifying, a technologist signing)."""


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
