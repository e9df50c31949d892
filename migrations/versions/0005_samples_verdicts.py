"""Verdicts and samples: each result's verdict and minimum; samples pooling their images; jobs' sample;
each cell's review reason.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

Results recorded before this revision were judged without a minimum of white cells. They are judged
again by the default rule (100): fewer cells give "insufficient cells", and such a row is no longer
flagged. Their result keys predate the scale and the model's sha256, so no new run reuses them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT_MIN_WHITE_CELLS = 100  # core.stats.DEFAULT_MIN_WHITE_CELLS when this revision was written


def upgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("verdict", sa.String(length=24), server_default="", nullable=False))
        batch.add_column(sa.Column("min_white_cells", sa.Integer(), server_default="0", nullable=False))
    op.execute(
        sa.text(
            "UPDATE results SET min_white_cells = :least, verdict = CASE"
            " WHEN white_cells = 0 OR white_cells < :least THEN 'insufficient cells'"
            " WHEN flagged THEN 'flagged' ELSE 'not flagged' END"
        ).bindparams(least=DEFAULT_MIN_WHITE_CELLS)
    )
    op.execute(sa.text("UPDATE results SET flagged = false WHERE verdict = 'insufficient cells'"))
    # Every writer gives both from now on: no default hides a row recorded without a verdict.
    with op.batch_alter_table("results") as batch:
        batch.alter_column("verdict", server_default=None)
        batch.alter_column("min_white_cells", server_default=None)
    with op.batch_alter_table("cells") as batch:
        batch.add_column(sa.Column("review_reason", sa.Text(), nullable=True))

    op.create_table(
        "samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("threshold_percent", sa.Float(), nullable=False),
        sa.Column("min_white_cells", sa.Integer(), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("white_cells", sa.Integer(), nullable=False),
        sa.Column("blasts", sa.Integer(), nullable=False),
        sa.Column("blast_percent", sa.Float(), nullable=False),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.Column("verdict", sa.String(length=24), nullable=False),
        sa.Column("differential", sa.JSON(), nullable=False),
        sa.Column("review_cells", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_samples")),
        sa.UniqueConstraint("name", name=op.f("uq_samples_name")),
    )
    op.create_table(
        "sample_results",
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("result_id", sa.Integer(), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["sample_id"],
            ["samples.id"],
            name=op.f("fk_sample_results_sample_id_samples"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["result_id"],
            ["results.id"],
            name=op.f("fk_sample_results_result_id_results"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("sample_id", "sha256", name=op.f("pk_sample_results")),
    )
    op.create_index(op.f("ix_sample_results_result_id"), "sample_results", ["result_id"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("sample_id", sa.Integer(), nullable=True))
        batch.create_index(op.f("ix_jobs_sample_id"), ["sample_id"])
        batch.create_foreign_key(op.f("fk_jobs_sample_id_samples"), "samples", ["sample_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("fk_jobs_sample_id_samples"), type_="foreignkey")
        batch.drop_index(op.f("ix_jobs_sample_id"))
        batch.drop_column("sample_id")
    op.drop_table("sample_results")  # its index goes with it on both backends
    op.drop_table("samples")
    with op.batch_alter_table("cells") as batch:
        batch.drop_column("review_reason")
    with op.batch_alter_table("results") as batch:
        batch.drop_column("min_white_cells")
        batch.drop_column("verdict")
