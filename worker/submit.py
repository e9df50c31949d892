"""Putting slides into the service: upload, job row, message; waiting for a batch; requeueing stuck jobs.

Jobs are rows first: the row is written before its message is sent, so a message lost anywhere (a
broker restarted, a publish that failed) leaves a row that `requeue` sends again. Content already
processed with the same model and parameters is not sent at all: its job points at the existing result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from blastq.core.adapters import (
    BatchStatus,
    Settings,
    add_to_sample,
    batch_status,
    check_local_folders,
    connect,
    create_batch,
    create_job,
    create_training_run,
    dead_workers_jobs,
    ensure_sample,
    find_result,
    finish_job,
    hide_secrets,
    reopen_transient_failures,
    stale_jobs,
    store_from_settings,
    touch_job,
)
from blastq.core.cells import check_sample_name
from blastq.core.common import InvalidConfig, InvalidSlide, NoWorker
from blastq.core.image import IMAGE_SUFFIXES as IMAGE_SUFFIXES  # worker.watch takes it from here
from blastq.core.image import Refused, check_image_header, check_user_mpp, expand_inputs, file_sha256
from blastq.core.pipeline import (
    ModelIdentity,
    classifier_file_sha256,
    file_result_key,
    pipeline_config,
    whole_slide_config,
)
from blastq.core.segment import UNet, default_model_path
from blastq.worker.celery_app import SLIDES_QUEUE, TRAIN_QUEUE, BlastqCelery, make_app, workers_on_queue
from blastq.worker.messages import held_for_later, waiting_messages
from blastq.worker.tasks import PROCESS_SLIDE, TRAIN_MODEL

if TYPE_CHECKING:
    from blastq.trainer.train import TrainConfig

CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}
POLL_S = 0.2
# `--wait` asks the broker for workers once the batch has sat this long with jobs queued and none
# running: a worker just started is still loading its model for the first seconds.
NO_WORKER_AFTER_S = 15.0


@dataclass(frozen=True)
class SubmittedFile:
    """What became of one file: queued, succeeded at once (an existing result), or an error (no job)."""

    path: str
    job_id: str | None
    state: str  # "queued", "succeeded" (reused_result_id is set) or "error"
    reused_result_id: int | None = None
    reason: str | None = None  # why the file failed, or what went wrong after it was queued; without the path

    @property
    def error(self) -> str | None:
        """The one line for a person: "path: reason"; None when nothing went wrong."""
        return None if self.reason is None else f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class SubmitOutcome:
    batch_id: str | None  # None when no file could be submitted (no batch is made)
    jobs: tuple[SubmittedFile, ...]
    skipped: str | None = None  # one line: what folders and globs held besides smears (core.image.inputs)

    @property
    def errors(self) -> tuple[SubmittedFile, ...]:
        return tuple(j for j in self.jobs if j.error is not None)


def expand_paths(paths: Iterable[str | Path]) -> tuple[list[Path], list[SubmittedFile]]:
    """core.image.inputs.expand_inputs in submit()'s terms: (files, one error entry per refused argument or file)."""
    inputs = expand_inputs(paths)
    return list(inputs.files), [_refused(r) for r in inputs.refused]


def _refused(refused: Refused) -> SubmittedFile:
    return SubmittedFile(refused.path, None, "error", reason=refused.reason)


def model_identity(settings: Settings) -> ModelIdentity:
    """The model and classifier a worker with these settings runs, as its results' keys name them.

    A checkpoint file, a registered version, or "registry" (the promoted version now, fetched and
    verified; the shipped model when none is). The classifier file is hashed, not loaded."""
    from blastq.core.pipeline import model_checkpoint

    path = model_checkpoint(settings, settings.model) if settings.model else None
    _, info = UNet.from_checkpoint(path or default_model_path())
    return ModelIdentity.of(info, classifier_file_sha256(settings.classifier))


def result_key_of(settings: Settings, model: ModelIdentity, path: str | Path, mpp: float | None) -> str:
    """The key a worker with these settings gives the file's result (core.pipeline.resultkey: the same function)."""
    config = pipeline_config(settings, model.sha256)
    return file_result_key(path, mpp, config, model, whole_slide_config(settings))


def send_job(app: BlastqCelery, job_id: str) -> None:
    app.send_task(PROCESS_SLIDE, args=[job_id], queue=SLIDES_QUEUE)


def submit(
    settings: Settings,
    paths: Iterable[str | Path],
    *,
    batch_name: str | None = None,
    batch_id: str | None = None,
    force: bool = False,
    mpp: float | None = None,
    app: BlastqCelery | None = None,
    sample: str | None = None,
) -> SubmitOutcome:
    """Upload each file, write its job row, then queue it; a file with a result already is not queued.

    `force`: queue even when a result exists (it is computed again and its row replaced). A file that
    cannot be read is an error entry in the outcome, and the others go on. A job whose message the
    broker did not take stays queued, with the error in the outcome: `requeue` sends it later.
    `batch_id`: add the jobs to this existing batch (the watcher keeps one batch per run).
    `sample`: the files are images of this sample; each result joins its pool as its job succeeds.
    """
    check_user_mpp(mpp)
    if sample is not None:
        check_sample_name(sample)
    inputs = expand_inputs(paths)
    entries = [_refused(r) for r in inputs.refused]
    skipped = inputs.skipped_line()
    if not inputs.files:
        return SubmitOutcome(None, tuple(entries), skipped)
    check_local_folders(settings, engine=False, queue=True)  # a read-only data dir, named as such
    model = model_identity(settings)
    store = store_from_settings(settings)
    own_app = app is None
    app = make_app(settings) if own_app else app
    db = connect(settings.database_url.get_secret_value())
    try:
        if batch_id is not None and batch_status(db, batch_id) is None:
            raise InvalidConfig(f"no batch {batch_id}")
        sample_id = None
        if sample is not None:
            rule = (settings.blast_threshold_percent, settings.min_white_cells)
            sample_id = ensure_sample(db, sample, *rule)
        for path in inputs.files:
            try:
                # The worker's own header checks, here: a file it would refuse is never queued.
                check_image_header(path, max_pixels=settings.max_pixels)
                sha256 = file_sha256(path)  # streamed: a whole-slide scan is gigabytes
                # Read from the header (the scale from metadata): the worker's key for the same inputs.
                key = result_key_of(settings, model, path, mpp)
            except InvalidSlide as exc:
                entries.append(SubmittedFile(str(path), None, "error", reason=exc.reason_for(path)))
                continue
            suffix = path.suffix.lower()
            input_key = f"inputs/{sha256}{suffix if suffix[1:].isalnum() else '.bin'}"
            store.put_file(input_key, path, CONTENT_TYPES.get(suffix, "application/octet-stream"))
            existing = None if force else find_result(db, sha256, model.version, key)
            if batch_id is None:  # made with its first job: a submit that takes no file leaves no batch
                batch_id = create_batch(db, batch_name or f"submit {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC")
            job = create_job(
                db,
                batch_id=batch_id,
                filename=str(path),
                input_key=input_key,
                sha256=sha256,
                mpp=mpp,
                params_key=key,
                sample_id=sample_id,
            )
            if existing is not None:
                if sample_id is not None:
                    add_to_sample(db, sample_id, existing)
                finish_job(db, job.id, existing)
                entries.append(SubmittedFile(str(path), job.id, "succeeded", reused_result_id=existing))
                continue
            try:
                send_job(app, job.id)
            except Exception as exc:  # noqa: BLE001 - the row is there; `blastq requeue` sends it later
                reason = hide_secrets(
                    f"queued, but the broker did not take it ({type(exc).__name__}: {exc})",
                    settings.broker_url.get_secret_value(),
                )
                entries.append(SubmittedFile(str(path), job.id, "queued", reason=" ".join(reason.split())))
                continue
            entries.append(SubmittedFile(str(path), job.id, "queued"))
    finally:
        db.dispose()
        if own_app:
            app.close()
    return SubmitOutcome(batch_id, tuple(entries), skipped)


def wait_for_batch(
    settings: Settings,
    batch_id: str,
    timeout_s: float | None = None,
    progress: Callable[[BatchStatus], None] | None = None,
    *,
    no_worker_after_s: float | None = None,
    workers: Callable[[], list[str] | None] | None = None,
) -> BatchStatus:
    """Poll the batch until none of its jobs is queued or running; TimeoutError after `timeout_s`.

    `no_worker_after_s`: each time the batch has sat that long with jobs queued, none running and no
    count changing, ask which workers take jobs from the slides queue (`workers`; by default the
    broker, worker.celery_app.workers_on_queue) and raise NoWorker when none does. The jobs stay queued.
    """
    db = connect(settings.database_url.get_secret_value())
    app = None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    counts, still_since = None, time.monotonic()
    try:
        while True:
            status = batch_status(db, batch_id)
            if status is None:
                raise InvalidConfig(f"no batch {batch_id}")
            if progress is not None:
                progress(status)
            if status.finished:
                return status
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise TimeoutError(
                    f"batch {batch_id} not finished after {timeout_s}s: "
                    f"{status.queued} queued, {status.running} running"
                )
            if (status.queued, status.running, status.succeeded, status.failed) != counts:
                counts, still_since = (status.queued, status.running, status.succeeded, status.failed), now
            elif (
                no_worker_after_s is not None
                and not status.running
                and now - still_since >= no_worker_after_s
            ):
                still_since = now  # asked again after as long, should the worker found be busy elsewhere
                if workers is None:
                    app = app or make_app(settings)
                    names = workers_on_queue(app, SLIDES_QUEUE)
                else:
                    names = workers()
                if names == []:
                    raise NoWorker(
                        f"batch {batch_id}: {status.queued} job(s) queued for {no_worker_after_s:g}s and no "
                        f"worker takes jobs from the {SLIDES_QUEUE!r} queue: start one with `blastq worker` "
                        f"(the jobs stay queued; follow them with `blastq status --batch {batch_id}`)"
                    )
            time.sleep(POLL_S)
    finally:
        db.dispose()
        if app is not None:
            app.close()


@dataclass(frozen=True)
class Requeued:
    """A job sent again, and why: its worker is dead (`why` says which and since when), or "" when its
    row had not changed for the time asked."""

    job_id: str
    why: str = ""


def requeue(
    settings: Settings,
    older_than_s: float,
    *,
    failed_transient: bool = False,
    app: BlastqCelery | None = None,
) -> list[Requeued]:
    """Send again the jobs a dead worker left running, the queued jobs whose message waits in no queue, and
    those queued or running whose row has not changed for `older_than_s` seconds.

    A worker is dead when its heartbeat is older than settings.worker_dead_after_s (or it stopped): its
    running jobs go at once, whatever their age. A queued job unchanged for that long whose message waits
    in no queue of the broker went with a worker that took it and died before starting it (Redis keeps such
    a message unacknowledged for BLASTQ_VISIBILITY_TIMEOUT_S; the embedded broker loses it), or with a
    broker that lost it: it goes at once too. Where the broker can be read (Redis, the embedded one), a job
    whose message already waits is not sent again: it is in the queue, behind the others. The database is
    the truth: this also rebuilds a broker that lost its messages. Each job's updated_at is bumped first,
    so it is not sent again until it has been stale that long once more, and two requeues at once send it
    once. A job still being processed would be run twice (with one result): choose `older_than_s` above
    the longest slide for running jobs. With `failed_transient`, also the jobs failed because the database
    or the store stayed away too long.
    """
    own_app = app is None
    app = make_app(settings) if own_app else app
    db = connect(settings.database_url.get_secret_value())
    sent: list[Requeued] = []
    # Read before the jobs: a job submitted meanwhile is then too new to be taken for one without a message.
    waiting = _jobs_waiting(settings)

    def send(job, why: str | None = None) -> None:
        if job.id in {r.job_id for r in sent} or (waiting is not None and job.id in waiting):
            return
        if touch_job(db, job):
            send_job(app, job.id)
            sent.append(Requeued(job.id, why))

    try:
        for job, worker in dead_workers_jobs(db, timedelta(seconds=settings.worker_dead_after_s)):
            send(job, f"its worker {worker.name} {_silence(worker)}")
        if failed_transient:
            for job in reopen_transient_failures(db):
                send_job(app, job.id)
                sent.append(Requeued(job.id, f"it failed: {job.error}"))
        if waiting is not None:
            for job in stale_jobs(db, timedelta(seconds=settings.worker_dead_after_s)):
                if job.state == "queued":
                    send(job, NO_MESSAGE)
        for job in stale_jobs(db, timedelta(seconds=older_than_s)):
            send(job)
    finally:
        db.dispose()
        if own_app:
            app.close()
    return sent


NO_MESSAGE = "queued, but its message is in no queue (a worker took it and died, or the broker lost it)"


def _jobs_waiting(settings: Settings) -> set[str] | None:
    """The jobs with a message waiting in the slides queue, or held by a worker for a retry whose time has
    not come (after a database outage most queued jobs are); None when the broker cannot be read. Once
    its time has passed, a held retry no longer counts: if its worker died meanwhile (with every retry it
    held), Redis would give them out again only after the visibility timeout (the embedded broker never),
    and a soak run that waited for that stalled for 110 s; a copy sent to a live worker's job is dropped."""
    waiting, later = waiting_messages(settings), held_for_later(settings, datetime.now(UTC))
    if waiting is None or later is None:
        return None
    targets = {m.target for m in waiting if m.target is not None} | later
    return {job_id for task, job_id in targets if task == PROCESS_SLIDE}


def _silence(worker) -> str:
    if worker.stopped_at is not None:
        return f"stopped at {worker.stopped_at:%Y-%m-%d %H:%M:%S} UTC"
    seconds = (datetime.now(UTC) - worker.heartbeat_at).total_seconds()
    return f"was last heard of {seconds:.0f} s ago"


def submit_training(settings: Settings, cfg: TrainConfig) -> str:
    """Queue a training run for `blastq trainer`: the row first, then the message; returns the run id."""
    db = connect(settings.database_url.get_secret_value())
    try:
        run = create_training_run(db, config=cfg.to_dict(), version=cfg.version)
    finally:
        db.dispose()
    make_app(settings).send_task(TRAIN_MODEL, args=[run.id], queue=TRAIN_QUEUE)
    return run.id
