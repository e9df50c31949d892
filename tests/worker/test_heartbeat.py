"""Worker heartbeats: `blastq status` shows who is alive, and `blastq requeue` sends the job a dead worker
left running at once (not after --older-than); a slide past BLASTQ_SLIDE_TIME_LIMIT_S is stopped and its
job failed with the reason. On the real PostgreSQL, Redis and S3 server."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from servicekit import Service, use_service, wait_until

from blastq.core.adapters.db import (
    beat,
    claim_job,
    connect,
    create_batch,
    create_job,
    dead_workers_jobs,
    job_status,
    list_workers,
    stop_beating,
)
from blastq.worker.submit import submit, wait_for_batch


def new_job(db, sha: str) -> str:
    batch = create_batch(db, "heartbeat test")
    return create_job(
        db,
        batch_id=batch,
        filename=f"{sha}.png",
        input_key=f"inputs/{sha}.png",
        sha256=sha,
        mpp=None,
        params_key="k",
    ).id


def test_a_running_job_belongs_to_a_dead_worker_once_it_stops_beating(migrated_db):
    db = migrated_db
    alive, dead, unknown = new_job(db, "a" * 64), new_job(db, "b" * 64), new_job(db, "c" * 64)
    for job_id, worker in ((alive, "host/1"), (dead, "host/2"), (unknown, "old-blastq/3")):
        assert claim_job(db, job_id, worker, 3) is not None
    for name in ("host/1", "host/2"):
        beat(db, name, host="host", pid=int(name[-1]), queues="slides", version="x", parent="host/0")
    minute = timedelta(seconds=60)
    assert dead_workers_jobs(db, minute) == []
    assert [w.alive for w in list_workers(db, minute)] == [True, True]

    stop_beating(db, "host/2")
    ((job, worker),) = dead_workers_jobs(db, minute)
    assert (job.id, worker.name, worker.stopped_at is not None) == (dead, "host/2", True)
    assert [(w.name, w.alive) for w in list_workers(db, minute)] == [("host/1", True), ("host/2", False)]

    # Not heard of for longer than dead_after: dead too. A worker with no heartbeat row (an older blastq)
    # is never judged by heartbeats, and a finished job is nobody's concern.
    time.sleep(0.05)
    assert {j.id for j, _ in dead_workers_jobs(db, timedelta(seconds=0.01))} == {alive, dead}
    finish_job_row(db, alive)
    assert {j.id for j, _ in dead_workers_jobs(db, timedelta(seconds=0.01))} == {dead}
    # A beat after a stop brings it back (the same process name started again).
    beat(db, "host/2", host="host", pid=2, queues="slides", version="x", parent=None)
    assert dead_workers_jobs(db, minute) == []


@contextmanager
def lab_with(lab_service, monkeypatch, **env: str) -> Iterator[tuple[Service, object, object]]:
    """The lab services with these settings in this process: (service, settings, database engine)."""
    service = Service({**lab_service.env, **env}, lab_service.data_dir)
    use_service(monkeypatch, service)
    settings = service.settings()
    db = connect(settings.database_url.get_secret_value())
    try:
        yield service, settings, db
    finally:
        db.dispose()


def finish_job_row(db, job_id: str) -> None:
    from sqlalchemy import update

    from blastq.core.adapters.db.schema import jobs_table

    with db.begin() as c:  # succeeded without a result row: enough for this query
        c.execute(update(jobs_table).where(jobs_table.c.id == job_id).values(state="succeeded"))


def test_requeue_sends_a_killed_workers_job_at_once_and_it_completes_once(
    lab_service, start_worker, cli, make_slide, monkeypatch
):
    with lab_with(lab_service, monkeypatch, BLASTQ_HEARTBEAT_S="1") as (service, settings, db):
        worker = start_worker(service, "--pool", "prefork", "--concurrency", "1")
        status = wait_until(
            lambda: "workers: 1 alive" in (out := cli("status").output) and out, 30, "a heartbeat"
        )
        assert "alive    slides" in status

        outcome = submit(settings, [make_slide(171, size=1536)], mpp=0.2)
        job_id = outcome.jobs[0].job_id
        wait_until(lambda: job_status(db, job_id).state == "running", 120, "the slide to start")
        os.killpg(worker.proc.pid, signal.SIGKILL)  # the whole worker: no process left to hand it back
        killed_at = time.monotonic()

        # Dead once silent for 3 heartbeats and 5 s; until then its job is left alone.
        assert cli("requeue").output.endswith("0 job(s) requeued\n")
        wait_until(lambda: "DEAD" in cli("status").output, 30, "the worker to count as dead")
        requeued = cli("requeue")  # the default --older-than (an hour) would send nothing yet
        assert requeued.exit_code == 0, requeued.output
        assert (
            f"requeued job {job_id} (its worker " in requeued.output
            and "was last heard of" in requeued.output
        )
        assert time.monotonic() - killed_at < 60

        start_worker(service, "--pool", "prefork", "--concurrency", "1")
        batch = wait_for_batch(settings, outcome.batch_id, timeout_s=180)
        job = job_status(db, job_id)
        assert (batch.succeeded, job.state, job.attempts) == (1, "succeeded", 2)
        assert cli("requeue").output.endswith("0 job(s) requeued\n")  # nothing left behind


def test_a_slide_past_the_time_limit_is_stopped_and_failed_with_the_reason(
    lab_service, start_worker, make_slide, monkeypatch
):
    with lab_with(lab_service, monkeypatch, BLASTQ_SLIDE_TIME_LIMIT_S="1") as (service, settings, db):
        worker = start_worker(service, "--pool", "prefork", "--concurrency", "1")
        outcome = submit(settings, [make_slide(181, size=2048)], mpp=0.2)  # several seconds of work
        batch = wait_for_batch(settings, outcome.batch_id, timeout_s=120)
        job = job_status(db, outcome.jobs[0].job_id)
        assert (batch.failed, job.state, job.attempts) == (1, "failed", 1), worker.output[-3000:]
        assert job.error == "stopped after 1 s: longer than BLASTQ_SLIDE_TIME_LIMIT_S (1 s)"
        assert worker.proc.poll() is None  # the worker goes on
