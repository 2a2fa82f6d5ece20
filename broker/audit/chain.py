"""A hash-chained audit log written in the same transaction as the change it describes.

Services call `record(session, ...)`; the events wait in the session and are sealed just
before commit: under a transaction-scoped advisory lock we read the chain head, link each
event to its predecessor by SHA-256 (an HMAC when an audit key is configured, so that
someone with database access alone can't rebuild the chain), insert, and move the head.
The lock is held only from sealing to commit, so requests serialise for microseconds.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import event, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from broker.clock import Clock, rfc3339
from broker.models import AuditEvent, AuditHead, Lease, Task

GENESIS = "0" * 64
AUDIT_LOCK = 0x6175646974  # "audit"
_PENDING = "broker.audit.pending"


@dataclass(frozen=True)
class _Pending:
    id: uuid.UUID
    at: datetime
    event: str
    actor: str
    task_id: uuid.UUID | None
    lease_id: uuid.UUID | None
    owner: str | None
    purpose: str | None
    detail: Mapping[str, Any]


def record(
    session: Session,
    clock: Clock,
    event_name: str,
    actor: str,
    *,
    task: Task | None = None,
    lease: Lease | None = None,
    detail: Mapping[str, Any] | None = None,
    owner: str | None = None,
    purpose: str | None = None,
) -> None:
    """Queue an event; it is chained and written when the session commits.

    Owner and purpose come from the task or lease; pass them for events that have
    neither (a denied start) so every event stays attributable (SPEC §6.8).
    """
    owner_source = task or lease
    session.info.setdefault(_PENDING, []).append(
        _Pending(
            id=uuid.uuid4(),
            at=clock.now(),
            event=event_name,
            actor=actor,
            task_id=task.id if task is not None else (lease.task_id if lease else None),
            lease_id=lease.id if lease is not None else None,
            owner=owner_source.owner if owner_source is not None else owner,
            purpose=owner_source.purpose if owner_source is not None else purpose,
            detail=dict(detail or {}),
        )
    )


def canonical(fields: Mapping[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def link_hash(prev_hash: str, fields: Mapping[str, Any], key: bytes | None) -> str:
    message = prev_hash.encode() + b"\n" + canonical(fields)
    if key:
        return hmac.new(key, message, hashlib.sha256).hexdigest()
    return hashlib.sha256(message).hexdigest()


def chained_fields(
    id: uuid.UUID,
    at: datetime,
    event_name: str,
    actor: str,
    task_id: uuid.UUID | None,
    lease_id: uuid.UUID | None,
    owner: str | None,
    purpose: str | None,
    detail: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "id": str(id),
        "at": rfc3339(at),
        "event": event_name,
        "actor": actor,
        "task_id": str(task_id) if task_id else None,
        "lease_id": str(lease_id) if lease_id else None,
        "owner": owner,
        "purpose": purpose,
        "detail": detail,
    }


class AuditRecorder:
    """Installs the seal-before-commit hook on a session factory."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key

    def install(self, factory: sessionmaker[Session]) -> None:
        event.listen(factory, "before_commit", self._seal)

    def _seal(self, session: Session) -> None:
        pending: list[_Pending] = session.info.pop(_PENDING, [])
        if not pending:
            return
        session.flush()
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": AUDIT_LOCK})
        head = session.get(AuditHead, 1, populate_existing=True)
        prev = head.hash if head is not None else GENESIS
        last_seq = head.seq if head is not None else 0
        for item in pending:
            fields = chained_fields(
                item.id,
                item.at,
                item.event,
                item.actor,
                item.task_id,
                item.lease_id,
                item.owner,
                item.purpose,
                item.detail,
            )
            digest = link_hash(prev, fields, self._key)
            row = AuditEvent(
                id=item.id,
                at=item.at,
                event=item.event,
                actor=item.actor,
                task_id=item.task_id,
                lease_id=item.lease_id,
                owner=item.owner,
                purpose=item.purpose,
                detail=dict(item.detail),
                prev_hash=prev,
                hash=digest,
            )
            session.add(row)
            session.flush()
            prev, last_seq = digest, row.seq
        session.execute(
            insert(AuditHead)
            .values(id=1, seq=last_seq, hash=prev)
            .on_conflict_do_update(index_elements=[AuditHead.id], set_={"seq": last_seq, "hash": prev})
        )


@dataclass(frozen=True)
class ChainProblem:
    seq: int | None
    problem: str


@dataclass(frozen=True)
class ChainReport:
    checked: int
    problems: tuple[ChainProblem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def _rows(session: Session, batch: int = 2000) -> Iterator[AuditEvent]:
    last = 0
    while True:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.seq > last).order_by(AuditEvent.seq).limit(batch)
        ).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].seq
        session.expunge_all()


@dataclass(frozen=True)
class Anchor:
    """A (seq, hash) seen earlier and kept outside the database (a file, a log line).

    Someone with write access to the database can delete the newest rows and move the
    head back; only a copy of a later head held elsewhere shows that rows went missing.
    """

    seq: int
    hash: str

    def dumps(self) -> str:
        return json.dumps({"seq": self.seq, "hash": self.hash})

    @classmethod
    def loads(cls, text: str) -> Anchor:
        data = json.loads(text)
        return cls(int(data["seq"]), str(data["hash"]))


def head_anchor(session: Session) -> Anchor | None:
    head = session.get(AuditHead, 1)
    return Anchor(head.seq, head.hash) if head is not None else None


def verify_chain(session: Session, key: bytes | None = None, anchor: Anchor | None = None) -> ChainReport:
    """Walk the chain: a changed row breaks its own hash, an inserted or deleted row breaks
    the link to its neighbour, a deleted tail no longer matches the head, and rows deleted
    together with a rewound head fall short of an earlier `anchor`."""
    problems: list[ChainProblem] = []
    anchored = anchor is None
    prev, checked, last_seq = GENESIS, 0, 0
    for row in _rows(session):
        checked += 1
        fields = chained_fields(
            row.id,
            row.at,
            row.event,
            row.actor,
            row.task_id,
            row.lease_id,
            row.owner,
            row.purpose,
            row.detail,
        )
        if row.prev_hash != prev:
            problems.append(
                ChainProblem(row.seq, "link broken: a row before it was changed, inserted or deleted")
            )
        if link_hash(row.prev_hash, fields, key) != row.hash:
            problems.append(ChainProblem(row.seq, "content changed: hash does not match the row"))
        prev, last_seq = row.hash, row.seq
        if anchor is not None and row.seq == anchor.seq:
            anchored = row.hash == anchor.hash
    if not anchored and anchor is not None:
        problems.append(ChainProblem(anchor.seq, "anchor missing: a row seen earlier is gone or changed"))
    head = session.get(AuditHead, 1)
    if head is None and checked:
        problems.append(ChainProblem(None, "chain head missing"))
    elif head is not None and (head.seq != last_seq or head.hash != prev):
        problems.append(ChainProblem(head.seq, "head mismatch: rows were deleted from the end"))
    return ChainReport(checked, tuple(problems))
