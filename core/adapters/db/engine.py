"""Connecting and migrating: database URLs, engines, the Alembic history brought to head, and the
helpers every query module uses (reachable, utcnow, as_utc)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import (
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError
from sqlalchemy.pool import NullPool

from blastq.core.adapters.settings import hide_secrets, mask_secret
from blastq.core.common import DatabaseUnavailable, InvalidConfig

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
    with reachable(engine), engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _migrate(engine: Engine, action: Callable[[Config], None]) -> str | None:
    with _ALEMBIC_LOCK, reachable(engine), engine.begin() as conn:
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
def reachable(engine: Engine) -> Iterator[None]:
    """Database faults as DatabaseUnavailable, with the URL's password masked."""
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        reason = _without_secrets(" ".join(str(exc.orig).split()), engine.url)
        raise DatabaseUnavailable(f"database {_masked(engine.url)} not reachable: {reason}") from exc


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value):
    """SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones in its session zone."""
    if not isinstance(value, datetime):
        return value
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
