"""Reading the audit log out, for a SIEM or a terminal: sealed events in chain order.

Chain order (`chain_seq`, gapless, assigned by the sealer) rather than insertion order:
two transactions can commit their events out of `seq` order, so a reader following `seq`
could step past an event that commits a moment later. A sealed event is one the chain
vouches for; the scheduler seals every sweep, so an event shows here within about a
second of being written.

Each event is exported in one stable shape, `SCHEMA` (documented in docs/audit.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.clock import rfc3339
from broker.models import AuditEvent

SCHEMA = "credential-broker.audit/v1"
_BATCH = 1000


def row_json(row: AuditEvent) -> dict[str, Any]:
    """An audit row as every reader gets it (the API and the export): who did what to which
    task, for whom and why, and its link in the chain."""
    return {
        "id": str(row.id),
        "chain_seq": row.chain_seq,
        "at": rfc3339(row.at),
        "event": row.event,
        "actor": row.actor,
        "task_id": str(row.task_id) if row.task_id else None,
        "lease_id": str(row.lease_id) if row.lease_id else None,
        "owner": row.owner,
        "purpose": row.purpose,
        "detail": row.detail,
        "prev_hash": row.prev_hash,
        "hash": row.hash,
    }


def event_json(row: AuditEvent) -> dict[str, Any]:
    """One event in the export schema."""
    return {"schema": SCHEMA, **row_json(row)}


def sealed_after(
    session: Session, after_chain_seq: int = 0, *, since: datetime | None = None, limit: int = _BATCH
) -> list[AuditEvent]:
    """Sealed events with a chain position past `after_chain_seq` (and at or after `since`)."""
    query = select(AuditEvent).where(AuditEvent.chain_seq > after_chain_seq)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    return list(session.scalars(query.order_by(AuditEvent.chain_seq).limit(limit)))


def newest_sealed(session: Session, count: int) -> list[AuditEvent]:
    """The `count` newest sealed events, oldest of them first."""
    query = (
        select(AuditEvent)
        .where(AuditEvent.chain_seq.is_not(None))
        .order_by(AuditEvent.chain_seq.desc())
        .limit(count)
    )
    return list(reversed(session.scalars(query).all()))


def iter_sealed(session: Session, *, since: datetime | None = None, after: int = 0) -> Iterator[AuditEvent]:
    """Every sealed event from `since` on, in chain order, read in batches."""
    while True:
        rows = sealed_after(session, after, since=since)
        yield from rows
        if len(rows) < _BATCH:
            return
        after = rows[-1].chain_seq or after
