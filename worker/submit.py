"""Putting slides into the service: upload, job row, message; waiting for a batch; requeueing stuck jobs.

Jobs are rows first: the row is written before its message is sent, so a message lost anywhere (a
broker restarted, a publish that failed) leaves a row that `requeue` sends again. Content already
processed with the same model and parameters is not sent at all: its job points at the existing result.
"""

from __future__ import annotations

import glob
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from blastq.core.db import (
    BatchStatus,
    batch_status,
    connect,
    create_batch,
    create_job,
    find_result,
    finish_job,
    stale_jobs,
    touch_job,
)
from blastq.core.errors import InvalidConfig, InvalidSlide
from blastq.core.registry import promoted
from blastq.core.settings import REGISTRY_MODEL, Settings, pipeline_config, whole_slide_config
from blastq.core.slide import USER_MPP_RANGE
from blastq.core.store import store_from_settings
from blastq.core.unet import default_model_path, load_checkpoint
from blastq.core.wholeslide import whole_slide_key
from blastq.core.wsi import file_sha256, is_whole_slide
from blastq.worker.celery_app import SLIDES_QUEUE, BlastqCelery, make_app
from blastq.worker.tasks import PROCESS_SLIDE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}
POLL_S = 0.5


@dataclass(frozen=True)
class SubmittedFile:
    """What became of one file: queued, succeeded at once (an existing result), or an error (no job)."""

    path: str
    job_id: str | None
    state: str  # "queued", "succeeded" (reused_result_id is set) or "error"
    reused_result_id: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class SubmitOutcome:
    batch_id: str | None  # None when no file could be submitted (no batch is made)
    jobs: tuple[SubmittedFile, ...]

    @property
    def errors(self) -> tuple[SubmittedFile, ...]:
        return tuple(j for j in self.jobs if j.error is not None)


def expand_paths(paths: Iterable[str | Path]) -> tuple[list[Path], list[SubmittedFile]]:
    """Files named, the images directly inside folders named, and the files glob patterns match.

    Returns (files in order, each once; one error entry per argument that names nothing).
    """
    files: list[Path] = []
    errors: list[SubmittedFile] = []
    for arg in map(str, paths):
        path = Path(arg)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                errors.append(SubmittedFile(arg, None, "error", error=f"{arg}: no images in this folder"))
        elif path.exists():
            found = [path]
        elif glob.has_magic(arg):
            found = sorted(Path(p) for p in glob.glob(arg) if Path(p).is_file())
            if not found:
                errors.append(SubmittedFile(arg, None, "error", error=f"{arg}: no files match"))
        else:
            found = []
            errors.append(SubmittedFile(arg, None, "error", error=f"{arg}: no such file"))
        files.extend(found)
    seen: set[Path] = set()
    unique = []
    for f in files:
        if (key := f.resolve()) not in seen:
            seen.add(key)
            unique.append(f)
    return unique, errors


def model_identity(settings: Settings) -> tuple[str, str]:
    """(model version, pipeline parameters key) that a worker with these settings gives its results."""
    if settings.model == REGISTRY_MODEL:  # the promoted version now; the shipped model when none is
        db = connect(settings.database_url)
        try:
            model = promoted(db)
        finally:
            db.dispose()
        if model is not None:
            return model.version, pipeline_config(settings).key()
    _, info = load_checkpoint(
        Path(settings.model) if settings.model not in ("", REGISTRY_MODEL) else default_model_path()
    )
    return info.version, pipeline_config(settings).key()


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
) -> SubmitOutcome:
    """Upload each file, write its job row, then queue it; a file with a result already is not queued.

    `force`: queue even when a result exists (it is computed again and its row replaced). A file that
    cannot be read is an error entry in the outcome, and the others go on. A job whose message the
    broker did not take stays queued, with the error in the outcome: `requeue` sends it later.
    `batch_id`: add the jobs to this existing batch (the watcher keeps one batch per run).
    """
    if mpp is not None and not USER_MPP_RANGE[0] <= mpp <= USER_MPP_RANGE[1]:
        lo, hi = USER_MPP_RANGE
        raise InvalidConfig(f"mpp={mpp} is not a plausible pixel size (expected {lo}..{hi} um/px)")
    files, entries = expand_paths(paths)
    if not files:
        return SubmitOutcome(None, tuple(entries))
    model_version, params_key = model_identity(settings)
    store = store_from_settings(settings)
    own_app = app is None
    app = make_app(settings) if own_app else app
    db = connect(settings.database_url)
    try:
        if batch_id is None:
            batch_id = create_batch(db, batch_name or f"submit {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC")
        elif batch_status(db, batch_id) is None:
            raise InvalidConfig(f"no batch {batch_id}")
        for path in files:
            try:
                sha256 = file_sha256(path)  # streamed: a whole-slide scan is gigabytes
            except InvalidSlide as exc:
                entries.append(SubmittedFile(str(path), None, "error", error=str(exc)))
                continue
            suffix = path.suffix.lower()
            input_key = f"inputs/{sha256}{suffix if suffix[1:].isalnum() else '.bin'}"
            store.put_file(input_key, path, CONTENT_TYPES.get(suffix, "application/octet-stream"))
            # A whole slide's result is keyed by the chunking too (core.wholeslide); the worker decides
            # the same way, from the file.
            key = (
                whole_slide_key(params_key, whole_slide_config(settings))
                if is_whole_slide(path)
                else params_key
            )
            existing = None if force else find_result(db, sha256, model_version, key)
            job = create_job(
                db,
                batch_id=batch_id,
                filename=str(path),
                input_key=input_key,
                sha256=sha256,
                mpp=mpp,
                params_key=key,
            )
            if existing is not None:
                finish_job(db, job.id, existing)
                entries.append(SubmittedFile(str(path), job.id, "succeeded", reused_result_id=existing))
                continue
            try:
                send_job(app, job.id)
            except Exception as exc:  # noqa: BLE001 - the row is there; `blastq requeue` sends it later
                error = f"{path}: queued, but the broker did not take it ({type(exc).__name__}: {exc})"
                entries.append(SubmittedFile(str(path), job.id, "queued", error=" ".join(error.split())))
                continue
            entries.append(SubmittedFile(str(path), job.id, "queued"))
    finally:
        db.dispose()
        if own_app:
            app.close()
    return SubmitOutcome(batch_id, tuple(entries))


def wait_for_batch(
    settings: Settings,
    batch_id: str,
    timeout_s: float | None = None,
    progress: Callable[[BatchStatus], None] | None = None,
) -> BatchStatus:
    """Poll the batch until none of its jobs is queued or running; TimeoutError after `timeout_s`."""
    db = connect(settings.database_url)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            status = batch_status(db, batch_id)
            if status is None:
                raise InvalidConfig(f"no batch {batch_id}")
            if progress is not None:
                progress(status)
            if status.finished:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"batch {batch_id} not finished after {timeout_s}s: "
                    f"{status.queued} queued, {status.running} running"
                )
            time.sleep(POLL_S)
    finally:
        db.dispose()


def requeue(settings: Settings, older_than_s: float, *, app: BlastqCelery | None = None) -> list[str]:
    """Send again the jobs queued or running whose row has not changed for `older_than_s` seconds.

    The database is the truth: this rebuilds a broker that lost its messages. Each job's updated_at is
    bumped first, so it is not sent again until it has been stale that long once more, and two
    requeues at once send it once. A job still being processed would be run twice (with one result):
    choose `older_than_s` above the longest slide for running jobs.
    """
    own_app = app is None
    app = make_app(settings) if own_app else app
    db = connect(settings.database_url)
    sent = []
    try:
        for job in stale_jobs(db, timedelta(seconds=older_than_s)):
            if touch_job(db, job):
                send_job(app, job.id)
                sent.append(job.id)
    finally:
        db.dispose()
        if own_app:
            app.close()
    return sent
