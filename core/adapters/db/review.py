"""Reviews: people reclassify a sample's cells, a technologist completes, a pathologist signs off.

A sample's review has versions. Version 1 opens with the first change; "in review" -> "reviewed"
(completed) -> "signed off" (locked, its figures kept as signed). An amendment opens the next version from
the signed one's labels; nothing signed is ever overwritten. Every change is an audit row. A cell's class
is its label in the current version, else the analyser's; the figures are recomputed from those classes
(`core.cells.class_stats`) on every read, never kept incrementally.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from sqlalchemy import and_, delete, func, insert, select, update
from sqlalchemy.engine import Connection, Engine

from blastq.core.adapters.db.engine import as_utc, reachable, utcnow
from blastq.core.adapters.db.schema import (
    CellRow,
    ResultRow,
    audit_table,
    jobs_table,
    labels_table,
    members_table,
    reviews_table,
    samples_table,
)
from blastq.core.common import NotFound, ReviewConflict

PRE_CLASSIFIED = "pre-classified"  # a sample nobody has reviewed yet: no review row
IN_REVIEW, REVIEWED, SIGNED_OFF = "in review", "reviewed", "signed off"
SAMPLE_STATES = (PRE_CLASSIFIED, IN_REVIEW, REVIEWED, SIGNED_OFF)
cells_table = CellRow.__table__
results_table = ResultRow.__table__


@dataclass(frozen=True)
class ReviewCell:
    """One cell of a sample under review: what the analyser said and what it is now."""

    result_id: int
    cell_id: int
    image: str
    analyser: str  # the analyser's class (core.cells.analyser_class)
    current: str  # the reviewed class: a person's label in this version, else the analyser's
    flagged_for_review: bool  # the analyser was unsure (or could not type it)
    review_reason: str
    type_probability: float
    blast_probability: float
    centroid_x: float
    centroid_y: float
    area_um2: float
    nc_ratio: float
    labelled_by: str | None  # who gave `current`, when a person did
    circularity: float = 0.0
    nucleus_area_um2: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.result_id}-{self.cell_id}"


@dataclass(frozen=True)
class ReviewState:
    sample_id: int
    sample: str
    state: str  # one of SAMPLE_STATES
    version: int  # 0 while pre-classified
    opened_by: str | None = None
    reviewed_by: str | None = None
    reviewed_at: datetime | None = None
    signed_by: str | None = None
    signed_at: datetime | None = None
    amendment_reason: str | None = None
    signed_figures: dict | None = None


@dataclass(frozen=True)
class ImageInfo:
    result_id: int
    image: str
    width: int
    height: int
    mpp: float
    store_prefix: str
    model_version: str
    classifier_version: str


@dataclass(frozen=True)
class SampleReview:
    """A sample as the review station shows it: its state, images, cells and figures before and after."""

    state: ReviewState
    threshold_percent: float
    min_white_cells: int
    images: tuple[ImageInfo, ...]
    cells: tuple[ReviewCell, ...]
    pending: int  # images submitted and not finished

    def before(self):
        """The analyser's figures (core.cells.SlideStats)."""
        from blastq.core.cells import class_stats

        return class_stats([c.analyser for c in self.cells], self.threshold_percent, self.min_white_cells)

    def after(self):
        """The figures with every person's reclassification in."""
        from blastq.core.cells import class_stats

        return class_stats([c.current for c in self.cells], self.threshold_percent, self.min_white_cells)

    def changed(self) -> int:
        return sum(1 for c in self.cells if c.current != c.analyser)

    def figures(self) -> dict:
        """Before and after, verdicts, models: what a signature is put to (kept with the signed version)."""
        before, after = self.before(), self.after()
        return {
            "before": stats_dict(before),
            "after": stats_dict(after),
            "cells_reclassified": self.changed(),
            "models": sorted({i.model_version for i in self.images}),
            "classifiers": sorted({i.classifier_version for i in self.images if i.classifier_version}),
            "images": [i.image for i in self.images],
        }


def stats_dict(s) -> dict:
    """The figures a review shows of core.cells.SlideStats, as JSON."""
    return {
        "white_cells": s.white_cells,
        "blasts": s.blasts,
        "blast_percent": s.blast_percent,
        "verdict": s.verdict,
        "differential": s.differential,
    }


@dataclass(frozen=True)
class AuditEntry:
    at: datetime
    username: str
    action: str
    version: int
    result_id: int | None
    cell_id: int | None
    from_label: str | None
    to_label: str | None
    note: str | None


@dataclass(frozen=True)
class WorklistEntry:
    sample_id: int
    name: str
    state: str
    version: int
    images: int
    white_cells: int
    blasts: int
    blast_percent: float
    verdict: str
    review_cells: int
    pending: int
    created_at: datetime
    updated_at: datetime


# --- reading ----------------------------------------------------------------------------------------


def _sample_row(conn: Connection, name: str, lock: bool = False):
    if lock:  # an UPDATE takes the row lock on every backend, so review steps on one sample go in turn
        touched = conn.execute(
            update(samples_table).where(samples_table.c.name == name).values(updated_at=utcnow())
        )
        if touched.rowcount != 1:
            raise NotFound(f"no sample named {name!r}", value=name)
    row = conn.execute(select(samples_table).where(samples_table.c.name == name)).first()
    if row is None:
        raise NotFound(f"no sample named {name!r}", value=name)
    return row


def _latest(conn: Connection, sample_id: int):
    return conn.execute(
        select(reviews_table)
        .where(reviews_table.c.sample_id == sample_id)
        .order_by(reviews_table.c.version.desc())
        .limit(1)
    ).first()


def _state(sample, review) -> ReviewState:
    if review is None:
        return ReviewState(sample.id, sample.name, PRE_CLASSIFIED, 0)
    return ReviewState(
        sample.id,
        sample.name,
        review.state,
        review.version,
        review.opened_by,
        review.reviewed_by,
        as_utc(review.reviewed_at),
        review.signed_by,
        as_utc(review.signed_at),
        review.amendment_reason,
        review.signed_figures,
    )


def _review(conn: Connection, sample) -> SampleReview:
    from blastq.core.cells import analyser_class

    review = _latest(conn, sample.id)
    images = conn.execute(
        select(results_table)
        .join(members_table, members_table.c.result_id == results_table.c.id)
        .where(members_table.c.sample_id == sample.id)
        .order_by(members_table.c.added_at, results_table.c.id)
    ).all()
    labels = {}
    if review is not None:
        for r in conn.execute(select(labels_table).where(labels_table.c.review_id == review.id)):
            labels[(r.result_id, r.cell_id)] = r
    names = {r.id: r.image for r in images}
    rows = conn.execute(
        select(cells_table)
        .where(cells_table.c.result_id.in_(list(names)))
        .order_by(cells_table.c.result_id, cells_table.c.cell_id)
    ).all()
    cells = []
    for c in rows:
        analyser = analyser_class(c.cell_type, c.label)
        label = labels.get((c.result_id, c.cell_id))
        cells.append(
            ReviewCell(
                result_id=c.result_id,
                cell_id=c.cell_id,
                image=names[c.result_id],
                analyser=analyser,
                current=label.label if label is not None else analyser,
                flagged_for_review=bool(c.review),
                review_reason=c.review_reason or "",
                type_probability=c.cell_type_probability,
                blast_probability=c.blast_probability,
                centroid_x=c.centroid_x,
                centroid_y=c.centroid_y,
                area_um2=c.area_um2,
                nc_ratio=c.nc_ratio,
                labelled_by=label.labelled_by if label is not None else None,
                circularity=c.circularity,
                nucleus_area_um2=c.nucleus_area_um2,
            )
        )
    order = {r.id: i for i, r in enumerate(images)}
    cells.sort(key=lambda c: (order[c.result_id], c.cell_id))
    pending = conn.scalar(
        select(func.count()).where(
            jobs_table.c.sample_id == sample.id, jobs_table.c.state.in_(("queued", "running"))
        )
    )
    infos = tuple(
        ImageInfo(
            r.id, r.image, r.width, r.height, r.mpp, r.store_prefix, r.model_version, r.classifier_version
        )
        for r in images
    )
    return SampleReview(
        _state(sample, review),
        sample.threshold_percent,
        sample.min_white_cells,
        infos,
        tuple(cells),
        int(pending or 0),
    )


def sample_name(engine: Engine, sample_id: int) -> str:
    """The name of sample `sample_id` (NotFound if there is none)."""
    with reachable(engine), engine.connect() as conn:
        name = conn.scalar(select(samples_table.c.name).where(samples_table.c.id == sample_id))
    if name is None:
        raise NotFound(f"no sample {sample_id}", value=sample_id)
    return name


def result_prefix(engine: Engine, result_id: int) -> str:
    """Where result `result_id`'s files are in the store (NotFound if there is no such result)."""
    with reachable(engine), engine.connect() as conn:
        prefix = conn.scalar(select(results_table.c.store_prefix).where(results_table.c.id == result_id))
    if prefix is None:
        raise NotFound(f"no result {result_id}", value=result_id)
    return prefix


def note_in_audit(engine: Engine, name: str, user: str, action: str, note: str) -> None:
    """An event about the sample that changes nothing in it (a failed send to the LIS)."""
    with reachable(engine), engine.begin() as conn:
        sample = _sample_row(conn, name)
        review = _latest(conn, sample.id)
        _audit(conn, sample.id, review.version if review is not None else 0, user, action, note=note[:2000])


def sample_review(engine: Engine, name: str) -> SampleReview:
    """The sample `name` as it stands in review (NotFound if there is none)."""
    with reachable(engine), engine.connect() as conn:
        return _review(conn, _sample_row(conn, name))


def audit_trail(engine: Engine, name: str) -> list[AuditEntry]:
    """Every change to the sample's review, oldest first."""
    with reachable(engine), engine.connect() as conn:
        sample = _sample_row(conn, name)
        rows = conn.execute(
            select(audit_table).where(audit_table.c.sample_id == sample.id).order_by(audit_table.c.id)
        )
        return [
            AuditEntry(
                as_utc(r.at),
                r.username,
                r.action,
                r.review_version,
                r.result_id,
                r.cell_id,
                r.from_label,
                r.to_label,
                r.note,
            )
            for r in rows
        ]


def worklist(
    engine: Engine,
    *,
    state: str | None = None,
    batch_id: str | None = None,
    since: datetime | None = None,
) -> list[WorklistEntry]:
    """Samples to review: flagged and insufficient-cell ones first, then the rest; newest first within."""
    if state is not None and state not in SAMPLE_STATES:
        raise ValueError(f"unknown review state {state!r} (one of {', '.join(SAMPLE_STATES)})")
    latest = (
        select(reviews_table.c.sample_id, func.max(reviews_table.c.version).label("version"))
        .group_by(reviews_table.c.sample_id)
        .subquery()
    )
    current = (
        select(reviews_table.c.sample_id, reviews_table.c.state, reviews_table.c.version)
        .join(
            latest,
            and_(
                latest.c.sample_id == reviews_table.c.sample_id, latest.c.version == reviews_table.c.version
            ),
        )
        .subquery()
    )
    pending = (
        select(jobs_table.c.sample_id, func.count().label("pending"))
        .where(jobs_table.c.state.in_(("queued", "running")))
        .group_by(jobs_table.c.sample_id)
        .subquery()
    )
    query = (
        select(samples_table, current.c.state.label("review_state"), current.c.version, pending.c.pending)
        .outerjoin(current, current.c.sample_id == samples_table.c.id)
        .outerjoin(pending, pending.c.sample_id == samples_table.c.id)
    )
    if batch_id is not None:
        query = query.where(
            samples_table.c.id.in_(select(jobs_table.c.sample_id).where(jobs_table.c.batch_id == batch_id))
        )
    if since is not None:
        query = query.where(samples_table.c.updated_at >= since.astimezone(UTC))
    with reachable(engine), engine.connect() as conn:
        rows = conn.execute(query).all()
    entries = [
        WorklistEntry(
            r.id,
            r.name,
            r.review_state or PRE_CLASSIFIED,
            r.version or 0,
            r.images,
            r.white_cells,
            r.blasts,
            r.blast_percent,
            r.verdict,
            r.review_cells,
            int(r.pending or 0),
            as_utc(r.created_at),
            as_utc(r.updated_at),
        )
        for r in rows
    ]
    if state is not None:
        entries = [e for e in entries if e.state == state]
    # What needs a person first: flagged, then too few cells to judge, then the rest; newest first.
    urgency = {"flagged": 0, "insufficient cells": 1}
    entries.sort(key=lambda e: (urgency.get(e.verdict, 2), -e.created_at.timestamp(), e.name))
    return entries


@dataclass(frozen=True)
class LoneImage:
    """A recorded image that no sample holds (run or submitted without --sample): not reviewable until
    it is put in a sample of its own (`review_alone`)."""

    result_id: int
    image: str
    white_cells: int
    blasts: int
    blast_percent: float
    verdict: str
    created_at: datetime


def lone_images(engine: Engine, limit: int = 200) -> list[LoneImage]:
    """The newest `limit` recorded images that are in no sample, flagged first."""
    query = (
        select(results_table)
        .where(results_table.c.id.not_in(select(members_table.c.result_id)))
        .order_by(results_table.c.created_at.desc(), results_table.c.id.desc())
        .limit(limit)
    )
    with reachable(engine), engine.connect() as conn:
        rows = conn.execute(query).all()
    images = [
        LoneImage(r.id, r.image, r.white_cells, r.blasts, r.blast_percent, r.verdict, as_utc(r.created_at))
        for r in rows
    ]
    images.sort(key=lambda i: i.verdict != "flagged")  # stable: newest first within
    return images


def review_alone(engine: Engine, result_id: int) -> str:
    """Put a recorded image in a sample of its own (named "<image> #<result id>", judged by the rule its
    result was judged by) and return the sample's name; the same sample again on a second call."""
    from blastq.core.adapters.db.results import add_to_sample, ensure_sample
    from blastq.core.cells import SAMPLE_NAME_CHARS

    with reachable(engine), engine.connect() as conn:
        row = conn.execute(select(results_table).where(results_table.c.id == result_id)).first()
    if row is None:
        raise NotFound(f"no result {result_id}", value=result_id)
    suffix = f" #{result_id}"
    image = "".join(ch if ch.isprintable() else "_" for ch in row.image)
    name = image[: SAMPLE_NAME_CHARS - len(suffix)] + suffix
    sample_id = ensure_sample(engine, name, row.threshold_percent, row.min_white_cells)
    add_to_sample(engine, sample_id, result_id)
    return name


# --- changing ---------------------------------------------------------------------------------------


def _audit(conn: Connection, sample_id: int, version: int, user: str, action: str, **what) -> None:
    conn.execute(
        insert(audit_table).values(
            sample_id=sample_id, review_version=version, at=utcnow(), username=user, action=action, **what
        )
    )


def _open(conn: Connection, sample, user: str):
    """The sample's open review version, opening version 1 when there is none."""
    review = _latest(conn, sample.id)
    if review is None:
        conn.execute(
            insert(reviews_table).values(
                sample_id=sample.id, version=1, state=IN_REVIEW, opened_by=user, opened_at=utcnow()
            )
        )
        _audit(conn, sample.id, 1, user, "open")
        return _latest(conn, sample.id)
    if review.state == SIGNED_OFF:
        raise ReviewConflict(
            f"sample {sample.name!r} is signed off (version {review.version}): amend it to change it",
            value=sample.name,
        )
    return review


def reclassify(
    engine: Engine, name: str, cells: Sequence[tuple[int, int]], to_class: str, user: str
) -> SampleReview:
    """Give the cells (result id, cell id) of sample `name` the class `to_class`, as `user`.

    A completed review goes back to "in review" (what was completed has changed); a signed-off one is
    refused (ReviewConflict). Cells not of this sample are refused before anything changes."""
    from blastq.core.cells import REVIEW_CLASSES, analyser_class

    if to_class not in REVIEW_CLASSES:
        raise ValueError(f"unknown class {to_class!r} (one of {', '.join(REVIEW_CLASSES)})")
    wanted = list(dict.fromkeys((int(r), int(c)) for r, c in cells))
    if not wanted:
        raise ValueError("no cells given")
    with reachable(engine), engine.begin() as conn:
        sample = _sample_row(conn, name, lock=True)
        members = set(
            conn.scalars(select(members_table.c.result_id).where(members_table.c.sample_id == sample.id))
        )
        found = {}
        for result_id in {r for r, _ in wanted} & members:
            ids = [c for r, c in wanted if r == result_id]
            for row in conn.execute(
                select(cells_table.c.cell_id, cells_table.c.cell_type, cells_table.c.label).where(
                    cells_table.c.result_id == result_id, cells_table.c.cell_id.in_(ids)
                )
            ):
                found[(result_id, row.cell_id)] = analyser_class(row.cell_type, row.label)
        missing = [f"{r}-{c}" for r, c in wanted if (r, c) not in found]
        if missing:
            raise NotFound(f"cells {', '.join(missing[:5])} are not cells of sample {name!r}", value=missing)
        review = _open(conn, sample, user)
        if review.state == REVIEWED:
            conn.execute(
                update(reviews_table)
                .where(reviews_table.c.id == review.id)
                .values(state=IN_REVIEW, reviewed_by=None, reviewed_at=None)
            )
            _audit(conn, sample.id, review.version, user, "reopen", note="a cell changed after completion")
        labels = {
            (r.result_id, r.cell_id): r.label
            for r in conn.execute(select(labels_table).where(labels_table.c.review_id == review.id))
        }
        now = utcnow()
        for key in wanted:
            before = labels.get(key, found[key])
            if before == to_class:
                continue
            where = (
                labels_table.c.review_id == review.id,
                labels_table.c.result_id == key[0],
                labels_table.c.cell_id == key[1],
            )
            conn.execute(delete(labels_table).where(*where))
            conn.execute(
                insert(labels_table).values(
                    review_id=review.id,
                    result_id=key[0],
                    cell_id=key[1],
                    label=to_class,
                    labelled_by=user,
                    labelled_at=now,
                )
            )
            _audit(
                conn,
                sample.id,
                review.version,
                user,
                "reclassify",
                result_id=key[0],
                cell_id=key[1],
                from_label=before,
                to_label=to_class,
            )
        return _review(conn, sample)


def complete_review(engine: Engine, name: str, user: str) -> SampleReview:
    """A technologist has looked at every cell: the review waits for a pathologist's sign-off."""
    with reachable(engine), engine.begin() as conn:
        sample = _sample_row(conn, name, lock=True)
        review = _open(conn, sample, user)
        if review.state == REVIEWED:
            raise ReviewConflict(f"sample {name!r} is already completed by {review.reviewed_by}", value=name)
        conn.execute(
            update(reviews_table)
            .where(reviews_table.c.id == review.id)
            .values(state=REVIEWED, reviewed_by=user, reviewed_at=utcnow())
        )
        _audit(conn, sample.id, review.version, user, "complete")
        return _review(conn, sample)


def sign_off(engine: Engine, name: str, user: str) -> SampleReview:
    """A second person signs the completed review: it is locked and its figures kept as signed."""
    with reachable(engine), engine.begin() as conn:
        sample = _sample_row(conn, name, lock=True)
        review = _latest(conn, sample.id)
        if review is None or review.state != REVIEWED:
            state = PRE_CLASSIFIED if review is None else review.state
            raise ReviewConflict(
                f"sample {name!r} is {state}: a review is signed off once completed", value=name
            )
        if review.reviewed_by == user:
            raise ReviewConflict(
                f"sample {name!r} was completed by {user}: a second person signs it off", value=name
            )
        figures = _review(conn, sample).figures()
        figures["reviewed_by"], figures["signed_by"] = review.reviewed_by, user
        conn.execute(
            update(reviews_table)
            .where(reviews_table.c.id == review.id)
            .values(state=SIGNED_OFF, signed_by=user, signed_at=utcnow(), signed_figures=figures)
        )
        _audit(conn, sample.id, review.version, user, "sign off")
        return _review(conn, sample)


def amend(engine: Engine, name: str, user: str, reason: str) -> SampleReview:
    """Open the next version of a signed-off review, from its labels; the signed version stays as it was."""
    reason = " ".join(reason.split())
    if not reason:
        raise ValueError("an amendment needs a reason")
    with reachable(engine), engine.begin() as conn:
        sample = _sample_row(conn, name, lock=True)
        review = _latest(conn, sample.id)
        if review is None or review.state != SIGNED_OFF:
            raise ReviewConflict(f"sample {name!r} is not signed off: change it directly", value=name)
        version = review.version + 1
        conn.execute(
            insert(reviews_table).values(
                sample_id=sample.id,
                version=version,
                state=IN_REVIEW,
                opened_by=user,
                opened_at=utcnow(),
                amendment_reason=reason[:2000],
            )
        )
        new = _latest(conn, sample.id)
        for r in conn.execute(select(labels_table).where(labels_table.c.review_id == review.id)).all():
            values = {k: v for k, v in r._mapping.items() if k not in ("id", "review_id")}
            conn.execute(insert(labels_table).values(review_id=new.id, **values))
        _audit(conn, sample.id, version, user, "amend", note=reason[:2000])
        return _review(conn, sample)


# --- learning from reviews -----------------------------------------------------------------------


@dataclass(frozen=True)
class ReviewedCell:
    """A cell whose class a person confirmed in a signed-off review: a labelled example."""

    sample: str
    result_id: int
    cell_id: int
    store_prefix: str
    mpp: float  # of the image it came from
    label: str
    analyser: str
    labelled_by: str  # who gave or confirmed the class
    signed_at: datetime
    # The cell's measurements (what a blast caller decides from).
    blast_probability: float = 0.0
    area_um2: float = 0.0
    nc_ratio: float = 0.0
    circularity: float = 0.0
    nucleus_area_um2: float = 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["signed_at"] = self.signed_at.isoformat()
        return d


def reviewed_cells(engine: Engine, since: datetime | None = None) -> list[ReviewedCell]:
    """Every cell of every sample whose newest signed-off version was signed at or after `since`: a
    person's label where one was given, else the analyser's class, which the reviewer confirmed."""
    with reachable(engine), engine.connect() as conn:
        signed = conn.execute(
            select(reviews_table, samples_table.c.name)
            .join(samples_table, samples_table.c.id == reviews_table.c.sample_id)
            .where(reviews_table.c.state == SIGNED_OFF)
            .order_by(reviews_table.c.sample_id, reviews_table.c.version.desc())
        ).all()
        newest = {}
        for r in signed:
            newest.setdefault(r.sample_id, r)
        out = []
        for sample_id, r in sorted(newest.items()):
            signed_at = as_utc(r.signed_at)
            if since is not None and signed_at < since.astimezone(UTC):
                continue
            sample = conn.execute(select(samples_table).where(samples_table.c.id == sample_id)).one()
            labels = {
                (x.result_id, x.cell_id): x
                for x in conn.execute(select(labels_table).where(labels_table.c.review_id == r.id))
            }
            review = _review(conn, sample)
            by_result = {i.result_id: i for i in review.images}
            for c in review.cells:
                label = labels.get((c.result_id, c.cell_id))
                image = by_result[c.result_id]
                out.append(
                    ReviewedCell(
                        sample=r.name,
                        result_id=c.result_id,
                        cell_id=c.cell_id,
                        store_prefix=image.store_prefix,
                        mpp=image.mpp,
                        label=label.label if label is not None else c.analyser,
                        analyser=c.analyser,
                        labelled_by=label.labelled_by if label is not None else (r.reviewed_by or ""),
                        signed_at=signed_at,
                        blast_probability=c.blast_probability,
                        area_um2=c.area_um2,
                        nc_ratio=c.nc_ratio,
                        circularity=c.circularity,
                        nucleus_area_um2=c.nucleus_area_um2,
                    )
                )
        return out
