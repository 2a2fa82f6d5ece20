"""gateway handles, and a notification when a task ends

`leases.name` widens to 128 characters, for a gateway's leases (credential and replica).
`gateway_handles` holds what a gateway credential's workload connects with: the handle's
id and a SCRAM verifier of its secret (never the secret). The `tasks_ended` trigger
NOTIFYs `broker_task_ended` with the task id when a task that has handles leaves its open
states, on every path that ends one (a finish, the deadline, an operator, the kill
switch, a bulk UPDATE), so every gateway replica closes the task's sessions at once.

An older build ignores the table and the trigger; its tasks have no handles, so the
trigger's lookup finds none and notifies nothing.

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OPEN = "('issuing', 'pending_approval', 'active')"


def upgrade() -> None:
    # A gateway's leases are named after the credential and the replica that issued them.
    op.alter_column("leases", "name", type_=sa.String(length=128), existing_nullable=False)
    op.create_table(
        "gateway_handles",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("task_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("verifier", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("task_id", "name"),
    )
    # Only tasks with handles notify: a finish without a gateway pays one index probe.
    op.execute(
        f"""
        CREATE FUNCTION broker_notify_task_ended() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM gateway_handles WHERE task_id = NEW.id) THEN
                PERFORM pg_notify('broker_task_ended', NEW.id::text);
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER tasks_ended AFTER UPDATE OF state ON tasks FOR EACH ROW
            WHEN (OLD.state IN {_OPEN} AND NEW.state NOT IN {_OPEN})
            EXECUTE FUNCTION broker_notify_task_ended();
        """  # noqa: S608 (the states are this file's constant)
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER tasks_ended ON tasks; DROP FUNCTION broker_notify_task_ended()")
    op.drop_table("gateway_handles")
    op.alter_column("leases", "name", type_=sa.String(length=64), existing_nullable=False)
