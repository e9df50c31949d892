"""The trainer service: real Redis, PostgreSQL and S3, `blastq trainer` processes, tiny training runs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from servicekit import CLEARED_ENV, Service, WorkerProcess, use_service, wait_until

from blastq.core.adapters.db import (
    claim_training_run,
    connect,
    create_training_run,
    fail_training_run,
    finish_training_run,
    record_epoch,
    training_run_status,
)
from blastq.core.adapters.store import store_from_settings
from blastq.trainer.train import TrainConfig
from blastq.worker.submit import submit_training
from blastq.worker.training import model_key, resume_key

TRAINER_MAIN = (
    "import sys; from blastq.cli.main import main; from blastq.cli.trainer import register; "
    "register(main); main(sys.argv[1:], prog_name='blastq')"
)
RUN_S = 120


class TrainerProcess(WorkerProcess):
    """`blastq trainer` in a subprocess, in its own process group (stopped like a worker)."""

    def __init__(self, service: Service, log: Path, *args: str):
        self.log_path = log
        self.log = log.open("w")
        env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", TRAINER_MAIN, "trainer", "--loglevel", "INFO", *args],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**env, **service.env},
            start_new_session=True,
        )


@pytest.fixture(scope="module")
def trainer(lab_service, tmp_path_factory) -> Iterator[TrainerProcess]:
    """One trainer (one pool process) on the lab services, shared by the module's tests."""
    process = TrainerProcess(
        lab_service, tmp_path_factory.mktemp("trainer") / "trainer.log", "--concurrency", "1"
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture
def lab(lab_service, monkeypatch):
    use_service(monkeypatch, lab_service)
    settings = lab_service.settings()
    db = connect(settings.database_url.get_secret_value())
    yield settings, db
    db.dispose()


def tiny(tmp_path: Path, version: str, **overrides) -> TrainConfig:
    settings = dict(
        out=tmp_path / f"{version}.pt", version=version, synth_train=2, synth_val=2, synth_size_px=128,
        depth=2, width=4, patch_px=64, batch_size=2, steps_per_epoch=3, max_epochs=3, patience=10,
        lr=5e-3, threads=1,
    )  # fmt: skip
    return TrainConfig(**{**settings, **overrides})


def finished(db, run_id: str):
    run = training_run_status(db, run_id)
    return run if run is not None and run.state in ("succeeded", "failed") else None


def cli(*args: str):
    from blastq.cli.main import main
    from blastq.cli.models import register as register_models
    from blastq.cli.trainer import register as register_trainer

    register_models(main)
    register_trainer(main)
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_a_training_run_counts_its_deliveries_keeps_its_epochs_and_is_not_rerun_once_finished(tmp_path):
    db = connect(f"sqlite:///{tmp_path}/runs.db")
    run = create_training_run(db, config={"out": "x.pt"}, version="v1")
    assert claim_training_run(db, run.id, "host/1", 2).attempts == 1
    record_epoch(db, run.id, 1, [{"epoch": 1, "train_loss": 1.0}], resume_key(run.id))
    again = claim_training_run(db, run.id, "host/2", 2)  # redelivered after the trainer died
    assert again.attempts == 2 and again.epoch == 1 and again.checkpoint_key == resume_key(run.id)
    assert claim_training_run(db, run.id, "host/3", 2) is None  # died every time: failed, not rerun
    gave_up = training_run_status(db, run.id)
    assert gave_up.state == "failed" and "2 attempts" in gave_up.error and gave_up.history[0]["epoch"] == 1
    done = create_training_run(db, config={"out": "y.pt"}, version="v2")
    claim_training_run(db, done.id, "host/1", 3)
    finish_training_run(db, done.id, model_key=model_key(done.id), model_sha256="0" * 64)
    fail_training_run(db, done.id, "a late duplicate's failure")
    assert claim_training_run(db, done.id, "host/2", 3) is None
    assert training_run_status(db, done.id).state == "succeeded"
    db.dispose()


def test_a_submitted_run_is_trained_recorded_each_epoch_and_registered_as_a_candidate(lab, trainer, tmp_path):
    settings, db = lab
    run_id = submit_training(settings, tiny(tmp_path, "tiny-service"))
    run = wait_until(lambda: finished(db, run_id), RUN_S, "the training run to end")
    assert run.state == "succeeded", run.error
    assert run.epoch == 3 and [h["epoch"] for h in run.history] == [1, 2, 3] and run.attempts == 1
    store = store_from_settings(settings)
    assert run.model_key == model_key(run_id) and run.checkpoint_key == resume_key(run_id)
    assert store.exists(model_key(run_id)) and store.exists(f"training/{run_id}/model.run.json")
    listed = cli("models", "list")
    assert re.search(r"tiny-service\s+candidate", listed.output), listed.output
    shown = cli("trainer", "status", run_id)
    assert f'"id": "{run_id}"' in shown.output and '"state": "succeeded"' in shown.output
    assert run_id in cli("trainer", "status").output


def test_a_run_with_a_bad_config_fails_with_the_reason(lab, trainer, tmp_path):
    settings, db = lab
    bad = {**tiny(tmp_path, "tiny-bad").to_dict(), "width": "wide"}
    run = create_training_run(db, config=bad, version="tiny-bad")
    from blastq.worker.celery_app import TRAIN_QUEUE, make_app

    make_app(settings).send_task("blastq.train_model", args=[run.id], queue=TRAIN_QUEUE)
    run = wait_until(lambda: finished(db, run.id), RUN_S, "the training run to end")
    assert run.state == "failed" and "width" in run.error and run.attempts == 1


def test_a_killed_trainer_resumes_the_run_from_its_last_epoch(lab, trainer, tmp_path):
    settings, db = lab
    # Epochs of ~1 s, so the kill lands mid-run.
    cfg = tiny(tmp_path, "tiny-killed", steps_per_epoch=80, max_epochs=6)
    run_id = submit_training(settings, cfg)

    def two_epochs_done():
        run = training_run_status(db, run_id)
        return run if run.state == "running" and run.epoch >= 2 else None

    run = wait_until(two_epochs_done, RUN_S, "two finished epochs", interval_s=0.05)
    assert run.epoch < cfg.max_epochs, "the run ended before the kill: make its epochs longer"
    pool_pid = int(run.worker.rsplit("/", 1)[1])
    os.kill(pool_pid, signal.SIGKILL)  # the pool process dies mid-epoch; Celery redelivers the message

    run = wait_until(lambda: finished(db, run_id), RUN_S, "the resumed run to end")
    assert run.state == "succeeded", run.error
    assert run.attempts == 2 and [h["epoch"] for h in run.history] == list(range(1, 7))
    resumed = re.findall(rf"training run {run_id}: resuming from \S+ \(after epoch (\d+)\)", trainer.output)
    assert resumed and int(resumed[0]) >= 2, trainer.output[-3000:]
    assert f"training run {run_id}: epoch 1:" not in trainer.output.split("resuming from")[-1]


class UnreachableStore:
    url = "s3://down"

    def get(self, key: str) -> bytes:
        from blastq.core.common.errors import StoreUnavailable

        raise StoreUnavailable(f"store s3://down not reachable reading {key}")


def test_a_store_fault_is_left_to_celery_to_retry_then_fails_the_run(tmp_path):
    from types import SimpleNamespace

    from blastq.core.adapters.settings import load_settings
    from blastq.core.common import StoreUnavailable
    from blastq.worker.resources import WorkerResources
    from blastq.worker.training import run_training_job

    settings = load_settings({}, data_dir=tmp_path, task_retry_max=2)
    resources = WorkerResources(settings)
    resources.provide(store=UnreachableStore())
    db = resources.db()
    run = create_training_run(db, config=tiny(tmp_path, "tiny-retry").to_dict(), version="tiny-retry")

    def task(retries: int):
        return SimpleNamespace(
            app=SimpleNamespace(settings=settings, resources=resources),
            request=SimpleNamespace(retries=retries),
        )

    # While retries are left the fault goes to Celery (autoretry_for), which waits and delivers it again.
    for retries in (0, 1):
        with pytest.raises(StoreUnavailable, match="not reachable"):
            run_training_job(task(retries), run.id)
        assert training_run_status(db, run.id).state == "running"
    assert run_training_job(task(2), run.id) == "failed"
    failed = training_run_status(db, run.id)
    assert (
        failed.state == "failed" and "gave up after 2 retries" in failed.error and failed.attempts == 1
    )  # retries by its holder are not attempts
    resources.close()
