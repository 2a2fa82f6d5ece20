"""The tables: tasks, their leases, approvals, the audit chain, spent token ids and pooled task
tokens.

Rows are read and written through `broker.ledger`; this module only declares them. The
states and the moves between them are `broker.lifecycle`'s.

States are enforced by CHECK constraints so that no code path (or hand-written SQL in
an incident) can park a row in a state the scheduler does not know how to drive.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column, relationship

from broker.db import Base
from broker.lifecycle import LEASE_STATES, OUTCOMES, TASK_STATES, LeaseState, Outcome, TaskState

REVOKE_KINDS = ("lease", "token", "none")
DECISIONS = ("approve", "deny")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _tz() -> DateTime:
    return DateTime(timezone=True)


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint(_in("state", TASK_STATES), name="state"),
        CheckConstraint(f"outcome IS NULL OR {_in('outcome', OUTCOMES)}", name="outcome"),
        CheckConstraint("ttl_seconds > 0", name="ttl_positive"),
        # The sweeper's query: open tasks by deadline.
        Index(
            "ix_tasks_due",
            "expires_at",
            postgresql_where=text("state IN ('active', 'issuing')"),
        ),
        Index(
            "ix_tasks_approval_due",
            "approval_expires_at",
            postgresql_where=text("state = 'pending_approval'"),
        ),
        Index("ix_tasks_workload_task_created", "workload", "task", "created_at"),
        # Limits count a workload's open tasks; history must not make that slower.
        Index(
            "ix_tasks_workload_task_open",
            "workload",
            "task",
            postgresql_where=text("state IN ('issuing', 'pending_approval', 'active')"),
        ),
        # Ended tasks whose Vault token the scheduler has yet to revoke (not released for reuse).
        Index(
            "ix_tasks_token_unrevoked",
            "finished_at",
            postgresql_where=text(
                "token_accessor IS NOT NULL AND token_revoked_at IS NULL AND token_released_at IS NULL"
            ),
        ),
        # One task per workload and Idempotency-Key (docs/api.md#idempotent-starts): the
        # backstop for two starts with one key racing under different workload locks.
        Index(
            "uq_tasks_workload_idempotency_key",
            "workload",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
        Index("ix_tasks_owner_created", "owner", "created_at"),
        Index("ix_tasks_created", "created_at", "id"),
        Index("ix_tasks_task_created", "task", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    task: Mapped[str] = mapped_column(String(64))
    state: Mapped[TaskState] = mapped_column(String(32))
    workload: Mapped[str] = mapped_column(Text)
    workload_issuer: Mapped[str] = mapped_column(String(64))
    owner: Mapped[str] = mapped_column(String(200))
    purpose: Mapped[str] = mapped_column(String(500))
    context: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    ttl_seconds: Mapped[int] = mapped_column(Integer)
    request_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(_tz(), server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(_tz())
    approval_expires_at: Mapped[datetime | None] = mapped_column(_tz())
    approved_at: Mapped[datetime | None] = mapped_column(_tz())
    claimed_at: Mapped[datetime | None] = mapped_column(_tz())
    finished_at: Mapped[datetime | None] = mapped_column(_tz())
    outcome: Mapped[Outcome | None] = mapped_column(String(16))
    end_reason: Mapped[str | None] = mapped_column(Text)
    # Accessor of the per-task Vault token, committed before any secret is issued so a
    # crash mid-issue leaves something the reconciler can revoke (docs/contract.md §6.2).
    token_accessor: Mapped[str | None] = mapped_column(String(128))
    token_revoked_at: Mapped[datetime | None] = mapped_column(_tz())
    # Set when a finish handed the (then empty) token back to its process for the next
    # task of the type; the scheduler does not retire a released token.
    token_released_at: Mapped[datetime | None] = mapped_column(_tz())
    policy_version: Mapped[str | None] = mapped_column(String(64))
    # The start's Idempotency-Key, and the SHA-256 of the request it came with: a retry
    # with the key is answered from this task, and one with another request is refused.
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    idempotency_hash: Mapped[str | None] = mapped_column(String(64))

    leases: Mapped[list[Lease]] = relationship(
        back_populates="task_row", order_by="Lease.name", lazy="selectin"
    )
    approvals: Mapped[list[Approval]] = relationship(
        back_populates="task_row", order_by="Approval.created_at", lazy="selectin"
    )


class Lease(Base):
    __tablename__ = "leases"
    __table_args__ = (
        CheckConstraint(_in("state", LEASE_STATES), name="state"),
        CheckConstraint(_in("revoke_kind", REVOKE_KINDS), name="revoke_kind"),
        CheckConstraint("(state = 'revoked') = (revoked_at IS NOT NULL)", name="revoked_at"),
        UniqueConstraint("task_id", "name"),
        Index(
            "ix_leases_retry_due",
            "next_attempt_at",
            postgresql_where=text("state = 'revoke_pending'"),
        ),
        Index("ix_leases_task", "task_id"),
        Index("ix_leases_state_issued", "state", "issued_at", "id"),
        Index("ix_leases_owner_issued", "owner", "issued_at"),
        Index("ix_leases_workload_issued", "workload", "issued_at"),
        Index("ix_leases_issued", "issued_at", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tasks.id", ondelete="RESTRICT"))
    task: Mapped[str] = mapped_column(String(64))
    # The credential's name; a gateway's leases add the replica (`db@gw-1a2b3c4d`, docs/gateway.md).
    name: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(32))
    workload: Mapped[str] = mapped_column(Text)
    owner: Mapped[str] = mapped_column(String(200))
    purpose: Mapped[str] = mapped_column(String(500))
    state: Mapped[LeaseState] = mapped_column(String(32))
    issued_at: Mapped[datetime] = mapped_column(_tz(), server_default=func.now())
    expires_at: Mapped[datetime] = mapped_column(_tz())
    revoked_at: Mapped[datetime | None] = mapped_column(_tz())
    revoke_reason: Mapped[str | None] = mapped_column(Text)
    revoke_attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column(_tz())
    # What to hand Vault to revoke it: a lease id or a token accessor; never a secret.
    revoke_kind: Mapped[str] = mapped_column(String(16))
    revoke_ref: Mapped[str] = mapped_column(Text)
    vault_lease_id: Mapped[str | None] = mapped_column(Text)

    task_row: Mapped[Task] = relationship(back_populates="leases")


class Approval(Base):
    __tablename__ = "approvals"
    __table_args__ = (
        CheckConstraint(_in("decision", DECISIONS), name="decision"),
        # One vote per approver per task: a second vote by the same identity is refused.
        UniqueConstraint("task_id", "approver"),
        # ...and by the same person through another issuer (broker/identity/people.py).
        UniqueConstraint("task_id", "person"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tasks.id", ondelete="RESTRICT"))
    approver: Mapped[str] = mapped_column(Text)
    # The normalised name the vote counts under: verified email, else subject.
    person: Mapped[str] = mapped_column(Text)
    decision: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(500))
    request_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(_tz(), server_default=func.now())

    task_row: Mapped[Task] = relationship(back_populates="approvals")


class AuditEvent(Base):
    """An audit event. `row_mac` covers its fields from the moment it is written;
    `chain_seq`/`prev_hash`/`hash` link it into the chain once the sealer has run."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_task", "task_id", "seq"),
        Index("ix_audit_events_at", "at", "seq"),
        Index("ix_audit_events_unsealed", "seq", postgresql_where=text("chain_seq IS NULL")),
    )

    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), unique=True, default=uuid.uuid4)
    at: Mapped[datetime] = mapped_column(_tz())
    event: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(Text)
    task_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    lease_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    owner: Mapped[str | None] = mapped_column(String(200))
    purpose: Mapped[str | None] = mapped_column(String(500))
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    row_mac: Mapped[str] = mapped_column(String(64))
    chain_seq: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    hash: Mapped[str | None] = mapped_column(String(64), unique=True)


class AuditHead(Base):
    """The newest link (`seq` is its chain_seq), so a deleted chain end is detected too,
    and `key_check` (`broker.audit.chain.key_check`): which audit key the chain is under."""

    __tablename__ = "audit_head"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
    key_check: Mapped[str | None] = mapped_column(String(64))


class UsedJti(Base):
    """Spent token ids of `single_use` issuers; shared by every worker and replica."""

    __tablename__ = "used_jtis"
    __table_args__ = (Index("ix_used_jtis_expires", "expires_at"),)

    issuer: Mapped[str] = mapped_column(String(64), primary_key=True)
    jti: Mapped[str] = mapped_column(String(256), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(_tz())


class SchedulerHeartbeat(Base):
    """Last successful run of each scheduler job (alerting: a sweep that stopped)."""

    __tablename__ = "scheduler_heartbeats"

    job: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_success_at: Mapped[datetime] = mapped_column(_tz())
    runner: Mapped[str] = mapped_column(Text)


class PooledToken(Base):
    """A task token a process minted ahead of its task and holds in its pool, unused.

    Every live task token is on record in exactly one place: here while pooled, on its
    task (`tasks.token_accessor`) from the start that takes it. The start deletes this row
    in the transaction that records the task, and a finish that hands a token back to its
    pool writes it again in the transaction that releases it, so no handover leaves it
    unrecorded. `lease_until` is the holder's promise that it is alive; the holder renews
    it while it runs, and once it passes the scheduler revokes the token (docs/contract.md §6.2).
    """

    __tablename__ = "task_tokens"
    __table_args__ = (
        # The scheduler's claim: tokens whose holder stopped renewing.
        Index("ix_task_tokens_lease_until", "lease_until"),
        # A holder's renewal touches its own rows only.
        Index("ix_task_tokens_holder", "holder"),
    )

    accessor: Mapped[str] = mapped_column(String(128), primary_key=True)
    task: Mapped[str] = mapped_column(String(64))
    # hostname:pid:nonce of the process that holds it; the nonce tells a restarted pid apart.
    holder: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(_tz(), server_default=func.now())
    # Vault's own end of the token: past it there is nothing left to revoke.
    expires_at: Mapped[datetime] = mapped_column(_tz())
    lease_until: Mapped[datetime] = mapped_column(_tz())


class GatewayHandle(Base):
    """A gateway credential's handle (docs/gateway.md): what a workload connects with.

    `id` is the handle's public half (the Postgres user name it connects as); its secret
    half is never stored, only a SCRAM-SHA-256 verifier of it (salt, iteration count,
    StoredKey, ServerKey, in Postgres's own spelling), from which the secret can't be had.
    A handle is good while its task is active; the task's end (any trigger) notifies every
    gateway (the `tasks_ended` trigger, migration 0007) to close its sessions.
    """

    __tablename__ = "gateway_handles"
    __table_args__ = (UniqueConstraint("task_id", "name"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tasks.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    verifier: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(_tz(), server_default=func.now())


class Lock(Base):
    """An operator's standing refusal (docs/api.md#locks): every start, claim and approval
    of a task it matches is refused while it is live (not removed, not past `expires_at`
    by the database's clock). A target left NULL matches anything; at least one is set."""

    __tablename__ = "locks"
    __table_args__ = (
        CheckConstraint(
            "workload IS NOT NULL OR owner IS NOT NULL OR task IS NOT NULL OR issuer IS NOT NULL",
            name="target",
        ),
        # The locks that may still refuse something: what a start scans, a handful of rows.
        Index(
            "ix_locks_live",
            "created_at",
            postgresql_where=text("removed_at IS NULL AND expiry_recorded_at IS NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    workload: Mapped[str | None] = mapped_column(Text)
    owner: Mapped[str | None] = mapped_column(String(200))
    task: Mapped[str | None] = mapped_column(String(64))
    issuer: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(500))
    created_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(_tz(), server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(_tz())
    removed_at: Mapped[datetime | None] = mapped_column(_tz())
    removed_by: Mapped[str | None] = mapped_column(Text)
    # When the scheduler recorded `lock.expired` (once per lock).
    expiry_recorded_at: Mapped[datetime | None] = mapped_column(_tz())
