"""A promotion reaches running workers: real Redis, PostgreSQL and S3, two `blastq worker` processes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from servicekit import Service, WorkerProcess, use_service
from sqlalchemy import select

from blastq.core.adapters.db import ResultRow, batch_jobs, connect
from blastq.core.adapters.registry import promote, register_model, rollback
from blastq.core.adapters.settings import load_settings
from blastq.core.adapters.store import open_store
from blastq.core.segment.unet import UNet, default_model_path, save_checkpoint
from blastq.worker.resources import WorkerResources
from blastq.worker.submit import submit, wait_for_batch

SLIDE_PX = 256


def tiny_checkpoint(folder: Path, version: str, seed: int) -> Path:
    """A tiny U-Net (random weights) that records `version` and the shipped model's scale."""
    _, shipped = UNet.from_checkpoint(default_model_path())
    torch.manual_seed(seed)
    path = folder / f"{version}.pt"
    save_checkpoint(path, UNet(depth=2, width=4), replace(shipped, version=version, sha256=""))
    return path


@pytest.fixture(scope="module")
def registry_service(lab_service) -> Service:
    return Service({**lab_service.env, "BLASTQ_MODEL": "registry"}, lab_service.data_dir)


@pytest.fixture(scope="module")
def two_registry_workers(registry_service, tmp_path_factory) -> Iterator[list[WorkerProcess]]:
    """Two workers (one pool process each) following the registry, started together."""
    folder = tmp_path_factory.mktemp("promotion-workers")
    workers = [
        WorkerProcess(registry_service, folder / f"worker-{i}.log", "--pool", "prefork", "--concurrency", "1")
        for i in range(2)
    ]
    try:
        for worker in workers:
            worker.wait_ready()
        yield workers
    finally:
        for worker in workers:
            worker.stop()


@pytest.fixture
def lab(registry_service, monkeypatch):
    use_service(monkeypatch, registry_service)
    settings = registry_service.settings()
    db = connect(settings.database_url.get_secret_value())
    store = open_store(settings.store_url, endpoint_url=settings.s3_endpoint_url)
    yield settings, db, store
    db.dispose()


def run_batch(settings, db, slides: list[Path]) -> list:
    outcome = submit(settings, slides, mpp=0.2)
    assert not outcome.errors and all(j.state == "queued" for j in outcome.jobs)
    status = wait_for_batch(settings, outcome.batch_id, timeout_s=90)
    jobs = batch_jobs(db, outcome.batch_id)
    assert (status.succeeded, status.failed) == (len(slides), 0), [j.error for j in jobs]
    return jobs


def result_versions(db, jobs) -> list[str]:
    with db.connect() as conn:
        return [conn.scalar(select(ResultRow.model_version).where(ResultRow.id == j.result_id)) for j in jobs]


def test_a_promotion_reaches_both_running_workers_between_slides(
    lab, two_registry_workers, make_slide, tmp_path
):
    settings, db, store = lab
    pids = [w.proc.pid for w in two_registry_workers]

    model_a = tiny_checkpoint(tmp_path, "promo-a", seed=1)
    register_model(db, store, model_a, metrics={"validation_score": 0.7})
    promote(db, "promo-a")
    (job,) = run_batch(settings, db, [make_slide(2001, size=SLIDE_PX)])
    assert job.model_version == "promo-a" and result_versions(db, [job]) == ["promo-a"]

    model_b = tiny_checkpoint(tmp_path, "promo-b", seed=2)
    register_model(db, store, model_b, metrics={"validation_score": 0.8})
    from blastq.cli.main import main
    from blastq.cli.models import register

    register(main)
    promoted = CliRunner().invoke(main, ["models", "promote", "promo-b"], catch_exceptions=False)
    assert promoted.exit_code == 0, promoted.output

    # New content each round (a result for it cannot exist yet), until both workers have taken a slide.
    after: list = []
    for round_ in range(5):
        seeds = (2100 + 2 * round_, 2101 + 2 * round_)
        after += run_batch(settings, db, [make_slide(seed, size=SLIDE_PX) for seed in seeds])
        if len({j.worker for j in after}) == 2:
            break
    assert len({j.worker for j in after}) == 2, [j.worker for j in after]
    assert {j.model_version for j in after} == {"promo-b"}
    assert set(result_versions(db, after)) == {"promo-b"}
    # Swapped in place: the same worker processes, each told of the new model in its log.
    assert [w.proc.pid for w in two_registry_workers] == pids
    assert all(w.proc.poll() is None for w in two_registry_workers)
    # (A worker that took no slide under promo-a goes straight from the shipped model to promo-b.)
    assert all("model promo-b loaded (was " in w.output for w in two_registry_workers), [
        w.output[-2000:] for w in two_registry_workers
    ]


def test_the_worker_engine_follows_the_registry_and_runs_the_shipped_model_when_none_is_promoted(
    tmp_path, caplog
):
    settings = load_settings({}, data_dir=tmp_path / "data", model="registry", engine="torch")
    resources = WorkerResources(settings)
    _, shipped = UNet.from_checkpoint(default_model_path())
    with caplog.at_level("WARNING", logger="blastq.worker.resources"):
        assert resources.engine().info.version == shipped.version
    assert "no model is promoted in the registry" in caplog.text

    db, store = resources.db(), resources.store()
    for version, seed in (("unit-a", 1), ("unit-b", 2)):
        register_model(db, store, tiny_checkpoint(tmp_path, version, seed), metrics={"validation_score": 0.5})
    promote(db, "unit-a")
    loaded = resources.engine()
    assert (loaded.info.version, loaded.registry_version) == ("unit-a", "unit-a")
    assert resources.engine() is loaded  # unchanged promotion: the same engine, nothing reloaded
    promote(db, "unit-b")
    assert resources.engine().info.version == "unit-b"
    rollback(db)
    assert resources.engine().info.version == "unit-a"
    resources.close()
