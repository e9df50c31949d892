"""The tables: every row blastq keeps, and the states a job, a model version, a ledger entry may be in."""

from __future__ import annotations

from datetime import datetime

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
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JOB_STATES = ("queued", "running", "succeeded", "failed")
MODEL_STATES = ("candidate", "promoted", "retired")
# What a registered version is: the segmentation U-Net, or the per-cell classifier (migration 0006).
# One of each kind may be promoted.
MODEL_KINDS = ("unet", "classifier")
LEDGER_STATES = ("seen", "submitted", "rejected")
ROLES = ("viewer", "technologist", "pathologist", "admin")
# A sample's review: "in review" (cells being reclassified), "reviewed" (a technologist completed it,
# waiting for a pathologist), "signed off" (locked; an amendment opens a new version). A sample with no
# review row is "pre-classified": the analyser's call, unreviewed.
REVIEW_STATES = ("in review", "reviewed", "signed off")
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


def one_of(column: str, values: tuple[str, ...]) -> str:
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
        CheckConstraint(one_of("state", JOB_STATES), name="state"),
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
        CheckConstraint(one_of("state", LEDGER_STATES), name="state"),
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


# --- samples --------------------------------------------------------------------------------------

samples_table = SampleRow.__table__
members_table = SampleResultRow.__table__


jobs_table = JobRow.__table__


ledger_table = WatchLedgerRow.__table__


# --- the model registry -----------------------------------------------------------------------------


class ModelRow(Base):
    """One registered model version (the policy lives in core.adapters.registry). At most one of each kind
    is promoted: every state change takes the rows' locks in one transaction, and a partial unique index
    backs it."""

    __tablename__ = "models"
    __table_args__ = (
        CheckConstraint(one_of("state", MODEL_STATES), name="state"),
        CheckConstraint(one_of("kind", MODEL_KINDS), name="kind"),
        Index(
            "uq_models_one_promoted",
            "kind",
            "state",
            unique=True,
            postgresql_where=text("state = 'promoted'"),
            sqlite_where=text("state = 'promoted'"),
        ),
    )

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="unet", server_default="unet")
    state: Mapped[str] = mapped_column(String(16), index=True)
    sha256: Mapped[str] = mapped_column(String(64))  # of the checkpoint file
    checkpoint_key: Mapped[str] = mapped_column(String(300))  # store key: models/<version>/<sha256>.pt
    metrics: Mapped[str] = mapped_column(Text)  # JSON object, e.g. {"validation_score": 0.91}
    config: Mapped[str] = mapped_column(Text)  # JSON object: the training configuration
    split: Mapped[str] = mapped_column(Text)  # JSON object: the data split it was trained and validated on
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


models_table = ModelRow.__table__


# --- training runs (the trainer service) ------------------------------------------------------------

TRAINING_STATES = JOB_STATES


class TrainingRunRow(Base):
    """One training job of the trainer service: a row before it is a message, like a slide job.

    The trainer records each finished epoch here (with the store key of the state to resume from), so a
    killed trainer's run continues from its last epoch on the next delivery.
    """

    __tablename__ = "training_runs"
    __table_args__ = (CheckConstraint(one_of("state", TRAINING_STATES), name="state"),)

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


runs_table = TrainingRunRow.__table__


# --- the review station (migration 0006) ------------------------------------------------------------


class UserRow(Base):
    """A local account of the review station; the password only as an argon2 hash."""

    __tablename__ = "users"
    __table_args__ = (CheckConstraint(one_of("role", ROLES), name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    full_name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(256))
    active: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ReviewRow(Base):
    """One version of a sample's review. Version 1 opens on the first reclassification (or completion);
    an amendment of a signed-off version opens the next, which starts from the signed one's labels."""

    __tablename__ = "reviews"
    __table_args__ = (
        CheckConstraint(one_of("state", REVIEW_STATES), name="state"),
        UniqueConstraint("sample_id", "version", name="uq_reviews_sample_version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    opened_by: Mapped[str] = mapped_column(String(64))
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    reviewed_by: Mapped[str | None] = mapped_column(String(64))
    reviewed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    signed_by: Mapped[str | None] = mapped_column(String(64))
    signed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    amendment_reason: Mapped[str | None] = mapped_column(Text)
    # At sign-off: the figures before and after review, the verdicts and the model versions (JSON), so
    # the signed report reads the same whatever happens to the rows later.
    signed_figures: Mapped[dict | None] = mapped_column(JSON)


class CellLabelRow(Base):
    """A person's class for one cell in one review version. The cell is named by its result and its id
    within the result (stable: a result re-recorded under the same key has the same cells)."""

    __tablename__ = "cell_labels"
    __table_args__ = (UniqueConstraint("review_id", "result_id", "cell_id", name="uq_cell_labels_cell"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    review_id: Mapped[int] = mapped_column(ForeignKey("reviews.id", ondelete="CASCADE"), index=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    cell_id: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(16))
    labelled_by: Mapped[str] = mapped_column(String(64))
    labelled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class AuditRow(Base):
    """Every change a person makes to a sample's review: who, when, what (a cell from -> to, a state)."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    review_version: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    username: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(24))  # reclassify, complete, sign off, amend
    result_id: Mapped[int | None] = mapped_column(Integer)
    cell_id: Mapped[int | None] = mapped_column(Integer)
    from_label: Mapped[str | None] = mapped_column(String(16))
    to_label: Mapped[str | None] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(Text)


class WorkerRow(Base):
    """A process that takes jobs (a pool process of `blastq worker`, or the worker itself with the solo pool)
    and when it was last heard of: it writes heartbeat_at every BLASTQ_HEARTBEAT_S while it lives."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # hostname/pid, as jobs.worker records
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    parent: Mapped[str | None] = mapped_column(String(200))  # the `blastq worker` it belongs to: hostname/pid
    queues: Mapped[str] = mapped_column(String(100))
    version: Mapped[str] = mapped_column(String(40))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # a clean stop


users_table = UserRow.__table__
workers_table = WorkerRow.__table__
reviews_table = ReviewRow.__table__
labels_table = CellLabelRow.__table__
audit_table = AuditRow.__table__
