"""`blastq submit --wait` asks the broker whether any worker takes jobs: Redis answers by remote control."""

from __future__ import annotations

from servicekit import Service, redis_database

from blastq.worker.celery_app import make_app, workers_on_queue


def test_redis_tells_a_running_worker_from_none(tmp_path, start_worker):
    with redis_database() as broker_url:
        service = Service(
            {"BLASTQ_DATA_DIR": str(tmp_path / "data"), "BLASTQ_BROKER_URL": broker_url}, tmp_path / "data"
        )
        app = make_app(service.settings())
        try:
            assert workers_on_queue(app, "slides") == []
            start_worker(service, "--pool", "solo")
            (name,) = workers_on_queue(app, "slides")
            assert name.startswith("blastq-") and workers_on_queue(app, "train") == []
        finally:
            app.close()
