"""The Celery app of the slide service, configured as ARCHITECTURE.md decides, and the worker that runs it.

JSON only; late acknowledgement, and a message whose worker process died goes back on the queue;
one message reserved per process; explicit queues. There is no result backend: the database's job
rows are the truth, so a worker or a broker can be lost without losing what happened.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown
from kombu import Queue
from kombu.transport import sqlalchemy as sqla_transport

from blastq.core.adapters import REGISTRY_MODEL, Settings
from blastq.core.common import pid_running
from blastq.worker.resources import WorkerResources
from blastq.worker.retry import worker_name

SLIDES_QUEUE = "slides"
TRAIN_QUEUE = "train"
QUEUES = (SLIDES_QUEUE, TRAIN_QUEUE)
POOLS = ("prefork", "solo")
# The embedded broker's idle poll. Kombu's default, 1 s, kept each job of a batch waiting in the queue:
# five 256 px crops took 5.1 s from the first submitted to the last finished through a warm worker
# (blastq run: 5.1 s with its model loading), 0.7 s at 0.1 s. Each poll is one short SQLite
# transaction: an idle worker costs 0.3% of a core at 1 s, 2.6% at 0.1 s, 5.6% at 0.05 s.
EMBEDDED_POLL_S = 0.1
PROCESS_START_TIMEOUT_S = 900.0  # as `blastq doctor`'s engine check: an engine may be built first

log = logging.getLogger(__name__)


class BlastqCelery(Celery):
    """A Celery app that carries the settings it was built from and its per-process resources."""

    def __init__(self, settings: Settings, **kwargs):
        super().__init__("blastq", **kwargs)
        self.settings = settings
        self.resources = WorkerResources(settings)
        self.torch_threads = 0  # per pool process; 0: torch's default (set by run_worker)
        self.loads_engine = True  # False for a trainer (train queue only): it needs no inference engine
        self.queues_taken: list[str] = []  # set by run_worker: what its heartbeat says it takes
        self.parent_name: str | None = None  # the `blastq worker` process (hostname/pid) of a pool process
        self.heartbeat = None  # this process's worker.heartbeat.Heartbeat while it takes jobs


class EmbeddedTransport(sqla_transport.Transport):
    """Kombu's SQLAlchemy transport polling every EMBEDDED_POLL_S when idle.

    A subclass, because that transport hands all of broker_transport_options to create_engine, which
    refuses `polling_interval`.
    """

    polling_interval = EMBEDDED_POLL_S


def broker_transport_options(settings: Settings) -> dict:
    url = settings.broker_url.get_secret_value()
    if url.startswith(("redis://", "rediss://", "redis+socket://", "sentinel://")):
        # Redis hands an unacknowledged message to another worker after this long: it must exceed
        # the longest slide, or long slides run twice.
        return {"visibility_timeout": settings.visibility_timeout_s, "socket_connect_timeout": 10}
    if url.startswith("sqla+sqlite"):
        # Kombu passes these options to create_engine: wait for the SQLite write lock rather than fail.
        return {"connect_args": {"timeout": 30}}
    return {}


def make_app(settings: Settings) -> BlastqCelery:
    """The Celery app for these settings, with the blastq tasks registered."""
    from blastq.core.adapters import check_server_url
    from blastq.worker.tasks import register_tasks

    check_server_url("BLASTQ_BROKER_URL", settings.broker_url.get_secret_value())
    if settings.broker_url.get_secret_value().startswith("sqla+sqlite:///"):
        # SQLite creates the file, not its folder.
        Path(settings.broker_url.get_secret_value().removeprefix("sqla+sqlite:///")).parent.mkdir(
            parents=True, exist_ok=True
        )
    app = BlastqCelery(settings)
    broker = {"broker_url": settings.broker_url.get_secret_value()}
    if settings.broker_url.get_secret_value().startswith("sqla+"):
        # The URL's "sqla+" would choose Kombu's own transport over an explicit one.
        broker = {
            "broker_url": settings.broker_url.get_secret_value().removeprefix("sqla+"),
            "broker_transport": f"{__name__}:EmbeddedTransport",
        }
    app.conf.update(
        **broker,
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A new pool process loads its model, classifier and engine (worker_process_init) before it says it
        # is up: 2-7 s on 2 CPU cores, minutes for a first TensorRT build. Celery's default, 4 s, killed
        # such processes one after another on a loaded machine (a worker stuck for 100 s in the soak,
        # benchmarks/soak.py, replacing a killed pool process 24 times).
        worker_proc_alive_timeout=PROCESS_START_TIMEOUT_S,
        task_queues=[Queue(name, routing_key=name) for name in QUEUES],
        task_default_queue=SLIDES_QUEUE,
        task_create_missing_queues=False,
        worker_concurrency=settings.worker_concurrency,
        worker_send_task_events=False,
        # Remote control needs fanout, which the embedded (SQLAlchemy) broker does not offer across
        # processes, and it would poll SQLite for nothing.
        worker_enable_remote_control=not settings.broker_url.get_secret_value().startswith("sqla+"),
        enable_utc=True,
    )
    register_tasks(app)
    return app


def workers_on_queue(
    app: BlastqCelery, queue: str = SLIDES_QUEUE, timeout_s: float = 1.0
) -> list[str] | None:
    """Names of the running workers that take jobs from `queue`; None when the broker cannot tell.

    Redis (and AMQP): Celery's remote control, which every worker answers. The embedded broker has no
    remote control across processes, so its workers announce themselves in a folder beside its file
    (one machine, as SQLite is): a marker whose process is gone is removed.
    """
    folder = _presence_folder(app.settings)
    if folder is not None:
        return [name for name, queues in _announced_workers(folder) if queue in queues]
    if app.settings.broker_url.get_secret_value().startswith("sqla+"):
        return None  # the SQLAlchemy transport on a server database: workers on other machines
    try:
        replies = app.control.inspect(timeout=timeout_s).active_queues() or {}
    except Exception:  # noqa: BLE001 - a broker that does not answer cannot tell either
        return None
    return sorted(name for name, queues in replies.items() if any(q.get("name") == queue for q in queues))


def _presence_folder(settings: Settings) -> Path | None:
    if settings.broker_url.get_secret_value().startswith("sqla+sqlite:///"):
        return Path(settings.broker_url.get_secret_value().removeprefix("sqla+sqlite:///")).parent / "workers"
    return None


@contextmanager
def _announce(settings: Settings, queues: Sequence[str]) -> Iterator[None]:
    """While inside, this worker is listed for `workers_on_queue` on the embedded broker."""
    folder = _presence_folder(settings)
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"{socket.gethostname()}-{os.getpid()}.json"
    marker.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "queues": list(queues)}))
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)


def _announced_workers(folder: Path) -> list[tuple[str, list[str]]]:
    found = []
    for marker in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            entry = json.loads(marker.read_text())
            host, pid, queues = str(entry["host"]), int(entry["pid"]), list(entry["queues"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not ours
        if host == socket.gethostname() and not pid_running(pid):
            marker.unlink(missing_ok=True)  # a worker killed before it could remove its marker
            continue
        found.append((f"blastq-{pid}@{host}", queues))
    return found


def _load_in_child(**_) -> None:
    from celery import current_app

    app = current_app._get_current_object()
    if isinstance(app, BlastqCelery):
        if threads := app.torch_threads:
            import torch

            torch.set_num_threads(threads)
        try:
            if app.loads_engine:
                app.resources.load()
            else:
                app.resources.after_fork()
                app.resources.db()
                app.resources.store()
        except Exception as exc:  # noqa: BLE001 - the task meets it again and fails the job with it
            log.error("blastq worker process %s could not load its resources: %s", os.getpid(), exc)
        _start_heartbeat(app)


def _start_heartbeat(app: BlastqCelery) -> None:
    """This process takes jobs: its heartbeat (worker.heartbeat) from now until it stops."""
    from blastq.worker.heartbeat import Heartbeat

    app.heartbeat = Heartbeat(
        app.resources.db, app.queues_taken, app.settings.heartbeat_s, app.parent_name
    ).start()


def _stop_heartbeat(**_) -> None:
    from celery import current_app

    app = current_app._get_current_object()
    if isinstance(app, BlastqCelery) and app.heartbeat is not None:
        app.heartbeat.stop()
        app.heartbeat = None


def run_worker(
    app: BlastqCelery,
    *,
    queues: Sequence[str] = (SLIDES_QUEUE,),
    concurrency: int | None = None,
    pool: str = "prefork",
    loglevel: str = "INFO",
) -> int:
    """Run a Celery worker in this process until it is told to stop; returns its exit code.

    Engines load in each pool process after the fork (`worker_process_init`), never here.
    """
    from celery.concurrency import get_implementation

    from blastq.core.common import InvalidConfig, ModelNotFound
    from blastq.core.segment import default_model_path

    unknown = set(queues) - set(QUEUES)
    if unknown:
        raise InvalidConfig(f"unknown queue(s) {', '.join(sorted(unknown))}; choose from {', '.join(QUEUES)}")
    if pool not in POOLS:
        raise InvalidConfig(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
    # A missing checkpoint stops the worker here, with one line, instead of failing every job. Only
    # its presence: loading it would run torch ops in the parent of the fork, whose thread pools are not
    # fork-safe (a first pool process that hung before its first slide was seen while this loaded it).
    # With the registry, the model is fetched per process (and follows promotions): nothing to check.
    if app.settings.model != REGISTRY_MODEL and SLIDES_QUEUE in queues:
        model = Path(app.settings.model) if app.settings.model else default_model_path()
        if not model.is_file():
            raise ModelNotFound(f"model file not found: {model}")
    # A model, classifier or engine that does not load (a damaged file, a wrong format, an engine that
    # disagrees with torch) stops the worker here with the reason, rather than a ready worker failing
    # every job it takes. Checked in a fresh interpreter: not in this parent of the fork (above).
    if SLIDES_QUEUE in queues:
        from blastq.worker.preflight import preflight

        preflight(app.settings)
    worker_process_init.connect(_load_in_child, weak=False, dispatch_uid="blastq-load-resources")
    worker_process_shutdown.connect(_stop_heartbeat, weak=False, dispatch_uid="blastq-stop-heartbeat")
    app.queues_taken = list(queues)
    app.parent_name = worker_name()
    app.loads_engine = SLIDES_QUEUE in queues
    app.set_current()
    processes = concurrency or app.settings.worker_concurrency
    # Share the cores among the pool processes: each torch process defaults to all cores, and N of them
    # oversubscribe the machine (2 workers on 2 cores: 72 slides/min with 2 threads each, 134 with 1).
    app.torch_threads = max(1, (os.cpu_count() or 1) // processes) if pool == "prefork" else 0
    with _announce(app.settings, queues), _metrics_endpoint(app.settings, list(queues)):
        worker = app.Worker(
            hostname=f"blastq-{os.getpid()}@{socket.gethostname()}",
            queues=list(queues),
            concurrency=processes,
            pool_cls=get_implementation(pool),
            loglevel=loglevel,
            without_gossip=True,
            without_mingle=True,
            without_heartbeat=True,
        )
        if pool == "solo":  # this process claims the jobs itself
            _start_heartbeat(app)
        try:
            worker.start()
        finally:
            _stop_heartbeat()
    return worker.exitcode or 0


@contextmanager
def _metrics_endpoint(settings: Settings, queues: list[str]) -> Iterator[None]:
    """While inside, with BLASTQ_METRICS_PORT set: the pool processes count into a fresh multiprocess
    folder and this process serves /metrics, /healthz and /readyz (worker.metrics)."""
    if not settings.metrics_port:
        yield
        return
    from celery.signals import worker_ready, worker_shutting_down

    from blastq.worker.metrics import WorkerState, multiprocess_folder, serve_metrics

    state = WorkerState(queues)
    with multiprocess_folder(settings):
        worker_ready.connect(lambda **_: state.set_ready(), weak=False, dispatch_uid="blastq-metrics-ready")
        worker_shutting_down.connect(
            lambda **_: state.set_stopping(), weak=False, dispatch_uid="blastq-metrics-stopping"
        )
        server = serve_metrics(settings, state)
        log.info("metrics on http://%s:%d/metrics", *server.server_address[:2])
        try:
            yield
        finally:
            server.shutdown()
            server.server_close()
