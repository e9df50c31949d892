"""A worker's Prometheus metrics and health endpoints.

What the slide tasks record, in the pool process that ran the slide:
  blastq_slides_total{outcome, engine, model}   slides finished (outcome: succeeded or failed)
  blastq_cells_total{engine, model}             white cells found; blastq_blasts_total the blasts among them
  blastq_slide_seconds{engine, model}           a slide's seconds in the worker, end to end (histogram)
  blastq_stage_seconds{stage}                   seconds per stage of a slide (core.common.timing.STAGES)
  blastq_failures_total{reason}                 failed jobs: input, missing_input, transient, time_limit, internal
  blastq_retries_total                          transient faults retried (the database or store did not answer)
What the worker's main process adds when scraped, from the database every worker shares:
  blastq_jobs{state}                            jobs per state (queued, running, succeeded, failed)
  blastq_oldest_queued_job_age_seconds          how long the longest-waiting queued job has waited (0: none)
  blastq_database_up                            1 when that query answered
  blastq_worker_ready                           1 while the worker takes jobs (0 starting or shutting down)
  blastq_worker_info{host, pid, queues, version}

A prefork worker's slides run in its pool processes, so they write prometheus_client's multiprocess
files (PROMETHEUS_MULTIPROC_DIR: a folder per `blastq worker`, made empty when it starts, removed when it
stops) and the main process serves their sum: a pool process killed mid-slide keeps what it counted.
`serve_metrics` answers on BLASTQ_METRICS_HOST:BLASTQ_METRICS_PORT
  /metrics  the metrics above (Prometheus text format)
  /healthz  200 while the worker's main process answers (liveness)
  /readyz   200 while it takes jobs, 503 with the reason while starting or shutting down (readiness)
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ParamSpec

from blastq.core.adapters import Settings
from blastq.core.common import StageTimes

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
P = ParamSpec("P")
# Seconds: a stage of a small field takes milliseconds, a whole slide's engine stage many minutes.
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

_metrics: dict[str, Any] = {}
log = logging.getLogger(__name__)


def _never_fails(fn: Callable[P, None]) -> Callable[P, None]:
    """A metric that cannot be recorded (a full disk under the multiprocess folder) is logged, and the
    slide it counts goes on: metrics never fail a job."""

    @functools.wraps(fn)
    def record(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            log.warning("metric %s not recorded: %s: %s", fn.__name__, type(exc).__name__, exc)

    return record


def _defined() -> dict[str, Any]:
    """The metric objects, made on first use: after run_worker has chosen the multiprocess folder (the
    value class prometheus_client uses is fixed when the metric is made)."""
    if not _metrics:
        from prometheus_client import Counter, Histogram

        _metrics.update(
            slides=Counter("blastq_slides", "Slides finished by the worker", ["outcome", "engine", "model"]),
            cells=Counter("blastq_cells", "White cells found", ["engine", "model"]),
            blasts=Counter("blastq_blasts", "Blasts found", ["engine", "model"]),
            slide_seconds=Histogram(
                "blastq_slide_seconds",
                "Seconds per slide in the worker",
                ["engine", "model"],
                buckets=STAGE_BUCKETS,
            ),
            stage_seconds=Histogram(
                "blastq_stage_seconds", "Seconds per stage of a slide", ["stage"], buckets=STAGE_BUCKETS
            ),
            failures=Counter("blastq_failures", "Jobs failed, by reason", ["reason"]),
            retries=Counter("blastq_retries", "Transient faults retried"),
        )
    return _metrics


@_never_fails
def slide_succeeded(engine: str, model: str, white_cells: int, blasts: int, seconds: float) -> None:
    m = _defined()
    m["slides"].labels("succeeded", engine, model).inc()
    m["cells"].labels(engine, model).inc(white_cells)
    m["blasts"].labels(engine, model).inc(blasts)
    m["slide_seconds"].labels(engine, model).observe(seconds)


@_never_fails
def slide_failed(reason: str, engine: str = "", model: str = "") -> None:
    m = _defined()
    m["slides"].labels("failed", engine, model).inc()
    m["failures"].labels(reason).inc()


@_never_fails
def retried() -> None:
    _defined()["retries"].inc()


@_never_fails
def stages_done(times: StageTimes) -> None:
    histogram = _defined()["stage_seconds"]
    for stage, seconds in times.seconds.items():
        histogram.labels(stage).observe(seconds)


# --- the main process: the multiprocess folder, the database's gauges, the HTTP endpoint --------------


@contextmanager
def multiprocess_folder(settings: Settings) -> Iterator[Path]:
    """While inside, this process and the pool processes it forks count into a fresh folder of their own."""
    folder = settings.data_dir / "metrics" / f"worker-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(folder, ignore_errors=True)


class WorkerState:
    """What /readyz answers: ready between Celery's worker_ready and worker_shutting_down."""

    def __init__(self, queues: list[str]) -> None:
        self.queues = queues
        self.ready = False
        self.why_not = "starting"

    def set_ready(self) -> None:
        self.ready, self.why_not = True, ""

    def set_stopping(self) -> None:
        self.ready, self.why_not = False, "shutting down"


class QueueCollector:
    """The gauges read when scraped from the database every worker shares: jobs per state, the oldest
    queued job's wait, whether the database answered. `db`: an engine, or a callable that makes one: made
    (and its schema checked) on the first scrape that reaches the database, kept, and disposed after each
    scrape, so an idle scraper holds no connection (nor hands one to a pool process forked later)."""

    def __init__(self, db: Any) -> None:
        self.make = db if callable(db) else None
        self.db = None if callable(db) else db

    def collect(self):
        from datetime import UTC, datetime

        from prometheus_client.core import GaugeMetricFamily

        from blastq.core.adapters import job_counts, oldest_queued_job

        up = GaugeMetricFamily("blastq_database_up", "1 when the database answered this scrape")
        try:
            if self.db is None:
                self.db = self.make()
            try:
                counts, oldest = job_counts(self.db), oldest_queued_job(self.db)
            finally:
                if self.make is not None:
                    self.db.dispose()
        except Exception:  # noqa: BLE001 - a scrape reports the database down, it does not fail
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("blastq_jobs", "Jobs in the database, by state", labels=["state"])
        for state in ("queued", "running", "succeeded", "failed"):
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        age = GaugeMetricFamily(
            "blastq_oldest_queued_job_age_seconds",
            "Seconds the longest-waiting queued job has waited (0: none)",
        )
        age.add_metric([], 0 if oldest is None else max(0.0, (datetime.now(UTC) - oldest).total_seconds()))
        yield age


class WorkerCollector:
    """This worker's state and identity, read when scraped."""

    def __init__(self, state: WorkerState) -> None:
        self.state = state

    def collect(self):
        from importlib.metadata import version

        from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

        ready = GaugeMetricFamily("blastq_worker_ready", "1 while the worker takes jobs")
        ready.add_metric([], 1 if self.state.ready else 0)
        yield ready
        info = InfoMetricFamily("blastq_worker", "The worker process serving these metrics")
        labels = {
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "queues": ",".join(self.state.queues),
        }
        info.add_metric([], {**labels, "version": version("blastq")})
        yield info


def registry_for(settings: Settings, state: WorkerState):
    """The pool processes' metrics (summed from the multiprocess folder) and the service gauges."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from blastq.core.adapters import connect

    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
    url = settings.database_url.get_secret_value()
    registry.register(QueueCollector(lambda: connect(url)))
    registry.register(WorkerCollector(state))
    return registry


def serve_metrics(settings: Settings, state: WorkerState) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz and /readyz on a daemon thread; the server (its .server_address, .shutdown)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from blastq.core.common import InvalidConfig

    registry = registry_for(settings, state)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?")[0]
            if path == "/metrics":
                self._answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._answer(200, b"ok\n")
            elif path == "/readyz":
                if state.ready:
                    self._answer(200, b"ready\n")
                else:
                    self._answer(503, f"not ready: {state.why_not}\n".encode())
            else:
                self._answer(404, b"not found: /metrics, /healthz or /readyz\n")

        def _answer(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:  # a scrape every few seconds is not news
            pass

    try:
        server = ThreadingHTTPServer((settings.metrics_host, settings.metrics_port), Handler)
    except OSError as exc:
        raise InvalidConfig(
            f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} (BLASTQ_METRICS_PORT): "
            f"{exc.strerror or exc}"
        ) from exc
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="blastq-metrics", daemon=True).start()
    return server
