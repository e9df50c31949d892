"""Retention (`blastq gc`): which store objects and which queued messages the rows still need.

A row names its store objects by key (a job's input, a model's checkpoint, a training run's files) or by
folder (a result's outputs); anything else in blastq's folders of the store is garbage once it is old
enough that no row can still be on its way for it. A message is needed while its job or run is queued or
running.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.engine import Engine

from blastq.core.adapters.db.engine import reachable
from blastq.core.adapters.db.schema import ModelRow, ResultRow, jobs_table, runs_table

# The store folders rows point into; gc never touches a key outside them (a shared bucket's other files).
STORE_FOLDERS = ("inputs", "slides", "models", "training", "doctor")
OPEN_STATES = ("queued", "running")


@dataclass(frozen=True)
class StoreReferences:
    """The keys and folders of the store that rows name."""

    keys: frozenset[str]
    folders: frozenset[str]

    def holds(self, key: str) -> bool:
        """Whether a row names `key` or one of the folders it lies in."""
        if key in self.keys:
            return True
        parts = key.split("/")
        return any("/".join(parts[:n]) in self.folders for n in range(1, len(parts)))


def store_references(engine: Engine) -> StoreReferences:
    """Every store key and folder a row of this database names (read in one transaction)."""
    with reachable(engine), engine.connect() as conn:
        inputs = conn.execute(select(jobs_table.c.input_key)).scalars()
        checkpoints = conn.execute(select(ModelRow.checkpoint_key)).scalars()
        runs = conn.execute(
            select(runs_table.c.id, runs_table.c.checkpoint_key, runs_table.c.model_key)
        ).all()
        outputs = conn.execute(select(ResultRow.store_prefix)).scalars()
        keys = {*inputs, *checkpoints, *(k for r in runs for k in (r.checkpoint_key, r.model_key) if k)}
        folders = {p.rstrip("/") for p in outputs} | {f"training/{r.id}" for r in runs}
    return StoreReferences(frozenset(keys), frozenset(folders))


def open_job_ids(engine: Engine, job_ids: Iterable[str]) -> set[str]:
    """Those of `job_ids` whose job is queued or running (an unknown id is not open)."""
    return _open(engine, jobs_table, job_ids)


def open_training_run_ids(engine: Engine, run_ids: Iterable[str]) -> set[str]:
    """Those of `run_ids` whose training run is queued or running."""
    return _open(engine, runs_table, run_ids)


def _open(engine: Engine, table, ids: Iterable[str]) -> set[str]:
    wanted = sorted(set(ids))
    found: set[str] = set()
    with reachable(engine), engine.connect() as conn:
        for start in range(0, len(wanted), 500):  # bounded IN lists
            chunk = wanted[start : start + 500]
            found.update(
                conn.execute(
                    select(table.c.id).where(table.c.id.in_(chunk), table.c.state.in_(OPEN_STATES))
                ).scalars()
            )
    return found
