"""Results (one per slide, model and result key), their cells, and samples pooled from them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime

from sqlalchemy import (
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from blastq.core.adapters.db.engine import as_utc, reachable, utcnow
from blastq.core.adapters.db.schema import CellRow, ResultRow, jobs_table, members_table, samples_table
from blastq.core.common import NotFound

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
    with reachable(engine), Session(engine) as session, session.begin():
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
            row = ResultRow(**values, store_prefix=store_prefix, created_at=utcnow())
            session.add(row)
            session.flush()
        else:
            for k, v in values.items():
                setattr(row, k, v)
            row.store_prefix = store_prefix
            row.created_at = utcnow()  # when these figures were computed, not when the key first was
            session.execute(delete(CellRow).where(CellRow.result_id == row.id))
        session.add_all(CellRow(result_id=row.id, **_cell_values(c)) for c in cells)
        return row.id


def _cell_values(cell) -> dict:
    # getattr: cells recorded before CellRecord had a review reason (and tests' plain records) have none.
    reason = getattr(cell, "review_reason", "")
    return {**asdict(cell), "review_reason": str(reason) if reason else None}


def find_result(engine: Engine, sha256: str, model_version: str, params_key: str) -> int | None:
    """The id of the result for this slide content, model and parameters, if one is recorded."""
    with reachable(engine), engine.connect() as conn:
        return conn.scalar(
            select(ResultRow.id).where(
                ResultRow.sha256 == sha256,
                ResultRow.model_version == model_version,
                ResultRow.params_key == params_key,
            )
        )


def ensure_sample(engine: Engine, name: str, threshold_percent: float, min_white_cells: int) -> int:
    """The id of the sample `name`, made if new; its pool is judged by this threshold and minimum
    from now on (and judged again at once if they changed)."""
    from blastq.core.cells import check_sample_name

    name = check_sample_name(name)
    rule = {"threshold_percent": threshold_percent, "min_white_cells": min_white_cells}
    for attempt in range(2):
        now = utcnow()
        try:
            with reachable(engine), engine.begin() as conn:
                row = conn.execute(select(samples_table).where(samples_table.c.name == name)).first()
                if row is None:
                    empty = {
                        "images": 0, "white_cells": 0, "blasts": 0, "blast_percent": 0.0, "flagged": False,
                        "verdict": "insufficient cells", "differential": {}, "review_cells": 0,
                    }  # fmt: skip
                    values = {"name": name, **rule, **empty, "created_at": now, "updated_at": now}
                    (sample_id,) = conn.execute(insert(samples_table).values(**values)).inserted_primary_key
                    return sample_id
                if (row.threshold_percent, row.min_white_cells) != tuple(rule.values()):
                    conn.execute(
                        update(samples_table)
                        .where(samples_table.c.id == row.id)
                        .values(**rule, updated_at=now)
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
    with reachable(engine), engine.begin() as conn:
        locked = conn.execute(
            update(samples_table).where(samples_table.c.id == sample_id).values(updated_at=utcnow())
        )
        if locked.rowcount != 1:
            raise NotFound(f"no sample {sample_id}", value=sample_id)
        sha256 = conn.scalar(select(ResultRow.sha256).where(ResultRow.id == result_id))
        if sha256 is None:
            raise NotFound(f"no result {result_id}", value=result_id)
        member = (members_table.c.sample_id == sample_id, members_table.c.sha256 == sha256)
        if conn.execute(select(members_table.c.result_id).where(*member)).first() is None:
            conn.execute(
                insert(members_table).values(
                    sample_id=sample_id, sha256=sha256, result_id=result_id, added_at=utcnow()
                )
            )
        else:
            conn.execute(update(members_table).where(*member).values(result_id=result_id, added_at=utcnow()))
        return _refresh_sample(conn, sample_id)


def _refresh_sample(conn: Connection, sample_id: int):
    """Pool the sample from its member results (never incrementally) and store the figures."""
    result = _sample_result(
        conn, conn.execute(select(samples_table).where(samples_table.c.id == sample_id)).one()
    )
    s = result.stats
    conn.execute(
        update(samples_table)
        .where(samples_table.c.id == sample_id)
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
        .join(members_table, members_table.c.result_id == ResultRow.__table__.c.id)
        .where(members_table.c.sample_id == sample.id)
        .order_by(members_table.c.added_at, ResultRow.__table__.c.id)
    )
    infos = [ResultInfo(**{n: as_utc(getattr(r, n)) for n in names}) for r in rows]
    images = [SampleImage(i.image, i.sha256, i.stats(), i.id) for i in infos]
    counts = dict(
        conn.execute(
            select(jobs_table.c.state, func.count())
            .where(jobs_table.c.sample_id == sample.id, jobs_table.c.sha256.not_in([i.sha256 for i in infos]))
            .group_by(jobs_table.c.state)
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
    with reachable(engine), engine.connect() as conn:
        row = conn.execute(select(samples_table).where(samples_table.c.name == name)).first()
        return None if row is None else _sample_result(conn, row)


def list_samples(engine: Engine) -> list:
    """Every sample (core.cells.stats.SampleResult), oldest first."""
    with reachable(engine), engine.connect() as conn:
        rows = conn.execute(
            select(samples_table).order_by(samples_table.c.created_at, samples_table.c.id)
        ).all()
        return [_sample_result(conn, r) for r in rows]


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
                select(members_table.c.result_id)
                .join(samples_table, samples_table.c.id == members_table.c.sample_id)
                .where(samples_table.c.name == sample)
            )
        )
    if batch_id is not None:
        query = query.where(
            ResultRow.__table__.c.id.in_(
                select(jobs_table.c.result_id).where(
                    jobs_table.c.batch_id == batch_id, jobs_table.c.result_id.is_not(None)
                )
            )
        )
    if flagged is not None:
        query = query.where(ResultRow.__table__.c.flagged.is_(flagged))
    if since is not None:
        query = query.where(ResultRow.__table__.c.created_at >= since.astimezone(UTC))
    if min_blast_percent is not None:
        query = query.where(ResultRow.__table__.c.blast_percent >= min_blast_percent)
    names = [f.name for f in fields(ResultInfo)]
    with reachable(engine), engine.connect() as conn:
        rows = conn.execute(query.order_by(ResultRow.__table__.c.created_at, ResultRow.__table__.c.id))
        return [ResultInfo(**{n: as_utc(getattr(r, n)) for n in names}) for r in rows]
