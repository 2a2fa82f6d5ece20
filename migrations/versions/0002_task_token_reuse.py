"""task token reuse: tasks.token_released_at

A finish that revoked every lease of its task may hand the task's Vault token back to
its process's pool for the next task of the same type. The row then records that the
token left this task alive on purpose, and the scheduler's retirement (which revokes
the tokens of ended tasks) must skip it: its partial index is rebuilt to leave released
tokens out, or it would grow with every reuse.

A scheduler of an older build does not know the column and would retire a released
token under the task that took it next: run mixed fleets with
`vault.task_token_reuse: false` until every replica runs this build (docs/operations.md).

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD = "token_accessor IS NOT NULL AND token_revoked_at IS NULL"
_NEW = "token_accessor IS NOT NULL AND token_revoked_at IS NULL AND token_released_at IS NULL"


def upgrade() -> None:
    op.add_column("tasks", sa.Column("token_released_at", sa.DateTime(timezone=True), nullable=True))
    op.drop_index("ix_tasks_token_unrevoked", table_name="tasks", postgresql_where=sa.text(_OLD))
    op.create_index(
        "ix_tasks_token_unrevoked", "tasks", ["finished_at"], unique=False, postgresql_where=sa.text(_NEW)
    )


def downgrade() -> None:
    # Released tokens would look unrevoked to the old scheduler, which would then revoke
    # them under the task that now uses them; mark them revoked instead (they expire).
    op.execute("UPDATE tasks SET token_revoked_at = token_released_at WHERE token_released_at IS NOT NULL")
    op.drop_index("ix_tasks_token_unrevoked", table_name="tasks", postgresql_where=sa.text(_NEW))
    op.create_index(
        "ix_tasks_token_unrevoked", "tasks", ["finished_at"], unique=False, postgresql_where=sa.text(_OLD)
    )
    op.drop_column("tasks", "token_released_at")
