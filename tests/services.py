"""The real services the tests talk to: PostgreSQL schemas and the loopback S3 server.

Shared by tests/core and tests/worker (importable as `services`: pytest puts tests/ on sys.path for
tests/conftest.py). A missing service skips the tests that need it, except in CI (CI set), where it
fails them: CI must never pass by skipping.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

PG_URL = os.environ.get("BLASTQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BLASTQ_TEST_REDIS_URL", "redis://127.0.0.1:6379")
S3_SERVER_SCRIPT = Path(__file__).resolve().parent / "s3server.py"


def missing_service(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def pg_schema(url: str = PG_URL) -> Iterator[str]:
    """`url` with its search_path set to a new, empty schema, dropped afterwards."""
    admin = create_engine(PG_URL, poolclass=NullPool, connect_args={"connect_timeout": 5})
    schema = f"blastq_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.begin() as c:
            c.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:
        missing_service(f"PostgreSQL not reachable at {make_url(PG_URL)}: {exc}")
    try:
        yield (
            make_url(url)
            .update_query_dict({"options": f"-csearch_path={schema}"})
            .render_as_string(hide_password=False)
        )
    finally:
        with admin.begin() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


class S3Server:
    """tests/s3server.py in a subprocess on a free loopback port; it dies with its stdin, so it never
    outlives pytest."""

    def __init__(self, log: Path, env: dict[str, str] | None = None):
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(S3_SERVER_SCRIPT), "--exit-on-stdin-eof"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, **(env or {})},
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("PORT "):
            self.stop()
            missing_service(f"the S3 test server did not start: {line!r}\n{log.read_text()[-2000:]}")
        self.endpoint_url = f"http://127.0.0.1:{int(line.split()[1])}"

    def stop(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
