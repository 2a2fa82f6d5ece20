"""The scheduler's claims: what is due, stuck, spent or lapsed, oldest first, each on its
index. Statements, not results: the scheduler adds its row locks (`FOR UPDATE SKIP
LOCKED`) and runs them; bench/run plans the same statements at 100,000 rows."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import Select, any_, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import Session

from broker.ledger._sql import TASKS
from broker.lifecycle import TERMINAL_TASK_STATES, may_become
from broker.models import Lease, Task

# Spent task tokens one sweeper thread retires per transaction: claim, UPDATE and commit
# are paid per batch, not per token (scheduler CPU per token, Vault call aside, ~3 ms ->
# ~0.1 ms); small, so a slow Vault keeps few rows locked.
RETIRE_BATCH = 20


def until_next_deadline() -> Select[float]:
    """Seconds until the earliest deadline of an active task, by the database's clock (the
    one deadlines are set and checked with); NULL when no task is active."""
    until = func.extract("epoch", func.min(Task.expires_at) - func.now())
    return select(until).where(Task.state == "active")


def revoke_pending_count() -> Select[int]:
    """How many leases wait for a revocation retry (the pending-revocations gauge)."""
    return select(func.count()).where(Lease.state == "revoke_pending")


def due_tasks(limit: int) -> Select[Task]:
    """Active tasks past their deadline, oldest deadline first (ix_tasks_due)."""
    return (
        select(Task)
        .where(Task.state == "active", Task.expires_at <= func.now())
        .order_by(Task.expires_at)
        .limit(limit)
    )


def due_retry() -> Select[Lease, Task]:
    """The `revoke_pending` lease whose backoff ran out first, with its task (ix_leases_retry_due)."""
    return (
        select(Lease, Task)
        .join(Task, Task.id == Lease.task_id)
        .where(Lease.state == "revoke_pending", Lease.next_attempt_at <= func.now())
        .order_by(Lease.next_attempt_at)
        .limit(1)
    )


def spent_token(limit: int = RETIRE_BATCH) -> Select[uuid.UUID, str | None]:
    """Ended tasks whose leases are all revoked but whose Vault token is not, oldest end
    first (ix_tasks_token_unrevoked): just the id and accessor a retirement needs."""
    return (
        select(Task.id, Task.token_accessor)
        .where(
            Task.token_accessor.is_not(None),
            Task.token_revoked_at.is_(None),
            Task.token_released_at.is_(None),
            Task.state.in_(TERMINAL_TASK_STATES),
            ~Task.leases.any(Lease.state != "revoked"),
        )
        .order_by(Task.finished_at)
        .limit(limit)
    )


# The ids as one array parameter: the same cached SQL whatever the batch size.
MARK_RETIRED = (
    TASKS.update()
    .where(TASKS.c.id == any_(bindparam("ids", type_=ARRAY(UUID(as_uuid=True)))))
    .values(token_revoked_at=bindparam("at"))
)


def stuck_start(grace: timedelta) -> Select[Task]:
    """A start still `issuing` after the grace period: it crashed between Vault and its commit."""
    return (
        select(Task)
        .where(Task.state == "issuing", func.coalesce(Task.claimed_at, Task.created_at) < func.now() - grace)
        .limit(1)
    )


def lapse_pending_approvals(session: Session) -> Sequence[Task]:
    """End every task whose approval window closed, in one statement."""
    return session.scalars(
        update(Task)
        .where(Task.state.in_(may_become("approval_expired")), Task.approval_expires_at <= func.now())
        .values(state="approval_expired", finished_at=func.now(), end_reason="approval lapsed")
        .returning(Task)
    ).all()
