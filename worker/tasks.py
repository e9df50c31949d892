"""The worker's tasks: process one job's slide, the same way `blastq run` does, around its job row
(and `blastq.train_model`, whose body is blastq.worker.training.run_training_job).

claim the row -> read the input from the store -> decode -> core.pipeline.field -> artifacts to the store ->
result row -> job succeeded. Delivery is at least once, so every step is safe to repeat: the claim
refuses a finished job, the store keys and the result row are keyed by (sha256, model, parameters).

Failures: a transient fault (database, store) retries with exponential backoff for BLASTQ_TRANSIENT_WAIT_S,
then fails the job marked "transient: " (`blastq requeue --failed-transient` sends it again; a failure that
cannot even be written keeps retrying, so the job is never left running with no message); bad input fails
the job at once with the reason; anything else fails it as an internal error. The task never raises into
Celery except to retry, so one slide cannot stop the worker's loop.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path, PurePath

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.log import get_task_logger

from blastq.core.adapters import TRANSIENT_FAILURE, add_to_sample, claim_job, fail_job, finish_job
from blastq.core.common import BlastqError, StageTimes, TransientError, recording, stage
from blastq.core.image import decode_slide, is_whole_slide, open_slide_reader
from blastq.core.outputs import render_artifacts
from blastq.core.pipeline import (
    WholeSlideConfig,
    WholeSlideResult,
    persist_result,
    process_slide,
    process_whole_slide,
    whole_slide_config,
)
from blastq.worker import metrics
from blastq.worker.retry import MAX_BACKOFF_S, RETRY_POLICY, worker_name

PROCESS_SLIDE = "blastq.process_slide"
TRAIN_MODEL = "blastq.train_model"  # its body: blastq.worker.training.run_training_job

log = get_task_logger(__name__)


def run_job(task: Task, job_id: str, transient_since: float | None = None) -> str | None:
    """The body of `blastq.process_slide`; returns the job's final state, or None if it was not run.

    Counted in the worker's metrics (worker.metrics): the outcome, the cells, the seconds of each stage.
    `transient_since`: when the first transient fault of this job's retries happened (epoch seconds)."""
    app = task.app
    settings, resources = app.settings, app.resources
    retries = task.request.retries or 0
    start = time.perf_counter()
    loaded = None
    try:
        with recording() as times:
            db = resources.db()
            # A retry by this process (the row's holder) is not an attempt; a delivery of a job another live
            # worker holds is not run; `max_attempts` counts the starts whose worker died.
            with stage("database"):
                job = claim_job(
                    db,
                    job_id,
                    worker_name(),
                    settings.max_attempts,
                    timedelta(seconds=settings.worker_dead_after_s),
                )
            if job is None:
                log.info("job %s: not run (unknown, finished, or out of attempts)", job_id)
                return None
            store = resources.store()
            # The input is streamed to a file (a whole-slide scan is gigabytes), never held as bytes first.
            copy = PurePath(job.filename).name or "slide"
            with (
                tempfile.TemporaryDirectory(prefix="blastq-job-") as tmp,
                _naming(job.filename, Path(tmp) / copy),
            ):
                path = Path(tmp) / copy
                try:
                    with stage("read"):
                        store.get_file(job.input_key, path)
                except FileNotFoundError:
                    _fail(
                        resources,
                        job_id,
                        f"{job.filename}: input {job.input_key} is missing from {store.url}",
                    )
                    metrics.slide_failed("missing_input")
                    return "failed"
                loaded = resources.engine()
                if is_whole_slide(path):
                    result_id, result = _run_whole_slide(
                        db, store, loaded, job, path, whole_slide_config(settings)
                    )
                    with stage("database"):
                        _finish(db, job, result_id)
                    log.info("job %s: whole slide %s succeeded (result %s)", job_id, job.filename, result_id)
                    _count_success(loaded, result.stats, times, start)
                    return "succeeded"
                with stage("read"):
                    data = path.read_bytes()
            with stage("read"):
                slide = decode_slide(
                    data, PurePath(job.filename).name, mpp=job.mpp, max_pixels=settings.max_pixels
                )
            result = process_slide(
                slide, loaded.engine, loaded.info, loaded.config, classifier=loaded.classifier
            )
            artifacts = render_artifacts(result, slide.rgb)
            result_id = persist_result(result, store=store, db=db, artifacts=artifacts)
            with stage("database"):
                _finish(db, job, result_id)
            log.info("job %s: %s succeeded (result %s)", job_id, job.filename, result_id)
            _count_success(loaded, result.stats, times, start)
            return "succeeded"
    except TransientError as exc:
        since = time.time() if transient_since is None else transient_since
        waited = time.time() - since
        if waited < settings.transient_wait_s and retries < settings.task_retry_max:
            log.warning(
                "job %s: %s; retry %d (%.0f of %.0f s waited)",
                job_id,
                exc,
                retries + 1,
                waited,
                settings.transient_wait_s,
            )
            metrics.retried()
            raise _retry(task, job_id, since, exc, retries) from exc
        reason = f"{TRANSIENT_FAILURE}{exc} (gave up after {retries} retries in {waited:.0f} s)"
        if not _fail(resources, job_id, reason):
            # Not even the failure could be written (the database is what is away): keep the message, so
            # the job is neither lost nor left running with nothing queued to finish it.
            raise _retry(task, job_id, since, exc, retries) from exc
        reason = "transient"
    except SoftTimeLimitExceeded:
        limit = settings.slide_time_limit_s
        _fail(
            resources, job_id, f"stopped after {limit} s: longer than BLASTQ_SLIDE_TIME_LIMIT_S ({limit} s)"
        )
        reason = "time_limit"
    except BlastqError as exc:  # the input's fault (bad image, bad mpp, model): retrying cannot help
        _fail(resources, job_id, str(exc))
        reason = "input"
    except Exception as exc:  # noqa: BLE001 - a bug must fail one job, not the worker
        log.exception("job %s: internal error", job_id)
        _fail(resources, job_id, f"internal error: {type(exc).__name__}: {exc}")
        reason = "internal"
    engine, model = (loaded.engine.name, loaded.info.version) if loaded is not None else ("", "")
    metrics.slide_failed(reason, engine, model)
    return "failed"


def _retry(task: Task, job_id: str, since: float, exc: Exception, retries: int) -> Exception:
    """The job again after a backoff (1, 2, 4... s up to MAX_BACKOFF_S, full jitter), carrying when its
    transient faults began: Celery's Retry, to raise."""
    countdown = random.uniform(0, min(MAX_BACKOFF_S, 2**retries))
    return task.retry(
        args=[job_id],
        kwargs={"transient_since": since},
        exc=exc,
        countdown=countdown,
        max_retries=None,
        throw=False,
    )


def _count_success(loaded, stats, times: StageTimes, start: float) -> None:
    metrics.slide_succeeded(
        loaded.engine.name, loaded.info.version, stats.white_cells, stats.blasts, time.perf_counter() - start
    )
    metrics.stages_done(times)


def _run_whole_slide(
    db, store, loaded, job, path: Path, wsi: WholeSlideConfig
) -> tuple[int, WholeSlideResult]:
    """A whole slide, chunk by chunk (core.pipeline.wholeslide): files to the store, the result row; (its
    id, the result).

    The job's sha256 is the content's (submit hashed it; the input key is named by it): a scan of
    gigabytes is not read once more to hash it again."""
    with open_slide_reader(path) as reader:
        result = process_whole_slide(
            reader,
            loaded.engine,
            loaded.info,
            path.parent / "out",
            sha256=job.sha256,
            mpp=job.mpp,
            config=loaded.config,
            wsi=wsi,
            classifier=loaded.classifier,
        )
    return persist_result(result, store=store, db=db), result


def _finish(db, job, result_id: int) -> None:
    """The job succeeded: its result joins its sample first (pooled again from the recorded results,
    so the pool is right whichever of the sample's images finishes last), then the job is marked."""
    if job.sample_id is not None:
        add_to_sample(db, job.sample_id, result_id)
    finish_job(db, job.id, result_id)


@contextmanager
def _naming(filename: str, copy: Path) -> Iterator[None]:
    """An error raised about the worker's temporary copy names the submitted file instead."""
    try:
        yield
    except Exception as exc:

        def renamed(value):
            if not isinstance(value, str):
                return value
            return value.replace(str(copy), filename).replace(str(copy.parent), "(worker scratch folder)")

        exc.args = tuple(renamed(a) for a in exc.args)
        if isinstance(exc, BlastqError):
            exc.path, exc.reason = renamed(exc.path), renamed(exc.reason)
        if isinstance(exc, OSError):
            exc.filename, exc.filename2 = renamed(exc.filename), renamed(exc.filename2)
        raise


def _fail(resources, job_id: str, reason: str) -> bool:
    """Fail the job with `reason` (one line); False when even that could not be written."""
    reason = " ".join(reason.split())  # one line, as the CLI prints it
    log.warning("job %s failed: %s", job_id, reason)
    try:
        fail_job(resources.db(), job_id, reason)
    except Exception as exc:  # noqa: BLE001 - the caller decides: retry (transient) or leave it to requeue
        log.error("job %s: could not record its failure (%s): %s", job_id, reason, exc)
        return False
    return True


def register_tasks(app: Celery) -> None:
    """Register the blastq tasks on `app` under their explicit names."""

    @app.task(
        name=PROCESS_SLIDE,
        bind=True,
        shared=False,  # a shared task would be added to every app made later, with this app's settings
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        max_retries=None,  # run_job retries transient faults itself, for BLASTQ_TRANSIENT_WAIT_S
        # A stuck slide: SoftTimeLimitExceeded in the task (its job failed with the reason), and its pool
        # process killed 30 s later if that did not stop it (a death: the job's attempts count it).
        soft_time_limit=app.settings.slide_time_limit_s or None,
        time_limit=app.settings.slide_time_limit_s + 30 if app.settings.slide_time_limit_s else None,
    )
    def process_slide_task(self: Task, job_id: str, transient_since: float | None = None) -> str | None:
        return run_job(self, job_id, transient_since)

    @app.task(
        name=TRAIN_MODEL,
        bind=True,
        shared=False,
        acks_late=True,
        reject_on_worker_lost=True,  # a killed trainer's run is redelivered and resumes from its checkpoint
        ignore_result=True,
        max_retries=app.settings.task_retry_max,
        **RETRY_POLICY,
    )
    def train_model_task(self: Task, run_id: str) -> str | None:
        # Imported here: a slide worker never loads the training code.
        from blastq.worker.training import run_training_job

        return run_training_job(self, run_id)
