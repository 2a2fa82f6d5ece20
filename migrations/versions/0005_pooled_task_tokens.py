"""pooled task tokens: task_tokens

A process's ready task tokens were known only to that process, so a SIGKILLed worker left
them alive in Vault until their TTL. Each is now recorded here before it can be used,
under its holder's lease; the scheduler revokes the tokens of a holder whose lease ran out.

An older build neither writes nor reads the table: in a mixed fleet its pooled tokens stay
unrecorded, as before, and nothing of the new build's is mistaken by it.

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "task_tokens",
        sa.Column("accessor", sa.String(length=128), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("accessor", name=op.f("pk_task_tokens")),
    )
    op.create_index("ix_task_tokens_lease_until", "task_tokens", ["lease_until"], unique=False)
    op.create_index("ix_task_tokens_holder", "task_tokens", ["holder"], unique=False)


def downgrade() -> None:
    # The recorded tokens are forgotten, not revoked: they expire at their TTL, as before.
    op.drop_index("ix_task_tokens_holder", table_name="task_tokens")
    op.drop_index("ix_task_tokens_lease_until", table_name="task_tokens")
    op.drop_table("task_tokens")
