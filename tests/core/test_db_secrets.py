"""Database errors name the database, never its password, whatever the password's characters."""

from __future__ import annotations

import pytest

from blastq.core.adapters.db import connect
from blastq.core.common.errors import DatabaseUnavailable

CLOSED = "127.0.0.1:1"  # nothing listens: refused at once


@pytest.mark.parametrize(
    "url,secret",
    [
        (f"postgresql+psycopg://lab:s3cr3t@{CLOSED}/blastq", "s3cr3t"),
        (f"postgresql+psycopg://lab:se/cr3t@{CLOSED}/blastq", "se/cr3t"),
        (
            f"postgresql+psycopg://lab:p@ss/w0rd@{CLOSED}/blastq",
            "w0rd",
        ),  # SQLAlchemy: password "p", host "ss"
        (f"postgresql+psycopg://lab@{CLOSED}/blastq?password=s3cr3t", "s3cr3t"),
    ],
)
def test_not_reachable_never_shows_the_password(url, secret):
    with pytest.raises(DatabaseUnavailable) as caught:
        connect(url)
    message = str(caught.value)
    assert "not reachable" in message and secret not in message and "***" in message
    assert "'ss'" not in message and "p@ss" not in message
