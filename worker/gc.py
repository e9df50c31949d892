"""`blastq gc`: remove what no row needs any more.

- **Store objects** in blastq's folders (inputs/, slides/, models/, training/, doctor/) that no row names:
  a result's outputs written before a worker died and its job then failed, a slide's outputs under a model
  version that was never recorded, an uploaded input whose job row was never written. Only objects older
  than the grace period go: a slide's outputs are written before its row, an input before its job, so a
  younger unnamed object may be a row on its way. The store is listed before the rows are read, for the
  same reason. Keys outside those folders (a shared bucket's other files) are never touched.
- **Abandoned writes**: a killed process's half-written temporary files (file store) or unfinished
  multipart uploads (S3), older than the grace period.
- **Broker messages** no job needs: messages queued for a job or training run that has finished (or that
  no row names), and the embedded broker's delivered messages, which kombu's SQLAlchemy transport keeps
  forever (it marks them invisible and never deletes them). A message for a queued or running job stays.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from blastq.core.adapters import (
    STORE_FOLDERS,
    Settings,
    StoredObject,
    connect,
    open_job_ids,
    open_training_run_ids,
    store_from_settings,
    store_references,
)
from blastq.worker.celery_app import QUEUES
from blastq.worker.tasks import PROCESS_SLIDE, TRAIN_MODEL

# Kombu's Redis transport keeps a message of priority p > 0 in the list `<queue>\x06\x16<p>`.
_REDIS_PRIORITY_SEP = "\x06\x16"
_REDIS_PRIORITIES = (3, 6, 9)


@dataclass
class BrokerGarbage:
    kind: str  # "embedded", "redis", or a scheme gc does not look into
    delivered: int = 0  # the embedded broker's delivered messages
    finished: int = 0  # queued messages of jobs and runs that are finished or unknown
    looked: bool = True


@dataclass
class GcReport:
    dry_run: bool
    grace: timedelta
    store_url: str
    objects: int = 0  # in blastq's folders
    orphans: list[StoredObject] = field(default_factory=list)  # removed (or, dry, to remove)
    young_orphans: int = 0  # no row names them, but younger than the grace period: kept
    outside: int = 0  # keys outside blastq's folders: left alone
    abandoned_writes: int = 0
    broker: BrokerGarbage | None = None

    @property
    def orphan_bytes(self) -> int:
        return sum(o.size for o in self.orphans)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "grace_s": self.grace.total_seconds(),
            "store": {
                "url": self.store_url,
                "objects": self.objects,
                "orphans": [o.key for o in self.orphans],
                "orphan_bytes": self.orphan_bytes,
                "young_orphans_kept": self.young_orphans,
                "outside_left_alone": self.outside,
                "abandoned_writes": self.abandoned_writes,
            },
            "broker": None
            if self.broker is None
            else {
                "kind": self.broker.kind,
                "looked": self.broker.looked,
                "delivered_messages": self.broker.delivered,
                "finished_jobs_messages": self.broker.finished,
            },
        }


def collect_garbage(
    settings: Settings, *, grace: timedelta, dry_run: bool = False, broker: bool = True
) -> GcReport:
    """Remove (with `dry_run`: only count) the store objects, abandoned writes and broker messages that no
    row needs; see the module's docstring. `grace`: how old an unnamed object must be to go."""
    if grace < timedelta(0):
        raise ValueError("the grace period cannot be negative")
    store = store_from_settings(settings)
    report = GcReport(dry_run=dry_run, grace=grace, store_url=store.url)
    db = connect(settings.database_url.get_secret_value())
    try:
        now = datetime.now(UTC)
        listed = store.objects()  # before the rows: a row written meanwhile is read, never missed
        refs = store_references(db)
        for obj in listed:
            if obj.key.split("/", 1)[0] not in STORE_FOLDERS:
                report.outside += 1
                continue
            report.objects += 1
            if refs.holds(obj.key):
                continue
            if now - obj.modified < grace:
                report.young_orphans += 1
                continue
            report.orphans.append(obj)
        if not dry_run:
            for obj in report.orphans:
                store.delete(obj.key)
        report.abandoned_writes = store.clear_abandoned_writes(now - grace, dry_run=dry_run)
        if broker:
            report.broker = _broker_garbage(settings, db, dry_run)
    finally:
        db.dispose()
    return report


def message_target(payload: str | bytes) -> tuple[str, str] | None:
    """(task name, job or run id) of a Celery message as kombu stores it; None if it is not one of ours."""
    try:
        message = json.loads(payload)
        task = message["headers"]["task"]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if task not in (PROCESS_SLIDE, TRAIN_MODEL) or not args or not isinstance(args[0], str):
        return None
    return task, args[0]


def _finished(db, targets: list[tuple[str, str] | None]) -> list[bool]:
    """For each message target: whether its job or run is finished or unknown (None: not ours, kept)."""
    jobs = open_job_ids(db, [t[1] for t in targets if t and t[0] == PROCESS_SLIDE])
    runs = open_training_run_ids(db, [t[1] for t in targets if t and t[0] == TRAIN_MODEL])
    return [t is not None and t[1] not in (jobs if t[0] == PROCESS_SLIDE else runs) for t in targets]


def _broker_garbage(settings: Settings, db, dry_run: bool) -> BrokerGarbage:
    url = settings.broker_url.get_secret_value()
    if url.startswith("sqla+"):
        return _embedded_garbage(url.removeprefix("sqla+"), db, dry_run)
    if url.startswith(("redis://", "rediss://")):
        return _redis_garbage(url, db, dry_run)
    return BrokerGarbage(url.split(":", 1)[0], looked=False)


def _embedded_garbage(url: str, db, dry_run: bool) -> BrokerGarbage:
    from sqlalchemy import MetaData, Table, create_engine, func, inspect, select
    from sqlalchemy.pool import NullPool

    found = BrokerGarbage("embedded")
    options = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
    engine = create_engine(url, poolclass=NullPool, **options)
    try:
        if not inspect(engine).has_table("kombu_message"):
            return found  # no message was ever sent through it
        messages = Table("kombu_message", MetaData(), autoload_with=engine)
        delivered = messages.c.visible.is_(False)
        with engine.begin() as conn:
            waiting = conn.execute(
                select(messages.c.id, messages.c.payload).where(messages.c.visible.is_(True))
            )
            waiting = list(waiting)
            finished = [
                row.id
                for row, done in zip(
                    waiting, _finished(db, [message_target(r.payload) for r in waiting]), strict=True
                )
                if done
            ]
            found.delivered = conn.execute(select(func.count()).where(delivered)).scalar_one()
            found.finished = len(finished)
            if not dry_run:
                conn.execute(messages.delete().where(delivered))
                for start in range(0, len(finished), 500):
                    chunk = finished[start : start + 500]
                    conn.execute(messages.delete().where(messages.c.id.in_(chunk)))
    finally:
        engine.dispose()
    return found


def _redis_garbage(url: str, db, dry_run: bool) -> BrokerGarbage:
    import redis

    found = BrokerGarbage("redis")
    client = redis.Redis.from_url(url, socket_connect_timeout=10, socket_timeout=30)
    try:
        for queue in QUEUES:
            for name in (queue, *(f"{queue}{_REDIS_PRIORITY_SEP}{p}" for p in _REDIS_PRIORITIES)):
                waiting = client.lrange(name, 0, -1)
                for payload, done in zip(
                    waiting, _finished(db, [message_target(p) for p in waiting]), strict=True
                ):
                    if done:
                        # One copy, by value: a worker may have taken it meanwhile (then nothing goes).
                        found.finished += 1 if dry_run else client.lrem(name, 1, payload)
    finally:
        client.close()
    return found
