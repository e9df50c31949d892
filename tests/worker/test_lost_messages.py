"""`blastq requeue` sends at once a queued job whose message waits in no queue: a worker took it and died
before starting it (Redis keeps it unacknowledged for the visibility timeout, the embedded broker loses it),
or the broker lost it. A job whose message still waits is left alone, however old: it waits its turn."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import redis
from servicekit import use_service
from sqlalchemy import update

from blastq.core.adapters import connect
from blastq.core.adapters.db.schema import jobs_table
from blastq.worker.celery_app import SLIDES_QUEUE, make_app
from blastq.worker.messages import message_target, waiting_messages
from blastq.worker.submit import NO_MESSAGE
from blastq.worker.tasks import PROCESS_SLIDE


def submitted_ids(output: str) -> list[str]:
    return [w for line in output.splitlines() for w in line.split() if len(w) == 36 and w.count("-") == 4]


def age_jobs(settings, job_ids: list[str], seconds: float) -> None:
    """As if the jobs had been queued `seconds` ago."""
    db = connect(settings.database_url.get_secret_value())
    try:
        with db.begin() as c:
            c.execute(
                update(jobs_table)
                .where(jobs_table.c.id.in_(job_ids))
                .values(updated_at=datetime.now(UTC) - timedelta(seconds=seconds))
            )
    finally:
        db.dispose()


def waiting_for(settings) -> list[str]:
    return sorted(
        m.target[1] for m in waiting_messages(settings) if m.target and m.target[0] == PROCESS_SLIDE
    )


def check_only_the_lost_one_is_sent(cli, settings, lost: str, waiting: str) -> None:
    assert waiting_for(settings) == [waiting]
    age_jobs(settings, [lost, waiting], 10)  # younger than a worker takes to be declared dead: not yet
    assert "0 job(s) requeued" in cli("requeue").output
    age_jobs(settings, [lost, waiting], settings.worker_dead_after_s + 5)
    out = cli("requeue")  # the default --older-than is an hour: only the message rule can send it
    assert out.exit_code == 0, out.output
    assert f"requeued job {lost} ({NO_MESSAGE})" in out.output and "1 job(s) requeued" in out.output
    assert waiting_for(settings) == sorted([lost, waiting])
    assert "0 job(s) requeued" in cli("requeue").output  # sent once: its row was bumped and it waits now
    age_jobs(settings, [lost, waiting], settings.worker_dead_after_s + 5)
    # However old, a job whose message waits in the queue is not sent again: it waits its turn.
    assert "0 job(s) requeued" in cli("requeue", "--older-than", "0").output
    assert waiting_for(settings) == sorted([lost, waiting])


def test_a_message_redis_handed_to_a_worker_that_died_is_sent_again_at_once(
    lab_service, cli, make_slide, monkeypatch
):
    use_service(monkeypatch, lab_service)
    settings = lab_service.settings()
    out = cli("submit", make_slide(51, 256), make_slide(52, 256))  # no worker
    assert out.exit_code == 0, out.output
    lost, waiting = submitted_ids(out.output)
    broker = redis.Redis.from_url(settings.broker_url.get_secret_value())
    taken = broker.rpop(SLIDES_QUEUE)  # kombu takes from the list's tail; the taker dies with it
    assert message_target(taken) == (PROCESS_SLIDE, lost)
    check_only_the_lost_one_is_sent(cli, settings, lost, waiting)


def test_a_message_the_embedded_broker_delivered_to_a_worker_that_died_is_sent_again_at_once(
    embedded_service, cli, make_slide, monkeypatch
):
    use_service(monkeypatch, embedded_service)
    settings = embedded_service.settings()
    out = cli("submit", make_slide(53, 256), make_slide(54, 256))
    assert out.exit_code == 0, out.output
    lost, waiting = submitted_ids(out.output)
    app = make_app(settings)
    with app.connection_for_read() as conn:  # a worker's take (the oldest); it dies before starting it
        assert conn.default_channel.basic_get(SLIDES_QUEUE, no_ack=True) is not None
    app.close()
    check_only_the_lost_one_is_sent(cli, settings, lost, waiting)


def test_a_retry_a_worker_holds_for_its_countdown_is_not_taken_for_a_lost_message(
    lab_service, cli, make_slide, monkeypatch
):
    """After a database outage most queued jobs have no message in the queue: their retries wait out a
    countdown in the workers (unacknowledged, in Redis's hash). Those are not lost: not sent again until
    their time has passed (then, if still queued, their worker may have died with them)."""
    use_service(monkeypatch, lab_service)
    settings = lab_service.settings()
    out = cli("submit", make_slide(55, 256))
    assert out.exit_code == 0, out.output
    [job] = submitted_ids(out.output)
    broker = redis.Redis.from_url(settings.broker_url.get_secret_value())
    [taken] = [m for m in broker.lrange(SLIDES_QUEUE, 0, -1) if message_target(m) == (PROCESS_SLIDE, job)]
    assert broker.lrem(SLIDES_QUEUE, 1, taken) == 1  # a worker took it, and holds it for a retry
    message = json.loads(taken)
    try:
        for eta, sent in ((timedelta(minutes=5), 0), (timedelta(seconds=-1), 1)):
            message["headers"]["eta"] = (datetime.now(UTC) + eta).isoformat()
            broker.hset("unacked", "tag-1", json.dumps([message, "slides", "slides"]))  # as kombu keeps it
            age_jobs(settings, [job], settings.worker_dead_after_s + 5)
            out = cli("requeue")
            assert f"{sent} job(s) requeued" in out.output, (job, eta, out.output)
    finally:
        broker.hdel("unacked", "tag-1")
    assert waiting_for(settings).count(job) == 1
