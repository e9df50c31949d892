"""What waits in the broker: the messages queued for blastq's tasks, read (and removed) the way kombu
stores them, for `blastq gc` (messages of finished jobs) and `blastq requeue` (queued jobs whose message
is nowhere).

Two brokers are looked into: Redis (a list per queue, one more per priority) and the embedded one
(kombu's SQLAlchemy transport: a row per message, `visible` until a worker takes it, kept afterwards).
For any other, `waiting_messages` answers None: cannot tell.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from blastq.core.adapters import Settings
from blastq.worker.celery_app import QUEUES
from blastq.worker.tasks import PROCESS_SLIDE, TRAIN_MODEL

# Kombu's Redis transport keeps a message of priority p > 0 in the list `<queue>\x06\x16<p>`.
_REDIS_PRIORITY_SEP = "\x06\x16"
_REDIS_PRIORITIES = (3, 6, 9)
_REDIS_UNACKED = "unacked"  # kombu's hash of the messages workers took and have not acknowledged
_IN_CHUNKS = 500  # ids per DELETE ... IN (...)


@dataclass(frozen=True)
class Waiting:
    """One message waiting to be taken: where it is, and the job or run it is for (None: not blastq's)."""

    where: Any  # the embedded broker's row id, or Redis's (list name, payload)
    target: tuple[str, str] | None  # (task name, job or run id)


def message_target(payload: str | bytes | dict) -> tuple[str, str] | None:
    """(task name, job or run id) of a Celery message as kombu stores it; None if it is not one of ours."""
    message = _message(payload)
    try:
        task = message["headers"]["task"]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
    if task not in (PROCESS_SLIDE, TRAIN_MODEL) or not args or not isinstance(args[0], str):
        return None
    return task, args[0]


def _message(payload: str | bytes | dict) -> dict | None:
    if isinstance(payload, dict):
        return payload
    try:
        message = json.loads(payload)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _eta(payload: str | bytes | dict) -> datetime | None:
    """When a message is to run (a retry's countdown), UTC; None when at once."""
    message = _message(payload)
    try:
        eta = datetime.fromisoformat(message["headers"]["eta"])
    except (KeyError, TypeError, ValueError):
        return None
    return eta if eta.tzinfo else eta.replace(tzinfo=UTC)


def broker_kind(settings: Settings) -> str:
    """ "embedded", "redis", or the URL's scheme for a broker this module does not look into."""
    url = settings.broker_url.get_secret_value()
    if url.startswith("sqla+"):
        return "embedded"
    if url.startswith(("redis://", "rediss://")):
        return "redis"
    return url.split(":", 1)[0]


def waiting_messages(settings: Settings) -> list[Waiting] | None:
    """Every message waiting in blastq's queues (not yet taken by a worker); None for a broker it cannot read."""
    kind = broker_kind(settings)
    if kind == "embedded":
        with _embedded(settings) as (engine, table):
            if table is None:
                return []
            from sqlalchemy import select

            with engine.connect() as conn:
                rows = conn.execute(select(table.c.id, table.c.payload).where(table.c.visible.is_(True)))
                return [Waiting(r.id, message_target(r.payload)) for r in rows]
    if kind == "redis":
        with _redis(settings) as client:
            return [
                Waiting((name, payload), message_target(payload))
                for name in _redis_lists()
                for payload in client.lrange(name, 0, -1)
            ]
    return None


def held_for_later(settings: Settings, since: datetime) -> set[tuple[str, str]] | None:
    """Targets of the messages a worker took to run at a set time (a retry's countdown), that time later than
    `since`: Celery keeps such a message in the worker, unacknowledged, not in the queue, and a worker
    often holds many (after a database outage, one per queued job) and runs them one by one past their
    time. None for a broker that cannot be read. Redis: its hash of unacknowledged messages (given out
    again after the visibility timeout if their worker died); the embedded broker: its delivered rows.
    """
    kind = broker_kind(settings)
    if kind == "embedded":
        with _embedded(settings) as (engine, table):
            if table is None:
                return set()
            from sqlalchemy import select

            with engine.connect() as conn:
                held = list(conn.execute(select(table.c.payload).where(table.c.visible.is_(False))).scalars())
    elif kind == "redis":
        with _redis(settings) as client:
            held = []
            for value in client.hvals(_REDIS_UNACKED):
                try:
                    held.append(json.loads(value)[0])  # [message, exchange, routing key]
                except (ValueError, IndexError, TypeError):
                    continue
    else:
        return None
    return {
        t
        for m in held
        if (t := message_target(m)) is not None and (eta := _eta(m)) is not None and eta > since
    }


def remove_waiting(settings: Settings, messages: list[Waiting]) -> int:
    """Remove these waiting messages; returns how many went (one a worker took meanwhile is not counted)."""
    if not messages:
        return 0
    if broker_kind(settings) == "embedded":
        with _embedded(settings) as (engine, table), engine.begin() as conn:
            ids = [m.where for m in messages]
            return sum(
                conn.execute(
                    table.delete().where(table.c.id.in_(ids[i : i + _IN_CHUNKS]), table.c.visible.is_(True))
                ).rowcount
                for i in range(0, len(ids), _IN_CHUNKS)
            )
    with _redis(settings) as client:
        return sum(client.lrem(name, 1, payload) for name, payload in (m.where for m in messages))


def delivered_messages(settings: Settings, *, remove: bool = False) -> int:
    """The embedded broker's messages taken by a worker, which kombu keeps forever (0 for other brokers);
    with `remove`, they are deleted. A taken message is never read again: a worker that stops hands
    back what it has not finished as a new message."""
    if broker_kind(settings) != "embedded":
        return 0
    from sqlalchemy import func, select

    with _embedded(settings) as (engine, table):
        if table is None:
            return 0
        with engine.begin() as conn:
            delivered = table.c.visible.is_(False)
            if remove:
                return conn.execute(table.delete().where(delivered)).rowcount
            return conn.execute(select(func.count()).where(delivered)).scalar_one()


@contextmanager
def _embedded(settings: Settings) -> Iterator[tuple[Any, Any]]:
    """(engine, kombu_message table or None when no message was ever sent) of the embedded broker."""
    from sqlalchemy import MetaData, Table, create_engine, inspect
    from sqlalchemy.pool import NullPool

    url = settings.broker_url.get_secret_value().removeprefix("sqla+")
    options = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
    engine = create_engine(url, poolclass=NullPool, **options)
    try:
        if not inspect(engine).has_table("kombu_message"):
            yield engine, None
        else:
            yield engine, Table("kombu_message", MetaData(), autoload_with=engine)
    finally:
        engine.dispose()


@contextmanager
def _redis(settings: Settings) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(
        settings.broker_url.get_secret_value(), socket_connect_timeout=10, socket_timeout=30
    )
    try:
        yield client
    finally:
        client.close()


def _redis_lists() -> list[str]:
    return [
        name
        for queue in QUEUES
        for name in (queue, *(f"{queue}{_REDIS_PRIORITY_SEP}{p}" for p in _REDIS_PRIORITIES))
    ]
