"""What one worker process loads once and reuses: the inference engine, the object store, the database.

The engine cache of the worker. Each is built on first use in the process that uses it, and again in
a forked child (the pid is part of the cache), so nothing that holds sockets, file handles or CUDA state
is ever shared across a fork. The worker's `worker_process_init` handler calls `load()` right after the
fork, so the first slide does not pay for the model; the solo pool and eager calls load on first use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine as DatabaseEngine

from blastq.core.db import connect
from blastq.core.engines import Engine, load_engine
from blastq.core.pipeline import PipelineConfig
from blastq.core.settings import Settings, pipeline_config
from blastq.core.store import ObjectStore, store_from_settings
from blastq.core.unet import ModelInfo


@dataclass(frozen=True)
class LoadedEngine:
    engine: Engine
    info: ModelInfo
    config: PipelineConfig


class WorkerResources:
    """Per-process cache of the engine, the store and the database engine built from `settings`."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._cache: dict[str, tuple[int, Any]] = {}

    def _get(self, name: str, build) -> Any:
        pid = os.getpid()
        cached = self._cache.get(name)
        if cached is not None and cached[0] == pid:
            return cached[1]
        value = build()
        self._cache[name] = (pid, value)
        return value

    def engine(self) -> LoadedEngine:
        """The model on its device, loaded once per process."""

        def build() -> LoadedEngine:
            s = self.settings
            engine, info = load_engine(s.model or None, kind=s.engine, device=s.device)
            return LoadedEngine(engine, info, pipeline_config(s))

        return self._get("engine", build)

    def store(self) -> ObjectStore:
        s = self.settings
        return self._get(
            "store",
            lambda: store_from_settings(s),
        )

    def db(self) -> DatabaseEngine:
        return self._get("db", lambda: connect(self.settings.database_url))

    def provide(self, *, store: ObjectStore | None = None, db: DatabaseEngine | None = None) -> None:
        """Use these objects in this process instead of building them from the settings (embedding, tests)."""
        for name, value in (("store", store), ("db", db)):
            if value is not None:
                self._cache[name] = (os.getpid(), value)

    def after_fork(self) -> None:
        """Forget what a parent process built, without closing it: its sockets belong to the parent."""
        pid = os.getpid()
        for name, (owner, value) in list(self._cache.items()):
            if owner != pid:
                if isinstance(value, DatabaseEngine):
                    value.dispose(close=False)
                del self._cache[name]

    def load(self) -> None:
        """Build everything now (after the fork), so the first slide does not wait for the model."""
        self.after_fork()
        self.db()
        self.store()
        self.engine()

    def close(self) -> None:
        for pid, value in self._cache.values():
            if pid == os.getpid() and isinstance(value, DatabaseEngine):
                value.dispose()
        self._cache.clear()
