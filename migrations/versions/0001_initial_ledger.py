"""initial ledger

Revision ID: 0001
Revises:
Create Date: 2026-11-28 14:58:55.862853
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("task_id", sa.UUID(), nullable=True),
        sa.Column("lease_id", sa.UUID(), nullable=True),
        sa.Column("owner", sa.String(length=200), nullable=True),
        sa.Column("purpose", sa.String(length=500), nullable=True),
        sa.Column("detail", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("row_mac", sa.String(length=64), nullable=False),
        sa.Column("chain_seq", sa.BigInteger(), nullable=True),
        sa.Column("prev_hash", sa.String(length=64), nullable=True),
        sa.Column("hash", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_events")),
        sa.UniqueConstraint("chain_seq", name=op.f("uq_audit_events_chain_seq")),
        sa.UniqueConstraint("hash", name=op.f("uq_audit_events_hash")),
        sa.UniqueConstraint("id", name=op.f("uq_audit_events_id")),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at", "seq"], unique=False)
    op.create_index("ix_audit_events_task", "audit_events", ["task_id", "seq"], unique=False)
    op.create_index(
        "ix_audit_events_unsealed",
        "audit_events",
        ["seq"],
        unique=False,
        postgresql_where=sa.text("chain_seq IS NULL"),
    )
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_audit_head_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_head")),
    )
    op.create_table(
        "scheduler_heartbeats",
        sa.Column("job", sa.String(length=64), nullable=False),
        sa.Column("last_success_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("runner", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("job", name=op.f("pk_scheduler_heartbeats")),
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("workload", sa.Text(), nullable=False),
        sa.Column("workload_issuer", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("purpose", sa.String(length=500), nullable=False),
        sa.Column("context", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("ttl_seconds", sa.Integer(), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("approval_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("approved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("end_reason", sa.Text(), nullable=True),
        sa.Column("token_accessor", sa.String(length=128), nullable=True),
        sa.Column("token_revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("policy_version", sa.String(length=64), nullable=True),
        sa.CheckConstraint(
            "outcome IS NULL OR outcome IN ('succeeded', 'failed', 'cancelled')",
            name=op.f("ck_tasks_outcome"),
        ),
        sa.CheckConstraint(
            "state IN ('issuing', 'pending_approval', 'active', 'finished', 'expired', 'revoked', 'denied', 'approval_expired', 'failed')",
            name=op.f("ck_tasks_state"),
        ),
        sa.CheckConstraint("ttl_seconds > 0", name=op.f("ck_tasks_ttl_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
    )
    op.create_index(
        "ix_tasks_approval_due",
        "tasks",
        ["approval_expires_at"],
        unique=False,
        postgresql_where=sa.text("state = 'pending_approval'"),
    )
    op.create_index("ix_tasks_created", "tasks", ["created_at", "id"], unique=False)
    op.create_index(
        "ix_tasks_due",
        "tasks",
        ["expires_at"],
        unique=False,
        postgresql_where=sa.text("state IN ('active', 'issuing')"),
    )
    op.create_index("ix_tasks_owner_created", "tasks", ["owner", "created_at"], unique=False)
    op.create_index("ix_tasks_task_created", "tasks", ["task", "created_at"], unique=False)
    op.create_index(
        "ix_tasks_token_unrevoked",
        "tasks",
        ["finished_at"],
        unique=False,
        postgresql_where=sa.text("token_accessor IS NOT NULL AND token_revoked_at IS NULL"),
    )
    op.create_index(
        "ix_tasks_workload_task_created", "tasks", ["workload", "task", "created_at"], unique=False
    )
    op.create_index(
        "ix_tasks_workload_task_open",
        "tasks",
        ["workload", "task"],
        unique=False,
        postgresql_where=sa.text("state IN ('issuing', 'pending_approval', 'active')"),
    )
    op.create_table(
        "used_jtis",
        sa.Column("issuer", sa.String(length=64), nullable=False),
        sa.Column("jti", sa.String(length=256), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("issuer", "jti", name=op.f("pk_used_jtis")),
    )
    op.create_index("ix_used_jtis_expires", "used_jtis", ["expires_at"], unique=False)
    op.create_table(
        "approvals",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("task_id", sa.UUID(), nullable=False),
        sa.Column("approver", sa.Text(), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("decision IN ('approve', 'deny')", name=op.f("ck_approvals_decision")),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_approvals_task_id_tasks"), ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_approvals")),
        sa.UniqueConstraint("task_id", "approver", name=op.f("uq_approvals_task_id_approver")),
    )
    op.create_table(
        "leases",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("task_id", sa.UUID(), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("workload", sa.Text(), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("purpose", sa.String(length=500), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoke_reason", sa.Text(), nullable=True),
        sa.Column("revoke_attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoke_kind", sa.String(length=16), nullable=False),
        sa.Column("revoke_ref", sa.Text(), nullable=False),
        sa.Column("vault_lease_id", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "(state = 'revoked') = (revoked_at IS NOT NULL)", name=op.f("ck_leases_revoked_at")
        ),
        sa.CheckConstraint("revoke_kind IN ('lease', 'token', 'none')", name=op.f("ck_leases_revoke_kind")),
        sa.CheckConstraint("state IN ('active', 'revoke_pending', 'revoked')", name=op.f("ck_leases_state")),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_leases_task_id_tasks"), ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_leases")),
        sa.UniqueConstraint("task_id", "name", name=op.f("uq_leases_task_id_name")),
    )
    op.create_index("ix_leases_issued", "leases", ["issued_at", "id"], unique=False)
    op.create_index("ix_leases_owner_issued", "leases", ["owner", "issued_at"], unique=False)
    op.create_index(
        "ix_leases_retry_due",
        "leases",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("state = 'revoke_pending'"),
    )
    op.create_index("ix_leases_state_issued", "leases", ["state", "issued_at", "id"], unique=False)
    op.create_index("ix_leases_task", "leases", ["task_id"], unique=False)
    op.create_index("ix_leases_workload_issued", "leases", ["workload", "issued_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_leases_workload_issued", table_name="leases")
    op.drop_index("ix_leases_task", table_name="leases")
    op.drop_index("ix_leases_state_issued", table_name="leases")
    op.drop_index(
        "ix_leases_retry_due", table_name="leases", postgresql_where=sa.text("state = 'revoke_pending'")
    )
    op.drop_index("ix_leases_owner_issued", table_name="leases")
    op.drop_index("ix_leases_issued", table_name="leases")
    op.drop_table("leases")
    op.drop_table("approvals")
    op.drop_index("ix_used_jtis_expires", table_name="used_jtis")
    op.drop_table("used_jtis")
    op.drop_index(
        "ix_tasks_workload_task_open",
        table_name="tasks",
        postgresql_where=sa.text("state IN ('issuing', 'pending_approval', 'active')"),
    )
    op.drop_index("ix_tasks_workload_task_created", table_name="tasks")
    op.drop_index(
        "ix_tasks_token_unrevoked",
        table_name="tasks",
        postgresql_where=sa.text("token_accessor IS NOT NULL AND token_revoked_at IS NULL"),
    )
    op.drop_index("ix_tasks_task_created", table_name="tasks")
    op.drop_index("ix_tasks_owner_created", table_name="tasks")
    op.drop_index(
        "ix_tasks_due", table_name="tasks", postgresql_where=sa.text("state IN ('active', 'issuing')")
    )
    op.drop_index("ix_tasks_created", table_name="tasks")
    op.drop_index(
        "ix_tasks_approval_due", table_name="tasks", postgresql_where=sa.text("state = 'pending_approval'")
    )
    op.drop_table("tasks")
    op.drop_table("scheduler_heartbeats")
    op.drop_table("audit_head")
    op.drop_index(
        "ix_audit_events_unsealed", table_name="audit_events", postgresql_where=sa.text("chain_seq IS NULL")
    )
    op.drop_index("ix_audit_events_task", table_name="audit_events")
    op.drop_index("ix_audit_events_at", table_name="audit_events")
    op.drop_table("audit_events")
