"""The task's failure policy, run eagerly in this process on SQLite and a file store (no servers)."""

from __future__ import annotations

import hashlib

import pytest

from blastq.core.adapters.db import connect, create_job, job_status
from blastq.core.adapters.settings import load_settings
from blastq.core.adapters.store import FileStore
from blastq.core.common.errors import StoreUnavailable
from blastq.core.pipeline.field import pipeline_config
from blastq.core.pipeline.resultkey import result_key, scale_key
from blastq.worker.celery_app import make_app
from blastq.worker.submit import model_identity
from blastq.worker.tasks import PROCESS_SLIDE, TRAIN_MODEL


class FlakyStore(FileStore):
    """A file store whose reads fail (as a store that does not answer) the first `failures` times."""

    def __init__(self, root, failures: int):
        super().__init__(root)
        self.failures = failures
        self.reads = 0

    def get_file(self, key: str, path) -> None:
        self.reads += 1
        if self.reads <= self.failures:
            raise StoreUnavailable(f"cannot read {key} from {self.url}: no answer")
        super().get_file(key, path)


def local_app(tmp_path, **env: str):
    settings = load_settings({"BLASTQ_DATA_DIR": str(tmp_path / "data"), **env})
    app = make_app(settings)
    db = connect(settings.database_url.get_secret_value())
    yield settings, app, db
    app.resources.close()
    db.dispose()


@pytest.fixture
def local(tmp_path):
    yield from local_app(tmp_path, BLASTQ_TASK_RETRY_MAX="3")


@pytest.fixture
def no_wait(tmp_path):
    """A worker app whose slides wait out no transient fault (BLASTQ_TRANSIENT_WAIT_S=0)."""
    yield from local_app(tmp_path, BLASTQ_TRANSIENT_WAIT_S="0")


def queued_job(settings, db, store, data: bytes, name: str = "slide.png") -> str:
    sha256 = hashlib.sha256(data).hexdigest()
    store.put(f"inputs/{sha256}.png", data)
    # The key the worker will give it (mpp 0.2 from the user: no file needed to know the scale).
    model = model_identity(settings)
    params_key = result_key(pipeline_config(settings, model.sha256), model, scale_key(0.2, "user"))
    job = create_job(
        db, batch_id=None, filename=name, input_key=f"inputs/{sha256}.png", sha256=sha256, mpp=0.2,
        params_key=params_key,
    )  # fmt: skip
    return job.id


def test_training_retries_transient_faults_through_celery_and_slides_by_their_own_clock(local):
    from blastq.core.common import TransientError

    _, app, _ = local
    task = app.tasks[TRAIN_MODEL]
    assert task.autoretry_for == (TransientError,) and task.max_retries == 3
    assert (task.retry_backoff, task.retry_backoff_max, task.retry_jitter) == (1, 60, True)
    slides = app.tasks[PROCESS_SLIDE]  # run_job retries for BLASTQ_TRANSIENT_WAIT_S (capped by the count)
    assert not getattr(slides, "autoretry_for", ()) and slides.max_retries is None


def test_a_store_that_comes_back_is_retried_and_the_job_succeeds(local, make_slide):
    settings, app, db = local
    store = FlakyStore(settings.data_dir / "store", failures=2)
    app.resources.provide(store=store)
    job_id = queued_job(settings, db, store, make_slide(301).read_bytes())
    app.tasks[PROCESS_SLIDE].apply(args=[job_id])
    job = job_status(db, job_id)
    assert job.state == "succeeded", job.error
    assert job.attempts == 1  # two retries by the worker holding it: not attempts


def test_a_store_that_stays_down_fails_the_job_after_the_retries(local):
    settings, app, db = local
    store = FlakyStore(settings.data_dir / "store", failures=100)
    app.resources.provide(store=store)
    job_id = queued_job(settings, db, store, b"\x89PNG whatever")
    app.tasks[PROCESS_SLIDE].apply(args=[job_id])
    job = job_status(db, job_id)
    assert job.state == "failed"
    assert job.error.startswith("transient: ") and "no answer" in job.error
    assert "gave up after 3 retries" in job.error  # BLASTQ_TASK_RETRY_MAX caps the retries
    assert store.reads == 4


def test_a_transient_fault_past_the_wait_fails_marked_transient_and_requeue_sends_it_again(
    no_wait, make_slide
):
    from blastq.core.adapters.db import fail_job, reopen_transient_failures

    settings, app, db = no_wait
    store = FlakyStore(settings.data_dir / "store", failures=1)
    app.resources.provide(store=store)
    job_id = queued_job(settings, db, store, make_slide(302).read_bytes())
    app.tasks[PROCESS_SLIDE].apply(args=[job_id])
    job = job_status(db, job_id)
    assert (job.state, store.reads) == ("failed", 1)  # no wait allowed: failed at the first fault
    assert job.error.startswith("transient: ") and "gave up after 0 retries in 0 s" in job.error
    other = queued_job(settings, db, FileStore(settings.data_dir / "store"), b"other", name="o.png")
    fail_job(db, other, "o.png: not a PNG")  # the input's fault: not reopened
    (reopened,) = reopen_transient_failures(db)
    assert reopened.id == job_id and reopen_transient_failures(db) == []
    again = job_status(db, job_id)
    assert (again.state, again.error, again.attempts) == ("queued", None, 1)
    app.tasks[PROCESS_SLIDE].apply(args=[job_id])  # the store answers now
    assert (job_status(db, job_id).state, job_status(db, job_id).attempts) == ("succeeded", 2)
    assert job_status(db, other).state == "failed"


def test_a_failure_that_cannot_be_written_keeps_the_job_for_a_retry(no_wait, make_slide, monkeypatch):
    from blastq.core.common import DatabaseUnavailable
    from blastq.worker import tasks

    settings, app, db = no_wait
    store = FlakyStore(settings.data_dir / "store", failures=100)
    app.resources.provide(store=store)
    job_id = queued_job(settings, db, store, make_slide(303).read_bytes())

    def database_away(*_args):
        raise DatabaseUnavailable("database not reachable: the test cut it")

    retried = []
    monkeypatch.setattr(tasks, "fail_job", database_away)
    monkeypatch.setattr(tasks, "_retry", lambda *args: retried.append(args[1]) or RuntimeError("retried"))
    outcome = app.tasks[PROCESS_SLIDE].apply(args=[job_id])
    assert retried == [job_id] and str(outcome.result) == "retried"
    assert job_status(db, job_id).state == "running"  # not failed, not acknowledged as done


def test_bad_input_fails_at_once_without_retry(local):
    settings, app, db = local
    store = FileStore(settings.data_dir / "store")
    job_id = queued_job(settings, db, store, b"not an image", name="notes.png")
    assert app.tasks[PROCESS_SLIDE].apply(args=[job_id]).get() == "failed"
    job = job_status(db, job_id)
    assert (job.state, job.attempts) == ("failed", 1)
    assert job.error == "notes.png: not a PNG, JPEG, BMP or TIFF image (unrecognised leading bytes)"


def test_an_input_missing_from_the_store_fails_the_job(local):
    settings, app, db = local
    store = FileStore(settings.data_dir / "store")
    job_id = queued_job(settings, db, store, b"gone soon")
    store.delete(job_status(db, job_id).input_key)
    app.tasks[PROCESS_SLIDE].apply(args=[job_id])
    job = job_status(db, job_id)
    assert job.state == "failed" and "is missing from" in job.error


def test_an_unexpected_error_fails_the_job_as_an_internal_error(local, monkeypatch):
    settings, app, db = local
    store = FileStore(settings.data_dir / "store")
    job_id = queued_job(settings, db, store, b"whatever")

    def broken(*_args, **_kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("blastq.worker.tasks.decode_slide", broken)
    assert app.tasks[PROCESS_SLIDE].apply(args=[job_id]).get() == "failed"
    assert job_status(db, job_id).error == "internal error: ZeroDivisionError: division by zero"


def test_a_job_started_max_attempts_times_is_failed_not_run_again(local):
    settings, app, db = local
    store = FileStore(settings.data_dir / "store")
    job_id = queued_job(settings, db, store, b"kills its worker")
    from blastq.core.adapters.db import claim_job

    for _ in range(settings.max_attempts):  # each delivery's worker died mid-slide
        assert claim_job(db, job_id, "host/1", settings.max_attempts) is not None
    assert app.tasks[PROCESS_SLIDE].apply(args=[job_id]).get() is None
    job = job_status(db, job_id)
    assert job.state == "failed" and "gave up after 3 attempts" in job.error


def test_a_whole_slide_job_is_processed_by_region(local, tmp_path):
    """A tiled TIFF queued as a job: the worker takes the whole-slide path and records its cells."""
    import tifffile

    from blastq.core.adapters.db import list_results
    from blastq.core.adapters.store import FileStore
    from blastq.core.image.slide import Slide
    from blastq.core.pipeline.field import process_slide
    from blastq.core.synth.slide import write_synthetic_slide

    settings, app, db = local
    store = FileStore(settings.data_dir / "store")
    app.resources.provide(store=store)
    slide = tmp_path / "wsi.tif"
    write_synthetic_slide(slide, 1100, 900, seed=5, field_px=512)
    job_id = queued_job(settings, db, store, slide.read_bytes(), name="wsi.tif")
    app.tasks[PROCESS_SLIDE].apply(args=[job_id])
    job = job_status(db, job_id)
    assert job.state == "succeeded", job.error
    (result,) = [r for r in list_results(db) if r.id == job.result_id]
    # The same pixels as one image through the small-image pipeline: the same count.
    engine, model = app.resources.engine().engine, app.resources.engine().info
    pixels = Slide(tifffile.imread(slide, level=0), 0.2, "user", "wsi", "0")
    assert result.white_cells == len(process_slide(pixels, engine, model).maps.cells) > 10
    keys = set(store.list(result.store_prefix))
    assert {f"{result.store_prefix}/{n}" for n in ("mask.tif", "instances.tif", "summary.json")} <= keys
