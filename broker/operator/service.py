"""The operator's view: inventory of tasks, leases and audit, single revoke and kill switch."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from broker.audit import record
from broker.clock import Clock
from broker.db import unit_of_work
from broker.errors import NotFound
from broker.identity import Identity
from broker.leases.revoker import Revoker
from broker.ledger import (
    Filters,
    leases_matching,
    load_task,
    open_task_ids,
    read_lease,
    task_ids_matching,
    task_of_lease,
    tasks_matching,
)
from broker.lifecycle import TERMINAL_TASK_STATES
from broker.models import AuditEvent, Lease, Task
from broker.paging import Page, clamp_limit, encode_cursor, page


@dataclass(frozen=True)
class KillResult:
    tasks: list[uuid.UUID]
    revoked: int
    pending: int


class OperatorService:
    def __init__(self, sessions: sessionmaker[Session], revoker: Revoker, clock: Clock) -> None:
        self._sessions = sessions
        self._revoker = revoker
        self._clock = clock

    # ---- inventory ---------------------------------------------------------------------

    def leases(self, filters: Filters, cursor: str | None, limit: int | None) -> Page[Lease]:
        query = leases_matching(filters)
        return self._page(query, Lease.issued_at, Lease.id, cursor, limit, lambda r: (r.issued_at, r.id))

    def tasks(self, filters: Filters, cursor: str | None, limit: int | None) -> Page[Task]:
        query = tasks_matching(filters)
        return self._page(query, Task.created_at, Task.id, cursor, limit, lambda r: (r.created_at, r.id))

    def audit(
        self,
        filters: Filters,
        since: datetime | None,
        event: str | None,
        cursor: str | None,
        limit: int | None,
    ) -> Page[AuditEvent]:
        query = select(AuditEvent)
        if filters.task_id is not None:
            query = query.where(AuditEvent.task_id == filters.task_id)
        if filters.owner is not None:
            query = query.where(AuditEvent.owner == filters.owner)
        if filters.workload is not None:
            # What the workload did, and what anyone (the scheduler, an operator, an
            # approver) did to its tasks.
            of_workload = task_ids_matching(Filters(workload=filters.workload))
            query = query.where(
                or_(AuditEvent.actor == filters.workload, AuditEvent.task_id.in_(of_workload))
            )
        if filters.task is not None or filters.state is not None:
            of_tasks = task_ids_matching(Filters(state=filters.state, task=filters.task))
            matches: ColumnElement[bool] = AuditEvent.task_id.in_(of_tasks)
            if filters.state is None:
                # A start refused before any task existed (denied, failed) names the type in `detail`.
                unborn = and_(AuditEvent.task_id.is_(None), AuditEvent.detail["task"].astext == filters.task)
                matches = or_(matches, unborn)
            query = query.where(matches)
        if since is not None:
            query = query.where(AuditEvent.at >= since)
        if event is not None:
            query = query.where(AuditEvent.event == event)
        return self._page(
            query, AuditEvent.at, AuditEvent.seq, cursor, limit, lambda r: (r.at, r.seq), key_type=int
        )

    def lease(self, lease_id: uuid.UUID) -> Lease:
        with unit_of_work(self._sessions) as session:
            lease = read_lease(session, lease_id)
            if lease is None:
                raise NotFound("no such lease")
            return lease

    def _page(
        self,
        query: Any,
        at: Any,
        key: Any,
        cursor: str | None,
        limit: int | None,
        position: Any,
        key_type: type = uuid.UUID,
    ) -> Page[Any]:
        size = clamp_limit(limit)
        with unit_of_work(self._sessions) as session:
            rows = list(session.scalars(page(query, at, key, cursor, size, key_type=key_type)).all())
        next_cursor = None
        if len(rows) > size:
            rows = rows[:size]
            next_cursor = encode_cursor(*position(rows[-1]))
        return Page(rows, next_cursor)

    # ---- revocation --------------------------------------------------------------------

    def revoke_lease(self, operator: Identity, lease_id: uuid.UUID, reason: str) -> Lease:
        with unit_of_work(self._sessions) as session:
            # The task first, then its lease: the order finish, expiry and the kill switch
            # lock in, so an operator revoke racing them waits instead of deadlocking.
            task_id = task_of_lease(session, lease_id)
            if task_id is None:
                raise NotFound("no such lease")
            task = load_task(session, task_id, lock=True)
            lease = next((item for item in task.leases if item.id == lease_id), None) if task else None
            if task is None or lease is None:
                raise NotFound("no such lease")
            why = f"revoked by operator: {reason}"
            self._revoker.revoke_lease(session, lease, actor=operator.id, reason=why, trigger="operator")
            if task.state not in TERMINAL_TASK_STATES and all(item.state != "active" for item in task.leases):
                # Nothing left to hold: the task ends revoked and its token goes too.
                self._revoker.end_task(
                    session, task, state="revoked", actor=operator.id, reason=why, trigger="operator"
                )
            return lease

    def kill_switch(
        self, operator: Identity, reason: str, *, workload: str | None, owner: str | None, task: str | None
    ) -> KillResult:
        """Revoke every open task matching all given filters (at least one is required)."""
        query = open_task_ids(workload=workload, owner=owner, task=task)
        with unit_of_work(self._sessions) as session:
            ids = list(session.scalars(query).all())
            record(
                session,
                self._clock,
                "operator.kill_switch",
                operator.id,
                # One event for many tasks: attributed to the owner it targets, if it names
                # one, and to the operator's stated reason as its purpose (docs/contract.md §6.8).
                owner=owner,
                purpose=reason,
                detail={
                    "reason": reason,
                    "workload": workload,
                    "owner": owner,
                    "task": task,
                    "tasks": len(ids),
                },
            )
        revoked = pending = 0
        for task_id in ids:
            with unit_of_work(self._sessions) as session:
                row = load_task(session, task_id, lock=True)
                if row is None or row.state in TERMINAL_TASK_STATES:
                    continue
                self._revoker.end_task(
                    session,
                    row,
                    state="revoked",
                    actor=operator.id,
                    reason=f"kill switch: {reason}",
                    trigger="kill_switch",
                )
                revoked += sum(1 for lease in row.leases if lease.state == "revoked")
                pending += sum(1 for lease in row.leases if lease.state == "revoke_pending")
        return KillResult(tasks=ids, revoked=revoked, pending=pending)
