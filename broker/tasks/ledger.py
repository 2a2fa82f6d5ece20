"""The task path's rows: a start, a finish and a read, in as few round trips as possible.

Each of these touches one task and its few leases once, and most of its time in the
database was waiting: a BEGIN, then one statement, its answer, the next. Here the
statements of one step go together in psycopg's pipeline mode on the session's own
connection (`broker.db.pipelined`), audit rows included, so a start costs five round
trips and a finish three where they cost eighteen between them. The SQL is spelled out
(column lists come from the models), and rows become plain, session-less `Task`/`Lease`
objects: what the renderers and the `Revoker` work with anyway, without the ORM's unit of
work, which was the largest single item of the worker's CPU on this path.

Objects from `read_task` belong to no session: changing one persists nothing by itself.
The finish writes back what ending a task changes with `write_back_end`; anything else
that edits a task uses `broker.models.load_task` and the ORM.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar, cast

from psycopg import Connection, Cursor
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from sqlalchemy import Select, Table, any_, bindparam, select
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import Session, configure_mappers
from sqlalchemy.orm.attributes import set_committed_value

from broker.audit.chain import pending_rows
from broker.db import pipelined
from broker.models import TASK_OPEN_STATES, Approval, AuditEvent, Lease, Task
from broker.policy import Usage

_TASKS = cast(Table, Task.__table__)
_LEASES = cast(Table, Lease.__table__)
_APPROVALS = cast(Table, Approval.__table__)
_AUDIT = cast(Table, AuditEvent.__table__)
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
_TASK_LOCKED = _select(_TASKS, "id = %(task_id)s", "FOR UPDATE")
_LEASES_OF = _select(_LEASES, "task_id = %(task_id)s", "ORDER BY name")
_LEASES_OF_MANY = (
    select(_LEASES)
    .where(_LEASES.c.task_id == any_(bindparam("task_ids", type_=ARRAY(UUID(as_uuid=True)))))
    .order_by(_LEASES.c.task_id, _LEASES.c.name)
)
_APPROVALS_OF = _select(_APPROVALS, "task_id = %(task_id)s", "ORDER BY created_at")
# What `Revoker.end_task` (and a finish that releases the task token) changes.
_TASK_ENDED = (
    "UPDATE tasks SET state = %(state)s, finished_at = %(finished_at)s, end_reason = %(end_reason)s,"
    " outcome = %(outcome)s, token_released_at = %(token_released_at)s WHERE id = %(id)s"
)
_TASK_ENDED_FIELDS = ("id", "state", "finished_at", "end_reason", "outcome", "token_released_at")
_LEASE_FIELDS = ("state", "revoked_at", "revoke_reason", "revoke_attempts", "last_error", "next_attempt_at")
_LEASE_SET = ", ".join(f"{name} = %({name})s" for name in _LEASE_FIELDS)
_LEASE_ENDED = f"UPDATE leases SET {_LEASE_SET} WHERE id = %(id)s"  # noqa: S608 (fixed names)


def lock_and_count(session: Session, *, lock_key: int, workload: str, task: str) -> tuple[datetime, Usage]:
    """Take the workload's advisory lock, then count its open and recent tasks of `task`.

    One round trip, and still exact: Postgres runs the count after the lock is granted,
    with a snapshot of its own, so a start that committed while we waited is counted.
    The database's clock, so every replica measures deadlines against one time.
    """
    with pipelined(session) as connection:
        clock = connection.execute(_LOCK_AND_NOW, {"key": lock_key})
        counts = connection.execute(USAGE_QUERY, {"workload": workload, "task": task})
    (now,) = _one(clock)
    active, started = _one(counts)
    return now, Usage(active_for_workload=int(active), starts_last_minute=int(started))


def insert_task(session: Session, task: Task) -> None:
    """INSERT the task and the session's queued audit events, in one round trip."""
    with pipelined(session) as connection:
        connection.execute(_INSERT_TASK, _values(task, _TASK_COLUMNS))
        _insert_audit(session, connection)


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


def write_back_end(session: Session, task: Task) -> None:
    """Persist what ending changed on a task from `read_task`, with the queued audit events."""
    write_back_ended(session, [task])


def write_back_ended(session: Session, tasks: Sequence[Task]) -> None:
    """`write_back_end` for many tasks, in one round trip."""
    with pipelined(session) as connection:
        connection.cursor().executemany(_TASK_ENDED, [_values(task, _TASK_ENDED_FIELDS) for task in tasks])
        ended_leases = [_values(lease, ("id", *_LEASE_FIELDS)) for task in tasks for lease in task.leases]
        if ended_leases:
            connection.cursor().executemany(_LEASE_ENDED, ended_leases)
        _insert_audit(session, connection)


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
