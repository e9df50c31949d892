"""The Alembic history against the models, on SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from legacy import COLUMNS_OF_0004, COLUMNS_OF_0005
from services import pg_schema
from sqlalchemy import MetaData, create_engine, inspect, text
from sqlalchemy.pool import NullPool

from blastq.core.adapters.db import (
    Base,
    CellRow,
    ResultRow,
    current_revision,
    downgrade,
    head_revision,
    migrations_dir,
    upgrade,
)

TABLES = {"batches", "jobs", "results", "cells", "watch_ledger", "samples", "sample_results"}


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/empty.db"
        return
    with pg_schema() as url:
        yield url


def differences(url: str) -> list:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()


def tables(url: str) -> set[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names())
    finally:
        engine.dispose()


def test_the_migrations_build_the_schema_the_models_describe(empty_url):
    assert upgrade(empty_url) == head_revision()
    assert differences(empty_url) == []  # a model changed without a migration fails here


def test_upgrading_twice_is_harmless_and_downgrading_to_base_removes_the_tables(empty_url):
    assert current_revision(empty_url) is None
    upgrade(empty_url)
    assert upgrade(empty_url) == head_revision() == current_revision(empty_url)
    assert tables(empty_url) >= TABLES
    assert downgrade(empty_url, "base") is None
    assert current_revision(empty_url) is None
    assert not TABLES & tables(empty_url)
    upgrade(empty_url)
    assert tables(empty_url) >= TABLES


def test_a_database_from_before_migrations_is_adopted_as_it_is(empty_url):
    # blastq 0.1 created results and cells with create_all and SQLAlchemy's default names.
    legacy = MetaData()
    for table in (ResultRow.__table__, CellRow.__table__):
        table.to_metadata(legacy)
    engine = create_engine(empty_url, poolclass=NullPool)
    legacy.create_all(engine)
    with engine.begin() as c:
        for table, column in [*COLUMNS_OF_0004, *COLUMNS_OF_0005]:  # added later, by 0004 and 0005
            c.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        c.execute(
            text(
                "INSERT INTO results (sha256, model_version, params_key, image, width, height, mpp, mpp_source,"
                " white_cells, blasts, blast_percent, flagged, threshold_percent, seconds, store_prefix,"
                " created_at) VALUES ('s', 'v1', 'k', 'a.png', 1, 1, 0.2, 'user', 1, 0, 0, false, 20, 1,"
                " 'p', '2024-01-01 00:00:00')"
            )
        )
    engine.dispose()
    upgrade(empty_url)
    assert differences(empty_url) == []
    engine = create_engine(empty_url, poolclass=NullPool)
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM results")).scalar() == 1
    engine.dispose()


def test_the_migrations_folder_ships_its_environment_and_one_initial_revision():
    folder = migrations_dir()
    assert (folder / "env.py").is_file() and (folder / "script.py.mako").is_file()
    assert head_revision() == "0007"
