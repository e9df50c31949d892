"""The results adapter on SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import dataclasses
import os
import uuid

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from blastq.core.cells import CellRecord
from blastq.core.db import CellRow, ResultRow, connect, record_result

PG_URL = os.environ.get("BLASTQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
CELL = CellRecord(1, "blast", 5.0, 6.0, 0, 0, 10, 12, 90, 3.6, 7.0, 0.9, 60, 2.4, 0.67, 100, 80, 160, 0.93)


def summary(sha: str, blasts: int = 1) -> dict:
    return {
        "sha256": sha, "model_version": "v1", "params_key": "k1", "image": "a.png", "width": 64, "height": 64,
        "mpp": 0.2, "mpp_source": "user", "white_cells": 2, "blasts": blasts, "blast_percent": 50.0 * blasts,
        "flagged": True, "threshold_percent": 20.0, "seconds": 0.5,
    }  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        yield connect(f"sqlite:///{tmp_path}/t.db")
        return
    try:
        eng = connect(PG_URL)
        with eng.connect() as c:
            c.execute(text("select 1"))
    except Exception as exc:  # the service is part of the test: in CI its absence is a failure
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL not reachable at {PG_URL}: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}")
    yield eng


def test_recording_the_same_result_twice_keeps_one_row_and_one_set_of_cells(engine):
    sha = uuid.uuid4().hex
    cells = [CELL, dataclasses.replace(CELL, cell_id=2, label="white_cell")]
    first = record_result(engine, summary(sha), cells, "slides/x")
    second = record_result(engine, summary(sha, blasts=1), cells, "slides/x")
    assert first == second
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(ResultRow).where(ResultRow.sha256 == sha)) == 1
        assert s.scalar(select(func.count()).select_from(CellRow).where(CellRow.result_id == first)) == 2
        assert (
            s.scalar(select(CellRow.label).where(CellRow.result_id == first, CellRow.cell_id == 1)) == "blast"
        )


def test_a_new_model_version_is_a_new_result(engine):
    sha = uuid.uuid4().hex
    a = record_result(engine, summary(sha), [CELL], "p1")
    b = record_result(engine, {**summary(sha), "model_version": "v2"}, [CELL], "p2")
    assert a != b
