"""The trainer service: training runs queued on the `train` queue and run by `blastq trainer`.

A run is a row before it is a message (`blastq.worker.submit.submit_training`). The task claims the row, resumes from
`training/<run id>/last.pt` in the store when an earlier delivery left one, trains with a hook that
uploads the resume state and records the epoch in the row after every epoch, then uploads the final
checkpoint (`training/<run id>/model.pt`, with its run record and history beside it), registers it
as a candidate in the model registry and marks the run succeeded.

Delivery is at least once, as for slides: a trainer killed mid-run has its message redelivered, and
the next delivery goes on from the last finished epoch (the same losses as an uninterrupted run). A
bad config fails the run with the reason; a transient store or database fault retries with backoff.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from blastq.core.adapters import (
    Settings,
    claim_training_run,
    fail_training_run,
    finish_training_run,
    record_epoch,
    register_model,
)
from blastq.core.common import BlastqError, TransientError
from blastq.core.segment import load_plain
from blastq.trainer.train import TrainConfig, TrainResult, read_run_record, train
from blastq.worker.retry import worker_name

if TYPE_CHECKING:
    from celery import Task

    from blastq.core.adapters import ObjectStore

TRAIN_MODEL = "blastq.train_model"  # the task name worker/tasks.py registers

__all__ = ["TRAIN_MODEL", "model_key", "resume_key", "run_training_job"]


def resume_key(run_id: str) -> str:
    """The store key of a run's latest resume state."""
    return f"training/{run_id}/last.pt"


def model_key(run_id: str) -> str:
    """The store key of a run's final (best) checkpoint."""
    return f"training/{run_id}/model.pt"


def run_training_job(task: Task, run_id: str) -> str | None:
    """The body of `blastq.train_model`; returns the run's final state, or None if it was not run."""
    app = task.app
    settings, resources = app.settings, app.resources
    retries = task.request.retries or 0
    log = _Log(run_id)
    try:
        db = resources.db()
        # As for slides: a retry by the holder is not an attempt, so max_attempts counts dead trainers only.
        run = claim_training_run(
            db, run_id, worker_name(), settings.max_attempts, timedelta(seconds=settings.worker_dead_after_s)
        )
        if run is None:
            log.info("not run (unknown, finished, or out of attempts)")
            return None
        store = resources.store()
        work = settings.data_dir / "training" / run_id
        # The trainer's machine decides the device; a run's results do not depend on where it is stored.
        cfg = TrainConfig.from_dict(run.config, out=work / "model.pt", device=settings.device)
        state = _resume_state(store, run_id)
        if state is not None:
            log.info(f"resuming from {resume_key(run_id)} (after epoch {state.get('epoch')})")

        def checkpoint(epoch: int, resume: dict[str, Any]) -> None:
            # The object first: the row never names a state the store does not hold.
            buffer = io.BytesIO()
            torch.save(resume, buffer)
            store.put(resume_key(run_id), buffer.getvalue())
            record_epoch(db, run_id, epoch, resume["history"], resume_key(run_id))

        result = train(cfg, progress=log.info, checkpoint_hook=checkpoint, resume_state=state)
        sha256 = _publish(store, run_id, result)
        metrics = {"best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch}
        metrics |= _validation_metrics(cfg, result, settings)
        register_model(
            db,
            store,
            result.checkpoint,
            metrics=metrics,
            config=cfg.to_dict(),
            split=read_run_record(result.run_record)["split"] if result.run_record else {},
        )
        finish_training_run(db, run_id, model_key=model_key(run_id), model_sha256=sha256)
        shutil.rmtree(work, ignore_errors=True)
        log.info(f"succeeded: {cfg.version} best epoch {result.best_epoch}, val loss {result.best_val_loss}")
        return "succeeded"
    except TransientError as exc:
        if retries < settings.task_retry_max:  # else Celery would give up: fail the row here
            log.warning(f"{exc}; retry {retries + 1} of {settings.task_retry_max}")
            raise  # Celery retries it (worker.retry.RETRY_POLICY: backoff with jitter)
        _fail(resources, run_id, f"{exc} (gave up after {retries} retries)")
    except BlastqError as exc:  # the config's or the data's fault: retrying cannot help
        _fail(resources, run_id, str(exc))
    except Exception as exc:  # noqa: BLE001 - a bug must fail one run, not the trainer
        log.exception("internal error")
        _fail(resources, run_id, f"internal error: {type(exc).__name__}: {exc}")
    return "failed"


def _resume_state(store: ObjectStore, run_id: str) -> dict[str, Any] | None:
    try:
        data = store.get(resume_key(run_id))
    except FileNotFoundError:
        return None
    return load_plain(data, "training run's resume state", resume_key(run_id))


def _publish(store: ObjectStore, run_id: str, result: TrainResult) -> str:
    """Upload the final checkpoint with its run record and history; returns the checkpoint's sha256."""
    data = Path(result.checkpoint).read_bytes()
    store.put(model_key(run_id), data)
    prefix = f"training/{run_id}"
    if result.run_record is not None:
        store.put(f"{prefix}/model.run.json", result.run_record.read_bytes(), "application/json")
    history = json.dumps([asdict(h) for h in result.history], indent=1).encode()
    store.put(f"{prefix}/model.history.json", history, "application/json")
    return hashlib.sha256(data).hexdigest()


def _validation_metrics(cfg: TrainConfig, result: TrainResult, settings: Settings) -> dict[str, float]:
    """The registry's `validation_score` (trainer.evaluate on the fixed validation set) when the run had
    segmentation_wbc data; without it there is no fixed validation set to score on."""
    if cfg.wbc_root is None:
        return {}
    from blastq.core.segment import load_engine
    from blastq.trainer.evaluate import validation_metrics

    engine, info = load_engine(result.checkpoint, kind="torch", device=settings.device)
    return validation_metrics(engine, info, cfg.wbc_root)


def _fail(resources, run_id: str, reason: str) -> None:
    reason = " ".join(reason.split())
    _Log(run_id).warning(f"failed: {reason}")
    try:
        fail_training_run(resources.db(), run_id, reason)
    except Exception as exc:  # noqa: BLE001 - the row stays running; a redelivery settles it
        _Log(run_id).error(f"could not record its failure ({reason}): {exc}")


class _Log:
    """The task logger with the run id in front of every line."""

    def __init__(self, run_id: str):
        from celery.utils.log import get_task_logger

        self._log = get_task_logger(__name__)
        self._prefix = f"training run {run_id}: "

    def info(self, message: str) -> None:
        self._log.info(self._prefix + message)

    def warning(self, message: str) -> None:
        self._log.warning(self._prefix + message)

    def error(self, message: str) -> None:
        self._log.error(self._prefix + message)

    def exception(self, message: str) -> None:
        self._log.exception(self._prefix + message)
