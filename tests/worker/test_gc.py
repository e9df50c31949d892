"""`blastq gc`: store objects no row names and broker messages no open job needs go; nothing else does.

Against the real PostgreSQL, Redis and S3 server, and on the embedded defaults (SQLite, a file store, the
SQLite broker), with rows made the way users make them (`blastq run`, `blastq submit`).
"""

from __future__ import annotations

import json
import os
import time
import uuid

import redis
from servicekit import use_service
from sqlalchemy import create_engine, text, update

from blastq.core.adapters import connect, store_from_settings
from blastq.core.adapters.db.schema import jobs_table
from blastq.worker.celery_app import SLIDES_QUEUE, make_app
from blastq.worker.messages import message_target
from blastq.worker.tasks import PROCESS_SLIDE


def set_state(settings, job_id: str, state: str) -> None:
    db = connect(settings.database_url.get_secret_value())
    try:
        with db.begin() as c:
            c.execute(update(jobs_table).where(jobs_table.c.id == job_id).values(state=state))
    finally:
        db.dispose()


def submitted_ids(output: str) -> list[str]:
    """The job ids `blastq submit` printed, in order."""
    return [
        word
        for line in output.splitlines()
        for word in line.split()
        if len(word) == 36 and word.count("-") == 4
    ]


def orphans(store) -> list[str]:
    """Objects in blastq's folders that no row names, and one outside them."""
    fake = uuid.uuid4().hex
    keys = [
        f"slides/{fake}/v9/k9/mask.png",  # outputs whose result row was never written
        f"inputs/{fake}.png",  # an upload whose job row was never written
        "doctor/host-1-probe.probe",  # a probe a killed `blastq doctor` left
        f"training/{uuid.uuid4()}/last.pt",  # files of a training run no row names
    ]
    for key in keys:
        store.put(key, b"left behind")
    return keys


def test_gc_removes_what_no_row_names_and_messages_of_finished_jobs_only(
    lab_service, cli, make_slide, monkeypatch
):
    use_service(monkeypatch, lab_service)
    settings = lab_service.settings()
    store = store_from_settings(settings)
    assert cli("run", make_slide(41, 256)).exit_code == 0  # a result row and its outputs
    out = cli("submit", make_slide(42, 256), make_slide(43, 256))  # no worker: two queued jobs
    assert out.exit_code == 0, out.output
    queued, finished = submitted_ids(out.output)
    set_state(settings, finished, "failed")
    broker = redis.Redis.from_url(settings.broker_url.get_secret_value())
    broker.lpush(SLIDES_QUEUE, b"not a celery message")  # someone else's: never touched
    targets = [message_target(m) for m in broker.lrange(SLIDES_QUEUE, 0, -1)]
    assert sorted(t for t in targets if t) == sorted([(PROCESS_SLIDE, queued), (PROCESS_SLIDE, finished)])
    assert targets.count(None) == 1

    needed = store.list()
    left = orphans(store)
    store.put("exports/keep.csv", b"a lab's own file")

    young = cli("gc")  # default: 24 h; every orphan is seconds old
    assert young.exit_code == 0, young.output
    assert "removed 0 no row names" in young.output and "kept 4 younger than 24 h" in young.output
    assert "left alone 1 outside its folders" in young.output
    assert "removed 1 message(s) of finished jobs" in young.output
    assert [message_target(m) for m in broker.lrange(SLIDES_QUEUE, 0, -1)].count((PROCESS_SLIDE, queued)) == 1
    assert broker.llen(SLIDES_QUEUE) == 2  # the queued job's message and the foreign one
    assert sorted(store.list()) == sorted([*needed, *left, "exports/keep.csv"])

    dry = json.loads(cli("gc", "--older-than", "0", "--dry-run", "--json").output)
    assert sorted(dry["store"]["orphans"]) == sorted(left)
    assert dry["store"]["orphan_bytes"] == 4 * len(b"left behind")
    assert sorted(store.list()) == sorted([*needed, *left, "exports/keep.csv"])

    done = cli("gc", "--older-than", "0", "-v")
    assert done.exit_code == 0, done.output
    for key in left:
        assert f"removed {key} (11 bytes" in done.output
    assert sorted(store.list()) == sorted([*needed, "exports/keep.csv"])
    assert any(k.startswith("inputs/") for k in needed) and any(k.startswith("slides/") for k in needed)
    assert broker.llen(SLIDES_QUEUE) == 2


def test_gc_on_the_embedded_defaults_trims_delivered_messages_and_goes_by_age(
    embedded_service, cli, make_slide, monkeypatch
):
    use_service(monkeypatch, embedded_service)
    settings = embedded_service.settings()
    store = store_from_settings(settings)
    out = cli("submit", make_slide(44, 256), make_slide(45, 256), make_slide(46, 256))
    assert out.exit_code == 0, out.output
    _, finished, _ = submitted_ids(out.output)
    app = make_app(settings)
    with app.connection_for_read() as conn:  # a worker's take: kombu marks the message delivered
        assert conn.default_channel.basic_get(SLIDES_QUEUE, no_ack=True) is not None
    app.close()
    set_state(settings, finished, "succeeded")

    old, young = orphans(store)[:2]
    root = store.root
    two_days_ago = time.time() - 2 * 86400
    os.utime(root / old, (two_days_ago, two_days_ago))
    half = root / "slides" / ".cells.csv.x1y2.part"  # a write a killed worker left
    half.write_bytes(b"half")
    os.utime(half, (two_days_ago, two_days_ago))

    dry = cli("gc", "--dry-run", "-v")
    assert dry.exit_code == 0, dry.output
    assert f"would remove {old} (11 bytes" in dry.output
    assert "would remove 1 message(s) of finished jobs, 1 delivered message(s)" in dry.output
    assert (root / old).exists() and half.exists()

    done = cli("gc")
    assert done.exit_code == 0, done.output
    assert "removed 1 no row names" in done.output and "kept 3 younger than 24 h" in done.output
    assert "abandoned writes: removed 1" in done.output
    assert not (root / old).exists() and not half.exists() and (root / young).exists()
    broker = create_engine(settings.broker_url.get_secret_value().removeprefix("sqla+"))
    with broker.connect() as c:
        rows = c.execute(text("SELECT visible, payload FROM kombu_message")).all()
    broker.dispose()
    assert len(rows) == 1 and rows[0].visible  # the one job still queued and not yet taken
    assert message_target(rows[0].payload)[1] not in (finished,)
    again = cli("gc")
    assert "removed 0 message(s) of finished jobs, 0 delivered message(s)" in again.output


def test_gc_refuses_a_negative_age_and_leaves_brokers_it_does_not_know(embedded_service, cli, monkeypatch):
    use_service(monkeypatch, embedded_service)
    bad = cli("gc", "--older-than", "-1")
    assert bad.exit_code == 2 and "-1" in bad.output
    monkeypatch.setenv("BLASTQ_BROKER_URL", "amqp://guest@127.0.0.1:5672//")
    out = cli("gc", "--dry-run")
    assert out.exit_code == 0, out.output
    assert "broker (amqp): not looked into" in out.output
    assert message_target(b'{"headers": {"task": "other.task"}, "body": "W1tdLHt9XQ=="}') is None
    assert message_target("{") is None
