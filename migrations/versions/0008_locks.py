"""locks: operators' standing refusals of a workload, owner, task type or issuer

A lock refuses every start, claim and approval it matches until it is removed or its
`expires_at` passes (by the database's clock). `expiry_recorded_at` is when the
scheduler recorded `lock.expired`, once per lock. The partial index holds only the
locks that may still refuse something, so the check every start makes scans a handful of
rows however many locks history holds.

An older build ignores the table: it refuses nothing by it.

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "locks",
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("workload", sa.Text(), nullable=True),
        sa.Column("owner", sa.String(length=200), nullable=True),
        sa.Column("task", sa.String(length=64), nullable=True),
        sa.Column("issuer", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("removed_by", sa.Text(), nullable=True),
        sa.Column("expiry_recorded_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "workload IS NOT NULL OR owner IS NOT NULL OR task IS NOT NULL OR issuer IS NOT NULL",
            name=op.f("ck_locks_target"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_locks")),
    )
    op.create_index(
        "ix_locks_live",
        "locks",
        ["created_at"],
        postgresql_where=sa.text("removed_at IS NULL AND expiry_recorded_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_locks_live", table_name="locks")
    op.drop_table("locks")
