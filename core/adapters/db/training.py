"""Training runs of the trainer service: config, epochs so far, the resume state's key, the final model."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from uuid import uuid4

from sqlalchemy import (
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine

from blastq.core.adapters.db.engine import as_utc, reachable, utcnow
from blastq.core.adapters.db.lifecycle import claim_row, fail_row, finish_row
from blastq.core.adapters.db.schema import runs_table
from blastq.core.common import NotFound


@dataclass(frozen=True)
class TrainingRunInfo:
    """One training_runs row with its JSON columns decoded. Times are UTC."""

    id: str
    state: str
    config: dict
    version: str
    attempts: int
    worker: str | None
    epoch: int
    history: list
    checkpoint_key: str | None
    model_key: str | None
    model_sha256: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @classmethod
    def from_row(cls, row) -> TrainingRunInfo:
        values = {k: as_utc(v) for k, v in row._mapping.items()}
        values["config"] = json.loads(values["config"])
        values["history"] = json.loads(values["history"])
        return cls(**{f.name: values[f.name] for f in fields(cls)})


def create_training_run(engine: Engine, *, config: dict, version: str) -> TrainingRunInfo:
    """A new queued training run: the row exists before any message about it is sent."""
    now = utcnow()
    values = {
        "id": str(uuid4()),
        "state": "queued",
        "config": json.dumps(config, sort_keys=True),
        "version": version,
        "attempts": 0,
        "worker": None,
        "epoch": 0,
        "history": "[]",
        "checkpoint_key": None,
        "model_key": None,
        "model_sha256": None,
        "error": None,
        "created_at": now,
        "started_at": None,
        "finished_at": None,
        "updated_at": now,
    }
    with reachable(engine), engine.begin() as conn:
        conn.execute(insert(runs_table).values(**values))
    return TrainingRunInfo(**{**values, "config": config, "history": []})


def claim_training_run(
    engine: Engine, run_id: str, worker: str, max_attempts: int, alive_after: timedelta | None = None
) -> TrainingRunInfo | None:
    """Move a queued (or redelivered running) run to running for `worker`; None when it must not run.

    The rules of `claim_job`: None for an unknown or finished run, for a claim lost to another worker
    at the same moment or held by another live trainer, and past `max_attempts` starts its trainer did
    not live through (the run is failed instead).
    """
    row = claim_row(
        engine, runs_table, run_id, worker, max_attempts, "the trainer died each time", alive_after
    )
    return None if row is None else TrainingRunInfo.from_row(row)


def record_epoch(engine: Engine, run_id: str, epoch: int, history: list, checkpoint_key: str) -> None:
    """Record a finished epoch: its number, the history so far and the resume state's key, at once."""
    with reachable(engine), engine.begin() as conn:
        done = conn.execute(
            update(runs_table)
            .where(runs_table.c.id == run_id, runs_table.c.state == "running")
            .values(
                epoch=epoch,
                history=json.dumps(history),
                checkpoint_key=checkpoint_key,
                updated_at=utcnow(),
            )
        )
        if done.rowcount != 1:
            raise NotFound(f"no running training run {run_id}", value=run_id)


def finish_training_run(engine: Engine, run_id: str, *, model_key: str, model_sha256: str) -> None:
    """Mark a run succeeded with the store key and sha256 of its final checkpoint."""
    finish_row(engine, runs_table, run_id, "training run", model_key=model_key, model_sha256=model_sha256)


def fail_training_run(engine: Engine, run_id: str, error: str) -> None:
    """Mark a run failed with the reason; a succeeded run stays succeeded."""
    fail_row(engine, runs_table, run_id, "training run", error)


def training_run_status(engine: Engine, run_id: str) -> TrainingRunInfo | None:
    """The run's row; None for an unknown id."""
    with reachable(engine), engine.connect() as conn:
        row = conn.execute(select(runs_table).where(runs_table.c.id == run_id)).first()
    return None if row is None else TrainingRunInfo.from_row(row)


def training_runs(engine: Engine, limit: int = 20) -> list[TrainingRunInfo]:
    """The newest training runs, newest first."""
    with reachable(engine), engine.connect() as conn:
        rows = conn.execute(
            select(runs_table).order_by(runs_table.c.created_at.desc(), runs_table.c.id).limit(limit)
        )
        return [TrainingRunInfo.from_row(r) for r in rows]
