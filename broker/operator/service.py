"""The operator's view: inventory of tasks, leases and audit, single revoke and kill switch."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from broker import metrics
from broker.audit import record
from broker.clock import Clock
from broker.db import unit_of_work
from broker.errors import NotFound
from broker.identity import Identity
from broker.leases.revoker import Revoker
from broker.ledger import (
    Filters,
    Targets,
    active_lease_count,
    add_lock,
    end_matching,
    leases_matching,
    list_locks,
    load_task,
    read_lease,
    read_lock,
    remove_lock,
    task_ids_matching,
    task_of_lease,
    tasks_matching,
)
from broker.lifecycle import TERMINAL_TASK_STATES
from broker.models import AuditEvent, Lease, Lock, Task
from broker.paging import Page, clamp_limit, encode_cursor, page


@dataclass(frozen=True)
class KillResult:
    """The tasks ended (`revoked`), and how many of their leases the scheduler has yet to revoke."""

    tasks: list[uuid.UUID]
    pending_leases: int
    lock: Lock | None = None


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
        self,
        operator: Identity,
        reason: str,
        targets: Targets,
        *,
        lock: bool = False,
        by_lock: Lock | None = None,
    ) -> KillResult:
        """End every open task matching all given targets (at least one is required) as
        `revoked`, in one statement, and answer: the scheduler revokes their leases
        (`Jobs.revoke_ended`). With `lock`, a lock on the same targets is committed first,
        so a start that slips past this statement cannot activate (the activation's guard).
        """
        added = self.add_lock(operator, targets, reason=reason, expires_in=None) if lock else None
        # `by_lock`: the ending of a lock just added (`lock_and_end`), said so in each task's end.
        why, trigger = (
            (f"lock {by_lock.id}: {reason}", "lock") if by_lock else (f"kill switch: {reason}", "kill_switch")
        )
        with unit_of_work(self._sessions) as session:
            ended = end_matching(session, targets, reason=why)
            ids = [task.id for task in ended]
            for task in ended:
                record(
                    session, self._clock, "task.revoked", operator.id, task=task,
                    detail={"reason": why, "outcome": None, "trigger": trigger},
                )  # fmt: skip
            pending = active_lease_count(session, ids)
            named = added or by_lock
            record(
                session,
                self._clock,
                "operator.kill_switch",
                operator.id,
                # One event for many tasks: attributed to the owner it targets, if it names
                # one, and to the operator's stated reason as its purpose (docs/contract.md §6.8).
                owner=targets.owner,
                purpose=reason,
                detail={
                    "reason": reason,
                    "workload": targets.workload,
                    "owner": targets.owner,
                    "task": targets.task,
                    "issuer": targets.issuer,
                    "tasks": len(ids),
                    "lock": str(named.id) if named is not None else None,
                },
            )
        if ids:
            metrics.TASKS_FINISHED.labels("revoked").inc(len(ids))
        return KillResult(tasks=ids, pending_leases=pending, lock=added)

    # ---- locks -------------------------------------------------------------------------

    def add_lock(self, operator: Identity, targets: Targets, *, reason: str, expires_in: int | None) -> Lock:
        """Record a lock (committed before this returns, so every replica's next check sees
        it); ending the tasks it matches is the caller's (`lock_and_end`, the kill switch)."""
        with unit_of_work(self._sessions) as session:
            lock = add_lock(session, targets, reason=reason, by=operator.id, expires_in=expires_in)
            record(session, self._clock, "lock.added", operator.id, owner=targets.owner, purpose=reason,
                   detail=lock_detail(lock))  # fmt: skip
        return lock

    def lock_and_end(
        self, operator: Identity, targets: Targets, *, reason: str, expires_in: int | None
    ) -> tuple[Lock, KillResult]:
        """`POST /locks`: the lock, then every open task it matches ended as by the kill switch."""
        lock = self.add_lock(operator, targets, reason=reason, expires_in=expires_in)
        ended = self.kill_switch(operator, reason, targets, by_lock=lock)
        return lock, ended

    def locks(self, *, include_ended: bool) -> list[Lock]:
        with unit_of_work(self._sessions) as session:
            return list(list_locks(session, include_ended=include_ended))

    def remove_lock(self, operator: Identity, lock_id: uuid.UUID) -> Lock:
        """Remove a lock; removing one already removed answers it unchanged."""
        with unit_of_work(self._sessions) as session:
            removed = remove_lock(session, lock_id, by=operator.id)
            if removed is None:
                existing = read_lock(session, lock_id)
                if existing is None:
                    raise NotFound("no such lock")
                return existing
            record(session, self._clock, "lock.removed", operator.id, owner=removed.owner,
                   purpose=removed.reason, detail=lock_detail(removed))  # fmt: skip
            return removed


def lock_detail(lock: Lock) -> dict[str, Any]:
    """What an audit event about a lock says of it."""
    return {
        "lock_id": str(lock.id),
        "workload": lock.workload,
        "owner": lock.owner,
        "task": lock.task,
        "issuer": lock.issuer,
        "reason": lock.reason,
        "expires_at": lock.expires_at.isoformat() if lock.expires_at else None,
    }
