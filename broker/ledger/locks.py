"""Locks (operators' standing refusals) and the statements that end many tasks at once:
the kill switch's, a lock's, and the scheduler's claim of what those left to revoke.

A lock is live while it is neither removed nor past `expires_at` by the database's clock,
so every replica agrees on it without a cache: the check is one statement on the
`ix_locks_live` partial index, sent in the start's existing round trip.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Select, and_, func, insert, or_, select, update
from sqlalchemy.orm import Session

from broker.lifecycle import TERMINAL_TASK_STATES, may_become
from broker.models import Lease, Lock, Task

# Spelled out for the start's pipeline, which runs raw SQL on the session's connection.
_LIVE_SQL = "removed_at IS NULL AND expiry_recorded_at IS NULL AND (expires_at IS NULL OR expires_at > now())"
LOCK_FOR_START = (
    f"SELECT id FROM locks WHERE {_LIVE_SQL}"  # noqa: S608 (no input in the text)
    " AND (workload IS NULL OR workload = %(workload)s) AND (owner IS NULL OR owner = %(owner)s)"
    " AND (task IS NULL OR task = %(task)s) AND (issuer IS NULL OR issuer = %(issuer)s)"
    " ORDER BY created_at LIMIT 1"
)
# The activation's guard: no live lock matches the task being activated (`tasks.*`), so
# a start that passed the check before a lock committed cannot activate after it.
NO_LOCK_ON_TASK = (
    f"NOT EXISTS (SELECT 1 FROM locks WHERE {_LIVE_SQL}"  # noqa: S608
    " AND (locks.workload IS NULL OR locks.workload = tasks.workload)"
    " AND (locks.owner IS NULL OR locks.owner = tasks.owner)"
    " AND (locks.task IS NULL OR locks.task = tasks.task)"
    " AND (locks.issuer IS NULL OR locks.issuer = tasks.workload_issuer))"
)
# Ended tasks with leases still active, claimed per transaction by the scheduler.
REVOKE_ENDED_BATCH = 20


@dataclass(frozen=True)
class Targets:
    """What a lock or the kill switch selects: every target given must match."""

    workload: str | None = None
    owner: str | None = None
    task: str | None = None
    issuer: str | None = None


def _live() -> ColumnElement[bool]:
    return and_(
        Lock.removed_at.is_(None),
        Lock.expiry_recorded_at.is_(None),
        or_(Lock.expires_at.is_(None), Lock.expires_at > func.now()),
    )


def matching_lock(session: Session, targets: Targets) -> uuid.UUID | None:
    """The oldest live lock matching a task with these fields (a claim, an approval)."""
    query = select(Lock.id).where(_live()).order_by(Lock.created_at).limit(1)
    for column, value in (
        (Lock.workload, targets.workload),
        (Lock.owner, targets.owner),
        (Lock.task, targets.task),
        (Lock.issuer, targets.issuer),
    ):
        query = query.where(or_(column.is_(None), column == value))
    return session.scalar(query)


def add_lock(session: Session, targets: Targets, *, reason: str, by: str, expires_in: int | None) -> Lock:
    """INSERT a lock; its times are the database's (every replica checks against them)."""
    expires = func.now() + func.make_interval(0, 0, 0, 0, 0, 0, expires_in) if expires_in else None
    row = session.scalars(
        insert(Lock)
        .values(
            id=uuid.uuid4(),
            workload=targets.workload,
            owner=targets.owner,
            task=targets.task,
            issuer=targets.issuer,
            reason=reason,
            created_by=by,
            expires_at=expires,
        )
        .returning(Lock)
    ).one()
    return row


def list_locks(session: Session, *, include_ended: bool) -> Sequence[Lock]:
    """Live locks, or every lock, newest first (at most 500: locks are few)."""
    query = select(Lock).order_by(Lock.created_at.desc(), Lock.id).limit(500)
    if not include_ended:
        query = query.where(_live())
    return session.scalars(query).all()


def read_lock(session: Session, lock_id: uuid.UUID) -> Lock | None:
    return session.get(Lock, lock_id)


def remove_lock(session: Session, lock_id: uuid.UUID, *, by: str) -> Lock | None:
    """Remove a lock that was not removed yet; None if it was (or never existed)."""
    return session.scalars(
        update(Lock)
        .where(Lock.id == lock_id, Lock.removed_at.is_(None))
        .values(removed_at=func.now(), removed_by=by)
        .returning(Lock)
    ).one_or_none()


def lapse_expired_locks(session: Session) -> Sequence[Lock]:
    """Mark every lock past its expiry as recorded, once: the rows to audit as expired."""
    return session.scalars(
        update(Lock)
        .where(Lock.removed_at.is_(None), Lock.expiry_recorded_at.is_(None), Lock.expires_at <= func.now())
        .values(expiry_recorded_at=func.now())
        .returning(Lock)
    ).all()


def lock_targets(lock: Lock) -> Targets:
    return Targets(workload=lock.workload, owner=lock.owner, task=lock.task, issuer=lock.issuer)


# ---- ending many tasks ---------------------------------------------------------------


def end_matching(session: Session, targets: Targets, *, reason: str) -> Sequence[Task]:
    """End every open task matching all `targets` as `revoked`, in one statement.

    Only the tasks' rows: their leases stay `active` until the scheduler revokes them
    (`ended_holding`). The `tasks_ended` trigger notifies the gateways for each row."""
    condition: list[ColumnElement[bool]] = [Task.state.in_(may_become("revoked"))]
    for column, value in (
        (Task.workload, targets.workload),
        (Task.owner, targets.owner),
        (Task.task, targets.task),
        (Task.workload_issuer, targets.issuer),
    ):
        if value is not None:
            condition.append(column == value)
    return _end(session, and_(*condition), reason)


def _end(session: Session, where: ColumnElement[bool], reason: str) -> Sequence[Task]:
    return session.scalars(
        update(Task)
        .where(where)
        .values(state="revoked", finished_at=func.now(), end_reason=reason)
        .returning(Task)
        .execution_options(synchronize_session=False)
    ).all()


def active_lease_count(session: Session, task_ids: Sequence[uuid.UUID]) -> int:
    if not task_ids:
        return 0
    return int(
        session.scalar(select(func.count()).where(Lease.task_id.in_(task_ids), Lease.state == "active")) or 0
    )


def ended_holding(limit: int = REVOKE_ENDED_BATCH) -> Select[Task]:
    """Ended tasks that still hold an `active` lease (the kill switch's and a lock's, whose
    revocations the scheduler runs): from the active leases (ix_leases_state_issued),
    which are few however long the history."""
    holding = select(Lease.task_id).where(Lease.state == "active")
    return select(Task).where(Task.id.in_(holding), Task.state.in_(TERMINAL_TASK_STATES)).limit(limit)


def targets_of(task: Task) -> Targets:
    """What a lock is matched against for an existing task (a claim, an approval)."""
    return Targets(workload=task.workload, owner=task.owner, task=task.task, issuer=task.workload_issuer)
