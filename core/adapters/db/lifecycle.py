"""A job's and a training run's life: queued -> running -> succeeded | failed, the same rules for both.

A claim moves a queued (or redelivered running) row to running for one worker, compare-and-set on
its attempts. `attempts` counts the starts a worker did not live through, not the retries: a claim by
the process that already holds the row (a retry after a transient fault) leaves it as it is; a claim of
a row another live process holds is refused (a duplicate message: the row is in hand); a claim of a row
whose holder died counts one more attempt, and past `max_attempts` the row is failed instead. A
succeeded row stays succeeded: a late duplicate's failure does not undo it."""

from __future__ import annotations

import socket
from datetime import timedelta

from sqlalchemy import (
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine

from blastq.core.adapters.db.engine import as_utc, reachable, utcnow
from blastq.core.adapters.db.schema import MAX_ERROR_CHARS, workers_table
from blastq.core.common import InvalidConfig, NotFound, pid_running


def claim_row(
    engine: Engine,
    table,
    row_id: str,
    worker: str,
    max_attempts: int,
    why: str,
    alive_after: timedelta | None = None,
):
    """The claim shared by jobs and training runs: the claimed row, or None when it must not run.

    `alive_after`: how recent a heartbeat keeps a holder on another machine alive (a holder on this
    machine is alive while its process is); None: every claim is an attempt (no holder is asked after)."""
    if max_attempts < 1:
        raise InvalidConfig(f"max_attempts must be at least 1, got {max_attempts}")
    now = utcnow()
    with reachable(engine), engine.begin() as conn:
        seen = conn.execute(
            select(table.c.state, table.c.attempts, table.c.worker).where(table.c.id == row_id)
        ).first()
        if seen is None or seen.state not in ("queued", "running"):
            return None
        held = seen.state == "running" and seen.worker and alive_after is not None
        if held and seen.worker == worker:  # the holder again: a retry, not a new start
            values = {"state": "running", "attempts": seen.attempts, "worker": worker}
        elif held and holder_alive(conn, seen.worker, alive_after):
            return None  # another live process has it in hand: this delivery is a duplicate
        elif seen.state == "running" and seen.attempts >= max_attempts:  # its holders died each time
            values = {
                "state": "failed",
                "error": f"gave up after {seen.attempts} attempts ({why})",
                "finished_at": now,
            }
        else:
            values = {"state": "running", "attempts": seen.attempts + 1, "worker": worker, "started_at": now}
        # Compare-and-set on attempts: of two workers that read the same row, only the first write
        # matches; PostgreSQL makes the second wait for the first's commit, then re-checks the WHERE.
        claimed = conn.execute(
            update(table)
            .where(
                table.c.id == row_id,
                table.c.state.in_(("queued", "running")),
                table.c.attempts == seen.attempts,
            )
            .values(**values, updated_at=now)
        )
        if claimed.rowcount != 1 or values["state"] == "failed":
            return None
        return conn.execute(select(table).where(table.c.id == row_id)).one()


def holder_alive(conn: Connection, name: str, alive_after: timedelta) -> bool:
    """Whether the process `name` (hostname/pid, as a claim records it) is alive. On this machine the process
    table says, at once and through a database outage that kept heartbeats from being written: it runs, is
    not a zombie, and is still the child of the worker that started it (a pool process orphaned by its
    killed worker never reports back); a process that stopped cleanly is dead. Elsewhere its heartbeat is at
    most `alive_after` old and it has not stopped."""
    row = conn.execute(
        select(workers_table.c.heartbeat_at, workers_table.c.stopped_at, workers_table.c.parent).where(
            workers_table.c.name == name
        )
    ).first()
    if row is not None and row.stopped_at is not None:
        return False
    host, _, pid = name.rpartition("/")
    if host == socket.gethostname() and pid.isdigit():
        parent_host, _, parent_pid = (row.parent or "").rpartition("/") if row is not None else ("", "", "")
        here = parent_host == host and parent_pid.isdigit()
        return pid_running(int(pid), int(parent_pid) if here else None)
    return row is not None and as_utc(row.heartbeat_at) >= utcnow() - alive_after


def finish_row(engine: Engine, table, row_id: str, what: str, **values) -> None:
    """Mark a job or run succeeded with `values` (its result), clearing any error; NotFound("no <what>
    <id>") for an unknown id."""
    now = utcnow()
    with reachable(engine), engine.begin() as conn:
        done = conn.execute(
            update(table)
            .where(table.c.id == row_id)
            .values(state="succeeded", error=None, finished_at=now, updated_at=now, **values)
        )
        if done.rowcount != 1:
            raise NotFound(f"no {what} {row_id}", value=row_id)


def fail_row(engine: Engine, table, row_id: str, what: str, error: str) -> None:
    """Mark a job or run failed with the reason (cut to MAX_ERROR_CHARS). A succeeded row stays
    succeeded: a late duplicate's failure does not undo a result already recorded."""
    now = utcnow()
    with reachable(engine), engine.begin() as conn:
        failed = conn.execute(
            update(table)
            .where(table.c.id == row_id, table.c.state != "succeeded")
            .values(state="failed", error=error[:MAX_ERROR_CHARS], finished_at=now, updated_at=now)
        )
        if failed.rowcount != 1 and conn.scalar(select(table.c.id).where(table.c.id == row_id)) is None:
            raise NotFound(f"no {what} {row_id}", value=row_id)
