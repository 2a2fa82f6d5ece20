"""The task path's rows: a start, a finish and a read, in as few round trips as possible.

Each of these touches one task and its few leases once, and most of its time in the
database was waiting: a BEGIN, then one statement, its answer, the next. Here the
statements of one step go together in psycopg's pipeline mode on the session's own
connection (`broker.db.pipelined`), audit rows included, so a start costs five round
trips and a finish three where they cost eighteen between them. The SQL is spelled out
(column lists come from the models), and rows become plain, session-less `Task`/`Lease`
objects: what the renderers and the `Revoker` work with anyway, without the ORM's unit of
work, which was the largest single item of the worker's CPU on this path.

This module is the only reader and writer of tasks and leases (and of pooled task tokens,
whose handover to a task happens in the task's own statements): every service and the
scheduler come here. Two kinds of object come out of it:
- from `read_task(s)`: session-less; changing one persists nothing by itself. What ending
  a task may change (`Revoker.TASK_FIELDS`, `Revoker.LEASE_FIELDS`) is written back with
  `write_back_end(ed)`, so a field the revoker sets is saved on every path.
- from `load_task`: attached to the caller's session, for the rarer edits (approval,
  claim, operator revocation); the session's flush at the unit of work's commit writes
  every changed field.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeVar, cast

from psycopg import Connection, Cursor
from psycopg.errors import UniqueViolation
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from sqlalchemy import Select, String, Table, any_, bindparam, delete, func, select, update
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import Session, configure_mappers, joinedload, lazyload, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from broker.audit.chain import pending_rows
from broker.db import pipelined
from broker.leases.revoker import Revoker
from broker.models import (
    TASK_OPEN_STATES,
    TERMINAL_TASK_STATES,
    Approval,
    AuditEvent,
    Lease,
    PooledToken,
    Task,
)
from broker.policy import Usage

_TASKS = cast(Table, Task.__table__)
_LEASES = cast(Table, Lease.__table__)
_APPROVALS = cast(Table, Approval.__table__)
_AUDIT = cast(Table, AuditEvent.__table__)
_POOLED = cast(Table, PooledToken.__table__)
_JSON_COLUMNS = frozenset({"context", "detail"})


def _names(table: Table, only: Iterable[str] | None = None) -> list[str]:
    return [column.name for column in table.columns if only is None or column.name in only]


def _insert(table: Table, names: Sequence[str]) -> str:
    placeholders = ", ".join(f"%({name})s" for name in names)
    return f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({placeholders})"  # noqa: S608


def _select(table: Table, where: str, tail: str = "") -> str:
    return f"SELECT {', '.join(_names(table))} FROM {table.name} WHERE {where} {tail}".strip()  # noqa: S608


_OPEN = "state IN ({})".format(", ".join(f"'{state}'" for state in TASK_OPEN_STATES))
_LOCK_AND_NOW = "SELECT now() FROM pg_advisory_xact_lock(%(key)s)"
# Open tasks, and starts in the last minute by the database's clock: now() is the
# transaction's start, the same instant the lock statement answers with.
_RECENT = "created_at > now() - interval '60 seconds'"
# Public so bench/run plans exactly this query.
USAGE_QUERY = (
    f"SELECT count(*) FILTER (WHERE {_OPEN}), count(*) FILTER (WHERE {_RECENT})"  # noqa: S608
    f" FROM tasks WHERE workload = %(workload)s AND task = %(task)s AND ({_OPEN} OR {_RECENT})"
)
_TASK_COLUMNS = _names(_TASKS)
_LEASE_COLUMNS = _names(_LEASES)
_AUDIT_COLUMNS = _names(_AUDIT, ("id", "at", "event", "actor", "task_id",
                        "lease_id", "owner", "purpose", "detail", "row_mac"))  # fmt: skip
_INSERT_TASK = _insert(_TASKS, _TASK_COLUMNS)
_INSERT_LEASE = _insert(_LEASES, _LEASE_COLUMNS)
_INSERT_AUDIT = _insert(_AUDIT, _AUDIT_COLUMNS)
# Guarded: a finish or the kill switch that ended the task meanwhile leaves nothing to move.
_ACTIVATE = "UPDATE tasks SET state = 'active' WHERE id = %(task_id)s AND state = 'issuing' RETURNING id"
_TASK = _select(_TASKS, "id = %(task_id)s")
_KEYED = _select(_TASKS, "workload = %(workload)s AND idempotency_key = %(key)s")  # its unique index
_RELEASE_KEY = "UPDATE tasks SET idempotency_key = NULL WHERE id = %(task_id)s"
_TASK_LOCKED = _select(_TASKS, "id = %(task_id)s", "FOR UPDATE")
_LEASES_OF = _select(_LEASES, "task_id = %(task_id)s", "ORDER BY name")
_LEASES_OF_MANY = (
    select(_LEASES)
    .where(_LEASES.c.task_id == any_(bindparam("task_ids", type_=ARRAY(UUID(as_uuid=True)))))
    .order_by(_LEASES.c.task_id, _LEASES.c.name)
)
_APPROVALS_OF = _select(_APPROVALS, "task_id = %(task_id)s", "ORDER BY created_at")
# What `Revoker.end_task` may change, and so what ending a task writes back: one list,
# declared by the revoker, so a field it starts to set is saved on every path.
_TASK_ENDED_FIELDS = ("id", *Revoker.TASK_FIELDS)
_LEASE_ENDED_FIELDS = ("id", *Revoker.LEASE_FIELDS)


def _update(table: Table, fields: Sequence[str]) -> str:
    assignments = ", ".join(f"{name} = %({name})s" for name in fields if name != "id")
    return f"UPDATE {table.name} SET {assignments} WHERE id = %(id)s"  # noqa: S608 (names from the models)


_TASK_ENDED = _update(_TASKS, _TASK_ENDED_FIELDS)
_LEASE_ENDED = _update(_LEASES, _LEASE_ENDED_FIELDS)

# Pooled task tokens. Leases run on the database's clock, the one the scheduler judges them by.
_RECORD_POOLED = (
    "INSERT INTO task_tokens (accessor, task, holder, expires_at, lease_until)"
    " VALUES (%(accessor)s, %(task)s, %(holder)s, %(expires_at)s,"
    " now() + make_interval(secs => %(lease_seconds)s))"
    " ON CONFLICT (accessor) DO UPDATE SET task = excluded.task, holder = excluded.holder,"
    " lease_until = excluded.lease_until"
)
_RENEW_POOLED = (
    "UPDATE task_tokens SET lease_until = now() + make_interval(secs => %(lease_seconds)s)"
    " WHERE holder = %(holder)s"
)
# What Vault expired has nothing left to revoke; its holder drops the row as it renews.
_DROP_EXPIRED = "DELETE FROM task_tokens WHERE holder = %(holder)s AND expires_at <= now()"
_FORGET_POOLED = "DELETE FROM task_tokens WHERE accessor = ANY(%(accessors)s)"
# A token its holder could not revoke: no longer held, so the scheduler's next claim takes it.
_ABANDON_POOLED = (
    "UPDATE task_tokens SET holder = '', lease_until = now() WHERE accessor = ANY(%(accessors)s)"
)
# The handover to a task: gone means the scheduler reclaimed (revoked) the token first.
_TAKE_POOLED = "DELETE FROM task_tokens WHERE accessor = %(accessor)s RETURNING accessor"


class Admission(NamedTuple):
    now: datetime
    usage: Usage
    # The task the start's Idempotency-Key already names, if any (with no leases loaded).
    keyed: Task | None


def lock_and_count(
    session: Session, *, lock_key: int, workload: str, task: str, idempotency_key: str | None = None
) -> Admission:
    """Take the workload's advisory lock, then count its open and recent tasks of `task`,
    and find the task `idempotency_key` names.

    One round trip, and still exact: Postgres runs the count after the lock is granted,
    with a snapshot of its own, so a start that committed while we waited is counted
    (and a retry of a start that committed while we waited finds it).
    The database's clock, so every replica measures deadlines against one time.
    """
    with pipelined(session) as connection:
        clock = connection.execute(_LOCK_AND_NOW, {"key": lock_key})
        counts = connection.execute(USAGE_QUERY, {"workload": workload, "task": task})
        keyed = (
            connection.cursor(row_factory=dict_row).execute(
                _KEYED, {"workload": workload, "key": idempotency_key}
            )
            if idempotency_key is not None
            else None
        )
    (now,) = _one(clock)
    active, started = _one(counts)
    row = keyed.fetchone() if keyed is not None else None
    return Admission(
        now,
        Usage(active_for_workload=int(active), starts_last_minute=int(started)),
        _row_object(Task, row) if row is not None else None,
    )


IDEMPOTENCY_INDEX = "uq_tasks_workload_idempotency_key"


def idempotency_clash(error: BaseException) -> bool:
    """Whether `error` is a task INSERT refused because its workload's key names another
    task: two starts with one key under different locks (task types) at once."""
    cause = getattr(error, "orig", None) or error
    return isinstance(cause, UniqueViolation) and cause.diag.constraint_name == IDEMPOTENCY_INDEX


def release_idempotency_key(session: Session, task_id: uuid.UUID) -> None:
    """Take the key off a task that no longer holds it, so a new task can (one per key)."""
    with pipelined(session) as connection:
        connection.execute(_RELEASE_KEY, {"task_id": task_id})


def insert_task(session: Session, task: Task, *, pooled_token: bool = False) -> bool:
    """INSERT the task and the session's queued audit events, in one round trip.

    With `pooled_token` the task's token comes from a pool and its `task_tokens` row is
    deleted in the same round trip: from this commit on the task row alone records it.
    False when that row was gone (the scheduler reclaimed the token): the caller must
    roll back and not use the token.
    """
    with pipelined(session) as connection:
        taken = connection.execute(_TAKE_POOLED, {"accessor": task.token_accessor}) if pooled_token else None
        connection.execute(_INSERT_TASK, _values(task, _TASK_COLUMNS))
        _insert_audit(session, connection)
    return taken is None or taken.fetchone() is not None


def activate_with_leases(session: Session, task_id: uuid.UUID, leases: Sequence[Lease]) -> bool:
    """Move an `issuing` task to `active` and INSERT its leases and the queued audit events.

    One round trip. False when the task was no longer `issuing`: then the caller must
    roll back, which takes the leases and events sent alongside with it.
    """
    with pipelined(session) as connection:
        moved = connection.execute(_ACTIVATE, {"task_id": task_id})
        connection.cursor().executemany(_INSERT_LEASE, [_values(lease, _LEASE_COLUMNS) for lease in leases])
        _insert_audit(session, connection)
    return moved.fetchone() is not None


def read_task(session: Session, task_id: uuid.UUID, *, lock: bool = False) -> Task | None:
    """The task with its leases, and its approvals if it went through approval.

    Locked: the leases are read by the statement after the lock, in the same round trip,
    so they are the rows as they are *after* waiting for it; read along with the locking
    statement they would be as they were before, and a finish would revoke again what an
    operator had just revoked.
    """
    with pipelined(session) as connection:
        found = _dict_cursor(connection, _TASK_LOCKED if lock else _TASK, task_id)
        leases = _dict_cursor(connection, _LEASES_OF, task_id)
    row = found.fetchone()
    if row is None:
        return None
    task = _row_object(Task, row)
    set_committed_value(task, "leases", [_row_object(Lease, lease) for lease in leases.fetchall()])
    approvals: list[Approval] = []
    if task.approval_expires_at is not None:  # only tasks that asked for approval have any
        with pipelined(session) as connection:
            cursor = _dict_cursor(connection, _APPROVALS_OF, task_id)
        approvals = [_row_object(Approval, approval) for approval in cursor.fetchall()]
    set_committed_value(task, "approvals", approvals)
    return task


def read_tasks(session: Session, claim: Select[Any]) -> list[Task]:
    """The tasks `claim` selects (and, with FOR UPDATE, locks), each with its leases, as
    session-less objects like `read_task`'s: two statements for a whole batch, and no ORM
    unit of work (most of the scheduler's CPU per expired task went to loading and then
    flushing ORM objects). Write back what ending changed with `write_back_ended`."""
    connection = session.connection()
    tasks = [_row_object(Task, row) for row in connection.execute(claim).mappings()]
    if not tasks:
        return []
    by_task: dict[uuid.UUID, list[Lease]] = {task.id: [] for task in tasks}
    for row in connection.execute(_LEASES_OF_MANY, {"task_ids": list(by_task)}).mappings():
        by_task[row["task_id"]].append(_row_object(Lease, row))
    for task in tasks:
        set_committed_value(task, "leases", by_task[task.id])
    return tasks


def write_back_end(session: Session, task: Task, *, back_to_pool: PoolRecord | None = None) -> None:
    """Persist what ending changed on a task from `read_task`, with the queued audit events.

    `back_to_pool`: the task released its token to its process's pool; the token is
    recorded as pooled in the same round trip, so it is never off the record.
    """
    with pipelined(session) as connection:
        _write_back(session, connection, [task])
        if back_to_pool is not None:
            connection.execute(_RECORD_POOLED, back_to_pool._asdict())


def write_back_ended(session: Session, tasks: Sequence[Task]) -> None:
    """`write_back_end` for many tasks, in one round trip."""
    with pipelined(session) as connection:
        _write_back(session, connection, tasks)


def _write_back(session: Session, connection: Connection[Any], tasks: Sequence[Task]) -> None:
    connection.cursor().executemany(_TASK_ENDED, [_values(task, _TASK_ENDED_FIELDS) for task in tasks])
    ended_leases = [_values(lease, _LEASE_ENDED_FIELDS) for task in tasks for lease in task.leases]
    if ended_leases:
        connection.cursor().executemany(_LEASE_ENDED, ended_leases)
    _insert_audit(session, connection)


# -- pooled task tokens (docs/contract.md §6.2) ------------------------------------------


class PoolRecord(NamedTuple):
    """A pooled token as its holder records it."""

    accessor: str
    task: str
    expires_at: datetime
    holder: str
    lease_seconds: float


def record_pooled(
    session: Session, *, holder: str, lease_seconds: float, tokens: Sequence[PoolRecord] = (),
    forget: Sequence[str] = (), abandon: Sequence[str] = (),
) -> None:  # fmt: skip
    """Record `tokens`, renew `holder`'s lease on every token it holds, drop the rows of
    `forget` (tokens it revoked) and of its tokens Vault has expired, and hand `abandon`
    (tokens it could not revoke) to the scheduler: one round trip."""
    params = {"holder": holder, "lease_seconds": lease_seconds}
    with pipelined(session) as connection:
        if tokens:
            connection.cursor().executemany(_RECORD_POOLED, [token._asdict() for token in tokens])
        connection.execute(_RENEW_POOLED, params)
        connection.execute(_DROP_EXPIRED, params)
        if forget:
            connection.execute(_FORGET_POOLED, {"accessors": list(forget)})
        if abandon:  # after the renewal, which would renew them too
            connection.execute(_ABANDON_POOLED, {"accessors": list(abandon)})


def take_pooled(session: Session, accessor: str) -> bool:
    """`insert_task`'s handover for an ORM-loaded task (a claim); False if reclaimed."""
    taken = session.execute(
        delete(PooledToken).where(PooledToken.accessor == accessor).returning(PooledToken.accessor)
    )
    return taken.first() is not None


def lapsed_pooled(limit: int = 20) -> Select[str, str, bool]:
    """Pooled tokens whose holder stopped renewing its lease, the longest lapsed first
    (ix_task_tokens_lease_until); `expired`: Vault already dropped the token."""
    return (
        select(
            PooledToken.accessor, PooledToken.holder, (PooledToken.expires_at <= func.now()).label("expired")
        )
        .where(PooledToken.lease_until < func.now())
        .order_by(PooledToken.lease_until)
        .limit(limit)
    )


FORGET_POOLED = _POOLED.delete().where(
    _POOLED.c.accessor == any_(bindparam("accessors", type_=ARRAY(String)))
)


# Spent task tokens one sweeper thread retires per transaction: claim, UPDATE and commit
# are paid per batch, not per token (scheduler CPU per token, Vault call aside, ~3 ms ->
# ~0.1 ms); small, so a slow Vault keeps few rows locked.
RETIRE_BATCH = 20


# -- the scheduler's claims, also planned by bench/run (EXPLAIN at 100,000 rows) -------


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
    _TASKS.update()
    .where(_TASKS.c.id == any_(bindparam("ids", type_=ARRAY(UUID(as_uuid=True)))))
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
        .where(Task.state == "pending_approval", Task.approval_expires_at <= func.now())
        .values(state="approval_expired", finished_at=func.now(), end_reason="approval lapsed")
        .returning(Task)
    ).all()


# -- attached objects, for the edits the ORM writes ----------------------------------


def load_task(session: Session, task_id: uuid.UUID, *, lock: bool = False) -> Task | None:
    """A task with its leases in one round trip (and its approvals only if it has any).

    The hot paths (start, finish, expiry) read tasks that never needed approval; loading
    their (empty) approvals would be a wasted query each time.
    """
    # Locked: the leases are read by a second statement once the lock is held. Joined into
    # the locking statement they would be the rows as they were *before* waiting for the
    # lock, and a finish would revoke again what an operator had just revoked.
    leases = selectinload(Task.leases) if lock else joinedload(Task.leases)
    query = (
        select(Task)
        .where(Task.id == task_id)
        .options(leases, lazyload(Task.approvals))
        .execution_options(populate_existing=True)
    )
    if lock:
        query = query.with_for_update(of=Task)
    task = session.scalars(query).unique().first()
    if task is not None and task.approval_expires_at is not None:
        task.approvals  # noqa: B018 (load while attached: rendered after the session closes)
    return task


# -- plumbing ----------------------------------------------------------------------------


def _insert_audit(session: Session, connection: Connection[Any]) -> None:
    rows = pending_rows(session)
    if rows:
        connection.cursor().executemany(_INSERT_AUDIT, [_adapted(row) for row in rows])


Row = TypeVar("Row", Task, Lease, Approval)


def _row_object(cls: type[Row], row: Mapping[Any, Any]) -> Row:
    """An object of a mapped class holding a row, as the ORM's loader builds one: values
    straight into its dict, not through the declarative constructor, which sets each
    attribute with change tracking (~65 µs against ~4 µs an object, and every start,
    finish and expiry builds a few)."""
    mapper = cls.__mapper__
    if not mapper.configured:
        # The constructor and every ORM query configure the mappers first; in a fresh
        # worker this may be the first use, and relationships have no loader until then.
        configure_mappers()
    instance: Row = mapper.class_manager.new_instance()
    instance.__dict__.update(row)
    return instance


def _values(row: Task | Lease, names: Iterable[str]) -> dict[str, Any]:
    return _adapted({name: getattr(row, name) for name in names})


def _adapted(values: Mapping[str, Any]) -> dict[str, Any]:
    # psycopg sends a dict only when told it is JSON; jsonb is what these columns are.
    return {name: Jsonb(value) if name in _JSON_COLUMNS else value for name, value in values.items()}


def _dict_cursor(connection: Connection[Any], query: str, task_id: uuid.UUID) -> Cursor[dict[str, Any]]:
    cursor = connection.cursor(row_factory=dict_row)
    cursor.execute(query, {"task_id": task_id})
    return cursor


def _one(cursor: Cursor[Any]) -> tuple[Any, ...]:
    row = cursor.fetchone()
    assert row is not None
    return tuple(row)
