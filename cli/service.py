"""The slide-service commands: submit, watch, worker, status, results, requeue, db upgrade.

Parse, call one function of blastq.worker (or core.adapters.db), print. `register(main)` adds them to the
`blastq` group; a BlastqError becomes one line and exit status 2 there.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import asdict, fields
from datetime import datetime

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
RESULT_COLUMNS = (
    "id",
    "image",
    "white_cells",
    "blasts",
    "blast_percent",
    "flagged",
    "verdict",
    "differential",
    "review_cells",
    "mpp",
    "created_at",
)
# Short names for the differential column of the table (percent of white cells per type).
TYPE_ABBREVIATIONS = {
    "neutrophil": "neu",
    "lymphocyte": "lym",
    "monocyte": "mono",
    "eosinophil": "eos",
    "basophil": "baso",
    "blast": "blast",
}


@click.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True)
@click.option("--batch", "batch_name", help="Name of the batch (default: the date and time).")
@click.option("--wait", is_flag=True, help="Show progress until the batch ends; exit 1 if a slide failed.")
@click.option("--force", is_flag=True, help="Process slides again even when a result exists.")
@click.option(
    "--mpp", type=float, help="Microns per pixel of the slides (default: from metadata, else estimated)."
)
@click.option(
    "--sample",
    metavar="ID",
    help="The slides are fields of one sample (patient): their cells are pooled into one verdict "
    "(`blastq results --sample ID`).",
)
def submit(
    paths: tuple[str, ...],
    batch_name: str | None,
    wait: bool,
    force: bool,
    mpp: float | None,
    sample: str | None,
) -> None:
    """Queue PATHS (files, folders of images, or glob patterns) for the workers.

    Prints one line per slide with its job id, then the batch id. Content already processed with
    the current model and parameters is not queued again: its job points at the existing result.
    """
    from blastq.core.adapters import load_settings
    from blastq.worker.submit import submit as submit_slides

    settings = load_settings()
    outcome = submit_slides(settings, paths, batch_name=batch_name, force=force, mpp=mpp, sample=sample)
    if outcome.skipped:
        click.echo(outcome.skipped, err=True)
    for job in outcome.jobs:
        if job.job_id is None:
            click.echo(f"FAILED {job.error}", err=True)
            continue
        reused = f" (existing result {job.reused_result_id})" if job.reused_result_id is not None else ""
        click.echo(f"{job.path}: job {job.job_id} {job.state}{reused}")
        if job.error:
            click.echo(f"WARNING {job.error}", err=True)
    n_jobs = sum(j.job_id is not None for j in outcome.jobs)
    if outcome.batch_id is not None:
        click.echo(f"batch {outcome.batch_id}: {n_jobs} job(s)")
    unsent = [j for j in outcome.errors if j.job_id is not None]
    if unsent:
        click.echo(f"{len(unsent)} job(s) not sent: start the broker, then run `blastq requeue`", err=True)
    elif wait and n_jobs:
        status = _wait(settings, outcome.batch_id, n_jobs)
        click.echo(
            f"batch {outcome.batch_id}: {status.succeeded} succeeded, {status.failed} failed"
            + (f" (see `blastq status --batch {outcome.batch_id}`)" if status.failed else "")
        )
        if sample is not None:
            click.echo(_sample(settings, sample).describe())
        if status.failed:
            sys.exit(1)
    if outcome.errors:
        sys.exit(1)


def _sample(settings, name: str):
    from blastq.core.adapters import connect, get_sample
    from blastq.core.common import InvalidConfig

    db = connect(settings.database_url.get_secret_value())
    try:
        found = get_sample(db, name)
    finally:
        db.dispose()
    if found is None:
        raise InvalidConfig(f"no sample {name!r}")
    return found


def _wait(settings, batch_id: str, total: int):
    from tqdm import tqdm

    from blastq.worker import submit as service

    with tqdm(total=total, desc="slides", unit="slide", disable=None) as bar:

        def tick(status) -> None:
            bar.total = status.total
            bar.n = status.succeeded + status.failed
            bar.set_postfix(failed=status.failed, refresh=False)
            bar.refresh()

        # Not forever when no worker runs: NoWorker (exit 2) says so, and how to start one.
        return service.wait_for_batch(
            settings, batch_id, progress=tick, no_worker_after_s=service.NO_WORKER_AFTER_S
        )


@click.command(context_settings=CONTEXT)
@click.option(
    "--queues",
    default="slides",
    show_default=True,
    help="Comma-separated queues to take jobs from (slides, train).",
)
@click.option(
    "--concurrency",
    "--worker-concurrency",
    "concurrency",
    type=click.IntRange(1),
    help="Worker processes (default: BLASTQ_WORKER_CONCURRENCY or 1).",
)
@click.option("--device", help="cpu or cuda:N (default: BLASTQ_DEVICE or cpu).")
@click.option(
    "--pool",
    type=click.Choice(["prefork", "solo"]),
    default="prefork",
    show_default=True,
    help="prefork: child processes, one engine each; solo: this process runs the jobs.",
)
@click.option("--loglevel", default="INFO", show_default=True, help="Celery log level.")
def worker(queues: str, concurrency: int | None, device: str | None, pool: str, loglevel: str) -> None:
    """Run a worker that processes queued slides until stopped (Ctrl-C or SIGTERM finish the slide first).

    Point more machines at the same broker, database and store (BLASTQ_BROKER_URL,
    BLASTQ_DATABASE_URL, BLASTQ_STORE_URL) to add workers.
    """
    from blastq.core.adapters import check_local_folders, load_settings
    from blastq.worker.celery_app import make_app, run_worker

    settings = load_settings(device=device, worker_concurrency=concurrency)
    # A read-only data directory, named before Celery starts (not a "database not reachable" per job).
    check_local_folders(settings, queue=True)
    names = [q.strip() for q in queues.split(",") if q.strip()]
    sys.exit(run_worker(make_app(settings), queues=names, pool=pool, loglevel=loglevel))


@click.command(context_settings=CONTEXT)
@click.argument("job_id", required=False)
@click.option(
    "--batch",
    "batch_id",
    metavar="ID|NAME",
    help="Show a batch (by id, or the name given at submit) and its jobs.",
)
def status(job_id: str | None, batch_id: str | None) -> None:
    """Show a job, a batch (--batch), or without arguments the job counts and the latest batches."""
    from blastq.core.adapters import (
        batch_jobs,
        batch_status,
        connect,
        job_counts,
        job_status,
        load_settings,
        recent_batches,
    )
    from blastq.core.common import InvalidConfig

    db = connect(load_settings().database_url.get_secret_value())
    try:
        if job_id:
            job = job_status(db, job_id)
            if job is None:
                raise InvalidConfig(f"no job {job_id}")
            for name, value in asdict(job).items():
                click.echo(f"{name:14} {'' if value is None else value}")
        elif batch_id:
            found = _batch_ids(db, batch_id)
            if not found:
                raise InvalidConfig(f"no batch with the id or name {batch_id!r}")
            for one in found:  # a name given to several batches shows each
                click.echo(_batch_line(batch_status(db, one)))
                for job in batch_jobs(db, one):
                    error = f"  {job.error}" if job.error else ""
                    click.echo(f"  {job.id}  {job.state:9}  attempts {job.attempts}  {job.filename}{error}")
        else:
            counts = job_counts(db)
            click.echo(
                "jobs: "
                + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("queued", "running", "succeeded", "failed"))
            )
            for batch in recent_batches(db):
                click.echo(_batch_line(batch))
            _show_workers(db, load_settings().worker_dead_after_s)
    finally:
        db.dispose()


def _show_workers(db, dead_after_s: float) -> None:
    """The processes that took jobs in the last hour: alive (heard of within dead_after_s) or not."""
    from datetime import UTC, timedelta

    from blastq.core.adapters import list_workers

    workers = list_workers(db, timedelta(seconds=dead_after_s))
    alive = [w for w in workers if w.alive]
    click.echo(f"workers: {len(alive)} alive, {len(workers) - len(alive)} stopped or dead in the last hour")
    now = datetime.now(UTC)
    for w in workers:
        heard = f"heard of {(now - w.heartbeat_at).total_seconds():.0f} s ago"
        state = "alive" if w.alive else ("stopped" if w.stopped_at is not None else "DEAD")
        parent = f" (of {w.parent})" if w.parent and w.parent != w.name else ""
        click.echo(f"  {w.name:<28} {state:<8} {w.queues:<12} {heard}{parent}")


def _batch_ids(db, ref: str) -> list[str]:
    """The batch with this id, else every batch given this name at submit, oldest first."""
    from blastq.core.adapters import batch_status, batches_named

    return [ref] if batch_status(db, ref) is not None else batches_named(db, ref)


def _batch_line(batch) -> str:
    state = "finished" if batch.finished else "in progress"
    return (
        f"batch {batch.id} {batch.name!r} ({batch.created_at:%Y-%m-%d %H:%M} UTC), {state}: "
        f"{batch.total} jobs, {batch.queued} queued, {batch.running} running, "
        f"{batch.succeeded} succeeded, {batch.failed} failed"
    )


@click.command(context_settings=CONTEXT)
@click.option(
    "--batch",
    "batch_id",
    metavar="ID|NAME",
    help="Only the results of this batch's jobs (id, or name given at submit).",
)
@click.option("--flagged", is_flag=True, help="Only slides flagged at the blast threshold.")
@click.option(
    "--since",
    type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]),
    help="Only results recorded since this local date/time.",
)
@click.option(
    "--min-blast-percent", type=click.FloatRange(0, 100), help="Only slides at or above this blast %."
)
@click.option(
    "--sample", metavar="ID", help="Only the images of this sample; the table ends with its pooled verdict."
)
@click.option(
    "--samples", "list_samples", is_flag=True, help="List the samples (pooled figures) instead of images."
)
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True
)
def results(
    batch_id: str | None,
    flagged: bool,
    since: datetime | None,
    min_blast_percent: float | None,
    sample: str | None,
    list_samples: bool,
    fmt: str,
) -> None:
    """List recorded results (one per slide content, model, parameters and scale), oldest first.

    Each has a verdict: flagged, not flagged, or insufficient cells (fewer white cells than
    BLASTQ_MIN_WHITE_CELLS, default 100). With --samples, one row per sample: its images' cells pooled.
    """
    from blastq.core.adapters import ResultInfo, connect, get_sample, list_results, load_settings
    from blastq.core.adapters import list_samples as all_samples
    from blastq.core.common import InvalidConfig

    db = connect(load_settings().database_url.get_secret_value())
    try:
        if list_samples:
            _print_samples(all_samples(db), fmt)
            return
        pooled = None
        if sample is not None:
            pooled = get_sample(db, sample)
            if pooled is None:
                raise InvalidConfig(f"no sample {sample!r}")
        rows = [
            row
            for batch in (_batch_ids(db, batch_id) if batch_id else [None])
            for row in list_results(
                db,
                batch_id=batch,
                flagged=True if flagged else None,
                since=since.astimezone() if since else None,  # naive: local time
                min_blast_percent=min_blast_percent,
                sample=sample,
            )
        ]
        if batch_id:  # several batches of one name: one list, oldest first, each result once
            rows = sorted({r.id: r for r in rows}.values(), key=lambda r: (r.created_at, r.id))
    finally:
        db.dispose()
    records = [{**asdict(r), "created_at": r.created_at.isoformat()} for r in rows]
    if fmt == "json":
        click.echo(json.dumps(records, indent=2))
    elif fmt == "csv":
        names = [f.name for f in fields(ResultInfo)]
        click.echo(_csv([_flat(r) for r in records], _flat_names(names)), nl=False)
    else:
        click.echo(_table(records, RESULT_COLUMNS, "no results"))
        if pooled is not None:
            click.echo(pooled.describe())


SAMPLE_COLUMNS = (
    "sample",
    "images",
    "pending",
    "failed",
    "white_cells",
    "blasts",
    "blast_percent",
    "flagged",
    "verdict",
    "differential",
    "review_cells",
)


def _print_samples(samples: list, fmt: str) -> None:
    from blastq.core.outputs import sample_summary_dict

    records = [sample_summary_dict(s) for s in samples]
    if fmt == "json":
        click.echo(json.dumps(records, indent=2))
    elif fmt == "csv":
        flat = [{k: r[k] for k in SAMPLE_COLUMNS} for r in records]
        click.echo(_csv([_flat(r) for r in flat], _flat_names(SAMPLE_COLUMNS)), nl=False)
    else:
        click.echo(_table(records, SAMPLE_COLUMNS, "no samples"))


def _csv(records: list[dict], names: list[str]) -> str:
    """CSV with its header even when there are no rows (a script reads the columns either way)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


def _flat_names(names) -> list[str]:
    """The CSV columns of records with a differential: the type columns in its place, at the end."""
    types = [f"{t}_{part}" for t in TYPE_ABBREVIATIONS for part in ("count", "percent")]
    return [n for n in names if n != "differential"] + types


def _flat(record: dict) -> dict:
    """A result for CSV: the differential as <type>_count and <type>_percent columns."""
    out = {k: v for k, v in record.items() if k != "differential"}
    for name in TYPE_ABBREVIATIONS:
        entry = record["differential"].get(name, {})
        out[f"{name}_count"] = entry.get("count", "")
        out[f"{name}_percent"] = entry.get("percent", "")
    return out


def _differential(differential: dict) -> str:
    if not differential:
        return "-"
    return " ".join(
        f"{TYPE_ABBREVIATIONS.get(name, name)} {d['percent']:.0f}%"
        for name, d in differential.items()
        if d["count"]
    )


def _table(records: list[dict], columns: tuple[str, ...], empty: str) -> str:
    if not records:
        return empty
    cells = [[_differential(r[c]) if c == "differential" else _show(r[c]) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [columns, *cells]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _show(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, str) and "T" in value and value[:4].isdigit():
        return value[:19].replace("T", " ")
    return str(value)


@click.command(context_settings=CONTEXT)
@click.option(
    "--older-than",
    "older_than_s",
    type=click.FloatRange(0),
    help="Seconds a queued or running job has not changed (default: BLASTQ_VISIBILITY_TIMEOUT_S).",
)
@click.option(
    "--failed-transient",
    is_flag=True,
    help="Also send again the jobs that failed because the database or the store stayed away longer than "
    "BLASTQ_TRANSIENT_WAIT_S (their reason starts with 'transient:').",
)
def requeue(older_than_s: float | None, failed_transient: bool) -> None:
    """Send again the jobs a dead worker left running, and those stuck in queued or running (the
    database rebuilds the broker's queue).

    A worker is dead when its heartbeat stopped (no beat for 3 x BLASTQ_HEARTBEAT_S + 5 s): its running
    jobs are sent at once. So is a queued job whose message waits in no queue of the broker (Redis or the
    embedded one) for that long: a worker took it and died before starting it, or the broker lost it.
    Otherwise a job is sent when its row has not changed for --older-than seconds; a job still being
    processed when it is sent again runs twice (its result is recorded once): keep --older-than above
    the longest slide unless the workers are stopped.
    """
    from blastq.core.adapters import load_settings
    from blastq.worker.submit import requeue as requeue_jobs

    settings = load_settings()
    sent = requeue_jobs(
        settings,
        settings.visibility_timeout_s if older_than_s is None else older_than_s,
        failed_transient=failed_transient,
    )
    for job in sent:
        click.echo(f"requeued job {job.job_id}" + (f" ({job.why})" if job.why else ""))
    click.echo(f"{len(sent)} job(s) requeued")


@click.command(context_settings=CONTEXT)
@click.option(
    "--older-than",
    "older_than_h",
    type=click.FloatRange(0),
    metavar="HOURS",
    default=24.0,
    show_default=True,
    help="Hours an object no row names must be old to go. Keep it above the longest slide plus "
    "BLASTQ_TRANSIENT_WAIT_S: a slide's outputs are written before its row. 0 only with every worker stopped.",
)
@click.option("--dry-run", is_flag=True, help="Count and list what would go; remove nothing.")
@click.option("--no-broker", is_flag=True, help="Leave the broker's messages alone; only the store.")
@click.option("-v", "--verbose", is_flag=True, help="Name every store object removed (or, dry, to remove).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object instead.")
def gc(older_than_h: float, dry_run: bool, no_broker: bool, verbose: bool, as_json: bool) -> None:
    """Remove what no row needs any more: store objects no job, result, model or training run names,
    writes a killed process left half-done, and broker messages of finished jobs (and the embedded
    broker's delivered ones, which it otherwise keeps forever).

    \b
    Results, their cells, inputs of existing jobs and registered models are never removed; neither is
    anything in the store outside blastq's folders (inputs/, slides/, models/, training/, doctor/).
    Safe to run while workers run (from cron, say):
      blastq gc --dry-run -v
      blastq gc
    """
    from datetime import timedelta

    from blastq.core.adapters import load_settings
    from blastq.worker.gc import collect_garbage

    settings = load_settings()
    report = collect_garbage(
        settings, grace=timedelta(hours=older_than_h), dry_run=dry_run, broker=not no_broker
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
        return
    verb = "would remove" if dry_run else "removed"
    if verbose:
        for obj in report.orphans:
            click.echo(f"{verb} {obj.key} ({obj.size} bytes, written {obj.modified:%Y-%m-%d %H:%M} UTC)")
    click.echo(
        f"store {report.store_url}: {report.objects} object(s) in blastq's folders; "
        f"{verb} {len(report.orphans)} no row names ({_size(report.orphan_bytes)})"
        + (f"; kept {report.young_orphans} younger than {older_than_h:g} h" if report.young_orphans else "")
        + (f"; left alone {report.outside} outside its folders" if report.outside else "")
    )
    click.echo(f"abandoned writes: {verb} {report.abandoned_writes}")
    broker = report.broker
    if broker is None:
        return
    if not broker.looked:
        click.echo(f"broker ({broker.kind}): not looked into (gc knows the embedded broker and Redis)")
        return
    click.echo(
        f"broker ({broker.kind}): {verb} {broker.finished} message(s) of finished jobs"
        + (f", {broker.delivered} delivered message(s)" if broker.kind == "embedded" else "")
    )


def _size(n: float) -> str:
    units = ("bytes", "KiB", "MiB", "GiB")
    step = 0
    while n >= 1024 and step < len(units) - 1:
        n, step = n / 1024, step + 1
    return f"{n:.0f} bytes" if step == 0 else f"{n:.1f} {units[step]}"


@click.group(context_settings=CONTEXT)
def db() -> None:
    """The database schema."""


@db.command(context_settings=CONTEXT)
def upgrade() -> None:
    """Apply the schema migrations (safe to run twice, and from several machines at once)."""
    from blastq.core.adapters import load_settings, mask_secret
    from blastq.core.adapters import upgrade as upgrade_schema

    settings = load_settings()
    revision = upgrade_schema(settings.database_url.get_secret_value())
    click.echo(f"database {mask_secret(settings.database_url.get_secret_value())} is at revision {revision}")


@click.command(context_settings=CONTEXT)
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--batch", "batch_name", help="Name of the batches it makes (default: watch FOLDER and the time)."
)
@click.option(
    "--settle",
    "--watch-settle-s",
    "settle_s",
    type=click.FloatRange(0),
    help="Seconds a file must stay unchanged to be complete (default: BLASTQ_WATCH_SETTLE_S or 10).",
)
@click.option(
    "--interval",
    "--watch-interval-s",
    "interval_s",
    type=click.FloatRange(0.01),
    help="Seconds between scans (default: BLASTQ_WATCH_INTERVAL_S or 2).",
)
@click.option("--once", is_flag=True, help="Scan, wait for files still settling (at most --settle), exit.")
@click.option("--recursive", is_flag=True, help="Watch subfolders too (symlinked folders are not entered).")
@click.option(
    "--samples",
    is_flag=True,
    help="Each sub-folder is a sample: the images in FOLDER/ID/ are pooled into one verdict for sample ID.",
)
def watch(
    folder: str,
    batch_name: str | None,
    settle_s: float | None,
    interval_s: float | None,
    once: bool,
    recursive: bool,
    samples: bool,
) -> None:
    """Submit each slide written into FOLDER once it is complete, and only once (until Ctrl-C or SIGTERM).

    A file is complete when its size and time have not changed for --settle seconds, or at once when a
    marker NAME.done or NAME.ready sits beside it. Hidden, temporary (.part, .tmp, .crdownload,
    .partial, ~*) and non-image files are ignored, and symlinks leading outside FOLDER are rejected.
    What was submitted is kept in the database: a restarted watcher, or a second one on the same
    folder, does not submit a file again. With --once the exit status is 1 when a file was rejected
    or could not be submitted.
    """
    from blastq.core.adapters import load_settings
    from blastq.worker.watch import Watcher, stop_on_signals

    settings = load_settings(watch_settle_s=settle_s, watch_interval_s=interval_s)
    with Watcher(settings, folder, batch_name=batch_name, recursive=recursive, samples=samples) as watcher:
        how = "once" if once else f"every {settings.watch_interval_s:g}s until stopped"
        click.echo(f"watching {watcher.root} ({how}, settle {settings.watch_settle_s:g}s)", err=True)
        with stop_on_signals(watcher.stop):
            summary = watcher.run(once=once, report=_print_watch_event)
    if once and (summary.rejected or summary.retrying):
        sys.exit(1)


def _print_watch_event(event) -> None:
    if event.state == "submitted":
        reused = f" (existing result {event.reused_result_id})" if event.reused_result_id is not None else ""
        click.echo(f"submitted {event.path}: job {event.job_id}{reused}")
        if event.reason:
            click.echo(f"WARNING {event.path}: {event.reason}", err=True)
    elif event.state == "rejected":
        click.echo(f"rejected {event.path}: {event.reason}")
    else:
        click.echo(f"WARNING {event.path}: {event.reason} (retrying)", err=True)


@click.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object instead.")
@click.option(
    "--only",
    metavar="CHECKS",
    help="Comma-separated checks to run (database, broker, store, model, classifier, engine, gpu, disk, clock).",
)
@click.option("--gpu", is_flag=True, help="Also require a visible CUDA GPU (implied by BLASTQ_DEVICE=cuda).")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=20.0,
    show_default=True,
    help="Seconds each check may take (model and engine checks: up to 15 min, an engine may be built first).",
)
@click.option(
    "--min-free-gb",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Free space the data, engine-cache and scratch folders need (GiB).",
)
def doctor(as_json: bool, only: str | None, gpu: bool, timeout_s: float, min_free_gb: float) -> None:
    """Check that this machine, with these settings, can process slides: the database, broker and store
    answer, the model and classifier load and are the files they should be, the engine runs a tile and
    agrees with torch, the disks have room and the clocks agree.

    \b
    One line per check (ok or FAIL, the verdict) and, for a failure, the fix. Exit status 0 when every
    check passed, 1 otherwise. Run it after installing, after changing a setting, and from a health
    probe (--json for machines):
      blastq doctor
      blastq doctor --only database,broker,store --json
    """
    from blastq.core.adapters import load_settings
    from blastq.worker.doctor import results_json, run_checks

    settings = load_settings()
    names = [n.strip() for n in only.split(",") if n.strip()] if only else None

    def show(result) -> None:
        if as_json:
            return
        click.echo(f"{'ok' if result.ok else 'FAIL':<5} {result.name:<10} {result.verdict}")
        if not result.ok:
            click.echo(f"{'':<5} {'':<10} fix: {result.fix}")

    results = run_checks(
        settings, only=names, gpu=gpu, timeout_s=timeout_s, min_free_gib=min_free_gb, on_result=show
    )
    failed = [r.name for r in results if not r.ok]
    if as_json:
        click.echo(results_json(results))
    else:
        click.echo(
            f"{len(results) - len(failed)} of {len(results)} checks passed"
            + (f"; failed: {', '.join(failed)}" if failed else "")
        )
    sys.exit(1 if failed else 0)


def register(main: click.Group) -> None:
    """Add the service commands to the `blastq` group."""
    for command in (submit, worker, status, results, requeue, gc, db, watch, doctor):
        main.add_command(command)
