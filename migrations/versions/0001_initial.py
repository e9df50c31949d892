"""The initial schema: batches, jobs, results, cells and the watcher's ledger.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Databases written by blastq before migrations already hold `results` and `cells`, created from the
same models with the same names: those two tables are kept (with their rows) when present.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _existing_tables() -> set[str]:
    if context.is_offline_mode():
        return set()
    return set(sa.inspect(op.get_bind()).get_table_names())


def upgrade() -> None:
    existing = _existing_tables()

    op.create_table(
        "batches",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
    )
    op.create_index(op.f("ix_batches_created_at"), "batches", ["created_at"])
    op.create_index(op.f("ix_batches_name"), "batches", ["name"])

    if "results" not in existing:
        op.create_table(
            "results",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("sha256", sa.String(length=64), nullable=False),
            sa.Column("model_version", sa.String(length=64), nullable=False),
            sa.Column("params_key", sa.String(length=32), nullable=False),
            sa.Column("image", sa.String(length=512), nullable=False),
            sa.Column("width", sa.Integer(), nullable=False),
            sa.Column("height", sa.Integer(), nullable=False),
            sa.Column("mpp", sa.Float(), nullable=False),
            sa.Column("mpp_source", sa.String(length=16), nullable=False),
            sa.Column("white_cells", sa.Integer(), nullable=False),
            sa.Column("blasts", sa.Integer(), nullable=False),
            sa.Column("blast_percent", sa.Float(), nullable=False),
            sa.Column("flagged", sa.Boolean(), nullable=False),
            sa.Column("threshold_percent", sa.Float(), nullable=False),
            sa.Column("seconds", sa.Float(), nullable=False),
            sa.Column("store_prefix", sa.String(length=256), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("id", name=op.f("pk_results")),
            sa.UniqueConstraint("sha256", "model_version", "params_key", name=op.f("uq_result_identity")),
        )
        op.create_index(op.f("ix_results_blast_percent"), "results", ["blast_percent"])
        op.create_index(op.f("ix_results_created_at"), "results", ["created_at"])
        op.create_index(op.f("ix_results_flagged"), "results", ["flagged"])
        op.create_index(op.f("ix_results_sha256"), "results", ["sha256"])

    if "cells" not in existing:
        op.create_table(
            "cells",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("result_id", sa.Integer(), nullable=False),
            sa.Column("cell_id", sa.Integer(), nullable=False),
            sa.Column("label", sa.String(length=16), nullable=False),
            sa.Column("centroid_x", sa.Float(), nullable=False),
            sa.Column("centroid_y", sa.Float(), nullable=False),
            sa.Column("bbox_x0", sa.Integer(), nullable=False),
            sa.Column("bbox_y0", sa.Integer(), nullable=False),
            sa.Column("bbox_x1", sa.Integer(), nullable=False),
            sa.Column("bbox_y1", sa.Integer(), nullable=False),
            sa.Column("area_px", sa.Integer(), nullable=False),
            sa.Column("area_um2", sa.Float(), nullable=False),
            sa.Column("perimeter_um", sa.Float(), nullable=False),
            sa.Column("circularity", sa.Float(), nullable=False),
            sa.Column("nucleus_area_px", sa.Integer(), nullable=False),
            sa.Column("nucleus_area_um2", sa.Float(), nullable=False),
            sa.Column("nc_ratio", sa.Float(), nullable=False),
            sa.Column("mean_r", sa.Float(), nullable=False),
            sa.Column("mean_g", sa.Float(), nullable=False),
            sa.Column("mean_b", sa.Float(), nullable=False),
            sa.Column("blast_probability", sa.Float(), nullable=False),
            sa.ForeignKeyConstraint(
                ["result_id"], ["results.id"], name=op.f("fk_cells_result_id_results"), ondelete="CASCADE"
            ),
            sa.PrimaryKeyConstraint("id", name=op.f("pk_cells")),
        )
        op.create_index(op.f("ix_cells_result_id"), "cells", ["result_id"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("batch_id", sa.String(length=36), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("filename", sa.String(length=512), nullable=False),
        sa.Column("input_key", sa.String(length=300), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("mpp", sa.Float(), nullable=True),
        sa.Column("params_key", sa.String(length=32), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("result_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "state IN ('queued', 'running', 'succeeded', 'failed')", name=op.f("ck_jobs_state")
        ),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name=op.f("fk_jobs_batch_id_batches")),
        sa.ForeignKeyConstraint(["result_id"], ["results.id"], name=op.f("fk_jobs_result_id_results")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_batch_id"), "jobs", ["batch_id"])
    op.create_index(op.f("ix_jobs_result_id"), "jobs", ["result_id"])
    op.create_index(op.f("ix_jobs_sha256"), "jobs", ["sha256"])
    op.create_index(op.f("ix_jobs_state_updated_at"), "jobs", ["state", "updated_at"])

    op.create_table(
        "watch_ledger",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("root", sa.String(length=1000), nullable=False),
        sa.Column("relpath", sa.String(length=1000), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("mtime_ns", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("job_id", sa.String(length=36), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("state IN ('seen', 'submitted', 'rejected')", name=op.f("ck_watch_ledger_state")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_watch_ledger_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_watch_ledger")),
        sa.UniqueConstraint("root", "relpath", "size", "mtime_ns", name=op.f("uq_watch_ledger_file")),
    )


def downgrade() -> None:
    # Dropping a table drops its indexes on both backends.
    for table in ("watch_ledger", "jobs", "cells", "results", "batches"):
        op.drop_table(table)
