"""The task path's rows: a start, a finish, a read and an expiry, in as few round trips as
possible (the package docstring says why they are spelled out in SQL)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from psycopg import Connection
from psycopg.errors import UniqueViolation
from psycopg.rows import dict_row
from sqlalchemy import Select, any_, bindparam, select
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from broker.db import pipelined
from broker.ledger._sql import (
    APPROVALS,
    HANDLES,
    LEASES,
    TASKS,
    dict_cursor,
    insert_audit,
    insert_sql,
    names,
    one,
    row_object,
    select_sql,
    update_sql,
    values,
)
from broker.ledger.locks import LOCK_FOR_START, NO_LOCK_ON_TASK
from broker.ledger.pool import RECORD_POOLED, TAKE_POOLED, PoolRecord
from broker.lifecycle import LEASE_END_FIELDS, TASK_END_FIELDS, TASK_OPEN_STATES
from broker.models import Approval, GatewayHandle, Lease, Task
from broker.policy import Usage

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
_TASK_COLUMNS = names(TASKS)
_LEASE_COLUMNS = names(LEASES)
_INSERT_TASK = insert_sql(TASKS, _TASK_COLUMNS)
_INSERT_LEASE = insert_sql(LEASES, _LEASE_COLUMNS)
# `created_at` is the database's: the row is stamped by the commit that records the handle.
_HANDLE_COLUMNS = [name for name in names(HANDLES) if name != "created_at"]
_INSERT_HANDLE = insert_sql(HANDLES, _HANDLE_COLUMNS)
# Guarded: a finish or the kill switch that ended the task meanwhile leaves nothing to move,
# nor does a lock that matches it (committed after the start's check).
_ACTIVATE = (
    "UPDATE tasks SET state = 'active' WHERE id = %(task_id)s AND state = 'issuing'"  # noqa: S608
    f" AND {NO_LOCK_ON_TASK} RETURNING id"
)
_TASK = select_sql(TASKS, "id = %(task_id)s")
_KEYED = select_sql(TASKS, "workload = %(workload)s AND idempotency_key = %(key)s")  # its unique index
_RELEASE_KEY = "UPDATE tasks SET idempotency_key = NULL WHERE id = %(task_id)s"
_TASK_LOCKED = select_sql(TASKS, "id = %(task_id)s", "FOR UPDATE")
_LEASES_OF = select_sql(LEASES, "task_id = %(task_id)s", "ORDER BY name")
_LEASES_OF_MANY = (
    select(LEASES)
    .where(LEASES.c.task_id == any_(bindparam("task_ids", type_=ARRAY(UUID(as_uuid=True)))))
    .order_by(LEASES.c.task_id, LEASES.c.name)
)
_APPROVALS_OF = select_sql(APPROVALS, "task_id = %(task_id)s", "ORDER BY created_at")
# What ending a task may change, and so what ending a task writes back: one list,
# declared by `broker.lifecycle`, so a field it starts to set is saved on every path.
_TASK_ENDED_FIELDS = ("id", *TASK_END_FIELDS)
_LEASE_ENDED_FIELDS = ("id", *LEASE_END_FIELDS)
_TASK_ENDED = update_sql(TASKS, _TASK_ENDED_FIELDS)
_LEASE_ENDED = update_sql(LEASES, _LEASE_ENDED_FIELDS)


class Admission(NamedTuple):
    now: datetime
    usage: Usage
    # The task the start's Idempotency-Key already names, if any (with no leases loaded).
    keyed: Task | None
    # The oldest live lock that refuses this start, if any.
    lock: uuid.UUID | None = None


def lock_and_count(
    session: Session,
    *,
    lock_key: int,
    workload: str,
    task: str,
    owner: str,
    issuer: str,
    idempotency_key: str | None = None,
) -> Admission:
    """Take the workload's advisory lock, then count its open and recent tasks of `task`,
    find the task `idempotency_key` names, and the live lock that refuses the start.

    One round trip, and still exact: Postgres runs the count after the lock is granted,
    with a snapshot of its own, so a start that committed while we waited is counted
    (and a retry of a start that committed while we waited finds it).
    The database's clock, so every replica measures deadlines against one time.
    """
    with pipelined(session) as connection:
        clock = connection.execute(_LOCK_AND_NOW, {"key": lock_key})
        counts = connection.execute(USAGE_QUERY, {"workload": workload, "task": task})
        # In the same round trip: a lock costs a start one index probe, not a trip.
        locked = connection.execute(
            LOCK_FOR_START, {"workload": workload, "owner": owner, "task": task, "issuer": issuer}
        )
        keyed = (
            connection.cursor(row_factory=dict_row).execute(
                _KEYED, {"workload": workload, "key": idempotency_key}
            )
            if idempotency_key is not None
            else None
        )
    (now,) = one(clock)
    active, started = one(counts)
    row = keyed.fetchone() if keyed is not None else None
    lock = locked.fetchone()
    return Admission(
        now,
        Usage(active_for_workload=int(active), starts_last_minute=int(started)),
        row_object(Task, row) if row is not None else None,
        lock[0] if lock is not None else None,
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
        taken = connection.execute(TAKE_POOLED, {"accessor": task.token_accessor}) if pooled_token else None
        connection.execute(_INSERT_TASK, values(task, _TASK_COLUMNS))
        insert_audit(session, connection)
    return taken is None or taken.fetchone() is not None


def activate_with_leases(
    session: Session, task_id: uuid.UUID, leases: Sequence[Lease], handles: Sequence[GatewayHandle] = ()
) -> bool:
    """Move an `issuing` task to `active` and INSERT its leases, its gateway handles and the
    queued audit events.

    One round trip. False when the task was no longer `issuing`: then the caller must
    roll back, which takes the leases and events sent alongside with it.
    """
    with pipelined(session) as connection:
        moved = connection.execute(_ACTIVATE, {"task_id": task_id})
        if leases:
            connection.cursor().executemany(
                _INSERT_LEASE, [values(lease, _LEASE_COLUMNS) for lease in leases]
            )
        if handles:
            connection.cursor().executemany(
                _INSERT_HANDLE, [values(handle, _HANDLE_COLUMNS) for handle in handles]
            )
        insert_audit(session, connection)
    return moved.fetchone() is not None


def read_task(session: Session, task_id: uuid.UUID, *, lock: bool = False) -> Task | None:
    """The task with its leases, and its approvals if it went through approval.

    Locked: the leases are read by the statement after the lock, in the same round trip,
    so they are the rows as they are *after* waiting for it; read along with the locking
    statement they would be as they were before, and a finish would revoke again what an
    operator had just revoked.
    """
    with pipelined(session) as connection:
        found = dict_cursor(connection, _TASK_LOCKED if lock else _TASK, task_id)
        leases = dict_cursor(connection, _LEASES_OF, task_id)
    row = found.fetchone()
    if row is None:
        return None
    task = row_object(Task, row)
    set_committed_value(task, "leases", [row_object(Lease, lease) for lease in leases.fetchall()])
    approvals: list[Approval] = []
    if task.approval_expires_at is not None:  # only tasks that asked for approval have any
        with pipelined(session) as connection:
            cursor = dict_cursor(connection, _APPROVALS_OF, task_id)
        approvals = [row_object(Approval, approval) for approval in cursor.fetchall()]
    set_committed_value(task, "approvals", approvals)
    return task


def read_tasks(session: Session, claim: Select[Any]) -> list[Task]:
    """The tasks `claim` selects (and, with FOR UPDATE, locks), each with its leases, as
    session-less objects like `read_task`'s: two statements for a whole batch, and no ORM
    unit of work (most of the scheduler's CPU per expired task went to loading and then
    flushing ORM objects). Write back what ending changed with `write_back_ended`."""
    connection = session.connection()
    tasks = [row_object(Task, row) for row in connection.execute(claim).mappings()]
    if not tasks:
        return []
    by_task: dict[uuid.UUID, list[Lease]] = {task.id: [] for task in tasks}
    for row in connection.execute(_LEASES_OF_MANY, {"task_ids": list(by_task)}).mappings():
        by_task[row["task_id"]].append(row_object(Lease, row))
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
            connection.execute(RECORD_POOLED, back_to_pool._asdict())


def write_back_ended(session: Session, tasks: Sequence[Task]) -> None:
    """`write_back_end` for many tasks, in one round trip."""
    with pipelined(session) as connection:
        _write_back(session, connection, tasks)


def _write_back(session: Session, connection: Connection[Any], tasks: Sequence[Task]) -> None:
    connection.cursor().executemany(_TASK_ENDED, [values(task, _TASK_ENDED_FIELDS) for task in tasks])
    ended_leases = [values(lease, _LEASE_ENDED_FIELDS) for task in tasks for lease in task.leases]
    if ended_leases:
        connection.cursor().executemany(_LEASE_ENDED, ended_leases)
    insert_audit(session, connection)
