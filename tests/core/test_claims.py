"""Claims count the starts a worker did not live through: a retry by the holder is not an attempt, a
delivery of a job a live worker holds is not run, a dead holder's job is started again and counted."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

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


def test_a_holder_here_orphaned_by_its_killed_worker_is_dead_and_one_that_only_went_quiet_is_not(migrated_db):
    """A pool process whose worker was SIGKILLed is re-parented and never reports back: its job must not
    wait for it (seen in the soak: a slide held 100 s). One still under its worker is alive even when its
    heartbeat is old, as after a database outage that kept it from being written."""
    me = f"{HERE}/{os.getpid()}"
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    with subprocess.Popen(sleeper) as quiet, subprocess.Popen(sleeper) as orphan:
        try:
            for child, parent in ((quiet, me), (orphan, f"{HERE}/{dead_pid()}")):  # orphan: its worker died
                beat(migrated_db, f"{HERE}/{child.pid}", host=HERE, pid=child.pid, queues="slides", version="x",
                     parent=parent)  # fmt: skip
            held = {child: new_job(migrated_db) for child in (quiet, orphan)}
            for child, job in held.items():
                claim_job(migrated_db, job, f"{HERE}/{child.pid}", 3, MINUTE)
            every_beat_old = timedelta(0)
            assert claim_job(migrated_db, held[quiet], me, 3, every_beat_old) is None  # still our child
            taken = claim_job(migrated_db, held[orphan], me, 3, MINUTE)
            assert (taken.attempts, taken.worker) == (2, me)
        finally:
            quiet.kill()
            orphan.kill()


def test_a_zombie_holder_is_dead_though_its_pid_exists(migrated_db):
    job = new_job(migrated_db)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exits, and is not waited for yet
    try:
        stat = Path(f"/proc/{zombie.pid}/stat")
        deadline = time.monotonic() + 30
        while stat.read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        os.kill(zombie.pid, 0)  # the pid still exists
        claim_job(migrated_db, job, f"{HERE}/{zombie.pid}", 3, MINUTE)  # no heartbeat row: the pid decides
        taken = claim_job(migrated_db, job, f"{HERE}/{os.getpid()}", 3, MINUTE)
        assert (taken.attempts, taken.worker) == (2, f"{HERE}/{os.getpid()}")
    finally:
        zombie.wait()
