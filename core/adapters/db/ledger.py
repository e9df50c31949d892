"""The folder watcher's ledger: which file it saw, submitted or rejected, so a restart repeats nothing."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import datetime, timedelta

from sqlalchemy import (
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from blastq.core.adapters.db.engine import as_utc, reachable, utcnow
from blastq.core.adapters.db.schema import MAX_ERROR_CHARS, ledger_table
from blastq.core.common import NotFound

# The folder watcher's ledger (`blastq watch`).


@dataclass(frozen=True)
class LedgerEntry:
    """One file version the watcher has seen (a watch_ledger row). Times are UTC."""

    id: int
    root: str
    relpath: str
    size: int
    mtime_ns: int
    sha256: str | None
    job_id: str | None
    state: str
    reason: str | None
    first_seen: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row) -> LedgerEntry:
        values = dict(row._mapping)
        return cls(**{f.name: as_utc(values[f.name]) for f in fields(cls)})


_LEDGER_CHUNK = 500  # relpaths per IN (...) query


def claim_watched_file(
    engine: Engine, root: str, relpath: str, size: int, mtime_ns: int, *, stale_after: timedelta
) -> tuple[LedgerEntry | None, bool]:
    """Claim one file version for submission: (its ledger row, True when this caller now owns it).

    The insert is the claim: the unique (root, relpath, size, mtime_ns) lets one of two watchers, or
    of a watcher and its restarted self, win. A row still `seen` after `stale_after` belongs to a
    watcher that died between claim and submit: it is taken over by compare-and-set and returned as
    it was, so the caller can look for a job the dead watcher made since its `updated_at`.
    (None, False) only when the row vanished (released) three times in a row while being read.
    """
    same_version = (
        ledger_table.c.root == root,
        ledger_table.c.relpath == relpath,
        ledger_table.c.size == size,
        ledger_table.c.mtime_ns == mtime_ns,
    )
    for _ in range(3):
        now = utcnow()
        values = {
            "root": root,
            "relpath": relpath,
            "size": size,
            "mtime_ns": mtime_ns,
            "sha256": None,
            "job_id": None,
            "state": "seen",
            "reason": None,
            "first_seen": now,
            "updated_at": now,
        }
        try:
            with reachable(engine), engine.begin() as conn:
                (entry_id,) = conn.execute(insert(ledger_table).values(**values)).inserted_primary_key
            return LedgerEntry(id=entry_id, **values), True
        except IntegrityError:
            pass  # someone has this version: read their row
        with reachable(engine), engine.begin() as conn:
            row = conn.execute(select(ledger_table).where(*same_version)).first()
            if row is None:
                continue  # released between our insert and this read: try the insert again
            entry = LedgerEntry.from_row(row)
            if entry.state != "seen" or entry.updated_at >= now - stale_after:
                return entry, False
            taken = conn.execute(
                update(ledger_table)
                .where(
                    ledger_table.c.id == row.id,
                    ledger_table.c.state == "seen",
                    ledger_table.c.updated_at == row.updated_at,
                )
                .values(updated_at=now)
            )
            return entry, taken.rowcount == 1
    return None, False


def record_watched_file(
    engine: Engine,
    entry_id: int,
    state: str,
    *,
    job_id: str | None = None,
    sha256: str | None = None,
    reason: str | None = None,
) -> None:
    """Settle a claimed file version: submitted (with its job and content sha256) or rejected (why)."""
    if state not in ("submitted", "rejected"):
        raise ValueError(f"a watched file is settled as submitted or rejected, not {state!r}")
    with reachable(engine), engine.begin() as conn:
        done = conn.execute(
            update(ledger_table)
            .where(ledger_table.c.id == entry_id)
            .values(
                state=state,
                job_id=job_id,
                sha256=sha256,
                reason=None if reason is None else reason[:MAX_ERROR_CHARS],
                updated_at=utcnow(),
            )
        )
        if done.rowcount != 1:
            raise NotFound(f"no watch ledger entry {entry_id}", value=entry_id)


def release_watched_file(engine: Engine, entry_id: int) -> None:
    """Give up a claim that was never submitted (a transient fault), so the next scan claims it again."""
    with reachable(engine), engine.begin() as conn:
        conn.execute(
            delete(ledger_table).where(ledger_table.c.id == entry_id, ledger_table.c.state == "seen")
        )


def watched_files(engine: Engine, root: str, relpaths: Iterable[str] | None = None) -> list[LedgerEntry]:
    """The ledger rows under `root` (only those of `relpaths` when given), oldest first."""
    chunks: list[list[str] | None] = [None]
    if relpaths is not None:
        wanted = sorted(set(relpaths))
        chunks = [wanted[i : i + _LEDGER_CHUNK] for i in range(0, len(wanted), _LEDGER_CHUNK)]
    entries: list[LedgerEntry] = []
    with reachable(engine), engine.connect() as conn:
        for chunk in chunks:
            query = select(ledger_table).where(ledger_table.c.root == root)
            if chunk is not None:
                query = query.where(ledger_table.c.relpath.in_(chunk))
            entries.extend(LedgerEntry.from_row(r) for r in conn.execute(query))
    return sorted(entries, key=lambda e: (e.first_seen, e.id))
