"""A job's and a training run's life: queued -> running -> succeeded | failed, the same rules for both.

A claim moves a queued (or redelivered running) row to running for one worker, compare-and-set on
its attempts; past `max_attempts` the row is failed instead. A succeeded row stays succeeded: a late
duplicate's failure does not undo it."""

from __future__ import annotations

from sqlalchemy import (
    select,
    update,
)
from sqlalchemy.engine import Engine

from blastq.core.adapters.db.engine import reachable, utcnow
from blastq.core.adapters.db.schema import MAX_ERROR_CHARS
from blastq.core.common import InvalidConfig, NotFound


def claim_row(engine: Engine, table, row_id: str, worker: str, max_attempts: int, why: str):
    """The claim shared by jobs and training runs: the claimed row, or None when it must not run."""
    if max_attempts < 1:
        raise InvalidConfig(f"max_attempts must be at least 1, got {max_attempts}")
    now = utcnow()
    with reachable(engine), engine.begin() as conn:
        seen = conn.execute(select(table.c.state, table.c.attempts).where(table.c.id == row_id)).first()
        if seen is None or seen.state not in ("queued", "running"):
            return None
        if seen.attempts >= max_attempts:
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
