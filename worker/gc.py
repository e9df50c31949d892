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
from blastq.worker.messages import broker_kind, delivered_messages, remove_waiting, waiting_messages
from blastq.worker.tasks import PROCESS_SLIDE, TRAIN_MODEL


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


def _broker_garbage(settings: Settings, db, dry_run: bool) -> BrokerGarbage:
    found = BrokerGarbage(broker_kind(settings))
    waiting = waiting_messages(settings)
    if waiting is None:
        found.looked = False
        return found
    slides = open_job_ids(db, [m.target[1] for m in waiting if m.target and m.target[0] == PROCESS_SLIDE])
    runs = open_training_run_ids(
        db, [m.target[1] for m in waiting if m.target and m.target[0] == TRAIN_MODEL]
    )
    finished = [
        m
        for m in waiting
        if m.target is not None and m.target[1] not in (slides if m.target[0] == PROCESS_SLIDE else runs)
    ]
    found.finished = len(finished) if dry_run else remove_waiting(settings, finished)
    found.delivered = delivered_messages(settings, remove=not dry_run)
    return found
