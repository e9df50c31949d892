"""The model registry commands: blastq models list|show|register|promote|rollback.

Parse, call one function of blastq.core.adapters.registry, print. `register(main)` adds the `models` group to
the `blastq` group, which turns a BlastqError into one line and exit status 2.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
LIST_COLUMNS = ("version", "state", "validation_score", "sha256", "created_at", "promoted_at")


@click.group(context_settings=CONTEXT)
def models() -> None:
    """The model registry: the versions workers with BLASTQ_MODEL=registry run."""


@contextmanager
def _database() -> Iterator[Any]:
    from blastq.core.adapters import connect, load_settings

    db = connect(load_settings().database_url.get_secret_value())
    try:
        yield db
    finally:
        db.dispose()


@models.command("list", context_settings=CONTEXT)
def list_command() -> None:
    """List the registered versions, oldest first."""
    from blastq.core.adapters import DEFAULT_METRIC, list_models

    with _database() as db:
        rows = list_models(db)
    if not rows:
        click.echo("no models registered")
        return
    cells = [
        [
            m.version,
            m.state,
            _show(m.metrics.get(DEFAULT_METRIC)),
            m.sha256[:12],
            _show(m.created_at),
            _show(m.promoted_at),
        ]
        for m in rows
    ]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(LIST_COLUMNS)]
    for line in (LIST_COLUMNS, *cells):
        click.echo("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


@models.command(context_settings=CONTEXT)
@click.argument("version")
def show(version: str) -> None:
    """Print one version as JSON: state, sha256, checkpoint key, metrics, config, split, times."""
    from blastq.core.adapters import get_model
    from blastq.core.common import InvalidConfig

    with _database() as db:
        model = get_model(db, version)
    if model is None:
        raise InvalidConfig(f"no model version {version} in the registry")
    click.echo(json.dumps(_record(model), indent=2))


@models.command("register", context_settings=CONTEXT)
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--metrics-json", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Metrics.")
@click.option("--config-json", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Config.")
@click.option(
    "--split-json", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Data split."
)
@click.option(
    "--validate-on",
    "wbc_root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="segmentation_wbc folder: measure the fixed validation set (its val split + synthetic fields) "
    "and record validation_score, which promotion compares.",
)
def register_command(
    checkpoint: Path,
    metrics_json: Path | None,
    config_json: Path | None,
    split_json: Path | None,
    wbc_root: Path | None,
) -> None:
    """Register CHECKPOINT as a candidate under the version it records (its bytes go to the store).

    The JSON files hold objects; promotion compares the metrics' validation_score.
    """
    from blastq.core.adapters import load_settings, register_model, store_from_settings

    settings = load_settings()
    metrics = _json_file(metrics_json)
    if wbc_root is not None:
        from blastq.core.segment import load_engine
        from blastq.trainer.evaluate import validation_metrics

        engine, info = load_engine(checkpoint, cache_dir=settings.engine_cache_dir)
        metrics = {**metrics, **validation_metrics(engine, info, wbc_root)}
        click.echo(f"validation_score {metrics['validation_score']}")
    with _database() as db:
        model = register_model(
            db,
            store_from_settings(settings),
            checkpoint,
            metrics=metrics,
            config=_json_file(config_json),
            split=_json_file(split_json),
        )
    click.echo(f"model {model.version} is {model.state} (sha256 {model.sha256})")


@models.command(context_settings=CONTEXT)
@click.argument("version")
@click.option("--force", is_flag=True, help="Promote even if it scores worse than the promoted version.")
def promote(version: str, force: bool) -> None:
    """Make VERSION the model the workers run; the version promoted before is retired."""
    from blastq.core.adapters import promote as promote_model

    _report(lambda db: promote_model(db, version, force=force))


@models.command(context_settings=CONTEXT)
def rollback() -> None:
    """Promote again the most recently retired version; the promoted one is retired."""
    from blastq.core.adapters import rollback as rollback_model

    _report(rollback_model)


def _report(action: Callable[[Any], Any]) -> None:
    with _database() as db:
        model = action(db)
    click.echo(f"model {model.version} is promoted; workers switch to it before their next slide")


def _json_file(path: Path | None) -> dict:
    from blastq.core.common import InvalidConfig

    if path is None:
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidConfig(f"cannot read {path} as JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidConfig(f"{path} must hold a JSON object")
    return value


def _record(model) -> dict:
    return {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in asdict(model).items()}


def _show(value) -> str:
    if value is None:
        return ""
    if hasattr(value, "strftime"):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def register(main: click.Group) -> None:
    """Add the `models` group to the `blastq` group."""
    main.add_command(models)
