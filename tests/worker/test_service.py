"""The slide service against the real Redis, PostgreSQL and S3 server, with real worker processes."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
import redis
from servicekit import use_service, wait_until
from sqlalchemy import func, select

from blastq.core.adapters.db import ResultRow, batch_jobs, connect, create_job, job_status
from blastq.core.adapters.store import open_store, slide_prefix
from blastq.core.outputs.artifacts import ARTIFACT_NAMES
from blastq.worker.celery_app import make_app
from blastq.worker.submit import model_identity, result_key_of, submit, wait_for_batch
from blastq.worker.tasks import PROCESS_SLIDE


@pytest.fixture
def lab(lab_service, monkeypatch):
    use_service(monkeypatch, lab_service)
    settings = lab_service.settings()
    db = connect(settings.database_url.get_secret_value())
    store = open_store(settings.store_url, endpoint_url=settings.s3_endpoint_url)
    yield settings, db, store
    db.dispose()


def batch_id_of(output: str) -> str:
    return re.search(r"^batch (\S+): \d+ job", output, re.MULTILINE).group(1)


def result_count(db, sha256: str) -> int:
    with db.connect() as c:
        return c.scalar(select(func.count()).select_from(ResultRow).where(ResultRow.sha256 == sha256))


def test_three_slides_are_processed_with_rows_and_every_artifact_in_s3(lab, lab_worker, cli, make_slide):
    settings, db, store = lab
    slides = [make_slide(seed) for seed in (101, 102, 103)]
    submitted = cli("submit", *slides, "--batch", "three", "--mpp", "0.2", "--wait")
    assert submitted.exit_code == 0, submitted.output
    batch_id = batch_id_of(submitted.output)
    assert "3 succeeded, 0 failed" in submitted.output

    shown = cli("status", "--batch", batch_id)
    assert shown.exit_code == 0, shown.output
    assert "3 succeeded, 0 failed" in shown.output
    assert shown.output.count(" succeeded ") == 3

    listed = cli("results", "--batch", batch_id, "--format", "json")
    assert listed.exit_code == 0, listed.output
    results = json.loads(listed.output)
    model = model_identity(settings)
    by_name = {p.name: p for p in slides}
    assert sorted(r["image"] for r in results) == sorted(by_name)
    for r in results:
        # The worker's key is the one submit computes for the same file and scale.
        prefix = slide_prefix(
            r["sha256"], model.version, result_key_of(settings, model, by_name[r["image"]], 0.2)
        )
        assert r["store_prefix"] == prefix
        assert store.list(prefix) == sorted(f"{prefix}/{name}" for name in ARTIFACT_NAMES)
        assert json.loads(store.get(f"{prefix}/summary.json"))["white_cells"] == r["white_cells"]
    assert all(j.attempts == 1 and j.result_id for j in batch_jobs(db, batch_id))


def test_bad_files_fail_with_their_reason_and_the_rest_succeed(lab, lab_worker, cli, make_slide, tmp_path):
    settings, db, _ = lab
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(make_slide(111).read_bytes()[:2000])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    submitted = cli("submit", truncated, make_slide(112), not_an_image, "--mpp", "0.2", "--wait")
    assert submitted.exit_code == 1, submitted.output
    assert "1 succeeded, 1 failed" in submitted.output
    # Not an image by its header: refused at submit with one line, never queued.
    assert f"FAILED {not_an_image}: not a PNG, JPEG, BMP or TIFF image" in submitted.output

    jobs = {os.path.basename(j.filename): j for j in batch_jobs(db, batch_id_of(submitted.output))}
    assert "notes.png" not in jobs
    assert jobs["truncated.png"].state == "failed" and "truncated PNG" in jobs["truncated.png"].error
    assert jobs[make_slide(112).name].state == "succeeded"
    assert [j.attempts for j in jobs.values()] == [1, 1]  # no retry loop


def test_the_same_content_again_reuses_its_result_and_force_processes_it_once_more(
    lab, lab_worker, make_slide
):
    settings, db, _ = lab
    slide = make_slide(121)
    first = submit(settings, [slide], mpp=0.2)
    assert wait_for_batch(settings, first.batch_id, timeout_s=120).succeeded == 1
    result_id = job_status(db, first.jobs[0].job_id).result_id

    again = submit(settings, [slide], mpp=0.2)
    (entry,) = again.jobs
    assert (entry.state, entry.reused_result_id) == ("succeeded", result_id)
    job = job_status(db, entry.job_id)
    assert (job.state, job.result_id, job.attempts, job.worker) == ("succeeded", result_id, 0, None)
    assert (
        redis.Redis.from_url(settings.broker_url.get_secret_value()).llen("slides") == 0
    )  # nothing was queued

    forced = submit(settings, [slide], mpp=0.2, force=True)
    assert forced.jobs[0].state == "queued"
    assert wait_for_batch(settings, forced.batch_id, timeout_s=120).succeeded == 1
    job = job_status(db, forced.jobs[0].job_id)
    assert (job.attempts, job.result_id) == (1, result_id)  # processed again, the same row upserted
    assert result_count(db, job.sha256) == 1


def test_a_whole_slide_goes_through_the_service_and_is_reused_when_sent_again(lab, lab_worker, tmp_path):
    """A tiled pyramidal TIFF: a real worker processes it by region, its TIFF masks land in S3, and the
    same file sent again finds its result (the whole-slide result key is the submitter's too)."""
    from blastq.core.synth.slide import write_synthetic_slide

    settings, db, store = lab
    slide = tmp_path / "scan.tif"
    write_synthetic_slide(slide, 1300, 1000, seed=9, field_px=512)
    first = submit(settings, [slide])
    assert wait_for_batch(settings, first.batch_id, timeout_s=180).succeeded == 1
    job = job_status(db, first.jobs[0].job_id)
    model = model_identity(settings)
    prefix = slide_prefix(job.sha256, model.version, result_key_of(settings, model, slide, None))
    keys = store.list(prefix)
    assert {f"{prefix}/{n}" for n in ("mask.tif", "nuclei.tif", "instances.tif", "cells.geojson")} <= set(
        keys
    )
    summary = json.loads(store.get(f"{prefix}/summary.json"))
    assert summary["white_cells"] > 10 and summary["mpp_source"] == "metadata"

    again = submit(settings, [slide])
    assert (again.jobs[0].state, again.jobs[0].reused_result_id) == ("succeeded", job.result_id)


def queued_without_message(settings, db, store, slide) -> str:
    """A job row written and its input uploaded, as submit does, but no message sent (a lost message)."""
    import hashlib

    data = slide.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    store.put(f"inputs/{sha256}.png", data, "image/png")
    job = create_job(
        db, batch_id=None, filename=str(slide), input_key=f"inputs/{sha256}.png", sha256=sha256, mpp=0.2,
        params_key=result_key_of(settings, model_identity(settings), slide, 0.2),
    )  # fmt: skip
    return job.id


def test_requeue_sends_a_queued_job_whose_message_was_lost(lab, lab_worker, cli, make_slide):
    settings, db, store = lab
    job_id = queued_without_message(settings, db, store, make_slide(131))
    assert redis.Redis.from_url(settings.broker_url.get_secret_value()).llen("slides") == 0

    requeued = cli("requeue", "--older-than", "0")
    assert requeued.exit_code == 0, requeued.output
    assert f"requeued job {job_id}" in requeued.output
    job = wait_until(
        lambda: (j := job_status(db, job_id)).state in ("succeeded", "failed") and j, 120, "the job to finish"
    )
    assert (job.state, job.attempts) == ("succeeded", 1)
    assert result_count(db, job.sha256) == 1
    assert cli("requeue", "--older-than", "0").output.endswith("0 job(s) requeued\n")


def test_a_redelivered_message_for_a_finished_job_does_nothing(lab, make_slide):
    settings, db, store = lab
    job_id = queued_without_message(settings, db, store, make_slide(141))
    task = make_app(settings).tasks[PROCESS_SLIDE]
    assert task.apply(args=[job_id]).get() == "succeeded"
    finished = job_status(db, job_id)
    assert task.apply(args=[job_id]).get() is None  # the same message delivered again
    assert job_status(db, job_id) == finished
    assert finished.attempts == 1
    assert result_count(db, finished.sha256) == 1


def test_a_worker_process_killed_mid_slide_is_replaced_and_the_slide_completes_once(
    lab, start_worker, lab_service, make_slide
):
    settings, db, store = lab
    worker = start_worker(lab_service, "--pool", "prefork", "--concurrency", "1")
    outcome = submit(settings, [make_slide(151, size=1536)], mpp=0.2)
    job_id = outcome.jobs[0].job_id
    running = wait_until(
        lambda: (j := job_status(db, job_id)).state == "running" and j, 120, "a worker to start the slide"
    )
    pid = int(running.worker.rsplit("/", 1)[1])
    assert pid != worker.proc.pid  # a pool process, not the worker's main process
    os.kill(pid, signal.SIGKILL)

    status = wait_for_batch(settings, outcome.batch_id, timeout_s=180)
    job = job_status(db, job_id)
    assert status.succeeded == 1, worker.output[-3000:]
    assert job.attempts == 2  # redelivered once, by reject_on_worker_lost
    assert int(job.worker.rsplit("/", 1)[1]) != pid
    assert result_count(db, job.sha256) == 1
    model = model_identity(settings)
    prefix = slide_prefix(job.sha256, model.version, result_key_of(settings, model, job.filename, 0.2))
    assert store.list(prefix) == sorted(f"{prefix}/{name}" for name in ARTIFACT_NAMES)


def test_a_sample_processed_by_two_workers_at_once_is_pooled_from_all_its_images(
    lab, start_worker, lab_service, cli, make_slide
):
    from sqlalchemy import text

    from blastq.core.adapters.db import get_sample, list_results

    settings, db, _ = lab
    start_worker(lab_service, "--pool", "prefork", "--concurrency", "2")
    slides = [make_slide(seed) for seed in (161, 162, 163, 164)]
    submitted = cli("submit", "--sample", "lab-P1", *slides, "--mpp", "0.2", "--wait")
    assert submitted.exit_code == 0, submitted.output
    assert "4 succeeded, 0 failed" in submitted.output
    sample, rows = get_sample(db, "lab-P1"), list_results(db, sample="lab-P1")
    assert (len(sample.images), sample.pending, sample.failed, len(rows)) == (4, 0, 0, 4)
    white, blasts = sum(r.white_cells for r in rows), sum(r.blasts for r in rows)
    assert (sample.stats.white_cells, sample.stats.blasts) == (white, blasts) and white > 0
    assert submitted.output.splitlines()[-1].startswith(f"sample lab-P1: 4 image(s), {white} white cells")
    with db.connect() as c:  # the stored pool, written by whichever worker finished last
        stored = c.execute(
            text("SELECT images, white_cells, blasts FROM samples WHERE name = 'lab-P1'")
        ).one()
    assert tuple(stored) == (4, white, blasts)
