"""Cell types: each cell's type, probabilities and review flag; each result's differential.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CELL_TYPES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil", "blast")


def upgrade() -> None:
    # Results and cells recorded before this revision keep empty types: no classifier ran on them.
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("differential", sa.JSON(), server_default="{}", nullable=False))
        batch.add_column(sa.Column("review_cells", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(
            sa.Column("classifier_version", sa.String(length=64), server_default="", nullable=False)
        )
    with op.batch_alter_table("cells") as batch:
        batch.add_column(sa.Column("cell_type", sa.String(length=16), server_default="", nullable=False))
        batch.add_column(sa.Column("cell_type_probability", sa.Float(), server_default="0", nullable=False))
        batch.add_column(sa.Column("review", sa.Boolean(), server_default=sa.false(), nullable=False))
        for name in CELL_TYPES:
            batch.add_column(sa.Column(f"p_{name}", sa.Float(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("cells") as batch:
        for name in ("cell_type", "cell_type_probability", "review", *(f"p_{n}" for n in CELL_TYPES)):
            batch.drop_column(name)
    with op.batch_alter_table("results") as batch:
        for name in ("differential", "review_cells", "classifier_version"):
            batch.drop_column(name)
