"""`blastq doctor`: can this machine, with these settings, process slides? One check per part of the
deployment, each answered with a one-line verdict and, when it fails, a one-line fix.

Checks, in order (later ones use what earlier ones found):
  database    reachable, schema at this blastq's revision; the jobs waiting and running
  broker      reachable; the workers listening on the slides queue
  store       a probe object written, read back and deleted
  model       the checkpoint the workers would load: found, loads, sha256 as expected (the shipped
              model's against core/weights/SHA256SUMS, a registry version's against the registry)
  classifier  the same for the cell classifier
  engine      the engine the settings choose loads, runs a synthetic smear tile and agrees with torch fp32
  gpu         a CUDA GPU is visible (only with --gpu, or when BLASTQ_DEVICE is cuda)
  disk        the data, engine-cache and scratch folders are writable and have room
  clock       this machine's clock against the database server's

Each check runs under a time limit, so a server that never answers is a failed check, not a hung doctor.
A check's own exception is its verdict: nothing here raises for a failed check.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from blastq.core.adapters import REGISTRY_MODEL, Settings, mask_secret
from blastq.worker.preflight import ENGINE_TIMEOUT_S, MODEL_CHECKS

CHECKS = ("database", "broker", "store", "model", "classifier", "engine", "gpu", "disk", "clock")
DEFAULT_TIMEOUT_S = 20.0
DEFAULT_MIN_FREE_GIB = 2.0  # a 4096 px field needs ~0.3 GB of scratch and store; a whole slide, gigabytes
MAX_CLOCK_SKEW_S = (
    10.0  # job claims, heartbeats and `blastq requeue --older-than` compare times across machines
)
SHIPPED_SUMS = "SHA256SUMS"  # beside the shipped weights: "<sha256>  <file name>" per line
# Class maps of the chosen engine and torch fp32 on a synthetic tile: the engines' own load checks use
# the same bar for int8 (core.segment.engines); fp32 and fp16 engines agree far more closely.
MIN_TILE_AGREEMENT = 0.99

# Each check's fix when it fails for a reason it does not name a fix for itself.
_FIXES = {
    "database": "start the database server, or set BLASTQ_DATABASE_URL to one that answers",
    "broker": "start the broker (Redis), or set BLASTQ_BROKER_URL to one that answers",
    "store": "check BLASTQ_STORE_URL; for S3 also BLASTQ_S3_ENDPOINT_URL, the bucket and the credentials "
    "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)",
    "model": "set BLASTQ_MODEL to a blastq U-Net checkpoint, or reinstall blastq for the shipped one",
    "classifier": "set BLASTQ_CLASSIFIER to a classifier file (or default, or none), or reinstall blastq",
    "engine": "choose another engine (BLASTQ_ENGINE=onnx or torch) or device (BLASTQ_DEVICE)",
    "gpu": "install PyTorch's CUDA build and the NVIDIA driver, or run on the CPU (BLASTQ_DEVICE=cpu)",
    "disk": "free space, or point BLASTQ_DATA_DIR / BLASTQ_ENGINE_CACHE_DIR / TMPDIR at a larger disk",
    "clock": "synchronise this machine's clock and the database server's (NTP)",
}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: `verdict` says what was found, `fix` what to do when it failed."""

    name: str
    ok: bool
    verdict: str
    fix: str = ""
    seconds: float = 0.0


class CheckFailed(Exception):
    """Raised by a check: the part is not usable; `fix` (or the check's default fix) says what to do."""

    def __init__(self, verdict: str, fix: str = ""):
        super().__init__(verdict)
        self.verdict, self.fix = verdict, fix


@dataclass
class _Found:
    """What earlier checks found, for later ones."""

    settings: Settings
    db: Any = None
    store: Any = None
    model_path: Path | None = None
    failed: set[str] = field(default_factory=set)  # the checks run so far that failed

    def needs(self, check: str) -> None:
        """Stop a check that rests on `check`, which failed: its own verdict would only repeat that one."""
        if check in self.failed:
            raise CheckFailed(f"not run: the {check} check failed", f"mend the {check} first")


def run_checks(
    settings: Settings,
    *,
    only: Sequence[str] | None = None,
    gpu: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    min_free_gib: float = DEFAULT_MIN_FREE_GIB,
    on_result: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """Run the checks (all, or `only` these names, in CHECKS order) and return their results.

    `gpu` asks for the GPU check even when the device is the CPU. `on_result` gets each result as it
    comes (the CLI prints as it goes: loading an engine takes seconds)."""
    wanted = list(CHECKS) if not only else [name for name in CHECKS if name in set(only)]
    unknown = set(only or ()) - set(CHECKS)
    if unknown:
        from blastq.core.common import InvalidConfig

        raise InvalidConfig(f"unknown check(s) {', '.join(sorted(unknown))}; choose from {', '.join(CHECKS)}")
    if "gpu" in wanted and not (gpu or settings.device.startswith("cuda")) and not only:
        wanted.remove("gpu")  # a CPU deployment has no GPU to look for unless asked
    found = _Found(settings)
    checks: dict[str, Callable[[_Found], str]] = {
        "database": _database,
        "broker": _broker,
        "store": _store,
        "model": _model,
        "classifier": _classifier,
        "engine": _engine,
        "gpu": _gpu,
        "disk": lambda f: _disk(f, min_free_gib),
        "clock": _clock,
    }
    results = []
    for name in wanted:
        check = checks[name]
        limit = ENGINE_TIMEOUT_S if name in MODEL_CHECKS else timeout_s
        result = _timed(name, lambda check=check: check(found), _FIXES[name], max(limit, timeout_s))
        results.append(result)
        if not result.ok:
            found.failed.add(name)
        if on_result is not None:
            on_result(result)
    _close(found)
    return results


def _timed(name: str, check: Callable[[], str], default_fix: str, limit_s: float) -> CheckResult:
    """Run one check in a daemon thread for at most `limit_s`: its verdict, its failure, or "no answer"."""
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            outcome["verdict"] = check()
        except CheckFailed as exc:
            outcome["failed"] = (exc.verdict, exc.fix or default_fix)
        except BaseException as exc:  # noqa: BLE001 - whatever a part raises is that check's verdict
            outcome["failed"] = (_one_line(exc), _fix_for(exc) or default_fix)

    start = time.monotonic()
    worker = threading.Thread(target=body, name=f"blastq-doctor-{name}", daemon=True)
    worker.start()
    worker.join(limit_s)
    seconds = round(time.monotonic() - start, 3)
    if worker.is_alive():
        return CheckResult(name, False, f"no answer within {limit_s:g} s", default_fix, seconds)
    if "failed" in outcome:
        verdict, fix = outcome["failed"]
        return CheckResult(name, False, verdict, fix, seconds)
    return CheckResult(name, True, outcome["verdict"], "", seconds)


def _fix_for(exc: BaseException) -> str:
    """The fix for a service that did not answer during another check (the registry's model needs both)."""
    from blastq.core.common import DatabaseUnavailable, StoreUnavailable

    if isinstance(exc, DatabaseUnavailable):
        return _FIXES["database"]
    if isinstance(exc, StoreUnavailable):
        return _FIXES["store"]
    return ""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    from blastq.core.common import BlastqError

    return text if isinstance(exc, BlastqError) and text else f"{type(exc).__name__}: {text}"


def _close(found: _Found) -> None:
    if found.db is not None:
        found.db.dispose()


# --- the checks: each returns its verdict or raises --------------------------------------------------


def _database(found: _Found) -> str:
    from blastq.core.adapters import connect, current_revision, head_revision, job_counts, oldest_queued_job

    url = found.settings.database_url.get_secret_value()
    shown = mask_secret(url)
    head = head_revision()
    if not url.startswith("sqlite"):  # SQLite is made and migrated on first use; a server is only checked
        current = current_revision(url)  # DatabaseUnavailable (the driver's reason) when it does not answer
        if current != head:
            raise CheckFailed(
                f"{shown}: schema at {current or 'none (never migrated)'}, this blastq needs {head}",
                "run `blastq db upgrade` (back up the database first)",
            )
    found.db = connect(url)
    counts = job_counts(found.db)
    oldest = oldest_queued_job(found.db)
    waiting = f"{counts.get('queued', 0)} queued"
    if oldest is not None:
        waiting += f" (oldest {_age(oldest)})"
    return f"{shown}: schema at {head}; jobs {waiting}, {counts.get('running', 0)} running"


def _broker(found: _Found) -> str:
    from blastq.worker.celery_app import SLIDES_QUEUE, make_app, workers_on_queue

    settings = found.settings
    shown = mask_secret(settings.broker_url.get_secret_value())
    app = make_app(settings)
    try:
        with app.connection_for_write() as connection:
            try:
                connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
            except Exception as exc:  # noqa: BLE001 - kombu's error names the cause
                raise CheckFailed(f"{shown}: not reachable: {_reason(exc)}") from exc
        workers = workers_on_queue(app, SLIDES_QUEUE, timeout_s=2.0)
    finally:
        app.close()
    if workers is None:
        listening = "workers on the slides queue: cannot tell with this broker"
    elif workers:
        listening = f"{len(workers)} worker(s) on the slides queue: {', '.join(workers)}"
    else:
        listening = "no worker on the slides queue yet (`blastq worker` starts one; `blastq run` needs none)"
    return f"{shown}: reachable; {listening}"


def _store(found: _Found) -> str:
    from blastq.core.adapters import store_from_settings

    store = store_from_settings(found.settings)
    found.store = store
    key = f"doctor/{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}.probe"
    payload = os.urandom(32)
    start = time.monotonic()
    try:
        store.put(key, payload)
    except Exception as exc:  # noqa: BLE001
        raise CheckFailed(f"{store.url}: cannot write a probe: {_reason(exc)}") from exc
    try:
        if store.get(key) != payload:
            raise CheckFailed(f"{store.url}: a probe read back differs from what was written")
    finally:
        store.delete(key)
    if store.exists(key):
        raise CheckFailed(f"{store.url}: a deleted probe is still there ({key})")
    return (
        f"{store.url}: a probe written, read back and deleted in {1000 * (time.monotonic() - start):.0f} ms"
    )


def _model(found: _Found) -> str:
    from blastq.core.segment import UNet

    path, source, sha, checked = _verified_file(found, "model")
    _, info = UNet.from_checkpoint(path)
    found.model_path = path
    return f"{info.version} ({sha[:12]}, {source}): loads; {checked}"


def _classifier(found: _Found) -> str:
    from blastq.core.cells import load_cell_classifier

    if found.settings.classifier == "none":
        return "none: cells are found and called blast or not, but not typed (BLASTQ_CLASSIFIER=none)"
    path, source, sha, checked = _verified_file(found, "classifier")
    info = load_cell_classifier(str(path)).info
    return f"{info.version} ({info.kind}, {sha[:12]}, {source}): loads; {checked}"


def _verified_file(found: _Found, kind: str) -> tuple[Path, str, str, str]:
    """(path, where it comes from, its sha256, how that was checked) of the model or classifier file the
    settings name, as a worker would resolve it; CheckFailed when it is missing or not the expected file."""
    from blastq.core.common import file_sha256

    path, source, reference = _named_file(found, kind)
    if not path.is_file():
        raise CheckFailed(f"{kind} file not found: {path} ({source})")
    sha = file_sha256(path)
    if reference and sha != reference:
        raise CheckFailed(
            f"{path}: sha256 {sha[:12]}, expected {reference[:12]} ({source}): the file changed or is damaged"
        )
    return path, source, sha, "sha256 as expected" if reference else "no sha256 on record to check it against"


def _named_file(found: _Found, kind: str) -> tuple[Path, str, str]:
    """(path, source, expected sha256 or "") of the `kind` ("model" or "classifier") the settings name:
    a file, the shipped one (checked against SHA256SUMS), or the registry's promoted version."""
    from blastq.core.adapters import fetch_checkpoint, promoted
    from blastq.core.cells import default_classifier_path
    from blastq.core.segment import default_model_path

    settings = found.settings
    if kind == "model":
        setting, shipped, variable, registry_kind = (
            settings.model,
            default_model_path(),
            "BLASTQ_MODEL",
            "unet",
        )
    else:
        setting, shipped = settings.classifier, default_classifier_path()
        variable, registry_kind = "BLASTQ_CLASSIFIER", "classifier"
    if setting == REGISTRY_MODEL:
        found.needs("database")
        version = promoted(_db(found), kind=registry_kind)
        if version is None:
            return shipped, f"the shipped {kind} (nothing promoted in the registry)", shipped_sha256(shipped)
        found.needs("store")
        path = fetch_checkpoint(_store_of(found), version, settings.data_dir / f"{kind}s")
        return path, f"registry version {version.version}", version.sha256
    if setting in ("", "default"):
        return shipped, f"the shipped {kind}", shipped_sha256(shipped)
    return Path(setting).expanduser(), variable, ""


def _engine(found: _Found) -> str:
    import numpy as np

    from blastq.core.segment import N_CLASSES, load_engine, probe_batch

    settings = found.settings
    found.needs("model")
    model = found.model_path
    if model is None:  # the model check was not asked for: the model the settings name
        model = _named_file(found, "model")[0]
    warnings = _EngineWarnings()
    with warnings:
        engine, info = load_engine(
            model, kind=settings.engine, device=settings.device, cache_dir=settings.engine_cache_dir
        )
    reference, _ = load_engine(model, kind="torch", device="cpu")
    batch = probe_batch()  # a synthetic smear field with white cells, prepared as every slide is
    side = batch.shape[-1]
    start = time.monotonic()
    got = np.asarray(engine.infer(batch), np.float32)
    seconds = time.monotonic() - start
    want = np.asarray(reference.infer(batch), np.float32)
    if got.shape != want.shape or not np.isfinite(got).all():
        raise CheckFailed(
            f"{engine.name}: output {got.shape} (finite: {bool(np.isfinite(got).all())}) on a tile"
        )
    agree = float((got[:, :N_CLASSES].argmax(1) == want[:, :N_CLASSES].argmax(1)).mean())
    if agree < MIN_TILE_AGREEMENT:
        raise CheckFailed(
            f"{engine.name}: class map agrees with torch fp32 on {agree:.2%} of a synthetic tile's pixels "
            f"(needs {MIN_TILE_AGREEMENT:.0%})"
        )
    verdict = (
        f"{engine.name} on {settings.device} ran a {side} px tile in {1000 * seconds:.0f} ms, class map "
        f"{agree:.2%} as torch fp32's"
    )
    if warnings.messages:  # e.g. the chosen engine failed to build and torch stands in: slower, or worse
        raise CheckFailed(f"{verdict}, but: {'; '.join(warnings.messages)}")
    return verdict


class _EngineWarnings(logging.Handler):
    """Collects what the engine loader warns of (a fallback to torch) while inside."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self._logger = logging.getLogger("blastq.core.segment.engines")

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split()))

    def __enter__(self) -> _EngineWarnings:
        self._logger.addHandler(self)
        return self

    def __exit__(self, *_: object) -> None:
        self._logger.removeHandler(self)


def _gpu(found: _Found) -> str:
    import torch

    if not torch.cuda.is_available():
        raise CheckFailed(
            f"no CUDA GPU visible to this torch ({torch.__version__}, built for CUDA {torch.version.cuda})"
        )
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{len(names)} GPU(s): {', '.join(names)} (torch {torch.__version__}, CUDA {torch.version.cuda})"


def _disk(found: _Found, min_free_gib: float) -> str:
    from blastq.core.adapters import check_local_folders
    from blastq.core.common import BlastqError

    settings = found.settings
    try:
        check_local_folders(settings, queue=True)
    except BlastqError as exc:
        raise CheckFailed(
            str(exc), "make the folder writable, or point BLASTQ_DATA_DIR at one that is"
        ) from exc
    folders = {
        "data": settings.data_dir,
        "engine cache": Path(settings.engine_cache_dir),
        "scratch": Path(tempfile.gettempdir()),
    }
    parts, short = [], []
    for what, folder in folders.items():
        free = shutil.disk_usage(_existing(folder)).free / 2**30
        parts.append(f"{what} {folder}: {free:.1f} GiB free")
        if free < min_free_gib:
            short.append(f"{what} {folder} has {free:.2f} GiB free (under {min_free_gib:g} GiB)")
    if short:
        raise CheckFailed("; ".join(short))
    return "; ".join(parts)


def _clock(found: _Found) -> str:
    from sqlalchemy import text

    url = found.settings.database_url.get_secret_value()
    if url.startswith("sqlite"):
        return "SQLite: the database's clock is this machine's"
    found.needs("database")
    db = _db(found)
    with db.connect() as connection:
        before = time.time()
        server = connection.execute(text("SELECT CURRENT_TIMESTAMP")).scalar_one()
        after = time.time()
    if server.tzinfo is None:
        server = server.replace(tzinfo=UTC)
    skew = server.timestamp() - (before + after) / 2
    shown = f"this machine's clock is {abs(skew):.2f} s {'behind' if skew > 0 else 'ahead of'} the database's"
    if abs(skew) > MAX_CLOCK_SKEW_S + (after - before) / 2:
        raise CheckFailed(f"{shown} (more than {MAX_CLOCK_SKEW_S:g} s)")
    return shown


# --- helpers -------------------------------------------------------------------------------------------


def shipped_sha256(path: Path) -> str:
    """The sha256 SHA256SUMS records for a file shipped beside it ("" when it records none)."""
    sums = path.parent / SHIPPED_SUMS
    try:
        lines = sums.read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        digest, _, name = line.strip().partition("  ")
        if name == path.name:
            return digest
    return ""


def _db(found: _Found):
    if found.db is None:
        from blastq.core.adapters import connect

        found.db = connect(found.settings.database_url.get_secret_value())
    return found.db


def _store_of(found: _Found):
    if found.store is None:
        from blastq.core.adapters import store_from_settings

        found.store = store_from_settings(found.settings)
    return found.store


def _existing(folder: Path) -> Path:
    """The folder, or its nearest ancestor that exists (a data dir not made yet is on its parent's disk)."""
    folder = Path(folder).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)  # SQLAlchemy wraps the driver's error
    return " ".join(str(orig if orig is not None else exc).split()) or type(exc).__name__


def _age(moment: datetime) -> str:
    seconds = max(0.0, (datetime.now(UTC) - moment).total_seconds())
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def results_json(results: Sequence[CheckResult]) -> str:
    """The results as one JSON object: {"ok": all passed, "checks": [{name, ok, verdict, fix, seconds}]}."""
    return json.dumps({"ok": all(r.ok for r in results), "checks": [asdict(r) for r in results]}, indent=2)
