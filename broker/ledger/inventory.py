"""What operators and approvers list: statements over tasks and leases, filtered and in the
order their pages are cut in (`broker.paging`), for the caller's session to run."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session, selectinload

from broker.models import Lease, Task


@dataclass(frozen=True)
class Filters:
    state: str | None = None
    owner: str | None = None
    workload: str | None = None
    task: str | None = None
    task_id: uuid.UUID | None = None
    # Leases only: of tasks in this state (`active` leases of `revoked` tasks: what the
    # scheduler has yet to revoke after a kill switch or a lock).
    task_state: str | None = None


# The task columns the filters apply to, in `_matching`'s order.
_TASK_FILTERED = (Task.state, Task.owner, Task.workload, Task.task, Task.id)


def _matching(query: Any, filters: Filters, *columns: Any) -> Any:
    """Apply the filters that were given, in the order state, owner, workload, task, task id."""
    values = (filters.state, filters.owner, filters.workload, filters.task, filters.task_id)
    for column, value in zip(columns, values, strict=True):
        if value is not None:
            query = query.where(column == value)
    return query


def leases_matching(filters: Filters) -> Select[Lease]:
    query: Select[Lease] = _matching(
        select(Lease), filters, Lease.state, Lease.owner, Lease.workload, Lease.task, Lease.task_id
    )
    if filters.task_state is not None:
        query = query.where(Lease.task_id.in_(select(Task.id).where(Task.state == filters.task_state)))
    return query


def tasks_matching(filters: Filters) -> Select[Task]:
    query: Select[Task] = _matching(select(Task), filters, *_TASK_FILTERED)
    return query


def task_ids_matching(filters: Filters) -> Select[uuid.UUID]:
    """The ids of the tasks `filters` select: for filtering other rows (audit events) by task."""
    query: Select[uuid.UUID] = _matching(select(Task.id), filters, *_TASK_FILTERED)
    return query


def read_lease(session: Session, lease_id: uuid.UUID) -> Lease | None:
    return session.get(Lease, lease_id)


def task_of_lease(session: Session, lease_id: uuid.UUID) -> uuid.UUID | None:
    return session.scalar(select(Lease.task_id).where(Lease.id == lease_id))


def waiting_for_approval(after: tuple[datetime, uuid.UUID] | None, batch: int) -> Select[Task]:
    """Tasks still waiting for approval within their window, with their approvals, in
    creation order, from after `after` (a page's last position)."""
    query = (
        select(Task)
        .where(Task.state == "pending_approval", Task.approved_at.is_(None))
        .where(Task.approval_expires_at > func.now())
        .options(selectinload(Task.approvals))
        .order_by(Task.created_at, Task.id)
        .limit(batch)
    )
    if after is not None:
        at, key = after
        query = query.where(or_(Task.created_at > at, and_(Task.created_at == at, Task.id > key)))
    return query
