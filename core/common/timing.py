"""Seconds spent per stage of a slide, for whoever asks (the worker's metrics); nothing when nobody does.

    with recording() as times:
        process_slide(...)
    times.seconds  # {"preprocess": 0.21, "engine": 4.2, "stitch": 0.3, "cells": 1.1, "typing": 2.0}

The pipeline marks its stages with `stage(name)` (or `@timed(name)`); outside `recording()` that costs
one context-variable read. A stage that runs in another thread is recorded there only when that thread
runs in a copy of the caller's context (`contextvars.copy_context().run`) or is handed `current_times()`.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import ParamSpec, TypeVar

# The stages of one slide, in the order they come: reading the input, preparing it for the model,
# the engine itself, cutting tiles and stitching their outputs, finding cells, typing them, rendering
# the output files, writing them to the store, and the database's rows.
STAGES = ("read", "preprocess", "engine", "stitch", "cells", "typing", "artifacts", "store", "database")

P = ParamSpec("P")
R = TypeVar("R")


class StageTimes:
    """Seconds per stage, summed over every time the stage ran (the engine runs once per batch)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


_CURRENT: ContextVar[StageTimes | None] = ContextVar("blastq_stage_times", default=None)


def current_times() -> StageTimes | None:
    """The recording in force in this context, or None."""
    return _CURRENT.get()


@contextmanager
def recording() -> Iterator[StageTimes]:
    """Record the stages run inside (in this context) into a fresh StageTimes."""
    times = StageTimes()
    token = _CURRENT.set(times)
    try:
        yield times
    finally:
        _CURRENT.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block as stage `name` when a recording is in force."""
    times = _CURRENT.get()
    if times is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        times.add(name, time.perf_counter() - start)


def timed(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: every call of the function is stage `name`."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with stage(name):
                return fn(*args, **kwargs)

        return run

    return wrap
