"""Measure the slide service's queue on this machine: overhead per job, and slides per minute by workers.

python benchmarks/bench_queue.py [--slides 20] [--size 512] [--workers 1,2] [--embedded]

Real services by default: PostgreSQL (--database-url, default $BLASTQ_TEST_POSTGRES_URL or the local test
database; a fresh schema per run, dropped afterwards), Redis (--redis-url; a free database number per run)
and S3 (--s3-endpoint with --bucket and the AWS_* variables, e.g. MinIO; without it, the moto server of
tests/s3server.py on loopback). --embedded: the single-machine defaults instead (SQLite, file store, SQLite
broker) under a temporary data directory.

For each worker count N, one `blastq worker --concurrency N` (N pool processes sharing the cores, as the
README advises for several workers on one machine) is started and warmed up, then:
- latency: slides submitted one at a time to idle workers, each awaited before the next: submit call ->
  job started_at (upload, row, message, delivery, claim), started_at -> finished_at less the pipeline's
  own time (the worker's store and database work), finished_at -> the result seen by a client polling
  every 10 ms;
- throughput: all slides submitted at once; slides per minute from the submit call to the last result.
The pure pipeline (process_slide in this process, no queue) is timed on the same slides for comparison.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import cv2
from sqlalchemy import select as sql_select

from blastq.core.adapters import (
    ResultRow,
    batch_jobs,
    batch_status,
    connect,
    job_status,
    load_settings,
    mask_secret,
    upgrade,
)
from blastq.core.image import Slide
from blastq.core.pipeline import PipelineConfig, process_slide
from blastq.core.segment import load_engine
from blastq.core.synth import generate_field
from blastq.worker.celery_app import make_app
from blastq.worker.submit import submit

REPO = Path(__file__).resolve().parents[1]
BLASTQ = "import sys; from blastq.cli.main import main; main(sys.argv[1:], prog_name='blastq')"
POLL_S = 0.01  # one job, one query a tick
BATCH_POLL_S = 0.1  # a batch: coarser, so the poller leaves the CPU to the workers
MPP = 0.2
AWS_TEST_ENV = {  # only for the moto server started here; a real endpoint uses the caller's AWS_* variables
    "AWS_ACCESS_KEY_ID": "blastq-bench",
    "AWS_SECRET_ACCESS_KEY": "blastq-bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


# --- deployments ----------------------------------------------------------------------------------


@contextmanager
def pg_schema(url: str) -> Iterator[str]:
    """`url` with its search_path on a new schema (migrated), dropped afterwards."""
    from sqlalchemy import create_engine, make_url, text
    from sqlalchemy.pool import NullPool

    admin = create_engine(url, poolclass=NullPool)
    schema = f"blastq_bench_{uuid.uuid4().hex[:12]}"
    with admin.begin() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        scoped = make_url(url).update_query_dict({"options": f"-csearch_path={schema}"})
        scoped_url = scoped.render_as_string(hide_password=False)
        upgrade(scoped_url)
        yield scoped_url
    finally:
        with admin.begin() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def redis_database(url: str) -> Iterator[str]:
    """A Redis database number nobody uses (claimed by a key), emptied afterwards."""
    import redis

    claim = uuid.uuid4().hex
    databases = int(redis.Redis.from_url(f"{url}/0").config_get("databases").get("databases", 16))
    for number in range(databases - 1, 0, -1):
        db = redis.Redis.from_url(f"{url}/{number}")
        if db.dbsize() == 0 and db.set("blastq-bench-claim", claim, nx=True, ex=3600):
            break
        db.close()
    else:
        raise SystemExit(f"no free Redis database number at {url}")
    try:
        yield f"{url}/{number}"
    finally:
        db.flushdb()
        db.close()


@contextmanager
def moto_server() -> Iterator[str]:
    """tests/s3server.py on loopback; its endpoint URL."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "s3server.py"), "--exit-on-stdin-eof"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("PORT "):
            raise SystemExit(f"the S3 test server did not start: {line!r}")
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.stdin.close()
        proc.terminate()
        proc.wait(10)


@contextmanager
def deployment(args, base_env: dict[str, str], data_dir: Path) -> Iterator[dict[str, str]]:
    """The BLASTQ_* environment of one fresh deployment: nothing in it from an earlier run."""
    run_dir = data_dir / uuid.uuid4().hex[:8]
    if args.embedded:
        yield {**base_env, "BLASTQ_DATA_DIR": str(run_dir)}
        return
    with pg_schema(args.database_url) as db_url, redis_database(args.redis_url) as broker_url:
        yield {
            **base_env,
            "BLASTQ_DATA_DIR": str(run_dir),
            "BLASTQ_DATABASE_URL": db_url,
            "BLASTQ_BROKER_URL": broker_url,
            "BLASTQ_STORE_URL": f"s3://{args.bucket}/bench-{uuid.uuid4().hex[:8]}",
        }


@contextmanager
def workers(env: dict[str, str], count: int, log_dir: Path) -> Iterator[None]:
    """One `blastq worker` with `count` pool processes, ready; stopped on the way out."""
    procs, logs = [], []
    try:
        for i in range(1):
            log = log_dir / f"worker-{count}-{i}-{uuid.uuid4().hex[:6]}.log"
            logs.append(log)
            with log.open("w") as out:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-c",
                            BLASTQ,
                            "worker",
                            "--concurrency",
                            str(count),
                            "--pool",
                            "prefork",
                        ],
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )  # fmt: skip
                )
        deadline = time.monotonic() + 120
        while not all(" ready." in log.read_text(errors="replace") for log in logs):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                tails = "\n".join(log.read_text(errors="replace")[-2000:] for log in logs)
                raise SystemExit(f"a worker did not start:\n{tails}")
            time.sleep(0.2)
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            with suppress(subprocess.TimeoutExpired):
                p.wait(30)
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


# --- measuring ------------------------------------------------------------------------------------


def write_slides(folder: Path, seeds: range, size: int) -> list[Path]:
    paths = []
    for seed in seeds:
        path = folder / f"bench_{seed}_{size}.png"
        field = generate_field(seed, size, size, mpp=MPP)
        cv2.imwrite(str(path), cv2.cvtColor(field.image, cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


def wait_finished(db, job_id: str, timeout_s: float = 300) -> datetime:
    """Poll one job until it is finished; when this client first saw it finished (UTC)."""
    deadline = time.monotonic() + timeout_s
    while job_status(db, job_id).state not in ("succeeded", "failed"):
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id} not finished after {timeout_s}s")
        time.sleep(POLL_S)
    return datetime.now(UTC)


def wait_batch(db, batch_id: str, timeout_s: float = 600) -> None:
    """Poll the batch (one query) every BATCH_POLL_S until none of its jobs is queued or running."""
    deadline = time.monotonic() + timeout_s
    while not batch_status(db, batch_id).finished:
        if time.monotonic() > deadline:
            raise SystemExit(f"batch {batch_id} not finished after {timeout_s}s")
        time.sleep(BATCH_POLL_S)


def result_seconds(db, result_id: int) -> float:
    with db.connect() as c:
        return c.scalar(sql_select(ResultRow.seconds).where(ResultRow.id == result_id))


def gaps_between_jobs(jobs) -> list[float]:
    """Per worker process, the idle time from one job's finished_at to its next job's started_at."""
    by_worker: dict[str, list] = {}
    for job in jobs:
        if job.started_at and job.finished_at:
            by_worker.setdefault(job.worker, []).append(job)
    gaps = []
    for runs in by_worker.values():
        runs.sort(key=lambda j: j.started_at)
        gaps += [(b.started_at - a.finished_at).total_seconds() for a, b in pairwise(runs)]
    return gaps


@dataclass
class Run:
    workers: int
    submit_call_s: list[float]  # submit() for one slide: model identity, upload, row, message
    row_to_start_s: list[float]  # job created_at -> started_at: publish, delivery, claim
    submit_to_start_s: list[float]  # the two above and what lies between
    worker_io_s: list[float]  # started_at -> finished_at less the pipeline
    finish_to_seen_s: list[float]  # finished_at -> a client polling every POLL_S sees it
    worker_pipeline_s: list[float]  # process_slide inside the worker (the result's seconds)
    gap_s: list[float]  # idle time of a worker process between two jobs of the batch
    batch_submit_per_slide_s: float  # submit() of the whole batch, per slide
    busy_percent: float  # the workers' started_at -> finished_at time over the batch's wall time
    slides_per_min: float
    failed: int


def measure(
    env: dict[str, str], count: int, slides: list[Path], latency_slides: list[Path], log_dir: Path
) -> Run:
    settings = load_settings(env)
    db = connect(settings.database_url.get_secret_value())
    app = make_app(settings)
    try:
        with workers(env, count, log_dir):
            # Warm-up: one slide per worker, so each pool process has run the model once.
            warm = submit(settings, latency_slides[:count], mpp=MPP, app=app)
            wait_batch(db, warm.batch_id)

            run = Run(count, [], [], [], [], [], [], [], 0.0, 0.0, 0.0, 0)
            for path in latency_slides[count:]:
                called = datetime.now(UTC)
                (entry,) = submit(settings, [path], mpp=MPP, app=app).jobs
                returned = datetime.now(UTC)
                seen = wait_finished(db, entry.job_id)
                job = job_status(db, entry.job_id)
                if job.state != "succeeded":
                    raise SystemExit(f"{path}: {job.error}")
                seconds = result_seconds(db, job.result_id)
                run.submit_call_s.append((returned - called).total_seconds())
                run.row_to_start_s.append((job.started_at - job.created_at).total_seconds())
                run.submit_to_start_s.append((job.started_at - called).total_seconds())
                run.worker_io_s.append((job.finished_at - job.started_at).total_seconds() - seconds)
                run.finish_to_seen_s.append((seen - job.finished_at).total_seconds())
                run.worker_pipeline_s.append(seconds)

            t0 = time.perf_counter()
            batch = submit(settings, slides, mpp=MPP, app=app)
            run.batch_submit_per_slide_s = (time.perf_counter() - t0) / len(slides)
            wait_batch(db, batch.batch_id)
            elapsed = time.perf_counter() - t0
            jobs = batch_jobs(db, batch.batch_id)
            run.worker_pipeline_s += [
                result_seconds(db, j.result_id) for j in jobs if j.result_id is not None
            ]
            run.gap_s = gaps_between_jobs(jobs)
            run.slides_per_min = len(slides) / elapsed * 60
            busy = sum((j.finished_at - j.started_at).total_seconds() for j in jobs if j.finished_at)
            run.busy_percent = busy / (elapsed * count) * 100
            run.failed = sum(j.state == "failed" for j in jobs)
            return run
    finally:
        app.close()
        db.dispose()


def pure_pipeline_s(slides: list[Path]) -> list[float]:
    """process_slide alone, in this process, on the same slides (model loaded and warmed up first)."""
    engine, info = load_engine()
    config = PipelineConfig()
    loaded = []
    for path in slides:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        loaded.append(Slide(rgb, MPP, "user", path.name, ""))
    process_slide(loaded[0], engine, info, config)
    times = []
    for slide in loaded:
        t0 = time.perf_counter()
        process_slide(slide, engine, info, config)
        times.append(time.perf_counter() - t0)
    return times


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:7.0f} / {p90(values) * 1000:5.0f}" if values else "n/a"


def report(runs: list[Run], pure: list[float]) -> None:
    pure_median = statistics.median(pure)
    pure_rate = 60 / pure_median

    def per_job_overhead(r: Run) -> str:
        parts = (r.submit_to_start_s, r.worker_io_s, r.finish_to_seen_s)
        if not all(parts):
            return "n/a"
        overhead = sum(statistics.median(p) for p in parts)
        return f"{overhead / statistics.median(r.worker_pipeline_s) * 100:.0f}"

    rows = [
        ("submit -> start, ms (median / p90)", [ms(r.submit_to_start_s) for r in runs]),
        ("  of which the submit call", [ms(r.submit_call_s) for r in runs]),
        ("  of which row -> start", [ms(r.row_to_start_s) for r in runs]),
        ("in-worker I/O, ms (median / p90)", [ms(r.worker_io_s) for r in runs]),
        ("finish -> seen, ms (median / p90)", [ms(r.finish_to_seen_s) for r in runs]),
        ("pipeline in worker, s (median)", [f"{statistics.median(r.worker_pipeline_s):.2f}" for r in runs]),
        ("per-job overhead, % of pipeline", [per_job_overhead(r) for r in runs]),
        ("submit per slide in a batch, ms", [f"{r.batch_submit_per_slide_s * 1000:.0f}" for r in runs]),
        ("idle between jobs, ms (batch)", [ms(r.gap_s) for r in runs]),
        ("workers busy, % of batch time", [f"{r.busy_percent:.0f}" for r in runs]),
        ("slides per minute (batch)", [f"{r.slides_per_min:.1f}" for r in runs]),
        ("throughput vs pure pipeline, %", [f"{r.slides_per_min / pure_rate * 100:.0f}" for r in runs]),
        ("failed jobs", [str(r.failed) for r in runs]),
    ]
    label, width = max(len(name) for name, _ in rows), 16
    print()
    print(f"{'':{label}}  " + "".join(f"{f'{r.workers} worker(s)':>{width}}" for r in runs))
    for name, cells in rows:
        print(f"{name:{label}}  " + "".join(f"{c:>{width}}" for c in cells))
    print(
        f"\npure process_slide, one process back to back: median {pure_median:.2f} s, p90 {p90(pure):.2f} s "
        f"-> {pure_rate:.1f} slides/min"
    )
    print(
        "in-worker I/O: started_at -> finished_at less the pipeline (input read, decode, artifacts, uploads,\n"
        "rows). row -> start: publish, delivery, claim. per-job overhead: the submit -> start, I/O and\n"
        "finish -> seen medians over the pipeline's, workers idle. idle between jobs: a worker process's\n"
        "finished_at -> next started_at in the batch. throughput vs pure: the batch's rate over the pure\n"
        "pipeline's (which already uses every core through torch threads)."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=20, help="slides in the throughput batch")
    ap.add_argument("--latency-slides", type=int, default=5, help="slides submitted one at a time")
    ap.add_argument("--size", type=int, default=512, help="slide width and height, px")
    ap.add_argument("--workers", default="1,2", help="worker process counts to run, comma-separated")
    ap.add_argument("--embedded", action="store_true", help="SQLite, file store, SQLite broker: no servers")
    ap.add_argument(
        "--database-url",
        default=os.environ.get(
            "BLASTQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    ap.add_argument("--redis-url", default=os.environ.get("BLASTQ_TEST_REDIS_URL", "redis://127.0.0.1:6379"))
    ap.add_argument("--s3-endpoint", default=os.environ.get("BLASTQ_S3_ENDPOINT_URL", ""))
    ap.add_argument(
        "--bucket", default="", help="with --s3-endpoint: an existing bucket (default: made here)"
    )
    args = ap.parse_args()
    counts = [int(n) for n in args.workers.split(",")]

    base_env = {k: v for k, v in os.environ.items() if not k.startswith("BLASTQ_")}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="blastq-bench-")))
        if not args.embedded:
            from blastq.core.adapters import S3Store

            if not args.s3_endpoint:
                base_env |= AWS_TEST_ENV
                args.s3_endpoint = stack.enter_context(moto_server())
            base_env["BLASTQ_S3_ENDPOINT_URL"] = args.s3_endpoint
            args.bucket = args.bucket or f"blastq-bench-{uuid.uuid4().hex[:8]}"
            os.environ.update({k: v for k, v in base_env.items() if k.startswith("AWS_")})
            S3Store(args.bucket, endpoint_url=args.s3_endpoint).ensure_bucket()
        slide_dir = tmp / "slides"
        slide_dir.mkdir()
        n_latency = max(counts) + args.latency_slides
        latency_slides = write_slides(slide_dir, range(1, 1 + n_latency), args.size)
        slides = write_slides(slide_dir, range(1001, 1001 + args.slides), args.size)

        where = (
            "embedded (SQLite, file store, SQLite broker)"
            if args.embedded
            else f"PostgreSQL {mask_secret(args.database_url)}, Redis {args.redis_url}, S3 {args.s3_endpoint}"
        )
        print(
            f"{args.slides} slides of {args.size}x{args.size} px at {MPP} um/px; {os.cpu_count()} CPU cores"
        )
        print(f"services: {where}")
        runs = []
        for count in counts:
            with deployment(args, base_env, tmp) as env:
                print(f"running {count} worker(s)...", flush=True)
                runs.append(measure(env, count, slides, latency_slides, tmp))
        print("timing process_slide alone...", flush=True)
        pure = pure_pipeline_s(slides)
        report(runs, pure)
        shutil.rmtree(slide_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
