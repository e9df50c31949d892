"""Shared fixtures: the shipped model, generated smears, paths to the real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WBC_ROOT = Path(os.environ.get("BLASTQ_WBC_DATA", REPO.parent / "shared" / "data" / "segmentation_wbc"))


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


@pytest.fixture(scope="session")
def wbc_root() -> Path:
    """The real segmentation_wbc data, read in place. Missing in CI is a failure, not a skip."""
    if not (WBC_ROOT / "dataset1").is_dir():
        if in_ci():
            pytest.fail(f"real data missing in CI: {WBC_ROOT}")
        pytest.skip(f"real data not found at {WBC_ROOT} (set BLASTQ_WBC_DATA)")
    return WBC_ROOT


@pytest.fixture(scope="session")
def shipped_engine():
    """The model shipped inside the package, loaded once for the session."""
    from blastq.core.segment.engines import load_engine

    return load_engine()


@pytest.fixture(scope="session")
def smear():
    """A 768x768 synthetic smear at the model's scale with a good share of blasts."""
    from blastq.core.synth.field import generate_field

    return generate_field(12345, 768, 768, mpp=0.2, blast_fraction=0.4)


@pytest.fixture(params=["sqlite", "postgresql"])
def migrated_db(request, tmp_path):
    """An empty, migrated database: SQLite in tmp_path, and a fresh PostgreSQL schema."""
    from services import pg_schema

    from blastq.core.adapters.db import connect, upgrade

    if request.param == "sqlite":
        engine = connect(f"sqlite:///{tmp_path / 'blastq-test.db'}")
        yield engine
        engine.dispose()
        return
    with pg_schema() as url:
        upgrade(url)
        engine = connect(url)
        yield engine
        engine.dispose()
