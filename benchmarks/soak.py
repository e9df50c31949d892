"""Soak the slide service with faults, then count what was lost or duplicated.

python benchmarks/soak.py [--slides 200] [--size 512] [--workers 2] [--kill-every 15,30] [--db-outage-s 40]
                          [--seed 1] [--out soak.json]

A deployment of its own on this machine: a fresh PostgreSQL schema (--database-url; dropped afterwards),
a redis-server of its own with an append-only file (a restart keeps the queue, as a lab's Redis should),
and the S3 test server (tests/s3server.py) with a fresh bucket. The workers reach PostgreSQL through a TCP
proxy, so the database can be cut off from them while it keeps running for the final count.

`--slides` distinct synthetic smears are submitted at once to `--workers` `blastq worker --concurrency 1`
processes (prefork). While they work:
- as the slides start, and then every `--kill-every` MIN,MAX seconds (uniform, seeded), one worker gets a
  SIGKILL: its pool process
  (Celery forks a new one and the message goes back to the queue) or its main process (the pool process
  is orphaned; the worker is started again), alternately at random;
- at a quarter of the slides finished the broker restarts (SIGTERM, 5 s away, started again);
- at half of them the database is cut off for `--db-outage-s` seconds (connections dropped and refused);
- every 10 s an operator's `blastq requeue` runs, as a cron job would (heartbeats let it send a dead
  worker's jobs at once; otherwise jobs unchanged for BLASTQ_VISIBILITY_TIMEOUT_S, here 120 s).

When every job has finished (or after --timeout-s), the workers stop and the database and store are
counted: submitted, succeeded, failed (with reasons), lost (a job not finished, or a submitted file with no
job), duplicated result rows (one slide, model and result key in two rows), duplicated cell rows (one cell
id twice in a result), succeeded jobs whose outputs are not all in the store, and orphaned store objects
(what `blastq gc --older-than 0` would remove). Exit status 0 when nothing was lost, duplicated, missing
or orphaned and no slide failed; 1 otherwise. Not part of the test suite (minutes of wall time); a small
run of it is (tests/test_soak.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

from bench_queue import AWS_TEST_ENV, BLASTQ, moto_server, pg_schema, write_slides
from sqlalchemy import func, make_url, select

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the fault injectors the reliability tests use
from faults import PrivateRedis, TcpProxy  # noqa: E402

from blastq.core.adapters import (  # noqa: E402
    CellRow,
    JobRow,
    ResultRow,
    S3Store,
    connect,
    load_settings,
    store_from_settings,
)
from blastq.core.outputs import ARTIFACT_NAMES  # noqa: E402
from blastq.worker.gc import collect_garbage  # noqa: E402
from blastq.worker.submit import requeue, submit  # noqa: E402

FINISHED = ("succeeded", "failed")
jobs_table = JobRow.__table__
REQUEUE_EVERY_S = 10.0


@dataclass
class Faults:
    pool_kills: int = 0
    main_kills: int = 0
    worker_starts: int = 0
    broker_restarts: int = 0
    database_outage_s: float = 0.0
    requeues_run: int = 0
    requeues_failed: int = 0  # the operator's requeue met the outage
    jobs_requeued: int = 0
    log: list[str] = field(default_factory=list)


class Worker:
    """One `blastq worker --concurrency 1` (prefork), started again after its main process is killed."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path):
        self.name, self.env, self.log_dir = name, env, log_dir
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None
        self.groups: list[int] = []  # every process group it ran in, killed at the end

    def start(self) -> None:
        self.log = self.log_dir / f"{self.name}-{len(self.groups)}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", BLASTQ, "worker", "--concurrency", "1", "--pool", "prefork"],
                env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.groups.append(self.proc.pid)

    @property
    def ready(self) -> bool:
        return self.alive and self.log is not None and " ready." in self.log.read_text(errors="replace")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pool_pids(self) -> list[int]:
        """The pool processes: the main process's children that are not its model check (doctor)."""
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return []
        pids = []
        for pid in map(int, children):
            with suppress(OSError):
                if b"doctor" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(pid)
        return pids

    def stop(self, timeout_s: float = 60) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        for group in self.groups:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()


def job_states(db, job_ids: list[str]) -> Counter:
    with db.connect() as c:
        rows = c.execute(select(jobs_table.c.state).where(jobs_table.c.id.in_(job_ids))).scalars()
        return Counter(rows)


def soak(args) -> dict:
    rng = random.Random(args.seed)
    kill_min, kill_max = args.kill_every
    os.environ.update(AWS_TEST_ENV)
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    faults = Faults()
    started = time.monotonic()

    def note(message: str) -> None:
        line = f"{time.monotonic() - started:7.1f} s  {message}"
        faults.log.append(line)
        print(line, flush=True)

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="blastq-soak-")))
        db_url = stack.enter_context(pg_schema(args.database_url))
        parsed = make_url(db_url)
        proxy = stack.enter_context(TcpProxy((parsed.host or "127.0.0.1", parsed.port or 5432)))
        proxied_url = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        broker = PrivateRedis(work, appendonly=True)
        stack.callback(broker.stop)
        endpoint = stack.enter_context(moto_server())
        bucket = f"blastq-soak-{uuid.uuid4().hex[:10]}"
        S3Store(bucket, endpoint_url=endpoint).ensure_bucket()
        base = {
            "BLASTQ_DATA_DIR": str(work / "data"),
            "BLASTQ_BROKER_URL": broker.url,
            "BLASTQ_STORE_URL": f"s3://{bucket}/store",
            "BLASTQ_S3_ENDPOINT_URL": endpoint,
            "BLASTQ_HEARTBEAT_S": "2",
            "BLASTQ_VISIBILITY_TIMEOUT_S": "120",
        }
        worker_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("BLASTQ_")},
            **base,
            "BLASTQ_DATABASE_URL": proxied_url,
        }
        settings = load_settings(
            {**base, "BLASTQ_DATABASE_URL": proxied_url}
        )  # through the proxy, as a client
        direct = load_settings({**base, "BLASTQ_DATABASE_URL": db_url})  # the final count only

        print(f"writing {args.slides} slides of {args.size} px ...", flush=True)
        (work / "slides").mkdir()
        slides = write_slides(work / "slides", range(7_000_000, 7_000_000 + args.slides), args.size)

        workers = [Worker(f"worker-{i}", worker_env, work) for i in range(args.workers)]
        for w in workers:
            stack.callback(w.stop)
            w.start()
            faults.worker_starts += 1
        deadline = time.monotonic() + 180
        while not all(w.ready for w in workers):
            if time.monotonic() > deadline or any(not w.alive for w in workers):
                tails = "\n".join(w.log.read_text(errors="replace")[-2000:] for w in workers)
                raise SystemExit(f"the workers did not start:\n{tails}")
            time.sleep(0.5)
        note(f"{args.workers} workers ready")

        outcome = submit(settings, slides, batch_name="soak")
        job_ids = [e.job_id for e in outcome.jobs if e.job_id is not None]
        not_queued = [e for e in outcome.jobs if e.state != "queued"]
        note(f"submitted {len(job_ids)} jobs ({len(not_queued)} not queued)")
        db = connect(db_url)
        stack.callback(db.dispose)

        next_kill = time.monotonic()  # the first at once, while the first slides run; then every MIN-MAX s
        next_requeue = time.monotonic() + REQUEUE_EVERY_S
        next_report = time.monotonic() + 10
        broker_restarted = outage_done = False
        restart_at: dict[str, float] = {}
        run_deadline = time.monotonic() + args.timeout_s
        while True:
            now = time.monotonic()
            states = job_states(db, job_ids)
            finished = sum(states[s] for s in FINISHED)
            if finished == len(job_ids) or now > run_deadline:
                break
            if now > next_report:
                note(f"{dict(states)}")
                next_report = now + 10
            for w in workers:  # a killed main process: start it again after a pause (a supervisor)
                if not w.alive and w.name not in restart_at:
                    restart_at[w.name] = now + 2
                if w.name in restart_at and now > restart_at[w.name]:
                    del restart_at[w.name]
                    w.start()
                    faults.worker_starts += 1
                    note(f"{w.name} started again")
            if not broker_restarted and finished >= len(job_ids) / 4:
                note("broker: restart (SIGTERM, 5 s away)")
                broker.restart(down_s=5)
                faults.broker_restarts += 1
                broker_restarted = True
                note("broker: back")
            elif broker_restarted and not outage_done and finished >= len(job_ids) / 2:
                note(f"database: cut off for {args.db_outage_s:g} s")
                cut = time.monotonic()
                with proxy.cut():
                    time.sleep(args.db_outage_s)
                faults.database_outage_s = round(time.monotonic() - cut, 1)
                outage_done = True
                note("database: back")
            elif now > next_kill and finished < len(job_ids) * 0.95:
                victims = [w for w in workers if w.ready]
                if victims:
                    w = rng.choice(victims)
                    pool = w.pool_pids()
                    if pool and rng.random() < 0.5:
                        os.kill(rng.choice(pool), signal.SIGKILL)
                        faults.pool_kills += 1
                        note(f"SIGKILL {w.name}'s pool process")
                    else:
                        os.kill(w.proc.pid, signal.SIGKILL)
                        w.proc.wait()
                        faults.main_kills += 1
                        note(f"SIGKILL {w.name}'s main process")
                next_kill = now + rng.uniform(kill_min, kill_max)
            if now > next_requeue:
                faults.requeues_run += 1
                try:
                    sent = requeue(settings, older_than_s=settings.visibility_timeout_s)
                    faults.jobs_requeued += len(sent)
                    if sent:
                        note(f"requeue sent {len(sent)}: " + "; ".join(r.why or "stale" for r in sent[:3]))
                except Exception as exc:  # noqa: BLE001 - an operator's cron line fails and runs again later
                    faults.requeues_failed += 1
                    note(f"requeue failed: {type(exc).__name__}: {str(exc)[:120]}")
                next_requeue = time.monotonic() + REQUEUE_EVERY_S
            time.sleep(0.5)
        wall_s = time.monotonic() - started
        note(f"finished: {dict(job_states(db, job_ids))}")
        for w in workers:
            w.stop()
        return count(direct, db, slides, job_ids, outcome, faults, wall_s, args)


def count(settings, db, slides, job_ids, outcome, faults: Faults, wall_s: float, args) -> dict:
    """What the database and the store hold after the run."""
    with db.connect() as c:
        jobs = c.execute(select(jobs_table).where(jobs_table.c.id.in_(job_ids))).all()
        duplicated_results = c.execute(
            select(func.count()).select_from(
                select(ResultRow.sha256)
                .group_by(ResultRow.sha256, ResultRow.model_version, ResultRow.params_key)
                .having(func.count() > 1)
                .subquery()
            )
        ).scalar_one()
        duplicated_cells = c.execute(
            select(func.count()).select_from(
                select(CellRow.result_id)
                .group_by(CellRow.result_id, CellRow.cell_id)
                .having(func.count() > 1)
                .subquery()
            )
        ).scalar_one()
        results = {r.id: r for r in c.execute(select(ResultRow.id, ResultRow.sha256, ResultRow.store_prefix))}
        cells = c.execute(select(func.count()).select_from(CellRow)).scalar_one()
    store = store_from_settings(settings)
    keys = set(store.list("slides"))
    succeeded = [j for j in jobs if j.state == "succeeded"]
    failed = [j for j in jobs if j.state == "failed"]
    missing_outputs = [
        j.id
        for j in succeeded
        if j.result_id not in results
        or any(f"{results[j.result_id].store_prefix}/{name}" not in keys for name in ARTIFACT_NAMES)
    ]
    garbage = collect_garbage(settings, grace=timedelta(0), dry_run=True)
    # A slide with no job, or whose job did not finish (or has no row at all).
    lost = len(slides) - sum(1 for j in jobs if j.state in FINISHED)
    report = {
        "slides": len(slides),
        "size_px": args.size,
        "workers": args.workers,
        "seed": args.seed,
        "wall_s": round(wall_s, 1),
        "submitted": len(job_ids),
        "succeeded": len(succeeded),
        "failed": len(failed),
        "failure_reasons": dict(Counter(j.error for j in failed)),
        "lost": lost,
        "duplicated_result_rows": duplicated_results,
        "duplicated_cell_rows": duplicated_cells,
        "result_rows": len(results),
        "distinct_slides_succeeded": len({j.sha256 for j in succeeded}),
        "cell_rows": cells,
        "succeeded_without_all_outputs": len(missing_outputs),
        "orphaned_store_objects": len(garbage.orphans),
        "abandoned_writes": garbage.abandoned_writes,
        "queued_messages_of_finished_jobs": garbage.broker.finished if garbage.broker else None,
        "attempts": dict(sorted(Counter(j.attempts for j in jobs).items())),
        "faults": asdict(faults),
    }
    report["clean"] = (
        report["lost"] == 0
        and report["failed"] == 0
        and duplicated_results == 0
        and duplicated_cells == 0
        and not missing_outputs
        and not garbage.orphans
    )
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=200, help="distinct slides submitted at once")
    ap.add_argument("--size", type=int, default=512, help="slide width and height, px")
    ap.add_argument("--workers", type=int, default=2, help="`blastq worker --concurrency 1` processes")
    ap.add_argument(
        "--kill-every",
        type=lambda s: tuple(float(x) for x in s.split(",")),
        default=(15.0, 30.0),
        metavar="MIN,MAX",
        help="seconds between SIGKILLs, uniform in [MIN, MAX]",
    )
    ap.add_argument("--db-outage-s", type=float, default=40.0, help="how long the database is cut off")
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="give up waiting after this long")
    ap.add_argument("--seed", type=int, default=1, help="seed of the fault schedule")
    ap.add_argument(
        "--database-url",
        default=os.environ.get(
            "BLASTQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
        help="a PostgreSQL server; a fresh schema is made in it and dropped afterwards",
    )
    ap.add_argument("--out", type=Path, help="also write the report here as JSON")
    args = ap.parse_args()
    if len(args.kill_every) != 2 or not 0 < args.kill_every[0] <= args.kill_every[1]:
        ap.error("--kill-every takes MIN,MAX seconds, 0 < MIN <= MAX")
    report = soak(args)
    shown = {k: v for k, v in report.items() if k != "faults"}
    faults = {k: v for k, v in report["faults"].items() if k != "log"}
    print(json.dumps({**shown, "faults": faults}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    sys.exit(0 if report["clean"] else 1)


if __name__ == "__main__":
    main()
