"""A tamper-evident audit log: each event is MACed when written, then chained.

Services call `record(session, ...)`; the events wait in the session and are inserted just
before commit, in the same transaction as the change they describe, each with a `row_mac`
(HMAC-SHA256 under the audit key, plain SHA-256 without one) over its own fields. Linking
them into a hash chain happens off the request path: `seal_pending` (a scheduler job, every
sweep) takes the chain head row lock, links unsealed events in insertion order and moves
the head. Requests never wait on a global lock, and a forged row inserted behind the
broker's back is refused by the sealer because its MAC does not verify (with a key).

What `verify_chain` detects: an edited row (its MAC), an inserted, reordered or deleted
sealed row (the links), a deleted tail (the head), and, with an anchor kept elsewhere, a
deleted tail with a rewound head. Events not yet sealed (at most one sweep old) are
covered by their MAC only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast

from sqlalchemy import BigInteger, Connection, Table, Text, bindparam, event, func, select
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.orm import Session, sessionmaker

from broker.canonical import canonical_json
from broker.clock import Clock, rfc3339
from broker.models import AuditEvent, AuditHead, Lease, Task

GENESIS = "0" * 64
# Most events one sealing transaction links; the scheduler loops while batches come back full.
SEAL_BATCH = 5000
_AUDIT_TABLE = cast(Table, AuditEvent.__table__)
_HEAD_TABLE = cast(Table, AuditHead.__table__)
log = logging.getLogger(__name__)
_PENDING = "broker.audit.pending"
_RECORDER = "broker.audit.recorder"


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
    task_id: uuid.UUID | None = None,
    at: datetime | None = None,
) -> None:
    """Queue an event; it is chained and written when the session commits.

    Owner and purpose come from the task or lease; pass them for events that have
    neither (a denied start) so every event stays attributable (docs/contract.md §6.8).
    `task_id` and `at`: for events written in a batch after they happened (the gateway's),
    the task they concern without loading it, and when they happened.
    """
    owner_source = task or lease
    session.info.setdefault(_PENDING, []).append(
        _Pending(
            id=uuid.uuid4(),
            at=at or clock.now(),
            event=event_name,
            actor=actor,
            task_id=task.id if task is not None else (lease.task_id if lease else task_id),
            lease_id=lease.id if lease is not None else None,
            owner=owner_source.owner if owner_source is not None else owner,
            purpose=owner_source.purpose if owner_source is not None else purpose,
            detail=dict(detail or {}),
        )
    )


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


def row_mac(fields: Mapping[str, Any], key: bytes | None) -> str:
    # Over the fields as Postgres gives them back, not as they were sent: the writer and
    # every later reader must hash the same bytes (`broker.canonical`).
    message = canonical_json(fields)
    if key:
        return hmac.new(key, message, hashlib.sha256).hexdigest()
    return hashlib.sha256(message).hexdigest()


def link_hash(prev_hash: str, mac: str, key: bytes | None) -> str:
    message = f"{prev_hash}\n{mac}".encode()
    if key:
        return hmac.new(key, message, hashlib.sha256).hexdigest()
    return hashlib.sha256(message).hexdigest()


UNKEYED = "unkeyed"
_KEY_CHECK_MESSAGE = b"broker audit key check"


def key_check(key: bytes | None) -> str:
    """What `audit_head.key_check` holds for a chain under `key`: an HMAC of a fixed
    message, no more telling than any row's MAC, so a verifier or sealer holding another
    key learns so before it reads a single row."""
    return hmac.new(key, _KEY_CHECK_MESSAGE, hashlib.sha256).hexdigest() if key else UNKEYED


class AuditKeyMismatch(Exception):
    """The key at hand is not the chain's: every MAC would fail, which says nothing about
    the rows. `reason`: "missing" (the chain is keyed, no key given), "wrong" (another
    key), "unexpected" (a key given, the chain has none)."""

    def __init__(self, reason: Literal["missing", "wrong", "unexpected"]) -> None:
        super().__init__(reason)
        self.reason = reason


def _fields_of(row: Any) -> dict[str, Any]:
    return chained_fields(
        row.id, row.at, row.event, row.actor, row.task_id, row.lease_id, row.owner, row.purpose, row.detail
    )


class AuditRecorder:
    """Installs the write-before-commit hook on a session factory."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key

    def install(self, factory: sessionmaker[Session]) -> None:
        factory.configure(info={_RECORDER: self})
        event.listen(factory, "before_commit", self._write)

    def take_rows(self, session: Session) -> list[dict[str, Any]]:
        """The session's queued events as MACed rows, no longer queued: for a caller that
        inserts them itself, in a round trip it makes anyway (`pending_rows`)."""
        pending: list[_Pending] = session.info.pop(_PENDING, [])
        rows = []
        for item in pending:
            rows.append(
                {
                    "id": item.id, "at": item.at, "event": item.event, "actor": item.actor,
                    "task_id": item.task_id, "lease_id": item.lease_id, "owner": item.owner,
                    "purpose": item.purpose, "detail": dict(item.detail),
                    "row_mac": row_mac(_fields_of(item), self._key),
                }
            )  # fmt: skip
        return rows

    def _write(self, session: Session) -> None:
        rows = self.take_rows(session)
        if rows:
            # Core, not the ORM's bulk path: one cached statement, no per-row bookkeeping.
            session.connection().execute(_AUDIT_TABLE.insert(), rows)


def pending_rows(session: Session) -> list[dict[str, Any]]:
    """Take the session's queued events as rows to insert in the caller's own statement.

    They are gone from the queue, so the commit hook won't insert them again: the caller
    must insert them in this transaction.
    """
    recorder: AuditRecorder | None = session.info.get(_RECORDER)
    if recorder is None:
        raise RuntimeError("no AuditRecorder is installed on this session's factory")
    return recorder.take_rows(session)


_COLUMNS = _AUDIT_TABLE.c
_HEAD_FOR_UPDATE = (
    select(_HEAD_TABLE.c.seq, _HEAD_TABLE.c.hash, _HEAD_TABLE.c.key_check)
    .where(_HEAD_TABLE.c.id == 1)
    .with_for_update()
)
_NEWEST_LINK = select(_COLUMNS.prev_hash, _COLUMNS.row_mac, _COLUMNS.hash).where(
    _COLUMNS.chain_seq == bindparam("chain_seq")
)
_HEAD_MOVE = _HEAD_TABLE.update().where(_HEAD_TABLE.c.id == 1)
_SEALED_BEFORE = select(_COLUMNS.seq).where(_COLUMNS.chain_seq.is_not(None)).limit(1)
# An unsealed row's own fields (for its MAC) and its seq: everything but the links it lacks.
_UNSEALED = (
    select(*(column for column in _COLUMNS if column.name not in {"chain_seq", "prev_hash", "hash"}))
    .where(_COLUMNS.chain_seq.is_(None))
    .order_by(_COLUMNS.seq)
)
# Every link of a batch in one statement with four array parameters: constant SQL (compiled
# once), one round trip, instead of one UPDATE per row.
_LINK_ROWS = (
    func.unnest(
        bindparam("seqs", type_=ARRAY(BigInteger)),
        bindparam("chain_seqs", type_=ARRAY(BigInteger)),
        bindparam("prev_hashes", type_=ARRAY(Text)),
        bindparam("hashes", type_=ARRAY(Text)),
    )
    .table_valued("seq", "chain_seq", "prev_hash", "hash")
    .render_derived(name="link")
)
_LINK = (
    _AUDIT_TABLE.update()
    .where(_COLUMNS.seq == _LINK_ROWS.c.seq)
    .values(chain_seq=_LINK_ROWS.c.chain_seq, prev_hash=_LINK_ROWS.c.prev_hash, hash=_LINK_ROWS.c.hash)
)


def seal_pending(session: Session, key: bytes | None, limit: int = SEAL_BATCH) -> int:
    """Link unsealed events into the chain, oldest first; returns how many were sealed.

    The head row lock makes concurrent sealers (several schedulers) take turns; the
    second finds nothing left to do. A row whose MAC does not verify is left unsealed
    and reported by `verify_chain`: sealing it would vouch for a forgery.
    """
    # Core rows, not ORM objects: the sealer reads each event once, so the identity map and
    # the ORM's bulk-update path were pure overhead (over half its CPU at 2,500 events).
    connection = session.connection()
    head_seq, head_hash, head_key_check = _locked_head(connection, key)
    if head_key_check is None and _newest_link_holds(connection, head_seq, key):
        # A head from before the key check (migration 0003): stamp it, once the newest
        # link shows that this key is the one the chain was sealed under.
        connection.execute(_HEAD_MOVE.values(key_check=key_check(key)))
    elif head_key_check != key_check(key):
        # Rows linked under another key would break the chain for the key that verifies
        # it; a replica with a stray BROKER_AUDIT_KEY must not do that.
        log.error("the audit key differs from the one the audit chain is under; not sealing")
        return 0
    if head_seq == 0 and connection.execute(_SEALED_BEFORE).first() is not None:
        # The head is gone while sealed events exist: someone deleted it. Sealing on from
        # a fresh head would bury that; stop and let `broker audit verify` say so.
        log.error("audit chain head missing while sealed events exist; not sealing")
        return 0
    rows = connection.execute(_UNSEALED.limit(limit)).all()
    links = _links(rows, head_hash, head_seq, key)
    if links:
        seqs, chain_seqs, prev_hashes, hashes = (list(column) for column in zip(*links, strict=True))
        connection.execute(
            _LINK, {"seqs": seqs, "chain_seqs": chain_seqs, "prev_hashes": prev_hashes, "hashes": hashes}
        )
        connection.execute(_HEAD_MOVE.values(seq=chain_seqs[-1], hash=hashes[-1]))
    return len(links)


def _locked_head(connection: Connection, key: bytes | None) -> tuple[int, str, str | None]:
    """The head's (seq, hash, key_check), locked until commit; created at genesis, under
    `key`, when missing."""
    head = connection.execute(_HEAD_FOR_UPDATE).first()
    if head is None:
        # Insert only when missing: the usual seal then costs one statement, not two.
        connection.execute(
            insert(_HEAD_TABLE)
            .values(id=1, seq=0, hash=GENESIS, key_check=key_check(key))
            .on_conflict_do_nothing()
        )
        head = connection.execute(_HEAD_FOR_UPDATE).one()
    return head.seq, head.hash, head.key_check


def _newest_link_holds(connection: Connection, head_seq: int, key: bytes | None) -> bool:
    """Whether the head's link verifies under `key`: how a head without a key check (made
    before migration 0003) tells which key its chain is under. Nothing sealed: any key."""
    if head_seq == 0:
        return True
    row = connection.execute(_NEWEST_LINK, {"chain_seq": head_seq}).first()
    return row is not None and row.hash == link_hash(row.prev_hash or "", row.row_mac, key)


def _links(
    rows: Iterable[Any], prev: str, position: int, key: bytes | None
) -> list[tuple[int, int, str, str]]:
    """(seq, chain_seq, prev_hash, hash) for each row whose MAC holds, chained in seq order."""
    links = []
    for row in rows:
        if row.row_mac != row_mac(_fields_of(row), key):
            log.error("audit event seq %s fails its MAC; left unsealed", row.seq)
            continue
        position += 1
        digest = link_hash(prev, row.row_mac, key)
        links.append((row.seq, position, prev, digest))
        prev = digest
    return links


@dataclass(frozen=True)
class ChainProblem:
    seq: int | None
    problem: str


@dataclass(frozen=True)
class ChainReport:
    checked: int
    problems: tuple[ChainProblem, ...]
    unsealed: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Anchor:
    """A (chain_seq, hash) seen earlier and kept outside the database (a file, a log line).

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


def check_key(session: Session, key: bytes | None) -> None:
    """Raise `AuditKeyMismatch` when the chain is under another key than `key`.

    A chain with no head yet has sealed nothing, and says nothing: its unsealed rows'
    MACs are checked one by one.
    """
    head = session.get(AuditHead, 1)
    if head is None:
        return
    if head.key_check is None:
        if _newest_link_holds(session.connection(), head.seq, key):
            return
    elif head.key_check == key_check(key):
        return
    if key is None:
        raise AuditKeyMismatch("missing")
    raise AuditKeyMismatch("unexpected" if head.key_check == UNKEYED else "wrong")


def _sealed(session: Session, batch: int = 2000) -> Iterator[AuditEvent]:
    last = 0
    while True:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.chain_seq > last).order_by(AuditEvent.chain_seq).limit(batch)
        ).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].chain_seq or last
        session.expunge_all()


def _check_unsealed(session: Session, key: bytes | None) -> tuple[int, list[ChainProblem]]:
    rows = session.scalars(select(AuditEvent).where(AuditEvent.chain_seq.is_(None))).all()
    problems = [
        ChainProblem(row.seq, "content changed or forged: MAC does not match (not yet sealed)")
        for row in rows
        if row.row_mac != row_mac(_fields_of(row), key)
    ]
    return len(rows), problems


def verify_chain(session: Session, key: bytes | None = None, anchor: Anchor | None = None) -> ChainReport:
    """Walk the sealed chain and check the unsealed rows' MACs (see the module docstring).

    Raises `AuditKeyMismatch` before reading any row when `key` is not the chain's.
    """
    check_key(session, key)
    problems: list[ChainProblem] = []
    # An anchor taken before anything was sealed (seq 0) vouches for nothing yet.
    anchored = anchor is None or anchor.seq == 0
    prev, checked, last = GENESIS, 0, 0
    for row in _sealed(session):
        checked += 1
        position = row.chain_seq or 0
        if position != last + 1 or row.prev_hash != prev:
            problems.append(
                ChainProblem(row.seq, "link broken: a row before it was changed, inserted or deleted")
            )
        if row.row_mac != row_mac(_fields_of(row), key):
            problems.append(ChainProblem(row.seq, "content changed: MAC does not match the row"))
        if row.hash != link_hash(row.prev_hash or "", row.row_mac, key):
            problems.append(ChainProblem(row.seq, "link forged: hash does not match"))
        if anchor is not None and position == anchor.seq:
            anchored = row.hash == anchor.hash
        prev, last = row.hash or "", position
    if not anchored and anchor is not None:
        problems.append(ChainProblem(None, "anchor missing: a row seen earlier is gone or changed"))
    head = session.get(AuditHead, 1)
    if head is None and checked:
        problems.append(ChainProblem(None, "chain head missing"))
    elif head is not None and (head.seq != last or head.hash != (prev if checked else head.hash)):
        problems.append(ChainProblem(head.seq, "head mismatch: rows were deleted from the end"))
    unsealed, forged = _check_unsealed(session, key)
    problems.extend(forged)
    return ChainReport(checked, tuple(problems), unsealed)
