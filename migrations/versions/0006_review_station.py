"""The review station: local users, review versions of a sample, people's cell labels, the audit trail;
the registry holds cell classifiers beside U-Nets (models.kind), one promoted of each kind.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("full_name", sa.String(length=200), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("password_hash", sa.String(length=256), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "role IN ('viewer', 'technologist', 'pathologist', 'admin')", name=op.f("ck_users_role")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("username", name=op.f("uq_users_username")),
    )
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("opened_by", sa.String(length=64), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reviewed_by", sa.String(length=64), nullable=True),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("signed_by", sa.String(length=64), nullable=True),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("amendment_reason", sa.Text(), nullable=True),
        sa.Column("signed_figures", sa.JSON(), nullable=True),
        sa.CheckConstraint(
            "state IN ('in review', 'reviewed', 'signed off')", name=op.f("ck_reviews_state")
        ),
        sa.ForeignKeyConstraint(
            ["sample_id"], ["samples.id"], name=op.f("fk_reviews_sample_id_samples"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reviews")),
        sa.UniqueConstraint("sample_id", "version", name="uq_reviews_sample_version"),
    )
    op.create_index(op.f("ix_reviews_sample_id"), "reviews", ["sample_id"])
    op.create_table(
        "cell_labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("review_id", sa.Integer(), nullable=False),
        sa.Column("result_id", sa.Integer(), nullable=False),
        sa.Column("cell_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=16), nullable=False),
        sa.Column("labelled_by", sa.String(length=64), nullable=False),
        sa.Column("labelled_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["review_id"], ["reviews.id"], name=op.f("fk_cell_labels_review_id_reviews"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["result_id"], ["results.id"], name=op.f("fk_cell_labels_result_id_results"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cell_labels")),
        sa.UniqueConstraint("review_id", "result_id", "cell_id", name="uq_cell_labels_cell"),
    )
    op.create_index(op.f("ix_cell_labels_review_id"), "cell_labels", ["review_id"])
    op.create_index(op.f("ix_cell_labels_result_id"), "cell_labels", ["result_id"])
    op.create_index(op.f("ix_cell_labels_labelled_at"), "cell_labels", ["labelled_at"])
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("review_version", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=24), nullable=False),
        sa.Column("result_id", sa.Integer(), nullable=True),
        sa.Column("cell_id", sa.Integer(), nullable=True),
        sa.Column("from_label", sa.String(length=16), nullable=True),
        sa.Column("to_label", sa.String(length=16), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["sample_id"], ["samples.id"], name=op.f("fk_audit_sample_id_samples"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit")),
    )
    op.create_index(op.f("ix_audit_sample_id"), "audit", ["sample_id"])

    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), server_default="unet", nullable=False))
        batch.create_check_constraint("kind", "kind IN ('unet', 'classifier')")
    op.drop_index("uq_models_one_promoted", table_name="models")
    op.create_index(
        "uq_models_one_promoted",
        "models",
        ["kind", "state"],
        unique=True,
        postgresql_where=sa.text("state = 'promoted'"),
        sqlite_where=sa.text("state = 'promoted'"),
    )


def downgrade() -> None:
    op.drop_index("uq_models_one_promoted", table_name="models")
    op.execute(sa.text("DELETE FROM models WHERE kind <> 'unet'"))
    with op.batch_alter_table("models") as batch:
        batch.drop_constraint("kind", type_="check")
        batch.drop_column("kind")
    op.create_index(
        "uq_models_one_promoted",
        "models",
        ["state"],
        unique=True,
        postgresql_where=sa.text("state = 'promoted'"),
        sqlite_where=sa.text("state = 'promoted'"),
    )
    op.drop_table("audit")
    op.drop_table("cell_labels")
    op.drop_table("reviews")
    op.drop_table("users")
