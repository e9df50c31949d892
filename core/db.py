"""The database adapter: results and cells as rows (SQLAlchemy 2).

A result is keyed by (slide sha256, model version, pipeline parameters key): recording the same
slide again replaces its row and its cells, never duplicates them.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    delete,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from blastq.core.errors import DatabaseUnavailable


class Base(DeclarativeBase):
    pass


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


def connect(url: str) -> Engine:
    """An engine with the schema in place (Alembic migrations take over with the slide service)."""
    if url.startswith("sqlite:///"):
        from pathlib import Path

        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    try:
        Base.metadata.create_all(engine)
    except OperationalError as exc:
        raise DatabaseUnavailable(f"database not reachable: {exc.orig}") from exc
    return engine


def record_result(engine: Engine, summary: dict, cells, store_prefix: str) -> int:
    """Upsert one result and replace its cells; returns the result id."""
    keys = {c.name for c in ResultRow.__table__.columns} - {"id", "store_prefix", "created_at"}
    fields = {k: summary[k] for k in keys}
    try:
        with Session(engine) as session, session.begin():
            row = session.scalar(
                select(ResultRow).where(
                    ResultRow.sha256 == fields["sha256"],
                    ResultRow.model_version == fields["model_version"],
                    ResultRow.params_key == fields["params_key"],
                )
            )
            if row is None:
                row = ResultRow(**fields, store_prefix=store_prefix, created_at=datetime.now(UTC))
                session.add(row)
                session.flush()
            else:
                for k, v in fields.items():
                    setattr(row, k, v)
                row.store_prefix = store_prefix
                session.execute(delete(CellRow).where(CellRow.result_id == row.id))
            session.add_all(CellRow(result_id=row.id, **asdict(c)) for c in cells)
            return row.id
    except OperationalError as exc:
        raise DatabaseUnavailable(f"database not reachable: {exc.orig}") from exc
