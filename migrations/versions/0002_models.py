"""The model registry: one row per registered model version.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("checkpoint_key", sa.String(length=300), nullable=False),
        sa.Column("metrics", sa.Text(), nullable=False),
        sa.Column("config", sa.Text(), nullable=False),
        sa.Column("split", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("state IN ('candidate', 'promoted', 'retired')", name=op.f("ck_models_state")),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_models")),
    )
    op.create_index(op.f("ix_models_state"), "models", ["state"])
    # At most one promoted version, whatever the code does (the registry also locks the rows).
    op.create_index(
        "uq_models_one_promoted",
        "models",
        ["state"],
        unique=True,
        postgresql_where=sa.text("state = 'promoted'"),
        sqlite_where=sa.text("state = 'promoted'"),
    )


def downgrade() -> None:
    op.drop_table("models")  # its indexes go with it on both backends
