"""Fixtures for the slide service: the real Redis, PostgreSQL and S3 server, slides, worker subprocesses.

Each test module gets its own PostgreSQL schema (migrated with `blastq db upgrade`'s function), its own
Redis database number, and its own bucket. Workers run as `blastq worker` subprocesses in their own
process group and are always stopped at teardown.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import pytest
from click.testing import CliRunner
from servicekit import AWS_ENV, S3Server, Service, WorkerProcess, pg_schema, redis_database

if not os.environ.get("CI"):  # the service extra; in CI its absence is a failure, not a skip
    pytest.importorskip("celery", reason="pip install 'blastq[service]'")
    pytest.importorskip("redis", reason="pip install 'blastq[service]'")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    server = S3Server(tmp_path_factory.mktemp("s3server") / "server.log")
    try:
        yield server.endpoint_url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def lab_service(tmp_path_factory, s3_endpoint) -> Iterator[Service]:
    """PostgreSQL (a fresh, migrated schema), Redis (a fresh database number), S3 (a fresh bucket)."""
    from blastq.core.adapters.db import upgrade
    from blastq.core.adapters.store import S3Store

    data_dir = tmp_path_factory.mktemp("lab-data")
    with pg_schema() as db_url, redis_database() as broker_url:
        upgrade(db_url)
        bucket = f"blastq-test-{uuid.uuid4().hex[:12]}"
        with pytest.MonkeyPatch.context() as mp:
            for name, value in AWS_ENV.items():
                mp.setenv(name, value)
            S3Store(bucket, endpoint_url=s3_endpoint).ensure_bucket()
        env = {
            **AWS_ENV,
            "BLASTQ_DATA_DIR": str(data_dir),
            "BLASTQ_DATABASE_URL": db_url,
            "BLASTQ_BROKER_URL": broker_url,
            "BLASTQ_STORE_URL": f"s3://{bucket}/lab",
            "BLASTQ_S3_ENDPOINT_URL": s3_endpoint,
        }
        yield Service(env, data_dir)


@pytest.fixture(scope="module")
def embedded_service(tmp_path_factory) -> Service:
    """No servers at all: SQLite, a file store and the SQLite broker under a data dir."""
    data_dir = tmp_path_factory.mktemp("embedded-data")
    return Service({"BLASTQ_DATA_DIR": str(data_dir)}, data_dir)


@pytest.fixture
def cli() -> Callable[..., object]:
    """`blastq ARGS...` in this process; the environment is the test's."""
    from blastq.cli.main import main
    from blastq.cli.service import register

    register(main)
    runner = CliRunner()
    return lambda *args: runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


# --- slides ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def make_slide(tmp_path_factory) -> Callable[..., Path]:
    """slide(seed, size=512) -> a PNG of a synthetic field at 0.2 um/px, each content written once."""
    from blastq.core.synth.field import generate_field

    folder = tmp_path_factory.mktemp("slides")

    def slide(seed: int, size: int = 512) -> Path:
        path = folder / f"field_{seed}_{size}.png"
        if not path.exists():
            field = generate_field(seed, size, size, mpp=0.2)
            assert cv2.imwrite(str(path), cv2.cvtColor(field.image, cv2.COLOR_RGB2BGR))
        return path

    return slide


# --- workers --------------------------------------------------------------------------------------


@pytest.fixture
def start_worker(tmp_path) -> Iterator[Callable[..., WorkerProcess]]:
    """start_worker(service, *args) -> a ready worker; every one is stopped at teardown."""
    started: list[WorkerProcess] = []

    def start(service: Service, *args: str) -> WorkerProcess:
        worker = WorkerProcess(service, tmp_path / f"worker-{len(started)}.log", *args)
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="module")
def lab_worker(lab_service, tmp_path_factory) -> Iterator[WorkerProcess]:
    """One prefork worker (concurrency 1) on the lab services, shared by a module's tests."""
    worker = WorkerProcess(
        lab_service,
        tmp_path_factory.mktemp("lab-worker") / "worker.log",
        "--pool",
        "prefork",
        "--concurrency",
        "1",
    )
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()
