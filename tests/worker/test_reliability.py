"""The slide service under real faults, against the real Redis, PostgreSQL and S3 server.

Workers are `blastq worker` subprocesses. The database and the store go away through TCP proxies that a
test cuts; the broker loses its messages by being a redis-server of the test's own, killed and started
again; a worker process dies by SIGKILL. Each group of workers gets a Redis database and a store prefix
of its own, so no worker takes another test's jobs and a store listing shows one test's objects.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlparse

import pytest
from faults import PrivateRedis, TcpProxy
from servicekit import (
    Service,
    WorkerProcess,
    missing_service,
    pg_schema,
    redis_database,
    use_service,
    wait_until,
)
from sqlalchemy import func, make_url, select

from blastq.core.adapters.db import (
    CellRow,
    ResultRow,
    batch_jobs,
    connect,
    job_status,
    record_result,
    upgrade,
)
from blastq.core.adapters.store import open_store, slide_prefix
from blastq.core.cells.instances import CellRecord
from blastq.core.outputs.artifacts import ARTIFACT_NAMES
from blastq.core.pipeline.field import pipeline_config
from blastq.core.pipeline.resultkey import result_key, scale_key
from blastq.worker.submit import model_identity, submit, wait_for_batch

# A slide that a worker holds for about a second (0.9 s here), some twenty polls: long enough to cut a
# service, or kill its process, while
# the worker holds it. The others are 512 px, about half a second.
HELD_SLIDE_PX = 768
# A finished job's line in a worker's log (worker/tasks.py).
SUCCEEDED_LINE = re.compile(r"job ([0-9a-f-]{36}): .* succeeded \(result \d+\)")


# --- faults -----------------------------------------------------------------------------------------


# --- deployments and workers ----------------------------------------------------------------------


@contextmanager
def isolated(base: Service, **env: str) -> Iterator[Service]:
    """`base` with a Redis database and a store prefix of its own, and `env` on top."""
    with redis_database() as broker_url:
        yield Service(
            {
                **base.env,
                "BLASTQ_BROKER_URL": broker_url,
                "BLASTQ_STORE_URL": f"{base.env['BLASTQ_STORE_URL']}/{uuid.uuid4().hex[:8]}",
                **env,
            },
            base.data_dir,
        )


@contextmanager
def running_workers(service: Service, folder: Path, count: int = 1) -> Iterator[list[WorkerProcess]]:
    """`count` prefork workers of concurrency 1, all ready; all stopped (at once) on the way out."""
    workers: list[WorkerProcess] = []
    try:
        for i in range(count):
            workers.append(
                WorkerProcess(service, folder / f"worker-{i}.log", "--pool", "prefork", "--concurrency", "1")
            )
        for worker in workers:
            worker.wait_ready()
        yield workers
    finally:
        for worker in workers:  # all told first, so their warm shutdowns overlap
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.stop()


def pid_of(job_worker: str) -> int:
    return int(job_worker.rsplit("/", 1)[1])


@dataclass(frozen=True)
class Lab:
    """What a test sees of one deployment: its settings, database and store, reached directly."""

    service: Service
    settings: object
    db: object
    store: object


@contextmanager
def lab_of(service: Service, monkeypatch) -> Iterator[Lab]:
    use_service(monkeypatch, service)  # boto3 in this process needs the AWS variables
    settings = service.settings()
    db = connect(settings.database_url.get_secret_value())
    try:
        yield Lab(
            service, settings, db, open_store(settings.store_url, endpoint_url=settings.s3_endpoint_url)
        )
    finally:
        db.dispose()


def results_of(db, sha256: str) -> list:
    with db.connect() as c:
        return c.execute(select(ResultRow.__table__).where(ResultRow.sha256 == sha256)).all()


def cell_count(db, result_id: int) -> int:
    with db.connect() as c:
        return c.scalar(select(func.count()).select_from(CellRow).where(CellRow.result_id == result_id))


def wait_for_job(db, job_id: str, condition, what: str, timeout_s: float = 90):
    """The job's row once `condition(row)` holds; polled often: a slide holds a state for about a second."""
    return wait_until(
        lambda: (job := job_status(db, job_id)) is not None and condition(job) and job, timeout_s, what, 0.05
    )


def objects_of(store, sha256s) -> list[str]:
    """The store's keys that belong to these slides (inputs and artifacts), sorted."""
    return [key for key in store.list() if any(sha in key for sha in sha256s)]


def expected_objects(settings, sha256s) -> list[str]:
    # Every slide of these tests is submitted with mpp 0.2: one key for all.
    model = model_identity(settings)
    model_version = model.version
    params_key = result_key(pipeline_config(settings, model.sha256), model, scale_key(0.2, "user"))
    return sorted(
        [f"inputs/{sha}.png" for sha in sha256s]
        + [
            f"{slide_prefix(sha, model_version, params_key)}/{name}"
            for sha in sha256s
            for name in ARTIFACT_NAMES
        ]
    )


# --- several workers, one batch -------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_workers(lab_service, tmp_path_factory) -> Iterator[tuple[Service, list[WorkerProcess]]]:
    with (
        isolated(lab_service) as service,
        running_workers(service, tmp_path_factory.mktemp("two-workers"), count=2) as workers,
    ):
        yield service, workers


def test_two_workers_share_a_batch_of_20_and_process_each_slide_exactly_once(
    two_workers, make_slide, monkeypatch
):
    service, workers = two_workers
    with lab_of(service, monkeypatch) as lab:
        outcome = submit(lab.settings, [make_slide(seed) for seed in range(1001, 1021)], mpp=0.2)
        assert not outcome.errors
        status = wait_for_batch(lab.settings, outcome.batch_id, timeout_s=150)
        jobs = batch_jobs(lab.db, outcome.batch_id)

        assert (status.succeeded, status.failed) == (20, 0), [w.output[-2000:] for w in workers]
        assert [j.attempts for j in jobs] == [1] * 20
        assert len({j.result_id for j in jobs}) == 20
        for job in jobs:
            (result,) = results_of(lab.db, job.sha256)
            assert result.id == job.result_id
        # Each job ran once in all: one success line in one worker's log, none anywhere else.
        runs = [SUCCEEDED_LINE.findall(w.output) for w in workers]
        assert sorted(sum(runs, [])) == sorted(j.id for j in jobs)
        # Both were idle and took one message at a time (prefetch 1) when the batch came: both worked.
        assert all(runs), [len(r) for r in runs]
        assert len({j.worker for j in jobs}) == 2
        # The store holds each input and one set of artifacts per slide, under the one expected prefix.
        sha256s = {j.sha256 for j in jobs}
        assert objects_of(lab.store, sha256s) == expected_objects(lab.settings, sha256s)


def test_the_same_content_queued_twice_at_once_is_recorded_once(
    two_workers, make_slide, tmp_path, monkeypatch
):
    """Two files of one content (a scanner that wrote a slide twice), taken by two workers at once."""
    service, _ = two_workers
    original = make_slide(1101, size=HELD_SLIDE_PX)
    first, second = tmp_path / "scan-a.png", tmp_path / "scan-b.png"
    shutil.copy(original, first)
    shutil.copy(original, second)
    with lab_of(service, monkeypatch) as lab:
        outcome = submit(lab.settings, [first, second, first], mpp=0.2)  # a path named twice: one job
        assert [j.state for j in outcome.jobs] == ["queued", "queued"]
        status = wait_for_batch(lab.settings, outcome.batch_id, timeout_s=90)
        jobs = batch_jobs(lab.db, outcome.batch_id)

        assert (status.succeeded, status.failed) == (2, 0), [j.error for j in jobs]
        assert jobs[0].result_id == jobs[1].result_id
        (result,) = results_of(lab.db, jobs[0].sha256)
        assert cell_count(lab.db, result.id) == result.white_cells  # one set of cells, not two
        csv_rows = lab.store.get(f"{result.store_prefix}/cells.csv").decode().strip().splitlines()
        assert len(csv_rows) - 1 == result.white_cells


def test_two_workers_recording_the_same_result_at_once_leave_one_row_with_one_set_of_cells(lab_service):
    """The race behind the test above, made certain: both record at the same instant, first a new
    result (both insert), then an existing one (both replace its cells)."""
    url = lab_service.env["BLASTQ_DATABASE_URL"]
    engines = [connect(url), connect(url)]
    cells = [
        CellRecord(**{f.name: 1 for f in fields(CellRecord)} | {"cell_id": i, "label": "blast"})
        for i in range(40)
    ]
    try:
        for _ in range(3):
            summary = {
                "image": "race.png", "sha256": uuid.uuid4().hex, "model_version": "race", "params_key": "p",
                "width": 512, "height": 512, "mpp": 0.2, "mpp_source": "user", "white_cells": len(cells),
                "blasts": len(cells), "blast_percent": 100.0, "flagged": True, "threshold_percent": 20.0,
                "seconds": 1.0, "differential": {}, "review_cells": 0, "classifier_version": "",
                "verdict": "insufficient cells", "min_white_cells": 100,
            }  # fmt: skip
            for case in ("both insert", "both replace"):
                barrier = threading.Barrier(2)

                def record(db, summary=summary, barrier=barrier) -> int:
                    barrier.wait()
                    return record_result(db, summary, cells, "slides/race")

                with ThreadPoolExecutor(2) as pool:
                    ids = [f.result() for f in [pool.submit(record, db) for db in engines]]
                (result,) = results_of(engines[0], summary["sha256"])
                assert ids == [result.id, result.id], case
                assert cell_count(engines[0], result.id) == len(cells), case
    finally:
        for db in engines:
            db.dispose()


# --- the database or the store away for a few seconds ---------------------------------------------


@dataclass(frozen=True)
class CutOff:
    service: Service  # what the test uses: the database and the store directly
    worker: WorkerProcess  # reaches both through the proxies
    proxies: dict[str, TcpProxy]


@pytest.fixture(scope="module")
def cut_off(lab_service, tmp_path_factory) -> Iterator[CutOff]:
    """One worker whose database and store are behind proxies the tests can cut."""
    db_url = make_url(lab_service.env["BLASTQ_DATABASE_URL"])
    s3 = urlparse(lab_service.env["BLASTQ_S3_ENDPOINT_URL"])
    with ExitStack() as stack:
        proxies = {
            "database": stack.enter_context(TcpProxy((db_url.host, db_url.port or 5432))),
            "store": stack.enter_context(TcpProxy((s3.hostname, s3.port))),
        }
        service = stack.enter_context(isolated(lab_service))
        through_proxies = {
            "BLASTQ_DATABASE_URL": db_url.set(
                host="127.0.0.1", port=proxies["database"].port
            ).render_as_string(hide_password=False),
            "BLASTQ_S3_ENDPOINT_URL": f"http://127.0.0.1:{proxies['store'].port}",
        }
        (worker,) = stack.enter_context(
            running_workers(
                Service({**service.env, **through_proxies}, service.data_dir),
                tmp_path_factory.mktemp("cut-off-worker"),
            )
        )
        yield CutOff(service, worker, proxies)


@pytest.mark.parametrize(("away", "seed"), [("database", 1401), ("store", 1402)])
def test_a_job_retries_with_backoff_through_a_few_seconds_without_its_service_and_succeeds(
    cut_off, make_slide, monkeypatch, away, seed
):
    with lab_of(cut_off.service, monkeypatch) as lab:
        outcome = submit(lab.settings, [make_slide(seed, size=HELD_SLIDE_PX)], mpp=0.2)
        job_id = outcome.jobs[0].job_id
        wait_for_job(lab.db, job_id, lambda j: j.state == "running", "the worker to start the slide")

        retried = re.compile(rf"job {job_id}: .*; retry 1 \(")
        with cut_off.proxies[away].cut():
            cut_at = time.monotonic()
            wait_until(lambda: retried.search(cut_off.worker.output), 60, f"a retry while the {away} is away")
            # Away for 3 s at least, so the retries meet it away too: they back off, and do not give up.
            time.sleep(max(0.0, 3 - (time.monotonic() - cut_at)))
        status = wait_for_batch(lab.settings, outcome.batch_id, timeout_s=90)
        job = job_status(lab.db, job_id)

        assert (status.succeeded, job.error) == (1, None), cut_off.worker.output[-3000:]
        assert job.attempts == 1  # retries by the worker holding it are not attempts
        (result,) = results_of(lab.db, job.sha256)
        assert result.id == job.result_id
        assert cell_count(lab.db, result.id) == result.white_cells
        assert objects_of(lab.store, [job.sha256]) == expected_objects(lab.settings, [job.sha256])


def test_a_store_away_longer_than_the_former_retry_window_is_waited_out(cut_off, make_slide, monkeypatch):
    """70 s without the store: the former 6 retries (~31 s on average, 63 s at most) failed such a job;
    it now waits up to BLASTQ_TRANSIENT_WAIT_S (an hour) and succeeds once the store is back."""
    with lab_of(cut_off.service, monkeypatch) as lab:
        outcome = submit(lab.settings, [make_slide(1403, size=HELD_SLIDE_PX)], mpp=0.2)
        job_id = outcome.jobs[0].job_id
        wait_for_job(lab.db, job_id, lambda j: j.state == "running", "the worker to start the slide")
        with cut_off.proxies["store"].cut():
            time.sleep(70)
        status = wait_for_batch(lab.settings, outcome.batch_id, timeout_s=180)
        job = job_status(lab.db, job_id)
        assert (status.succeeded, job.error, job.attempts) == (1, None, 1), cut_off.worker.output[-3000:]
        assert re.search(
            rf"job {job_id}: .*; retry (?:[4-9]|[1-9]\d+) \(", cut_off.worker.output
        )  # past 3 retries
        (result,) = results_of(lab.db, job.sha256)
        assert objects_of(lab.store, [job.sha256]) == expected_objects(lab.settings, [job.sha256])


# --- the broker restarted ---------------------------------------------------------------------------


def test_jobs_queued_when_the_broker_restarts_are_recovered_by_requeue_and_run_once(
    lab_service, make_slide, cli, tmp_path, monkeypatch
):
    try:
        broker = PrivateRedis(tmp_path)
    except FileNotFoundError as exc:
        missing_service(str(exc))
    try:
        with pg_schema() as db_url:  # a database of its own: requeue sends every stale job in it
            upgrade(db_url)
            service = Service(
                {
                    **lab_service.env,
                    "BLASTQ_BROKER_URL": broker.url,
                    "BLASTQ_DATABASE_URL": db_url,
                    "BLASTQ_STORE_URL": f"{lab_service.env['BLASTQ_STORE_URL']}/{uuid.uuid4().hex[:8]}",
                },
                lab_service.data_dir,
            )
            with lab_of(service, monkeypatch) as lab:
                outcome = submit(lab.settings, [make_slide(seed) for seed in (1201, 1202, 1203)], mpp=0.2)
                job_ids = sorted(j.job_id for j in outcome.jobs)
                assert not outcome.errors and broker.client.llen("slides") == 3

                broker.crash()
                broker.start()
                assert broker.client.llen("slides") == 0  # the messages are gone; the rows are not

                with running_workers(service, tmp_path) as (worker,):
                    assert {j.state for j in batch_jobs(lab.db, outcome.batch_id)} == {"queued"}
                    requeued = cli("requeue", "--older-than", "0")
                    assert requeued.exit_code == 0, requeued.output
                    assert sorted(re.findall(r"^requeued job (\S+)$", requeued.output, re.M)) == job_ids

                    status = wait_for_batch(lab.settings, outcome.batch_id, timeout_s=90)
                    jobs = batch_jobs(lab.db, outcome.batch_id)
                    assert (status.succeeded, status.failed) == (3, 0), worker.output[-3000:]
                    assert [j.attempts for j in jobs] == [1, 1, 1]
                    assert sorted(SUCCEEDED_LINE.findall(worker.output)) == job_ids
                    assert all(len(results_of(lab.db, j.sha256)) == 1 for j in jobs)
                    assert lab.store.list() == expected_objects(lab.settings, {j.sha256 for j in jobs})
                    assert cli("requeue", "--older-than", "0").output.endswith("0 job(s) requeued\n")
    finally:
        broker.stop()


# --- a slide that kills its worker ------------------------------------------------------------------


def test_a_slide_that_kills_its_worker_every_time_fails_after_max_attempts_and_the_rest_complete(
    lab_service, make_slide, tmp_path, monkeypatch
):
    with (
        isolated(lab_service, BLASTQ_MAX_ATTEMPTS="2") as service,
        running_workers(service, tmp_path) as (worker,),
        lab_of(service, monkeypatch) as lab,
    ):
        slides = [make_slide(1301, size=HELD_SLIDE_PX), make_slide(1302), make_slide(1303)]
        outcome = submit(lab.settings, slides, mpp=0.2)
        deadly = outcome.jobs[0].job_id
        for attempt in (1, 2):
            job = wait_for_job(
                lab.db,
                deadly,
                lambda j, n=attempt: j.state == "running" and j.attempts == n,
                f"attempt {attempt}",
            )
            assert pid_of(job.worker) != worker.proc.pid  # a pool process, not the worker's main process
            os.kill(pid_of(job.worker), signal.SIGKILL)

        status = wait_for_batch(lab.settings, outcome.batch_id, timeout_s=90)
        jobs = {j.id: j for j in batch_jobs(lab.db, outcome.batch_id)}
        failed = jobs.pop(deadly)
        assert (status.succeeded, status.failed) == (2, 1), worker.output[-3000:]
        assert (failed.state, failed.attempts, failed.result_id) == ("failed", 2, None)
        assert failed.error == "gave up after 2 attempts (the worker died each time)"
        assert [(j.state, j.attempts) for j in jobs.values()] == [("succeeded", 1)] * 2
        assert worker.proc.poll() is None  # the worker lives on, with a new pool process
