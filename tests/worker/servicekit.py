"""Helpers for the slide-service tests: the real services, a deployment's environment, worker processes.

A missing service skips the tests that need it, except in CI (CI set) where it fails them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from services import PG_URL, REDIS_URL, S3Server, missing_service, pg_schema  # noqa: F401 - re-exported

WORKER_START_S = 90
# `blastq worker` however cli/main.py registers the service commands.
WORKER_MAIN = (
    "import sys; from blastq.cli.main import main; from blastq.cli.service import register; "
    "register(main); main(sys.argv[1:], prog_name='blastq')"
)
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "blastq-test-key-id",
    "AWS_SECRET_ACCESS_KEY": "blastq-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": "127.0.0.1,localhost",
}
CLEARED_ENV = (
    "BLASTQ_CONFIG", "BLASTQ_DATABASE_URL", "BLASTQ_BROKER_URL", "BLASTQ_STORE_URL", "BLASTQ_S3_ENDPOINT_URL",
    "BLASTQ_MODEL", "BLASTQ_DEVICE", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
)  # fmt: skip


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.2):
    """Poll `condition` until it returns something truthy; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


@contextmanager
def redis_database() -> Iterator[str]:
    """A broker URL on a Redis database number nobody else uses, emptied afterwards."""
    import redis

    try:
        client = redis.Redis.from_url(f"{REDIS_URL}/0", socket_connect_timeout=5)
        databases = int(client.config_get("databases").get("databases", 16))
    except redis.RedisError as exc:
        missing_service(f"Redis not reachable at {REDIS_URL}: {exc}")
    claim = f"blastq-test-claim-{uuid.uuid4().hex}"
    for number in range(databases - 1, 0, -1):
        db = redis.Redis.from_url(f"{REDIS_URL}/{number}")
        # Claimed by a key, so a concurrent test run picks another number.
        if db.dbsize() == 0 and db.set("blastq-test-claim", claim, nx=True, ex=3600):
            break
        db.close()
    else:
        pytest.fail(f"no free Redis database number at {REDIS_URL}")
    try:
        yield f"{REDIS_URL}/{number}"
    finally:
        db.flushdb()
        db.close()
        client.close()


@dataclass(frozen=True)
class Service:
    """One isolated deployment: the BLASTQ_* (and AWS_*) variables of its processes, and its settings."""

    env: dict[str, str]
    data_dir: Path

    def settings(self):
        from blastq.core.adapters.settings import load_settings

        return load_settings(self.env)


def use_service(monkeypatch, service: Service) -> None:
    """This process's environment as the service's processes see it (for the CLI and boto3)."""
    for name in CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in service.env.items():
        monkeypatch.setenv(name, value)


class WorkerProcess:
    """`blastq worker` in a subprocess, in its own process group."""

    def __init__(self, service: Service, log: Path, *args: str):
        self.log_path = log
        self.log = log.open("w")
        env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_MAIN, "worker", "--loglevel", "INFO", *args],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**env, **service.env},
            start_new_session=True,
        )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = WORKER_START_S) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"the worker exited with {self.proc.returncode}:\n{self.output[-3000:]}")
            return " ready." in self.output

        wait_until(ready, timeout_s, "the worker to start")

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM (finish the slide in hand, then exit); SIGKILL to the whole group if it does not."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group: pool processes included
        self.proc.wait()
        self.log.close()
