"""The gateway's rows: a handle and its task, the leases a gateway issues under it, and
which of the tasks it serves have ended."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session

from broker.db import pipelined
from broker.ledger._sql import LEASES, insert_audit, insert_sql, names, values
from broker.lifecycle import TASK_OPEN_STATES
from broker.models import Lease

_OPEN = ", ".join(f"'{state}'" for state in TASK_OPEN_STATES)
_HANDLE = text(
    "SELECT h.id, h.name, h.kind, h.verifier, t.id AS task_id, t.task, t.state, t.workload,"
    " t.owner, t.purpose, t.expires_at, now() AS now"
    " FROM gateway_handles h JOIN tasks t ON t.id = h.task_id WHERE h.id = :id"
)
# FOR SHARE: an end (FOR UPDATE) waits for this insert, or this insert finds the task ended;
# either way no lease of a gateway is added to a task after its end has read its leases.
_ACTIVE = "SELECT expires_at > now() FROM tasks WHERE id = %(task_id)s AND state = 'active' FOR SHARE"
_LEASE_COLUMNS = names(LEASES)
_INSERT_LEASE = insert_sql(LEASES, _LEASE_COLUMNS)
_ENDED = text(
    f"SELECT id FROM tasks WHERE id = ANY(:ids) AND (state NOT IN ({_OPEN}) OR expires_at <= now())"  # noqa: S608
)


@dataclass(frozen=True)
class HandleView:
    """A handle with what the gateway needs of its task; no secret (only its verifier)."""

    id: str
    name: str
    kind: str
    verifier: str
    task_id: uuid.UUID
    task: str
    state: str
    workload: str
    owner: str
    purpose: str
    expires_at: datetime | None
    now: datetime

    @property
    def usable(self) -> bool:
        return self.state == "active" and self.expires_at is not None and self.expires_at > self.now

    def __repr__(self) -> str:
        return f"HandleView(id={self.id!r}, task_id={self.task_id})"


def find_handle(session: Session, handle_id: str) -> HandleView | None:
    row = session.execute(_HANDLE, {"id": handle_id}).mappings().first()
    return HandleView(**row) if row is not None else None


def hold_active(session: Session, task_id: uuid.UUID) -> bool:
    """Whether the task is active and before its deadline; if so, it stays so until the
    caller's transaction ends (FOR SHARE: its end waits), so a lease recorded in it is one
    the end will revoke."""
    with pipelined(session) as connection:
        cursor = connection.execute(_ACTIVE, {"task_id": task_id})
    row = cursor.fetchone()
    return row is not None and bool(row[0])


def insert_gateway_lease(session: Session, lease: Lease) -> None:
    """INSERT a lease a gateway issued, with the queued audit events (after `hold_active`)."""
    with pipelined(session) as connection:
        connection.execute(_INSERT_LEASE, values(lease, _LEASE_COLUMNS))
        insert_audit(session, connection)


def ended_tasks(session: Session, task_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Of `task_ids`, those that are no longer open or are past their deadline."""
    if not task_ids:
        return set()
    return set(session.scalars(_ENDED, {"ids": list(task_ids)}).all())
