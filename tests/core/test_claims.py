"""Claims count the starts a worker did not live through: a retry by the holder is not an attempt, a
delivery of a job a live worker holds is not run, a dead holder's job is started again and counted."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta

from blastq.core.adapters.db import beat, claim_job, create_batch, create_job, job_status, stop_beating

MINUTE = timedelta(seconds=60)
HERE = socket.gethostname()


def new_job(db) -> str:
    batch = create_batch(db, "claims")
    return create_job(
        db,
        batch_id=batch,
        filename="a.png",
        input_key="inputs/a.png",
        sha256="a" * 64,
        mpp=None,
        params_key="k",
    ).id


def dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def test_a_retry_by_the_holder_is_not_another_attempt(migrated_db):
    job = new_job(migrated_db)
    me = f"{HERE}/{os.getpid()}"
    assert claim_job(migrated_db, job, me, 2, MINUTE).attempts == 1
    for _ in range(5):  # five retries after transient faults
        again = claim_job(migrated_db, job, me, 2, MINUTE)
        assert (again.state, again.attempts, again.worker) == ("running", 1, me)


def test_a_job_a_live_worker_holds_is_not_claimed_by_another(migrated_db):
    job = new_job(migrated_db)
    holder = f"{HERE}/{os.getpid()}"  # this process: alive
    claim_job(migrated_db, job, holder, 3, MINUTE)
    assert claim_job(migrated_db, job, f"{HERE}/1", 3, MINUTE) is None
    row = job_status(migrated_db, job)
    assert (row.state, row.attempts, row.worker) == ("running", 1, holder)


def test_a_dead_holders_job_is_started_again_and_failed_past_max_attempts(migrated_db):
    job = new_job(migrated_db)
    first, second = f"{HERE}/{dead_pid()}", f"{HERE}/{dead_pid()}"
    claim_job(migrated_db, job, first, 2, MINUTE)
    assert claim_job(migrated_db, job, second, 2, MINUTE).attempts == 2  # the first died
    assert claim_job(migrated_db, job, f"{HERE}/{os.getpid()}", 2, MINUTE) is None  # and so did the second
    row = job_status(migrated_db, job)
    assert (row.state, row.error) == ("failed", "gave up after 2 attempts (the worker died each time)")


def test_a_holder_on_another_machine_is_alive_while_its_heartbeat_is(migrated_db):
    job = new_job(migrated_db)
    remote = "other-host.lab/77"
    claim_job(migrated_db, job, remote, 3, MINUTE)
    beat(migrated_db, remote, host="other-host.lab", pid=77, queues="slides", version="x", parent=None)
    assert claim_job(migrated_db, job, f"{HERE}/{os.getpid()}", 3, MINUTE) is None
    stop_beating(migrated_db, remote)
    taken = claim_job(migrated_db, job, f"{HERE}/{os.getpid()}", 3, MINUTE)
    assert (taken.attempts, taken.worker) == (2, f"{HERE}/{os.getpid()}")


def test_without_heartbeats_every_claim_is_an_attempt(migrated_db):
    job = new_job(migrated_db)
    me = f"{HERE}/{os.getpid()}"
    assert [claim_job(migrated_db, job, me, 2).attempts for _ in range(2)] == [1, 2]
    assert claim_job(migrated_db, job, me, 2) is None
    assert job_status(migrated_db, job).state == "failed"
