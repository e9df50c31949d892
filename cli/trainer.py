"""The trainer service commands: blastq trainer [status RUN_ID].

`blastq trainer` is a Celery worker on the `train` queue only; `blastq trainer status` shows training
runs from the database. Parse, call, print; `register(main)` adds the group to `blastq`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from datetime import datetime

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
RUN_COLUMNS = ("id", "state", "version", "epoch", "attempts", "created_at", "error")


@click.group(invoke_without_command=True, context_settings=CONTEXT)
@click.option(
    "--concurrency",
    "--worker-concurrency",
    "concurrency",
    type=click.IntRange(1),
    help="Training processes (default: BLASTQ_WORKER_CONCURRENCY or 1).",
)
@click.option(
    "--device", help="cpu or cuda:N (default: BLASTQ_DEVICE or cpu); CUDA trains in mixed precision."
)
@click.option(
    "--pool",
    type=click.Choice(["prefork", "solo"]),
    default="prefork",
    show_default=True,
    help="prefork: child processes run the training; solo: this process does.",
)
@click.option("--loglevel", default="INFO", show_default=True, help="Celery log level.")
@click.pass_context
def trainer(
    ctx: click.Context, concurrency: int | None, device: str | None, pool: str, loglevel: str
) -> None:
    """Run training jobs from the `train` queue (`blastq train --submit`) until stopped.

    Progress goes to the training_runs table; each epoch's state goes to the store, so a killed
    trainer's run resumes from its last epoch on the next trainer.
    """
    if ctx.invoked_subcommand is not None:
        return
    from blastq.core.adapters import load_settings
    from blastq.worker.celery_app import TRAIN_QUEUE, make_app, run_worker

    settings = load_settings(device=device, worker_concurrency=concurrency)
    sys.exit(run_worker(make_app(settings), queues=[TRAIN_QUEUE], pool=pool, loglevel=loglevel))


@trainer.command(context_settings=CONTEXT)
@click.argument("run_id", required=False)
def status(run_id: str | None) -> None:
    """One training run in full (JSON), or the newest runs as a table."""
    from blastq.core.adapters import connect, load_settings, training_run_status, training_runs

    db = connect(load_settings().database_url.get_secret_value())
    try:
        if run_id is not None:
            run = training_run_status(db, run_id)
            if run is None:
                click.echo(f"blastq: error: no training run {run_id}", err=True)
                sys.exit(2)
            click.echo(json.dumps(_record(run), indent=1))
            return
        runs = training_runs(db)
    finally:
        db.dispose()
    if not runs:
        click.echo("no training runs")
        return
    rows = [[_show(getattr(r, c)) for c in RUN_COLUMNS] for r in runs]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(RUN_COLUMNS)]
    for row in [list(RUN_COLUMNS), *rows]:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _record(run) -> dict:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in asdict(run).items()}


def _show(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return " ".join(str(value).split())[:80]


def register(main: click.Group) -> None:
    """Add the `trainer` group to the `blastq` group."""
    main.add_command(trainer)
