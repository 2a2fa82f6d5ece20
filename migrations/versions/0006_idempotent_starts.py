"""idempotent starts: tasks.idempotency_key, tasks.idempotency_hash

`POST /task/start` takes an Idempotency-Key (docs/api.md#idempotent-starts): the task a
key started is found by (workload, key), unique among the tasks that still hold a key.

An older build ignores the header and the columns; a retry it answers starts a new task,
as before.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("idempotency_key", sa.String(length=255), nullable=True))
    op.add_column("tasks", sa.Column("idempotency_hash", sa.String(length=64), nullable=True))
    op.create_index(
        "uq_tasks_workload_idempotency_key",
        "tasks",
        ["workload", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "uq_tasks_workload_idempotency_key",
        table_name="tasks",
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.drop_column("tasks", "idempotency_hash")
    op.drop_column("tasks", "idempotency_key")
