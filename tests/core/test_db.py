"""The database adapter on SQLite and on the real PostgreSQL server: results, jobs, connecting."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from legacy import COLUMNS_OF_0004, COLUMNS_OF_0005
from services import PG_URL, pg_schema
from sqlalchemy import create_engine, event, func, make_url, select, text, update
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from blastq.core.adapters.db import (
    Base,
    CellRow,
    JobRow,
    ResultRow,
    add_to_sample,
    batch_status,
    claim_job,
    connect,
    create_batch,
    create_job,
    current_revision,
    ensure_sample,
    fail_job,
    find_result,
    finish_job,
    get_sample,
    head_revision,
    job_status,
    list_results,
    list_samples,
    record_result,
    stale_jobs,
    upgrade,
)
from blastq.core.cells.instances import CellRecord
from blastq.core.common.errors import DatabaseUnavailable, InvalidConfig

# Imports, says it is ready, and connects once all three are: their migrations race.
RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from blastq.core.adapters.db import connect

    url, ready, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    (ready / name).touch()
    deadline = time.time() + 60
    while len(list(ready.iterdir())) < 3 and time.time() < deadline:
        time.sleep(0.005)
    connect(url).dispose()
    """
)
CELL = CellRecord(1, "blast", 5.0, 6.0, 0, 0, 10, 12, 90, 3.6, 7.0, 0.9, 60, 2.4, 0.67, 100, 80, 160, 0.93)


def summary(sha: str, blasts: int = 1) -> dict:
    return {
        "sha256": sha, "model_version": "v1", "params_key": "k1", "image": "a.png", "width": 64, "height": 64,
        "mpp": 0.2, "mpp_source": "user", "white_cells": 2, "blasts": blasts, "blast_percent": 50.0 * blasts,
        "flagged": True, "threshold_percent": 20.0, "seconds": 0.5, "review_cells": 0,
        "differential": {}, "classifier_version": "", "verdict": "flagged", "min_white_cells": 1,
    }  # fmt: skip


@pytest.fixture(scope="module")
def pg_url():
    with pg_schema() as url:
        upgrade(url)
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    url = f"sqlite:///{tmp_path}/t.db" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    eng = connect(url)
    yield eng
    eng.dispose()


def new_job(engine, batch_id=None, sha=None):
    sha = sha or uuid.uuid4().hex
    return create_job(
        engine, batch_id=batch_id, filename="smear 1.png", input_key=f"inputs/{sha}.png", sha256=sha,
        mpp=None, params_key="k1",
    )  # fmt: skip


# --- results -------------------------------------------------------------------------------------


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


def test_the_differential_and_cell_types_are_stored_and_listed(engine):
    sha = uuid.uuid4().hex
    differential = {"lymphocyte": {"count": 1, "percent": 50.0}, "blast": {"count": 1, "percent": 50.0}}
    typed = [
        dataclasses.replace(CELL, cell_type="blast", cell_type_probability=0.91, p_blast=0.91),
        dataclasses.replace(CELL, cell_id=2, label="white_cell", cell_type="lymphocyte", review=True),
    ]
    values = {**summary(sha), "differential": differential, "review_cells": 1, "classifier_version": "c1"}
    rid = record_result(engine, values, typed, "slides/t")
    [listed] = [r for r in list_results(engine) if r.id == rid]
    assert listed.differential == differential  # JSON keeps the type order
    assert list(listed.differential) == ["lymphocyte", "blast"]
    assert (listed.review_cells, listed.classifier_version) == (1, "c1")
    with Session(engine) as s:
        rows = s.execute(
            select(CellRow.cell_type, CellRow.review, CellRow.p_blast).where(CellRow.result_id == rid)
            .order_by(CellRow.cell_id)
        ).all()  # fmt: skip
    assert [tuple(r) for r in rows] == [("blast", False, 0.91), ("lymphocyte", True, 0.0)]


def test_a_new_model_version_is_a_new_result(engine):
    sha = uuid.uuid4().hex
    a = record_result(engine, summary(sha), [CELL], "p1")
    b = record_result(engine, {**summary(sha), "model_version": "v2"}, [CELL], "p2")
    assert a != b
    assert find_result(engine, sha, "v2", "k1") == b
    assert find_result(engine, sha, "v3", "k1") is None


# --- connecting ----------------------------------------------------------------------------------


def test_connect_creates_the_sqlite_folder_and_brings_the_schema_to_head(tmp_path):
    url = f"sqlite:///{tmp_path}/new/folder/blastq.db"
    connect(url).dispose()
    assert (tmp_path / "new" / "folder" / "blastq.db").is_file()
    assert current_revision(url) == head_revision()
    connect(url).dispose()  # a second time finds it in place


def test_processes_connecting_at_once_to_a_new_sqlite_database_all_get_it(tmp_path):
    url = f"sqlite:///{tmp_path}/shared.db"
    ready = tmp_path / "ready"
    ready.mkdir()
    procs = [
        subprocess.Popen([sys.executable, "-c", RACER, url, ready, str(i)], stderr=subprocess.PIPE, text=True)
        for i in range(3)
    ]
    errors = [p.communicate(timeout=90)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert current_revision(url) == head_revision()


def test_threads_connecting_at_once_to_a_new_sqlite_database_all_get_it(tmp_path):
    url = f"sqlite:///{tmp_path}/shared.db"
    with ThreadPoolExecutor(4) as pool:
        engines = list(pool.map(lambda _: connect(url), range(4)))
    for e in engines:
        e.dispose()
    assert current_revision(url) == head_revision()


def test_a_sqlite_database_from_before_migrations_keeps_its_results(tmp_path):
    # Before migrations blastq created `results` and `cells` with create_all; the columns of revision
    # 0004 did not exist yet.
    url = f"sqlite:///{tmp_path}/old.db"
    old = create_engine(url)
    Base.metadata.create_all(old, tables=[ResultRow.__table__, CellRow.__table__])
    with old.begin() as c:
        older = [*COLUMNS_OF_0004, *COLUMNS_OF_0005]
        for table, column in older:
            c.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        columns = [k for k in summary("a" * 64) if ("results", k) not in older]
        c.execute(
            text(f"INSERT INTO results ({', '.join(columns)}, store_prefix, created_at) "
                 f"VALUES ({', '.join(':' + k for k in columns)}, 'slides/a', '2026-01-01 00:00:00')"),
            {k: summary("a" * 64)[k] for k in columns},
        )  # fmt: skip
        rid = c.scalar(text("SELECT id FROM results"))
    old.dispose()
    engine = connect(url)
    assert find_result(engine, "a" * 64, "v1", "k1") == rid
    [kept] = list_results(engine)
    assert (kept.differential, kept.review_cells, kept.classifier_version) == ({}, 0, "")
    # Judged again by the default minimum: 2 white cells give no verdict, and no flag.
    assert (kept.verdict, kept.min_white_cells, kept.flagged) == ("insufficient cells", 100, False)
    assert new_job(engine).state == "queued"
    engine.dispose()


def test_a_database_from_a_newer_blastq_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path}/newer.db"
    connect(url).dispose()
    with create_engine(url).begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
    with pytest.raises(InvalidConfig, match="f00d"):
        connect(url)


def test_a_postgresql_database_from_a_newer_blastq_asks_for_a_newer_blastq():
    with pg_schema() as url:
        upgrade(url)
        engine = create_engine(url, poolclass=NullPool)
        with engine.begin() as c:
            c.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
        engine.dispose()
        with pytest.raises(InvalidConfig, match="f00d, newer than this blastq knows: upgrade blastq"):
            connect(url)


def _with_password(url: str) -> str:
    """The test URL with a password (trust authentication ignores it), to check it is never shown."""
    parsed = make_url(url)
    return url if parsed.password else parsed.set(password="hunter2").render_as_string(hide_password=False)


def test_connect_refuses_an_unmigrated_postgresql_database_without_showing_the_password():
    with pg_schema(_with_password(PG_URL)) as url:
        password = make_url(url).password
        with pytest.raises(InvalidConfig) as info:
            connect(url)
    message = str(info.value)
    assert "blastq db upgrade" in message and password not in message and "***" in message
    assert "\n" not in message


def test_an_unreachable_database_is_unavailable_without_showing_the_password():
    url = "postgresql+psycopg://postgres:hunter2@127.0.0.1:1/test"
    with pytest.raises(DatabaseUnavailable) as info:
        connect(url)
    assert "hunter2" not in str(info.value) and "127.0.0.1:1" in str(info.value)
    with pytest.raises(DatabaseUnavailable) as info:
        upgrade(url)
    assert "hunter2" not in str(info.value)


# --- jobs ----------------------------------------------------------------------------------------


def test_a_job_goes_from_queued_to_running_to_succeeded(engine):
    batch = create_batch(engine, "morning run")
    job = new_job(engine, batch)
    other = new_job(engine, batch)
    assert (job.state, job.attempts, job.created_at.tzinfo) == ("queued", 0, UTC)
    assert job_status(engine, job.id) == job

    running = claim_job(engine, job.id, "host-a/123", max_attempts=3)
    assert (running.state, running.attempts, running.worker) == ("running", 1, "host-a/123")
    assert running.started_at is not None and running.updated_at >= job.updated_at
    result_id = record_result(engine, summary(job.sha256), [CELL], "slides/x")
    finish_job(engine, job.id, result_id)
    fail_job(engine, other.id, "not an image: smear 2.png")

    done = job_status(engine, job.id)
    assert (done.state, done.result_id, done.model_version) == ("succeeded", result_id, "v1")
    assert done.error is None and done.finished_at.tzinfo == UTC
    status = batch_status(engine, batch)
    assert (status.name, status.succeeded, status.failed, status.queued, status.total) == (
        "morning run", 1, 1, 0, 2,
    )  # fmt: skip
    assert status.finished
    assert job_status(engine, str(uuid.uuid4())) is None and batch_status(engine, "nope") is None


def test_two_workers_claiming_one_job_at_once_exactly_one_wins(engine):
    job = new_job(engine)
    barrier = threading.Barrier(2, timeout=20)

    # Both workers have read the row before either writes: the worst interleaving, every time.
    def both_read_before_either_writes(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("UPDATE JOBS"):
            barrier.wait()

    event.listen(engine, "before_cursor_execute", both_read_before_either_writes)
    try:
        with ThreadPoolExecutor(2) as pool:
            claims = list(pool.map(lambda w: claim_job(engine, job.id, w, max_attempts=3), ["w1", "w2"]))
    finally:
        event.remove(engine, "before_cursor_execute", both_read_before_either_writes)
    winners = [c for c in claims if c is not None]
    assert len(winners) == 1
    row = job_status(engine, job.id)
    assert (row.state, row.attempts, row.worker) == ("running", 1, winners[0].worker)


def test_a_job_that_kills_its_worker_every_time_fails_after_max_attempts(engine):
    job = new_job(engine)
    for attempt in (1, 2, 3):  # each claim after the first is a redelivery after the worker died
        assert claim_job(engine, job.id, f"w{attempt}", max_attempts=3).attempts == attempt
    assert claim_job(engine, job.id, "w4", max_attempts=3) is None
    row = job_status(engine, job.id)
    assert row.state == "failed" and row.attempts == 3
    assert row.error == "gave up after 3 attempts (the worker died each time)"
    assert claim_job(engine, job.id, "w5", max_attempts=10) is None


def test_a_redelivered_finished_job_is_not_run_again(engine):
    done, failed = new_job(engine), new_job(engine)
    claim_job(engine, done.id, "w1", max_attempts=3)
    finish_job(engine, done.id, record_result(engine, summary(done.sha256), [], "slides/d"))
    claim_job(engine, failed.id, "w1", max_attempts=3)
    fail_job(engine, failed.id, "truncated image")
    assert claim_job(engine, done.id, "w2", max_attempts=3) is None
    assert claim_job(engine, failed.id, "w2", max_attempts=3) is None
    assert job_status(engine, done.id).attempts == 1
    assert claim_job(engine, str(uuid.uuid4()), "w2", max_attempts=3) is None


def test_a_late_failure_does_not_undo_a_success_and_long_errors_are_cut(engine):
    job, other = new_job(engine), new_job(engine)
    finish_job(engine, job.id, record_result(engine, summary(job.sha256), [], "slides/j"))
    fail_job(engine, job.id, "duplicate delivery lost the store")
    assert job_status(engine, job.id).state == "succeeded"
    fail_job(engine, other.id, "x" * 5000)
    assert len(job_status(engine, other.id).error) == 2000
    with pytest.raises(LookupError):
        fail_job(engine, str(uuid.uuid4()), "no such job")


def test_stale_jobs_finds_a_running_job_not_updated_for_a_while(engine):
    stuck, fresh, finished = new_job(engine), new_job(engine), new_job(engine)
    claim_job(engine, stuck.id, "w1", max_attempts=3)
    fail_job(engine, finished.id, "bad input")
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    with engine.begin() as c:
        c.execute(update(JobRow).where(JobRow.id.in_([stuck.id, finished.id])).values(updated_at=long_ago))
    found = {j.id: j for j in stale_jobs(engine, timedelta(hours=1))}
    assert stuck.id in found and fresh.id not in found and finished.id not in found
    assert found[stuck.id].state == "running"
    assert abs(found[stuck.id].updated_at - long_ago) < timedelta(seconds=1)


# --- verdicts, replaced results, review reasons --------------------------------------------------


def test_the_verdict_and_its_minimum_are_stored_and_listed(engine):
    sha = uuid.uuid4().hex
    values = {**summary(sha), "verdict": "insufficient cells", "flagged": False, "min_white_cells": 100}
    record_result(engine, values, [CELL], "slides/v")
    [row] = [r for r in list_results(engine) if r.sha256 == sha]
    assert (row.verdict, row.min_white_cells, row.flagged) == ("insufficient cells", 100, False)


def test_a_replaced_result_shows_when_it_was_computed_again(engine):
    sha = uuid.uuid4().hex
    rid = record_result(engine, summary(sha), [CELL], "slides/r")
    [first] = [r for r in list_results(engine) if r.id == rid]
    assert record_result(engine, summary(sha, blasts=2), [CELL], "slides/r") == rid
    [again] = [r for r in list_results(engine) if r.id == rid]
    assert again.created_at > first.created_at and again.blasts == 2


def test_a_cells_review_reason_is_stored_and_plain_records_have_none(engine):
    reviewed = dataclasses.replace(CELL, review=True, review_reason="measuring failed: ValueError")
    plain = dataclasses.replace(CELL, cell_id=2)
    rid = record_result(engine, summary(uuid.uuid4().hex), [reviewed, plain], "slides/c")
    with Session(engine) as s:
        reasons = dict(
            s.execute(select(CellRow.cell_id, CellRow.review_reason).where(CellRow.result_id == rid)).all()
        )
    assert reasons == {1: "measuring failed: ValueError", 2: None}


# --- samples -------------------------------------------------------------------------------------


def recorded(engine, white: int, blasts: int, sha=None, key="k1", typed=True) -> int:
    sha = sha or uuid.uuid4().hex
    differential = {}
    if typed:
        differential = {
            "neutrophil": {"count": white - blasts, "percent": 0.0},
            "blast": {"count": blasts, "percent": 0.0},
        }
    values = {
        **summary(sha), "params_key": key, "image": f"{sha[:6]}.png", "white_cells": white, "blasts": blasts,
        "blast_percent": round(100 * blasts / white, 2), "verdict": "insufficient cells", "flagged": False,
        "min_white_cells": 100, "differential": differential,
    }  # fmt: skip
    return record_result(engine, values, [], "slides/s")


def test_a_sample_pools_its_images_from_their_rows_whatever_the_order(engine):
    ids = [recorded(engine, 40, 4), recorded(engine, 40, 16), recorded(engine, 40, 10)]
    figures = []
    for order in (ids, ids[::-1]):
        sample = ensure_sample(engine, f"P-{uuid.uuid4().hex[:8]}", 20.0, 100)
        for rid in order:
            pooled = add_to_sample(engine, sample, rid)
        figures.append(pooled.stats)
    assert figures[0] == figures[1]
    s = figures[0]
    assert (s.white_cells, s.blasts, s.blast_percent, s.verdict) == (120, 30, 25.0, "flagged")
    assert s.differential["blast"] == {"count": 30, "percent": 25.0}


def test_a_sample_below_the_minimum_has_no_verdict_until_enough_images_arrive(engine):
    name = f"P-{uuid.uuid4().hex[:8]}"
    sample = ensure_sample(engine, name, 20.0, 100)
    assert add_to_sample(engine, sample, recorded(engine, 60, 0)).stats.verdict == "insufficient cells"
    assert add_to_sample(engine, sample, recorded(engine, 60, 6)).stats.verdict == "not flagged"
    stored = get_sample(engine, name)
    assert (len(stored.images), stored.stats.white_cells, stored.stats.verdict) == (2, 120, "not flagged")
    assert {r.id for r in list_results(engine, sample=name)} == {i.result_id for i in stored.images}
    assert name in {s.name for s in list_samples(engine)}


def test_one_content_counts_once_in_a_sample_with_its_newest_result(engine):
    name, sha = f"P-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    sample = ensure_sample(engine, name, 20.0, 100)
    add_to_sample(engine, sample, recorded(engine, 100, 10, sha=sha, key="mpp-0.08"))
    pooled = add_to_sample(engine, sample, recorded(engine, 120, 60, sha=sha, key="mpp-0.1"))
    assert (len(pooled.images), pooled.stats.white_cells, pooled.stats.verdict) == (1, 120, "flagged")


def test_a_changed_rule_judges_the_sample_again(engine):
    name = f"P-{uuid.uuid4().hex[:8]}"
    sample = ensure_sample(engine, name, 20.0, 100)
    add_to_sample(engine, sample, recorded(engine, 50, 5))
    assert get_sample(engine, name).stats.verdict == "insufficient cells"
    assert ensure_sample(engine, name, 20.0, 50) == sample
    assert get_sample(engine, name).stats.verdict == "not flagged"


def test_a_samples_pending_and_failed_images_are_counted_apart_from_the_pool(engine):
    name = f"P-{uuid.uuid4().hex[:8]}"
    sample = ensure_sample(engine, name, 20.0, 100)
    jobs = [
        create_job(
            engine, batch_id=None, filename=f"f{i}.png", input_key=f"inputs/{i}", sha256=uuid.uuid4().hex,
            mpp=None, params_key="k1", sample_id=sample,
        )
        for i in range(3)
    ]  # fmt: skip
    fail_job(engine, jobs[0].id, "bad")
    rid = recorded(engine, 120, 0, sha=jobs[1].sha256)
    add_to_sample(engine, sample, rid)
    finish_job(engine, jobs[1].id, rid)
    found = get_sample(engine, name)
    assert (len(found.images), found.pending, found.failed) == (1, 1, 1)
    assert job_status(engine, jobs[2].id).sample_id == sample


def test_workers_adding_a_samples_images_at_once_leave_every_image_in_the_pool(engine):
    # Each worker records its image and adds it; without the sample row's lock a worker pools
    # without the other's image and the last write wins.
    name = f"P-{uuid.uuid4().hex[:8]}"
    sample = ensure_sample(engine, name, 20.0, 100)
    n = 8
    ids = [recorded(engine, 20, 5) for _ in range(n)]
    start = threading.Barrier(n)

    def add(rid: int):
        start.wait()
        return add_to_sample(engine, sample, rid)

    with ThreadPoolExecutor(n) as pool:
        list(pool.map(add, ids))
    found = get_sample(engine, name)
    assert (len(found.images), found.stats.white_cells, found.stats.blasts) == (n, 20 * n, 5 * n)
    assert found.stats.verdict == "flagged"
    with Session(engine) as s:
        row = s.execute(
            text("SELECT images, white_cells, verdict FROM samples WHERE id = :i"), {"i": sample}
        ).one()
    assert tuple(row) == (n, 20 * n, "flagged")
