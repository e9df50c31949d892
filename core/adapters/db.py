"""The database adapter: batches, jobs, results, cells and the watcher's ledger (SQLAlchemy 2, Alembic).

A result is keyed by (slide sha256, model version, result key; core.pipeline.resultkey): recording the same
slide again replaces its row and its cells, never duplicates them. A sample (one patient's images)
holds its images' results and their pooled figures, recomputed from those rows whenever one is added. A job is a row before it is a
message: workers claim it here, so a redelivered message never redoes finished work and a slide that
kills its worker fails after `max_attempts` instead of killing every worker in turn.

The schema belongs to the Alembic history in the `migrations` folder. SQLite (the single-machine
default) is brought to the newest revision on connect; any other database must be upgraded on
purpose with `blastq db upgrade`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote
from uuid import uuid4

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    false,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

from blastq.core.adapters.settings import hide_secrets, mask_secret
from blastq.core.common import DatabaseUnavailable, InvalidConfig, NotFound

JOB_STATES = ("queued", "running", "succeeded", "failed")
MODEL_STATES = ("candidate", "promoted", "retired")
LEDGER_STATES = ("seen", "submitted", "rejected")
MAX_ERROR_CHARS = 2000

# Explicit names for every constraint and index, so a migration written on SQLite drops or alters the
# same object on PostgreSQL. The index pattern is the one SQLAlchemy used before the naming convention,
# so databases created before migrations keep matching names.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class BatchRow(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class ResultRow(Base):
    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("sha256", "model_version", "params_key", name="uq_result_identity"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    model_version: Mapped[str] = mapped_column(String(64))
    params_key: Mapped[str] = mapped_column(String(32))
    image: Mapped[str] = mapped_column(String(512))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    mpp: Mapped[float] = mapped_column(Float)
    mpp_source: Mapped[str] = mapped_column(String(16))
    white_cells: Mapped[int] = mapped_column(Integer)
    blasts: Mapped[int] = mapped_column(Integer)
    blast_percent: Mapped[float] = mapped_column(Float, index=True)
    flagged: Mapped[bool] = mapped_column(Boolean, index=True)
    threshold_percent: Mapped[float] = mapped_column(Float)
    # "flagged", "not flagged" or "insufficient cells" (fewer than min_white_cells; migration 0005).
    verdict: Mapped[str] = mapped_column(String(24))
    min_white_cells: Mapped[int] = mapped_column(Integer)
    # {type: {"count", "percent"}} in CELL_TYPES order; {} when no classifier ran (migration 0004).
    differential: Mapped[dict] = mapped_column(JSON, default=dict, server_default="{}")
    review_cells: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    classifier_version: Mapped[str] = mapped_column(String(64), default="", server_default="")
    seconds: Mapped[float] = mapped_column(Float)
    store_prefix: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class CellRow(Base):
    __tablename__ = "cells"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    cell_id: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(16))
    centroid_x: Mapped[float] = mapped_column(Float)
    centroid_y: Mapped[float] = mapped_column(Float)
    bbox_x0: Mapped[int] = mapped_column(Integer)
    bbox_y0: Mapped[int] = mapped_column(Integer)
    bbox_x1: Mapped[int] = mapped_column(Integer)
    bbox_y1: Mapped[int] = mapped_column(Integer)
    area_px: Mapped[int] = mapped_column(Integer)
    area_um2: Mapped[float] = mapped_column(Float)
    perimeter_um: Mapped[float] = mapped_column(Float)
    circularity: Mapped[float] = mapped_column(Float)
    nucleus_area_px: Mapped[int] = mapped_column(Integer)
    nucleus_area_um2: Mapped[float] = mapped_column(Float)
    nc_ratio: Mapped[float] = mapped_column(Float)
    mean_r: Mapped[float] = mapped_column(Float)
    mean_g: Mapped[float] = mapped_column(Float)
    mean_b: Mapped[float] = mapped_column(Float)
    blast_probability: Mapped[float] = mapped_column(Float)
    cell_type: Mapped[str] = mapped_column(String(16), default="", server_default="")
    cell_type_probability: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    review: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    p_neutrophil: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    p_lymphocyte: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    p_monocyte: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    p_eosinophil: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    p_basophil: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    p_blast: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # Why the cell is marked for review when measuring or typing it failed (migration 0005).
    review_reason: Mapped[str | None] = mapped_column(Text)


class SampleRow(Base):
    """A sample: several images or fields of one patient, their cells pooled into one verdict.

    The pooled figures are recomputed from the member results' rows each time one is added
    (`add_to_sample`), so workers finishing its images in any order leave the same figures."""

    __tablename__ = "samples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # The rule the pool is judged by: set by whoever last submitted or ran images into the sample.
    threshold_percent: Mapped[float] = mapped_column(Float)
    min_white_cells: Mapped[int] = mapped_column(Integer)
    images: Mapped[int] = mapped_column(Integer)
    white_cells: Mapped[int] = mapped_column(Integer)
    blasts: Mapped[int] = mapped_column(Integer)
    blast_percent: Mapped[float] = mapped_column(Float)
    flagged: Mapped[bool] = mapped_column(Boolean)
    verdict: Mapped[str] = mapped_column(String(24))
    differential: Mapped[dict] = mapped_column(JSON)
    review_cells: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SampleResultRow(Base):
    """One image of a sample: its content and its result. The same content counts once per sample: a
    newer result of it (other scale, model...) takes the place of the older one."""

    __tablename__ = "sample_results"

    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_one_of("state", JOB_STATES), name="state"),
        # Serves `requeue` (state IN (...) AND updated_at < cutoff) and, by its leading column, any
        # lookup by state alone, so state has no index of its own.
        Index("ix_jobs_state_updated_at", "state", "updated_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id"), index=True)
    state: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str] = mapped_column(String(512))  # the name the user submitted
    input_key: Mapped[str] = mapped_column(String(300))  # store key: inputs/<sha256>.<ext>
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    mpp: Mapped[float | None] = mapped_column(Float)  # user-given; None: from the slide's metadata
    params_key: Mapped[str] = mapped_column(String(32))
    model_version: Mapped[str | None] = mapped_column(String(64))  # known once a worker has run it
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # times a worker started it
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(200))  # hostname/pid of the last claim
    result_id: Mapped[int | None] = mapped_column(ForeignKey("results.id"), index=True)
    # The sample its image belongs to (migration 0005); the worker adds the result to it.
    sample_id: Mapped[int | None] = mapped_column(ForeignKey("samples.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WatchLedgerRow(Base):
    """The folder watcher's memory: one row per file version seen, so a restart never submits twice."""

    __tablename__ = "watch_ledger"
    __table_args__ = (
        CheckConstraint(_one_of("state", LEDGER_STATES), name="state"),
        UniqueConstraint("root", "relpath", "size", "mtime_ns", name="uq_watch_ledger_file"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    root: Mapped[str] = mapped_column(String(1000))
    relpath: Mapped[str] = mapped_column(String(1000))
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


# --- connecting and migrating ---------------------------------------------------------------------

# Alembic installs its `context` proxy process-wide, so two threads must not run migrations at once.
# Across processes, SQLite's BEGIN IMMEDIATE and PostgreSQL's advisory lock do the same job.
_ALEMBIC_LOCK = threading.Lock()
_PG_MIGRATION_LOCK_KEY = 0x626C61737471  # "blastq"


def migrations_dir() -> Path:
    """The Alembic folder: the installed `blastq.migrations` package."""
    import blastq.migrations as package

    folder = Path(package.__file__).parent
    if not (folder / "env.py").is_file():
        raise InvalidConfig(f"blastq's migrations are missing from this installation: {folder}")
    return folder


def alembic_config(database_url: str | None = None) -> Config:
    """An Alembic Config built in code (no ini file): the script folder, and the URL when given.

    For Alembic's own commands, e.g. `command.revision(alembic_config(url), autogenerate=True, ...)`.
    """
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if database_url:
        # The config is an ini parser: a literal % (URL-encoded passwords) must be doubled.
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def head_revision() -> str:
    """The newest schema revision this version of blastq knows."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(database_url: str) -> str | None:
    """The schema revision the database is at; None for a database never migrated."""
    engine = _engine(_parse(database_url), pooled=False)
    try:
        return _revision_of(engine)
    finally:
        engine.dispose()


def upgrade(database_url: str, revision: str = "head") -> str:
    """Apply the migrations up to `revision` (the newest by default); returns the revision now in place.

    Safe to run twice, and from several processes at once.
    """
    url = _parse(database_url)
    _make_sqlite_folder(url)
    engine = _engine(url, pooled=False, exclusive=True)
    try:
        return _migrate(engine, lambda config: command.upgrade(config, revision)) or "base"
    finally:
        engine.dispose()


def downgrade(database_url: str, revision: str) -> str | None:
    """Undo migrations down to `revision` ("base" removes every blastq table); returns the revision now."""
    engine = _engine(_parse(database_url), pooled=False, exclusive=True)
    try:
        return _migrate(engine, lambda config: command.downgrade(config, revision))
    finally:
        engine.dispose()


def connect(url: str) -> Engine:
    """An engine on a database whose schema is at the newest revision.

    SQLite is created (folder included) and upgraded here. Any other database is only checked:
    upgrading a shared server is an operator's decision (`blastq db upgrade`).
    """
    parsed = _parse(url)
    _make_sqlite_folder(parsed)
    engine = _engine(parsed, pooled=True)
    try:
        current, head = _revision_of(engine), head_revision()
        if current == head:
            return engine
        if parsed.get_backend_name() != "sqlite":
            raise InvalidConfig(_revision_problem(parsed, current, head))
        if _in_memory(parsed):  # a second engine would open a second, empty database
            _migrate(engine, lambda config: command.upgrade(config, "head"))
        else:
            upgrade(url)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _revision_problem(url: URL, current: str | None, head: str) -> str:
    where = f"database {_masked(url)}"
    if current is None:
        return f"{where} has no blastq schema yet: run `blastq db upgrade`"
    try:
        ScriptDirectory.from_config(alembic_config()).get_revision(current)
    except CommandError:  # a revision this blastq has never heard of
        return f"{where} is at schema revision {current}, newer than this blastq knows: upgrade blastq"
    return f"{where} is at schema revision {current}, this blastq needs {head}: run `blastq db upgrade`"


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError:
        # Not echoed: an unparsable URL may still hold a password.
        raise InvalidConfig(
            "the database URL cannot be read; expected a form like "
            "sqlite:///path/blastq.db or postgresql+psycopg://user:password@host/dbname"
        ) from None


def _masked(url: URL) -> str:
    # Rendered with its password, decoded, then masked: SQLAlchemy ends the password at the first "@"
    # (the rest would show as host and database), and it does not hide ?password= at all.
    return mask_secret(unquote(url.render_as_string(hide_password=False)))


def _without_secrets(text: str, url: URL) -> str:
    """A driver's message with the URL's passwords masked (core.adapters.settings.hide_secrets)."""
    return hide_secrets(text, unquote(url.render_as_string(hide_password=False)))


def _in_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


def _make_sqlite_folder(url: URL) -> None:
    if url.get_backend_name() != "sqlite" or _in_memory(url) or url.database.startswith("file:"):
        return
    folder = Path(url.database).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidConfig(f"cannot create the database folder {folder}: {exc.strerror}") from exc


def _engine(url: URL, *, pooled: bool, exclusive: bool = False) -> Engine:
    """An engine for `url`. `exclusive`: SQLite transactions take the write lock when they begin."""
    options: dict = {} if pooled else {"poolclass": NullPool}
    if url.get_backend_name() == "postgresql":
        options["pool_pre_ping"] = pooled  # a worker outlives database restarts
        if url.get_driver_name() in ("psycopg", "psycopg2") and "connect_timeout" not in url.query:
            options["connect_args"] = {"connect_timeout": 10}  # libpq waits forever by default
    engine = create_engine(url, **options)
    if exclusive and url.get_backend_name() == "sqlite":
        # pysqlite runs DDL outside any transaction; take over BEGIN so a whole migration is one
        # transaction, and make it IMMEDIATE so a second process waits instead of racing it.
        @event.listens_for(engine, "connect")
        def _no_implicit_transactions(dbapi_connection, _record) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin_immediate(connection: Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _revision_of(engine: Engine) -> str | None:
    with _reachable(engine), engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _migrate(engine: Engine, action: Callable[[Config], None]) -> str | None:
    with _ALEMBIC_LOCK, _reachable(engine), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK_KEY})
        config = alembic_config()
        config.attributes["connection"] = conn
        try:
            action(config)
        except CommandError as exc:
            raise InvalidConfig(
                f"database {_masked(engine.url)}: {_without_secrets(str(exc), engine.url)}"
            ) from exc
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _reachable(engine: Engine) -> Iterator[None]:
    """Database faults as DatabaseUnavailable, with the URL's password masked."""
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        reason = _without_secrets(" ".join(str(exc.orig).split()), engine.url)
        raise DatabaseUnavailable(f"database {_masked(engine.url)} not reachable: {reason}") from exc


# --- results --------------------------------------------------------------------------------------


def record_result(engine: Engine, summary: dict, cells, store_prefix: str) -> int:
    """Upsert one result and replace its cells; returns the result id.

    Safe when two workers record the same slide at once (a job redelivered while it still runs, the same
    content queued twice): of two inserts the loser updates the winner's row, and the row stays locked
    while its cells are replaced, so the cells are one worker's set, never both.
    """
    keys = {c.name for c in ResultRow.__table__.columns} - {"id", "store_prefix", "created_at"}
    values = {k: summary[k] for k in keys}
    cells = list(cells)
    try:
        return _upsert_result(engine, values, cells, store_prefix)
    except IntegrityError:  # the other worker inserted the same result first: the row exists now
        return _upsert_result(engine, values, cells, store_prefix)


def _upsert_result(engine: Engine, values: dict, cells: list, store_prefix: str) -> int:
    with _reachable(engine), Session(engine) as session, session.begin():
        row = session.scalar(
            select(ResultRow)
            .where(
                ResultRow.sha256 == values["sha256"],
                ResultRow.model_version == values["model_version"],
                ResultRow.params_key == values["params_key"],
            )
            # Without the lock, two concurrent replacements each delete the cells they can see and
            # insert their own: the result ends with both sets. (SQLite ignores FOR UPDATE: its writers
            # take the one database lock in turn.)
            .with_for_update()
        )
        if row is None:
            row = ResultRow(**values, store_prefix=store_prefix, created_at=_now())
            session.add(row)
            session.flush()
        else:
            for k, v in values.items():
                setattr(row, k, v)
            row.store_prefix = store_prefix
            row.created_at = _now()  # when these figures were computed, not when the key first was
            session.execute(delete(CellRow).where(CellRow.result_id == row.id))
        session.add_all(CellRow(result_id=row.id, **_cell_values(c)) for c in cells)
        return row.id


def _cell_values(cell) -> dict:
    # getattr: cells recorded before CellRecord had a review reason (and tests' plain records) have none.
    reason = getattr(cell, "review_reason", "")
    return {**asdict(cell), "review_reason": str(reason) if reason else None}


def find_result(engine: Engine, sha256: str, model_version: str, params_key: str) -> int | None:
    """The id of the result for this slide content, model and parameters, if one is recorded."""
    with _reachable(engine), engine.connect() as conn:
        return conn.scalar(
            select(ResultRow.id).where(
                ResultRow.sha256 == sha256,
                ResultRow.model_version == model_version,
                ResultRow.params_key == params_key,
            )
        )


# --- samples --------------------------------------------------------------------------------------

_samples = SampleRow.__table__
_members = SampleResultRow.__table__


def ensure_sample(engine: Engine, name: str, threshold_percent: float, min_white_cells: int) -> int:
    """The id of the sample `name`, made if new; its pool is judged by this threshold and minimum
    from now on (and judged again at once if they changed)."""
    from blastq.core.cells import check_sample_name

    name = check_sample_name(name)
    rule = {"threshold_percent": threshold_percent, "min_white_cells": min_white_cells}
    for attempt in range(2):
        now = _now()
        try:
            with _reachable(engine), engine.begin() as conn:
                row = conn.execute(select(_samples).where(_samples.c.name == name)).first()
                if row is None:
                    empty = {
                        "images": 0, "white_cells": 0, "blasts": 0, "blast_percent": 0.0, "flagged": False,
                        "verdict": "insufficient cells", "differential": {}, "review_cells": 0,
                    }  # fmt: skip
                    values = {"name": name, **rule, **empty, "created_at": now, "updated_at": now}
                    (sample_id,) = conn.execute(insert(_samples).values(**values)).inserted_primary_key
                    return sample_id
                if (row.threshold_percent, row.min_white_cells) != tuple(rule.values()):
                    conn.execute(
                        update(_samples).where(_samples.c.id == row.id).values(**rule, updated_at=now)
                    )
                    _refresh_sample(conn, row.id)
                return row.id
        except IntegrityError:  # made by another submitter at the same moment: read theirs
            if attempt:
                raise
    raise AssertionError("unreachable")


def add_to_sample(engine: Engine, sample_id: int, result_id: int):
    """Count a recorded result in its sample, then pool the sample again from its results' rows.

    The sample row is locked first (an UPDATE), so two workers adding images at once pool in turn and
    the second sees the first's image: the figures are right whatever order the images finish in. The
    same content counts once: a newer result of it replaces the older one. Returns the SampleResult.
    """
    with _reachable(engine), engine.begin() as conn:
        locked = conn.execute(update(_samples).where(_samples.c.id == sample_id).values(updated_at=_now()))
        if locked.rowcount != 1:
            raise NotFound(f"no sample {sample_id}", value=sample_id)
        sha256 = conn.scalar(select(ResultRow.sha256).where(ResultRow.id == result_id))
        if sha256 is None:
            raise NotFound(f"no result {result_id}", value=result_id)
        member = (_members.c.sample_id == sample_id, _members.c.sha256 == sha256)
        if conn.execute(select(_members.c.result_id).where(*member)).first() is None:
            conn.execute(
                insert(_members).values(
                    sample_id=sample_id, sha256=sha256, result_id=result_id, added_at=_now()
                )
            )
        else:
            conn.execute(update(_members).where(*member).values(result_id=result_id, added_at=_now()))
        return _refresh_sample(conn, sample_id)


def _refresh_sample(conn: Connection, sample_id: int):
    """Pool the sample from its member results (never incrementally) and store the figures."""
    result = _sample_result(conn, conn.execute(select(_samples).where(_samples.c.id == sample_id)).one())
    s = result.stats
    conn.execute(
        update(_samples)
        .where(_samples.c.id == sample_id)
        .values(
            images=len(result.images),
            white_cells=s.white_cells,
            blasts=s.blasts,
            blast_percent=s.blast_percent,
            flagged=s.flagged,
            verdict=s.verdict,
            differential=s.differential,
            review_cells=s.review_cells,
        )
    )
    return result


def _sample_result(conn: Connection, sample):
    from blastq.core.cells import SampleImage, sample_result

    names = [f.name for f in fields(ResultInfo)]
    rows = conn.execute(
        select(ResultRow.__table__)
        .join(_members, _members.c.result_id == ResultRow.__table__.c.id)
        .where(_members.c.sample_id == sample.id)
        .order_by(_members.c.added_at, ResultRow.__table__.c.id)
    )
    infos = [ResultInfo(**{n: _utc(getattr(r, n)) for n in names}) for r in rows]
    images = [SampleImage(i.image, i.sha256, i.stats(), i.id) for i in infos]
    counts = dict(
        conn.execute(
            select(_jobs.c.state, func.count())
            .where(_jobs.c.sample_id == sample.id, _jobs.c.sha256.not_in([i.sha256 for i in infos]))
            .group_by(_jobs.c.state)
        ).all()
    )
    pending = counts.get("queued", 0) + counts.get("running", 0)
    return sample_result(
        sample.name,
        images,
        sample.threshold_percent,
        sample.min_white_cells,
        pending,
        counts.get("failed", 0),
    )


def get_sample(engine: Engine, name: str):
    """The sample `name` (a core.cells.stats.SampleResult: its images and pooled figures); None if unknown."""
    with _reachable(engine), engine.connect() as conn:
        row = conn.execute(select(_samples).where(_samples.c.name == name)).first()
        return None if row is None else _sample_result(conn, row)


def list_samples(engine: Engine) -> list:
    """Every sample (core.cells.stats.SampleResult), oldest first."""
    with _reachable(engine), engine.connect() as conn:
        rows = conn.execute(select(_samples).order_by(_samples.c.created_at, _samples.c.id)).all()
        return [_sample_result(conn, r) for r in rows]


# --- batches and jobs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class JobInfo:
    """One job row, as the worker and the CLI see it. Times are timezone-aware UTC."""

    id: str
    batch_id: str | None
    state: str
    filename: str
    input_key: str
    sha256: str
    mpp: float | None
    params_key: str
    model_version: str | None
    attempts: int
    error: str | None
    worker: str | None
    result_id: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    sample_id: int | None = None

    @classmethod
    def _from_row(cls, row) -> JobInfo:
        values = dict(row._mapping)
        return cls(**{f.name: _utc(values[f.name]) for f in fields(cls)})


@dataclass(frozen=True)
class BatchStatus:
    """A batch and how many of its jobs are in each state."""

    id: str
    name: str
    created_at: datetime
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        return self.queued + self.running + self.succeeded + self.failed

    @property
    def finished(self) -> bool:
        return self.queued == 0 and self.running == 0


_jobs = JobRow.__table__


def create_batch(engine: Engine, name: str) -> str:
    """A new batch; returns its id."""
    batch_id = str(uuid4())
    with _reachable(engine), engine.begin() as conn:
        conn.execute(insert(BatchRow).values(id=batch_id, name=name, created_at=_now()))
    return batch_id


def create_job(
    engine: Engine,
    *,
    batch_id: str | None,
    filename: str,
    input_key: str,
    sha256: str,
    mpp: float | None,
    params_key: str,
    sample_id: int | None = None,
) -> JobInfo:
    """A new queued job: the row exists before any message about it is sent."""
    now = _now()
    values = {
        "id": str(uuid4()),
        "batch_id": batch_id,
        "state": "queued",
        "filename": filename,
        "input_key": input_key,
        "sha256": sha256,
        "mpp": mpp,
        "params_key": params_key,
        "model_version": None,
        "attempts": 0,
        "error": None,
        "worker": None,
        "result_id": None,
        "created_at": now,
        "started_at": None,
        "finished_at": None,
        "updated_at": now,
        "sample_id": sample_id,
    }
    with _reachable(engine), engine.begin() as conn:
        conn.execute(insert(_jobs).values(**values))
    return JobInfo(**values)


def claim_job(engine: Engine, job_id: str, worker: str, max_attempts: int) -> JobInfo | None:
    """Move a queued (or redelivered running) job to running for `worker`; None when it must not run.

    None when the job is unknown or already finished (a redelivered message must not redo it), when
    another worker claimed it at the same moment, or when it has been started `max_attempts` times
    already: the worker died each time, so the job is failed rather than handed to the next victim.
    """
    row = _claim(engine, _jobs, job_id, worker, max_attempts, "the worker died each time")
    return None if row is None else JobInfo._from_row(row)


def _claim(engine: Engine, table, row_id: str, worker: str, max_attempts: int, why: str):
    """The claim shared by jobs and training runs: the claimed row, or None when it must not run."""
    if max_attempts < 1:
        raise InvalidConfig(f"max_attempts must be at least 1, got {max_attempts}")
    now = _now()
    with _reachable(engine), engine.begin() as conn:
        seen = conn.execute(select(table.c.state, table.c.attempts).where(table.c.id == row_id)).first()
        if seen is None or seen.state not in ("queued", "running"):
            return None
        if seen.attempts >= max_attempts:
            values = {
                "state": "failed",
                "error": f"gave up after {seen.attempts} attempts ({why})",
                "finished_at": now,
            }
        else:
            values = {"state": "running", "attempts": seen.attempts + 1, "worker": worker, "started_at": now}
        # Compare-and-set on attempts: of two workers that read the same row, only the first write
        # matches; PostgreSQL makes the second wait for the first's commit, then re-checks the WHERE.
        claimed = conn.execute(
            update(table)
            .where(
                table.c.id == row_id,
                table.c.state.in_(("queued", "running")),
                table.c.attempts == seen.attempts,
            )
            .values(**values, updated_at=now)
        )
        if claimed.rowcount != 1 or values["state"] == "failed":
            return None
        return conn.execute(select(table).where(table.c.id == row_id)).one()


def finish_job(engine: Engine, job_id: str, result_id: int) -> None:
    """Mark a job succeeded with its result (and the result's model version)."""
    now = _now()
    model_version = select(ResultRow.model_version).where(ResultRow.id == result_id).scalar_subquery()
    with _reachable(engine), engine.begin() as conn:
        done = conn.execute(
            update(_jobs)
            .where(_jobs.c.id == job_id)
            .values(
                state="succeeded",
                result_id=result_id,
                model_version=model_version,
                error=None,
                finished_at=now,
                updated_at=now,
            )
        )
        if done.rowcount != 1:
            raise NotFound(f"no job {job_id}", value=job_id)


def fail_job(engine: Engine, job_id: str, error: str) -> None:
    """Mark a job failed with the reason (cut to 2000 characters). A succeeded job stays succeeded:
    a late duplicate's failure does not undo a result already recorded."""
    now = _now()
    with _reachable(engine), engine.begin() as conn:
        failed = conn.execute(
            update(_jobs)
            .where(_jobs.c.id == job_id, _jobs.c.state != "succeeded")
            .values(state="failed", error=error[:MAX_ERROR_CHARS], finished_at=now, updated_at=now)
        )
        if failed.rowcount != 1 and conn.scalar(select(_jobs.c.id).where(_jobs.c.id == job_id)) is None:
            raise NotFound(f"no job {job_id}", value=job_id)


def stale_jobs(engine: Engine, older_than: timedelta) -> list[JobInfo]:
    """Jobs still queued or running whose row has not changed for `older_than`, oldest first."""
    cutoff = _now() - older_than
    with _reachable(engine), engine.connect() as conn:
        rows = conn.execute(
            select(_jobs)
            .where(_jobs.c.state.in_(("queued", "running")), _jobs.c.updated_at < cutoff)
            .order_by(_jobs.c.updated_at)
        )
        return [JobInfo._from_row(r) for r in rows]


def job_status(engine: Engine, job_id: str) -> JobInfo | None:
    """The job's row; None for an unknown id."""
    with _reachable(engine), engine.connect() as conn:
        row = conn.execute(select(_jobs).where(_jobs.c.id == job_id)).first()
    return None if row is None else JobInfo._from_row(row)


def batch_status(engine: Engine, batch_id: str) -> BatchStatus | None:
    """The batch with its job counts by state; None for an unknown id."""
    with _reachable(engine), engine.connect() as conn:
        batch = conn.execute(select(BatchRow.__table__).where(BatchRow.id == batch_id)).first()
        if batch is None:
            return None
        counts = conn.execute(
            select(_jobs.c.state, func.count()).where(_jobs.c.batch_id == batch_id).group_by(_jobs.c.state)
        )
        return BatchStatus(
            id=batch.id, name=batch.name, created_at=_utc(batch.created_at), **{s: n for s, n in counts}
        )


def batches_named(engine: Engine, name: str) -> list[str]:
    """Ids of the batches given `name` at submit, oldest first (a name may be given more than once)."""
    with _reachable(engine), engine.connect() as conn:
        rows = conn.execute(select(BatchRow.id).where(BatchRow.name == name).order_by(BatchRow.created_at))
        return [row[0] for row in rows]


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value):
    """SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones in its session zone."""
    if not isinstance(value, datetime):
        return value
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Queries for the service commands (status, results, requeue).


@dataclass(frozen=True)
class ResultInfo:
    """One result row (the summary.json figures and where the files are). Times are UTC."""

    id: int
    image: str
    sha256: str
    model_version: str
    params_key: str
    width: int
    height: int
    mpp: float
    mpp_source: str
    white_cells: int
    blasts: int
    blast_percent: float
    flagged: bool
    verdict: str
    threshold_percent: float
    min_white_cells: int
    differential: dict
    review_cells: int
    classifier_version: str
    seconds: float
    store_prefix: str
    created_at: datetime

    def stats(self):
        """The figures as core.cells.stats.SlideStats (what samples pool)."""
        from blastq.core.cells import SlideStats

        return SlideStats(
            white_cells=self.white_cells,
            blasts=self.blasts,
            blast_percent=self.blast_percent,
            flagged=self.flagged,
            threshold_percent=self.threshold_percent,
            differential=self.differential,
            review_cells=self.review_cells,
            min_white_cells=self.min_white_cells,
            verdict=self.verdict,
        )


def touch_job(engine: Engine, job: JobInfo) -> bool:
    """Bump a queued/running job's updated_at if nobody changed the row since `job` was read.

    True when this caller won: of two `requeue` runs that read the same stale row, only one sends it.
    """
    with _reachable(engine), engine.begin() as conn:
        done = conn.execute(
            update(_jobs)
            .where(
                _jobs.c.id == job.id,
                _jobs.c.state.in_(("queued", "running")),
                _jobs.c.updated_at == job.updated_at,
            )
            .values(updated_at=datetime.now(UTC))
        )
        return done.rowcount == 1


def batch_jobs(engine: Engine, batch_id: str) -> list[JobInfo]:
    """The jobs of a batch in the order they were created."""
    with _reachable(engine), engine.connect() as conn:
        rows = conn.execute(
            select(_jobs).where(_jobs.c.batch_id == batch_id).order_by(_jobs.c.created_at, _jobs.c.id)
        )
        return [JobInfo._from_row(r) for r in rows]


def job_counts(engine: Engine) -> dict[str, int]:
    """How many jobs are in each state, over all batches."""
    with _reachable(engine), engine.connect() as conn:
        return dict(conn.execute(select(_jobs.c.state, func.count()).group_by(_jobs.c.state)).all())


def recent_batches(engine: Engine, limit: int = 10) -> list[BatchStatus]:
    """The newest batches with their job counts, newest first."""
    with _reachable(engine), engine.connect() as conn:
        ids = conn.scalars(select(BatchRow.id).order_by(BatchRow.created_at.desc()).limit(limit)).all()
    return [b for b in (batch_status(engine, i) for i in ids) if b is not None]


def list_results(
    engine: Engine,
    *,
    batch_id: str | None = None,
    flagged: bool | None = None,
    since: datetime | None = None,
    min_blast_percent: float | None = None,
    sample: str | None = None,
) -> list[ResultInfo]:
    """Results, oldest first; with `batch_id`, those of the batch's succeeded jobs (each once); with
    `sample`, the images of that sample (by name)."""
    query = select(ResultRow.__table__)
    if sample is not None:
        query = query.where(
            ResultRow.__table__.c.id.in_(
                select(_members.c.result_id)
                .join(_samples, _samples.c.id == _members.c.sample_id)
                .where(_samples.c.name == sample)
            )
        )
    if batch_id is not None:
        query = query.where(
            ResultRow.__table__.c.id.in_(
                select(_jobs.c.result_id).where(_jobs.c.batch_id == batch_id, _jobs.c.result_id.is_not(None))
            )
        )
    if flagged is not None:
        query = query.where(ResultRow.__table__.c.flagged.is_(flagged))
    if since is not None:
        query = query.where(ResultRow.__table__.c.created_at >= since.astimezone(UTC))
    if min_blast_percent is not None:
        query = query.where(ResultRow.__table__.c.blast_percent >= min_blast_percent)
    names = [f.name for f in fields(ResultInfo)]
    with _reachable(engine), engine.connect() as conn:
        rows = conn.execute(query.order_by(ResultRow.__table__.c.created_at, ResultRow.__table__.c.id))
        return [ResultInfo(**{n: _utc(getattr(r, n)) for n in names}) for r in rows]


# The folder watcher's ledger (`blastq watch`).


@dataclass(frozen=True)
class LedgerEntry:
    """One file version the watcher has seen (a watch_ledger row). Times are UTC."""

    id: int
    root: str
    relpath: str
    size: int
    mtime_ns: int
    sha256: str | None
    job_id: str | None
    state: str
    reason: str | None
    first_seen: datetime
    updated_at: datetime

    @classmethod
    def _from_row(cls, row) -> LedgerEntry:
        values = dict(row._mapping)
        return cls(**{f.name: _utc(values[f.name]) for f in fields(cls)})


_ledger = WatchLedgerRow.__table__
_LEDGER_CHUNK = 500  # relpaths per IN (...) query


def claim_watched_file(
    engine: Engine, root: str, relpath: str, size: int, mtime_ns: int, *, stale_after: timedelta
) -> tuple[LedgerEntry | None, bool]:
    """Claim one file version for submission: (its ledger row, True when this caller now owns it).

    The insert is the claim: the unique (root, relpath, size, mtime_ns) lets one of two watchers, or
    of a watcher and its restarted self, win. A row still `seen` after `stale_after` belongs to a
    watcher that died between claim and submit: it is taken over by compare-and-set and returned as
    it was, so the caller can look for a job the dead watcher made since its `updated_at`.
    (None, False) only when the row vanished (released) three times in a row while being read.
    """
    same_version = (
        _ledger.c.root == root,
        _ledger.c.relpath == relpath,
        _ledger.c.size == size,
        _ledger.c.mtime_ns == mtime_ns,
    )
    for _ in range(3):
        now = _now()
        values = {
            "root": root,
            "relpath": relpath,
            "size": size,
            "mtime_ns": mtime_ns,
            "sha256": None,
            "job_id": None,
            "state": "seen",
            "reason": None,
            "first_seen": now,
            "updated_at": now,
        }
        try:
            with _reachable(engine), engine.begin() as conn:
                (entry_id,) = conn.execute(insert(_ledger).values(**values)).inserted_primary_key
            return LedgerEntry(id=entry_id, **values), True
        except IntegrityError:
            pass  # someone has this version: read their row
        with _reachable(engine), engine.begin() as conn:
            row = conn.execute(select(_ledger).where(*same_version)).first()
            if row is None:
                continue  # released between our insert and this read: try the insert again
            entry = LedgerEntry._from_row(row)
            if entry.state != "seen" or entry.updated_at >= now - stale_after:
                return entry, False
            taken = conn.execute(
                update(_ledger)
                .where(
                    _ledger.c.id == row.id, _ledger.c.state == "seen", _ledger.c.updated_at == row.updated_at
                )
                .values(updated_at=now)
            )
            return entry, taken.rowcount == 1
    return None, False


def record_watched_file(
    engine: Engine,
    entry_id: int,
    state: str,
    *,
    job_id: str | None = None,
    sha256: str | None = None,
    reason: str | None = None,
) -> None:
    """Settle a claimed file version: submitted (with its job and content sha256) or rejected (why)."""
    if state not in ("submitted", "rejected"):
        raise ValueError(f"a watched file is settled as submitted or rejected, not {state!r}")
    with _reachable(engine), engine.begin() as conn:
        done = conn.execute(
            update(_ledger)
            .where(_ledger.c.id == entry_id)
            .values(
                state=state,
                job_id=job_id,
                sha256=sha256,
                reason=None if reason is None else reason[:MAX_ERROR_CHARS],
                updated_at=_now(),
            )
        )
        if done.rowcount != 1:
            raise NotFound(f"no watch ledger entry {entry_id}", value=entry_id)


def release_watched_file(engine: Engine, entry_id: int) -> None:
    """Give up a claim that was never submitted (a transient fault), so the next scan claims it again."""
    with _reachable(engine), engine.begin() as conn:
        conn.execute(delete(_ledger).where(_ledger.c.id == entry_id, _ledger.c.state == "seen"))


def watched_files(engine: Engine, root: str, relpaths: Iterable[str] | None = None) -> list[LedgerEntry]:
    """The ledger rows under `root` (only those of `relpaths` when given), oldest first."""
    chunks: list[list[str] | None] = [None]
    if relpaths is not None:
        wanted = sorted(set(relpaths))
        chunks = [wanted[i : i + _LEDGER_CHUNK] for i in range(0, len(wanted), _LEDGER_CHUNK)]
    entries: list[LedgerEntry] = []
    with _reachable(engine), engine.connect() as conn:
        for chunk in chunks:
            query = select(_ledger).where(_ledger.c.root == root)
            if chunk is not None:
                query = query.where(_ledger.c.relpath.in_(chunk))
            entries.extend(LedgerEntry._from_row(r) for r in conn.execute(query))
    return sorted(entries, key=lambda e: (e.first_seen, e.id))


def jobs_for_file(engine: Engine, filename: str, since: datetime) -> list[JobInfo]:
    """Jobs made for `filename` (as submitted) since `since`, newest first.

    How a watcher finds out whether a submit cut short by a fault, or by its own death, made a job.
    """
    with _reachable(engine), engine.connect() as conn:
        rows = conn.execute(
            select(_jobs)
            .where(_jobs.c.filename == filename, _jobs.c.created_at >= since.astimezone(UTC))
            .order_by(_jobs.c.created_at.desc(), _jobs.c.id)
        )
        return [JobInfo._from_row(r) for r in rows]


# --- the model registry -----------------------------------------------------------------------------


class ModelRow(Base):
    """One registered model version (the policy lives in core.adapters.registry). At most one is promoted:
    every state change takes the rows' locks in one transaction, and a partial unique index backs it."""

    __tablename__ = "models"
    __table_args__ = (
        CheckConstraint(_one_of("state", MODEL_STATES), name="state"),
        Index(
            "uq_models_one_promoted",
            "state",
            unique=True,
            postgresql_where=text("state = 'promoted'"),
            sqlite_where=text("state = 'promoted'"),
        ),
    )

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    sha256: Mapped[str] = mapped_column(String(64))  # of the checkpoint file
    checkpoint_key: Mapped[str] = mapped_column(String(300))  # store key: models/<version>/<sha256>.pt
    metrics: Mapped[str] = mapped_column(Text)  # JSON object, e.g. {"validation_score": 0.91}
    config: Mapped[str] = mapped_column(Text)  # JSON object: the training configuration
    split: Mapped[str] = mapped_column(Text)  # JSON object: the data split it was trained and validated on
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


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

    @classmethod
    def _from_row(cls, row) -> ModelVersion:
        values = {k: _utc(v) for k, v in row._mapping.items()}
        for name in ("metrics", "config", "split"):
            values[name] = json.loads(values[name])
        return cls(**{f.name: values[f.name] for f in fields(cls)})


_models = ModelRow.__table__


def add_model(
    engine: Engine,
    *,
    version: str,
    sha256: str,
    checkpoint_key: str,
    metrics: dict,
    config: dict,
    split: dict,
) -> ModelVersion | None:
    """Insert a candidate; None when the version is registered already (the caller reads that row)."""
    values = {
        "version": version,
        "state": "candidate",
        "sha256": sha256,
        "checkpoint_key": checkpoint_key,
        "metrics": json.dumps(metrics, sort_keys=True),
        "config": json.dumps(config, sort_keys=True),
        "split": json.dumps(split, sort_keys=True),
        "created_at": _now(),
        "promoted_at": None,
        "retired_at": None,
    }
    try:
        with _reachable(engine), engine.begin() as conn:
            conn.execute(insert(_models).values(**values))
    except IntegrityError:
        return None
    return get_model_row(engine, version)


def get_model_row(engine: Engine, version: str) -> ModelVersion | None:
    """The registered version; None for an unknown one."""
    with _reachable(engine), engine.connect() as conn:
        row = conn.execute(select(_models).where(_models.c.version == version)).first()
    return None if row is None else ModelVersion._from_row(row)


def model_rows(engine: Engine, state: str | None = None) -> list[ModelVersion]:
    """Registered versions (in `state` when given), oldest first."""
    query = select(_models).order_by(_models.c.created_at, _models.c.version)
    if state is not None:
        query = query.where(_models.c.state == state)
    with _reachable(engine), engine.connect() as conn:
        return [ModelVersion._from_row(r) for r in conn.execute(query)]


def promote_model_row(
    engine: Engine, version: str | None, check: Callable[[ModelVersion | None, ModelVersion | None], None]
) -> ModelVersion:
    """Promote `version` (None: the most recently retired one) and retire the promoted one, atomically.

    `check(target, current)` runs inside the transaction, after the locks are taken, on what is
    committed at that moment (target None: unknown, or nothing retired); it raises to refuse. Promoting
    the promoted version changes nothing.
    """
    with _reachable(engine), engine.begin() as conn:
        _lock_models(conn)
        current = conn.execute(select(_models).where(_models.c.state == "promoted")).first()
        if version is None:
            target = conn.execute(
                select(_models)
                .where(_models.c.state == "retired")
                .order_by(_models.c.retired_at.desc(), _models.c.version)
                .limit(1)
            ).first()
        else:
            target = conn.execute(select(_models).where(_models.c.version == version)).first()
        target_info = None if target is None else ModelVersion._from_row(target)
        check(target_info, None if current is None else ModelVersion._from_row(current))
        if target_info is None:
            raise NotFound(f"no model version {version}", value=version)
        if current is not None and current.version == target_info.version:
            return target_info
        now = _now()
        # Retire first: the partial unique index allows one promoted row at every statement.
        conn.execute(
            update(_models).where(_models.c.state == "promoted").values(state="retired", retired_at=now)
        )
        conn.execute(
            update(_models)
            .where(_models.c.version == target_info.version)
            .values(state="promoted", promoted_at=now, retired_at=None)
        )
        return ModelVersion._from_row(
            conn.execute(select(_models).where(_models.c.version == target_info.version)).one()
        )


def _lock_models(conn: Connection) -> None:
    """Serialise registry state changes for the rest of the transaction.

    PostgreSQL: lock every model row, in one order; a second promoter waits on the first row, and its
    next statement (READ COMMITTED) sees the first one's commit. Locking the promoted row alone is not
    enough: the waiter would then find it retired and see no promoted row at all. SQLite ignores FOR
    UPDATE: a write that changes nothing takes its database write lock instead.
    """
    if conn.dialect.name == "sqlite":
        conn.execute(update(_models).where(false()).values(state=_models.c.state))
    else:
        conn.execute(select(_models.c.version).order_by(_models.c.version).with_for_update())


def promoted_model_row(engine: Engine) -> ModelVersion | None:
    """The promoted version; None when nothing is promoted. One indexed query."""
    with _reachable(engine), engine.connect() as conn:
        row = conn.execute(select(_models).where(_models.c.state == "promoted")).first()
    return None if row is None else ModelVersion._from_row(row)


# --- training runs (the trainer service) ------------------------------------------------------------

TRAINING_STATES = JOB_STATES


class TrainingRunRow(Base):
    """One training job of the trainer service: a row before it is a message, like a slide job.

    The trainer records each finished epoch here (with the store key of the state to resume from), so a
    killed trainer's run continues from its last epoch on the next delivery.
    """

    __tablename__ = "training_runs"
    __table_args__ = (CheckConstraint(_one_of("state", TRAINING_STATES), name="state"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    config: Mapped[str] = mapped_column(Text)  # JSON object: TrainConfig.to_dict()
    version: Mapped[str] = mapped_column(String(64))  # the model version it trains
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # deliveries started
    worker: Mapped[str | None] = mapped_column(String(200))  # hostname/pid of the last claim
    epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # last finished epoch
    history: Mapped[str] = mapped_column(Text)  # JSON list: one record per finished epoch
    checkpoint_key: Mapped[str | None] = mapped_column(String(300))  # store key: training/<id>/last.pt
    model_key: Mapped[str | None] = mapped_column(String(300))  # store key: training/<id>/model.pt
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class TrainingRunInfo:
    """One training_runs row with its JSON columns decoded. Times are UTC."""

    id: str
    state: str
    config: dict
    version: str
    attempts: int
    worker: str | None
    epoch: int
    history: list
    checkpoint_key: str | None
    model_key: str | None
    model_sha256: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @classmethod
    def _from_row(cls, row) -> TrainingRunInfo:
        values = {k: _utc(v) for k, v in row._mapping.items()}
        values["config"] = json.loads(values["config"])
        values["history"] = json.loads(values["history"])
        return cls(**{f.name: values[f.name] for f in fields(cls)})


_runs = TrainingRunRow.__table__


def create_training_run(engine: Engine, *, config: dict, version: str) -> TrainingRunInfo:
    """A new queued training run: the row exists before any message about it is sent."""
    now = _now()
    values = {
        "id": str(uuid4()),
        "state": "queued",
        "config": json.dumps(config, sort_keys=True),
        "version": version,
        "attempts": 0,
        "worker": None,
        "epoch": 0,
        "history": "[]",
        "checkpoint_key": None,
        "model_key": None,
        "model_sha256": None,
        "error": None,
        "created_at": now,
        "started_at": None,
        "finished_at": None,
        "updated_at": now,
    }
    with _reachable(engine), engine.begin() as conn:
        conn.execute(insert(_runs).values(**values))
    return TrainingRunInfo(**{**values, "config": config, "history": []})


def claim_training_run(engine: Engine, run_id: str, worker: str, max_attempts: int) -> TrainingRunInfo | None:
    """Move a queued (or redelivered running) run to running for `worker`; None when it must not run.

    The rules of `claim_job`: None for an unknown or finished run, for a claim lost to another worker
    at the same moment, and past `max_attempts` deliveries (the run is failed instead).
    """
    row = _claim(engine, _runs, run_id, worker, max_attempts, "the trainer died each time")
    return None if row is None else TrainingRunInfo._from_row(row)


def record_epoch(engine: Engine, run_id: str, epoch: int, history: list, checkpoint_key: str) -> None:
    """Record a finished epoch: its number, the history so far and the resume state's key, at once."""
    with _reachable(engine), engine.begin() as conn:
        done = conn.execute(
            update(_runs)
            .where(_runs.c.id == run_id, _runs.c.state == "running")
            .values(
                epoch=epoch,
                history=json.dumps(history),
                checkpoint_key=checkpoint_key,
                updated_at=_now(),
            )
        )
        if done.rowcount != 1:
            raise NotFound(f"no running training run {run_id}", value=run_id)


def finish_training_run(engine: Engine, run_id: str, *, model_key: str, model_sha256: str) -> None:
    """Mark a run succeeded with the store key and sha256 of its final checkpoint."""
    now = _now()
    with _reachable(engine), engine.begin() as conn:
        done = conn.execute(
            update(_runs)
            .where(_runs.c.id == run_id)
            .values(
                state="succeeded",
                model_key=model_key,
                model_sha256=model_sha256,
                error=None,
                finished_at=now,
                updated_at=now,
            )
        )
        if done.rowcount != 1:
            raise NotFound(f"no training run {run_id}", value=run_id)


def fail_training_run(engine: Engine, run_id: str, error: str) -> None:
    """Mark a run failed with the reason; a succeeded run stays succeeded."""
    now = _now()
    with _reachable(engine), engine.begin() as conn:
        failed = conn.execute(
            update(_runs)
            .where(_runs.c.id == run_id, _runs.c.state != "succeeded")
            .values(state="failed", error=error[:MAX_ERROR_CHARS], finished_at=now, updated_at=now)
        )
        if failed.rowcount != 1 and conn.scalar(select(_runs.c.id).where(_runs.c.id == run_id)) is None:
            raise NotFound(f"no training run {run_id}", value=run_id)


def training_run_status(engine: Engine, run_id: str) -> TrainingRunInfo | None:
    """The run's row; None for an unknown id."""
    with _reachable(engine), engine.connect() as conn:
        row = conn.execute(select(_runs).where(_runs.c.id == run_id)).first()
    return None if row is None else TrainingRunInfo._from_row(row)


def training_runs(engine: Engine, limit: int = 20) -> list[TrainingRunInfo]:
    """The newest training runs, newest first."""
    with _reachable(engine), engine.connect() as conn:
        rows = conn.execute(select(_runs).order_by(_runs.c.created_at.desc(), _runs.c.id).limit(limit))
        return [TrainingRunInfo._from_row(r) for r in rows]
