"""What one worker process loads once and reuses: the inference engine, the object store, the database.

The engine cache of the worker. Each is built on first use in the process that uses it, and again in
a forked child (the pid is part of the cache), so nothing that holds sockets, file handles or CUDA state
is ever shared across a fork. The worker's `worker_process_init` handler calls `load()` right after the
fork, so the first slide does not pay for the model; the solo pool and eager calls load on first use.

With `BLASTQ_MODEL=registry` the engine follows the registry: before each slide one indexed query asks
for the promoted version (a millisecond against a slide's seconds, so a promotion reaches the very next
slide), and when it changed the new checkpoint is fetched, verified by sha256 and loaded in place of the
old one, between slides and without a restart. With nothing promoted, the shipped model runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine as DatabaseEngine

from blastq.core.adapters import (
    REGISTRY_MODEL,
    ModelVersion,
    ObjectStore,
    Settings,
    connect,
    fetch_checkpoint,
    promoted,
    store_from_settings,
)
from blastq.core.cells import CellClassifier, load_cell_classifier
from blastq.core.common import ModelInvalid
from blastq.core.pipeline import PipelineConfig, classifier_file, pipeline_config
from blastq.core.segment import Engine, ModelInfo, load_engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedEngine:
    engine: Engine
    info: ModelInfo
    config: PipelineConfig
    registry_version: str | None = None  # the registry's version it runs; None: not from the registry
    classifier: CellClassifier | None = None  # types the cells (the differential); None: settings say none


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
        """The model on its device: loaded once per process, or the registry's promoted version."""
        if self.settings.model == REGISTRY_MODEL:
            return self._registry_engine()
        return self._get("engine", lambda: self._load(self.settings.model or None))

    def _load(self, model_path, registry_version: str | None = None) -> LoadedEngine:
        s = self.settings
        engine, info = load_engine(model_path, kind=s.engine, device=s.device, cache_dir=s.engine_cache_dir)
        # The classifier is read once per process ("registry": the one promoted when the worker started).
        classifier = self._get("classifier", lambda: load_cell_classifier(classifier_file(s)))
        return LoadedEngine(engine, info, pipeline_config(s, info.sha256), registry_version, classifier)

    def _registry_engine(self) -> LoadedEngine:
        """The promoted version's engine, swapped when the promotion changed since the last slide."""
        model = promoted(self.db())
        cached = self._cache.get("engine")
        if cached is not None and cached[0] == os.getpid() and _runs(cached[1], model):
            return cached[1]
        # Drop the old engine before loading the new one: two models at once may not fit a GPU.
        previous = self._cache.pop("engine", None)
        before = previous[1].info.version if previous else None
        del previous, cached
        if model is None:
            log.warning("no model is promoted in the registry; using the shipped default model")
            loaded = self._load(None)
        else:
            path = fetch_checkpoint(self.store(), model, self.settings.data_dir / "models")
            loaded = self._load(path, model.version)
            if loaded.info.sha256 != model.sha256:  # the cached file changed after it was verified
                raise ModelInvalid(
                    f"model {model.version}: checksum mismatch for {path} when loading it "
                    f"(sha256 {loaded.info.sha256[:12]}, the registry has {model.sha256[:12]})"
                )
        self._cache["engine"] = (os.getpid(), loaded)
        log.info("model %s loaded (was %s)", loaded.info.version, before or "none")
        return loaded

    def store(self) -> ObjectStore:
        s = self.settings
        return self._get(
            "store",
            lambda: store_from_settings(s),
        )

    def db(self) -> DatabaseEngine:
        return self._get("db", lambda: connect(self.settings.database_url.get_secret_value()))

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


def _runs(loaded: LoadedEngine, model: ModelVersion | None) -> bool:
    """Whether `loaded` is the engine for the registry's promoted `model` (None: the shipped default)."""
    if model is None:
        return loaded.registry_version is None
    return loaded.registry_version == model.version and loaded.info.sha256 == model.sha256
