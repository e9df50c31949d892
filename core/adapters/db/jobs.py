"""Batches and slide jobs: created by submit, claimed and finished by workers, listed by the service commands."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from uuid import uuid4

from sqlalchemy import (
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine

from blastq.core.adapters.db.engine import as_utc, reachable, utcnow
from blastq.core.adapters.db.lifecycle import claim_row, fail_row, finish_row
from blastq.core.adapters.db.schema import BatchRow, ResultRow, jobs_table

# --- batches and jobs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class JobInfo:
    """One job row, as the worker and the CLI see it. Times are timezone-aware UTC."""

    id: str
    batch_id: str | None
    state: str
    filename: str
    input_key: str
    sha256: str
    mpp: float | None
    params_key: str
    model_version: str | None
    attempts: int
    error: str | None
    worker: str | None
    result_id: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    sample_id: int | None = None

    @classmethod
    def from_row(cls, row) -> JobInfo:
        values = dict(row._mapping)
        return cls(**{f.name: as_utc(values[f.name]) for f in fields(cls)})


@dataclass(frozen=True)
class BatchStatus:
    """A batch and how many of its jobs are in each state."""

    id: str
    name: str
    created_at: datetime
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        return self.queued + self.running + self.succeeded + self.failed

    @property
    def finished(self) -> bool:
        return self.queued == 0 and self.running == 0


def create_batch(engine: Engine, name: str) -> str:
    """A new batch; returns its id."""
    batch_id = str(uuid4())
    with reachable(engine), engine.begin() as conn:
        conn.execute(insert(BatchRow).values(id=batch_id, name=name, created_at=utcnow()))
    return batch_id


def create_job(
    engine: Engine,
    *,
    batch_id: str | None,
    filename: str,
    input_key: str,
    sha256: str,
    mpp: float | None,
    params_key: str,
    sample_id: int | None = None,
) -> JobInfo:
    """A new queued job: the row exists before any message about it is sent."""
    now = utcnow()
    values = {
        "id": str(uuid4()),
        "batch_id": batch_id,
        "state": "queued",
        "filename": filename,
        "input_key": input_key,
        "sha256": sha256,
        "mpp": mpp,
        "params_key": params_key,
        "model_version": None,
        "attempts": 0,
        "error": None,
        "worker": None,
        "result_id": None,
        "created_at": now,
        "started_at": None,
        "finished_at": None,
        "updated_at": now,
        "sample_id": sample_id,
    }
    with reachable(engine), engine.begin() as conn:
        conn.execute(insert(jobs_table).values(**values))
    return JobInfo(**values)


def claim_job(
    engine: Engine, job_id: str, worker: str, max_attempts: int, alive_after: timedelta | None = None
) -> JobInfo | None:
    """Move a queued (or redelivered running) job to running for `worker`; None when it must not run.

    None when the job is unknown or already finished (a redelivered message must not redo it), when
    another worker claimed it at the same moment or another live worker holds it (with `alive_after`:
    lifecycle.claim_row), or when it has been started `max_attempts` times already: the worker died
    each time, so the job is failed rather than handed to the next victim. With `alive_after`, a retry
    by the worker that holds the job is not another attempt.
    """
    row = claim_row(
        engine, jobs_table, job_id, worker, max_attempts, "the worker died each time", alive_after
    )
    return None if row is None else JobInfo.from_row(row)


def finish_job(engine: Engine, job_id: str, result_id: int) -> None:
    """Mark a job succeeded with its result (and the result's model version)."""
    model_version = select(ResultRow.model_version).where(ResultRow.id == result_id).scalar_subquery()
    finish_row(engine, jobs_table, job_id, "job", result_id=result_id, model_version=model_version)


def fail_job(engine: Engine, job_id: str, error: str) -> None:
    """Mark a job failed with the reason (lifecycle.fail_row: a succeeded job stays succeeded)."""
    fail_row(engine, jobs_table, job_id, "job", error)


# The start of the reason of a job failed by a fault outside it (the database or the store away longer
# than BLASTQ_TRANSIENT_WAIT_S): `reopen_transient_failures` finds them by it.
TRANSIENT_FAILURE = "transient: "


def reopen_transient_failures(engine: Engine) -> list[JobInfo]:
    """Jobs failed by a transient fault back to queued (reason cleared, attempts kept), oldest first: the
    caller sends them again. A job reopened by another caller meanwhile is left to that one."""
    now = utcnow()
    reopened = []
    with reachable(engine), engine.begin() as conn:
        rows = conn.execute(
            select(jobs_table)
            .where(jobs_table.c.state == "failed", jobs_table.c.error.like(f"{TRANSIENT_FAILURE}%"))
            .order_by(jobs_table.c.updated_at)
        ).all()
        for row in rows:
            done = conn.execute(
                update(jobs_table)
                .where(jobs_table.c.id == row.id, jobs_table.c.state == "failed")
                .values(state="queued", error=None, finished_at=None, updated_at=now)
            )
            if done.rowcount == 1:
                reopened.append(JobInfo.from_row(row))
    return reopened


def stale_jobs(engine: Engine, older_than: timedelta) -> list[JobInfo]:
    """Jobs still queued or running whose row has not changed for `older_than`, oldest first."""
    cutoff = utcnow() - older_than
    with reachable(engine), engine.connect() as conn:
        rows = conn.execute(
            select(jobs_table)
            .where(jobs_table.c.state.in_(("queued", "running")), jobs_table.c.updated_at < cutoff)
            .order_by(jobs_table.c.updated_at)
        )
        return [JobInfo.from_row(r) for r in rows]


def job_status(engine: Engine, job_id: str) -> JobInfo | None:
    """The job's row; None for an unknown id."""
    with reachable(engine), engine.connect() as conn:
        row = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).first()
    return None if row is None else JobInfo.from_row(row)


def batch_status(engine: Engine, batch_id: str) -> BatchStatus | None:
    """The batch with its job counts by state; None for an unknown id."""
    with reachable(engine), engine.connect() as conn:
        batch = conn.execute(select(BatchRow.__table__).where(BatchRow.id == batch_id)).first()
        if batch is None:
            return None
        counts = conn.execute(
            select(jobs_table.c.state, func.count())
            .where(jobs_table.c.batch_id == batch_id)
            .group_by(jobs_table.c.state)
        )
        return BatchStatus(
            id=batch.id, name=batch.name, created_at=as_utc(batch.created_at), **{s: n for s, n in counts}
        )


def batches_named(engine: Engine, name: str) -> list[str]:
    """Ids of the batches given `name` at submit, oldest first (a name may be given more than once)."""
    with reachable(engine), engine.connect() as conn:
        rows = conn.execute(select(BatchRow.id).where(BatchRow.name == name).order_by(BatchRow.created_at))
        return [row[0] for row in rows]


def touch_job(engine: Engine, job: JobInfo) -> bool:
    """Bump a queued/running job's updated_at if nobody changed the row since `job` was read.

    True when this caller won: of two `requeue` runs that read the same stale row, only one sends it.
    """
    with reachable(engine), engine.begin() as conn:
        done = conn.execute(
            update(jobs_table)
            .where(
                jobs_table.c.id == job.id,
                jobs_table.c.state.in_(("queued", "running")),
                jobs_table.c.updated_at == job.updated_at,
            )
            .values(updated_at=datetime.now(UTC))
        )
        return done.rowcount == 1


def batch_jobs(engine: Engine, batch_id: str) -> list[JobInfo]:
    """The jobs of a batch in the order they were created."""
    with reachable(engine), engine.connect() as conn:
        rows = conn.execute(
            select(jobs_table)
            .where(jobs_table.c.batch_id == batch_id)
            .order_by(jobs_table.c.created_at, jobs_table.c.id)
        )
        return [JobInfo.from_row(r) for r in rows]


def job_counts(engine: Engine) -> dict[str, int]:
    """How many jobs are in each state, over all batches."""
    with reachable(engine), engine.connect() as conn:
        return dict(conn.execute(select(jobs_table.c.state, func.count()).group_by(jobs_table.c.state)).all())


def oldest_queued_job(engine: Engine) -> datetime | None:
    """When the longest-waiting queued job was queued (UTC); None when nothing waits."""
    with reachable(engine), engine.connect() as conn:
        oldest = conn.scalar(select(func.min(jobs_table.c.created_at)).where(jobs_table.c.state == "queued"))
    return None if oldest is None else as_utc(oldest)


def recent_batches(engine: Engine, limit: int = 10) -> list[BatchStatus]:
    """The newest batches with their job counts, newest first."""
    with reachable(engine), engine.connect() as conn:
        ids = conn.scalars(select(BatchRow.id).order_by(BatchRow.created_at.desc()).limit(limit)).all()
    return [b for b in (batch_status(engine, i) for i in ids) if b is not None]


def jobs_for_file(engine: Engine, filename: str, since: datetime) -> list[JobInfo]:
    """Jobs made for `filename` (as submitted) since `since`, newest first.

    How a watcher finds out whether a submit cut short by a fault, or by its own death, made a job.
    """
    with reachable(engine), engine.connect() as conn:
        rows = conn.execute(
            select(jobs_table)
            .where(jobs_table.c.filename == filename, jobs_table.c.created_at >= since.astimezone(UTC))
            .order_by(jobs_table.c.created_at.desc(), jobs_table.c.id)
        )
        return [JobInfo.from_row(r) for r in rows]
