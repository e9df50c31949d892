"""The model registry's rows: versions, their checkpoints' keys and sha256, and which one is promoted."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime

from sqlalchemy import (
    false,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from blastq.core.adapters.db.engine import as_utc, reachable, utcnow
from blastq.core.adapters.db.schema import models_table
from blastq.core.common import NotFound


@dataclass(frozen=True)
class ModelVersion:
    """One models row with its JSON columns decoded. Times are UTC."""

    version: str
    state: str
    sha256: str
    checkpoint_key: str
    metrics: dict
    config: dict
    split: dict
    created_at: datetime
    promoted_at: datetime | None
    retired_at: datetime | None
    kind: str = "unet"  # or "classifier"

    @classmethod
    def from_row(cls, row) -> ModelVersion:
        values = {k: as_utc(v) for k, v in row._mapping.items()}
        for name in ("metrics", "config", "split"):
            values[name] = json.loads(values[name])
        return cls(**{f.name: values[f.name] for f in fields(cls)})


def add_model(
    engine: Engine,
    *,
    version: str,
    sha256: str,
    checkpoint_key: str,
    metrics: dict,
    config: dict,
    split: dict,
    kind: str = "unet",
) -> ModelVersion | None:
    """Insert a candidate; None when the version is registered already (the caller reads that row)."""
    values = {
        "version": version,
        "kind": kind,
        "state": "candidate",
        "sha256": sha256,
        "checkpoint_key": checkpoint_key,
        "metrics": json.dumps(metrics, sort_keys=True),
        "config": json.dumps(config, sort_keys=True),
        "split": json.dumps(split, sort_keys=True),
        "created_at": utcnow(),
        "promoted_at": None,
        "retired_at": None,
    }
    try:
        with reachable(engine), engine.begin() as conn:
            conn.execute(insert(models_table).values(**values))
    except IntegrityError:
        return None
    return get_model_row(engine, version)


def get_model_row(engine: Engine, version: str) -> ModelVersion | None:
    """The registered version; None for an unknown one."""
    with reachable(engine), engine.connect() as conn:
        row = conn.execute(select(models_table).where(models_table.c.version == version)).first()
    return None if row is None else ModelVersion.from_row(row)


def model_rows(engine: Engine, state: str | None = None, kind: str | None = None) -> list[ModelVersion]:
    """Registered versions (in `state`, of `kind` when given), oldest first."""
    query = select(models_table).order_by(models_table.c.created_at, models_table.c.version)
    if state is not None:
        query = query.where(models_table.c.state == state)
    if kind is not None:
        query = query.where(models_table.c.kind == kind)
    with reachable(engine), engine.connect() as conn:
        return [ModelVersion.from_row(r) for r in conn.execute(query)]


def promote_model_row(
    engine: Engine,
    version: str | None,
    check: Callable[[ModelVersion | None, ModelVersion | None], None],
    kind: str = "unet",
) -> ModelVersion:
    """Promote `version` (None: the most recently retired one of `kind`) and retire the promoted one of
    its kind, atomically.

    `check(target, current)` runs inside the transaction, after the locks are taken, on what is
    committed at that moment (target None: unknown, or nothing retired); it raises to refuse. Promoting
    the promoted version changes nothing.
    """
    with reachable(engine), engine.begin() as conn:
        _lock_models(conn)
        if version is None:
            target = conn.execute(
                select(models_table)
                .where(models_table.c.state == "retired", models_table.c.kind == kind)
                .order_by(models_table.c.retired_at.desc(), models_table.c.version)
                .limit(1)
            ).first()
        else:
            target = conn.execute(select(models_table).where(models_table.c.version == version)).first()
        target_info = None if target is None else ModelVersion.from_row(target)
        kind = target_info.kind if target_info is not None else kind
        current = conn.execute(
            select(models_table).where(models_table.c.state == "promoted", models_table.c.kind == kind)
        ).first()
        check(target_info, None if current is None else ModelVersion.from_row(current))
        if target_info is None:
            raise NotFound(f"no model version {version}", value=version)
        if current is not None and current.version == target_info.version:
            return target_info
        now = utcnow()
        # Retire first: the partial unique index allows one promoted row at every statement.
        conn.execute(
            update(models_table)
            .where(models_table.c.state == "promoted", models_table.c.kind == kind)
            .values(state="retired", retired_at=now)
        )
        conn.execute(
            update(models_table)
            .where(models_table.c.version == target_info.version)
            .values(state="promoted", promoted_at=now, retired_at=None)
        )
        return ModelVersion.from_row(
            conn.execute(select(models_table).where(models_table.c.version == target_info.version)).one()
        )


def _lock_models(conn: Connection) -> None:
    """Serialise registry state changes for the rest of the transaction.

    PostgreSQL: lock every model row, in one order; a second promoter waits on the first row, and its
    next statement (READ COMMITTED) sees the first one's commit. Locking the promoted row alone is not
    enough: the waiter would then find it retired and see no promoted row at all. SQLite ignores FOR
    UPDATE: a write that changes nothing takes its database write lock instead.
    """
    if conn.dialect.name == "sqlite":
        conn.execute(update(models_table).where(false()).values(state=models_table.c.state))
    else:
        conn.execute(select(models_table.c.version).order_by(models_table.c.version).with_for_update())


def promoted_model_row(engine: Engine, kind: str = "unet") -> ModelVersion | None:
    """The promoted version of `kind`; None when none is promoted. One indexed query."""
    with reachable(engine), engine.connect() as conn:
        row = conn.execute(
            select(models_table).where(models_table.c.state == "promoted", models_table.c.kind == kind)
        ).first()
    return None if row is None else ModelVersion.from_row(row)
