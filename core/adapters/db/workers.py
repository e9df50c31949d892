"""Worker heartbeats: who takes jobs, and who has stopped answering.

Each process that claims jobs (worker.heartbeat) writes its row every few seconds. A process not heard of
for `dead_after` (or stopped cleanly) is dead, and the jobs it left running can be sent again at once
(`blastq requeue`), with no need to guess how long a slide may take.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.engine import Engine

from blastq.core.adapters.db.engine import as_utc, reachable, utcnow
from blastq.core.adapters.db.jobs import JobInfo
from blastq.core.adapters.db.schema import jobs_table, workers_table

# Rows of processes dead or stopped this long ago are removed when a worker starts (pids are reused).
FORGET_AFTER = timedelta(days=7)


@dataclass(frozen=True)
class WorkerInfo:
    """One worker row; `alive` as of when it was read (heard of within dead_after, not stopped)."""

    name: str
    host: str
    pid: int
    parent: str | None
    queues: str
    version: str
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None
    alive: bool


def beat(
    engine: Engine, name: str, *, host: str, pid: int, queues: str, version: str, parent: str | None
) -> None:
    """Record that worker `name` is alive now (its row is made on the first beat)."""
    now = utcnow()
    with reachable(engine), engine.begin() as conn:
        done = conn.execute(
            update(workers_table)
            .where(workers_table.c.name == name)
            .values(heartbeat_at=now, stopped_at=None)
        )
        if done.rowcount == 0:  # only this process writes its row: no race on the insert
            conn.execute(
                workers_table.insert().values(
                    name=name,
                    host=host,
                    pid=pid,
                    parent=parent,
                    queues=queues,
                    version=version,
                    started_at=now,
                    heartbeat_at=now,
                )
            )


def stop_beating(engine: Engine, name: str) -> None:
    """Worker `name` stopped cleanly: it is not alive, and nothing it ran is still running."""
    with reachable(engine), engine.begin() as conn:
        conn.execute(update(workers_table).where(workers_table.c.name == name).values(stopped_at=utcnow()))


def forget_workers(engine: Engine, older_than: timedelta = FORGET_AFTER) -> int:
    """Remove the rows of workers dead or stopped for `older_than`; how many."""
    cutoff = utcnow() - older_than
    with reachable(engine), engine.begin() as conn:
        return conn.execute(delete(workers_table).where(workers_table.c.heartbeat_at < cutoff)).rowcount


def list_workers(
    engine: Engine, dead_after: timedelta, since: timedelta = timedelta(hours=1)
) -> list[WorkerInfo]:
    """Workers heard of within `since`, alive first, then by name."""
    now = utcnow()
    with reachable(engine), engine.connect() as conn:
        rows = conn.execute(
            select(workers_table)
            .where(workers_table.c.heartbeat_at >= now - since)
            .order_by(workers_table.c.name)
        ).all()
    names = [f.name for f in fields(WorkerInfo) if f.name != "alive"]
    out = []
    for row in rows:
        values = {n: as_utc(getattr(row, n)) for n in names}
        alive = values["stopped_at"] is None and values["heartbeat_at"] >= now - dead_after
        out.append(WorkerInfo(**values, alive=alive))
    return sorted(out, key=lambda w: (not w.alive, w.name))


def dead_workers_jobs(engine: Engine, dead_after: timedelta) -> list[tuple[JobInfo, WorkerInfo]]:
    """Running jobs whose last claim is by a worker now dead (not heard of for `dead_after`, or stopped),
    with that worker, oldest first. A job claimed by a worker with no heartbeat row (an older blastq) is
    not among them: only its age can tell (`requeue --older-than`)."""
    cutoff = utcnow() - dead_after
    dead = (
        select(workers_table)
        .where(or_(workers_table.c.stopped_at.is_not(None), workers_table.c.heartbeat_at < cutoff))
        .subquery()
    )
    with reachable(engine), engine.connect() as conn:
        rows = conn.execute(
            select(jobs_table, *[c.label(f"w_{c.name}") for c in dead.c])
            .join(dead, dead.c.name == jobs_table.c.worker)
            .where(jobs_table.c.state == "running")
            .order_by(jobs_table.c.updated_at)
        ).all()
    out = []
    for row in rows:
        mapping = row._mapping
        job = JobInfo.from_row(row)
        worker = {f.name: as_utc(mapping[f"w_{f.name}"]) for f in fields(WorkerInfo) if f.name != "alive"}
        out.append((job, WorkerInfo(**worker, alive=False)))
    return out
