"""The task path's rows, read and written with cached Core statements.

A start, a finish and a read each touch one task and its few leases, once. The ORM's unit
of work (identity map, change history, loader strategies, flush ordering) is pure cost
there: on a start+finish it was the largest single item of the worker's CPU. These
helpers move rows between the database and plain, session-less `Task`/`Lease` objects
(what the renderers and the `Revoker` already work with), in as many statements as the
ORM issued, or fewer.

Objects from `read_task` belong to no session: changing one persists nothing by itself.
The finish path writes back what ending a task changes with `write_back_end`; anything
else that edits a task uses `broker.models.load_task` and the ORM.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, select
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from broker.models import Approval, Lease, Task

_TASKS = cast(Table, Task.__table__)
_LEASES = cast(Table, Lease.__table__)
_APPROVALS = cast(Table, Approval.__table__)

_TASK = select(_TASKS).where(_TASKS.c.id == bindparam("task_id"))
_TASK_LOCKED = _TASK.with_for_update()
_LEASES_OF = select(_LEASES).where(_LEASES.c.task_id == bindparam("task_id")).order_by(_LEASES.c.name)
_APPROVALS_OF = (
    select(_APPROVALS).where(_APPROVALS.c.task_id == bindparam("task_id")).order_by(_APPROVALS.c.created_at)
)

# What `Revoker.end_task` changes. The parameters are prefixed: SQLAlchemy reserves bare
# column names for the SET clause it would generate itself.
_TASK_ENDED = (
    _TASKS.update()
    .where(_TASKS.c.id == bindparam("p_id"))
    .values(
        state=bindparam("p_state"),
        finished_at=bindparam("p_finished_at"),
        end_reason=bindparam("p_end_reason"),
        outcome=bindparam("p_outcome"),
        token_released_at=bindparam("p_token_released_at"),
    )
)
_LEASE_FIELDS = ("state", "revoked_at", "revoke_reason", "revoke_attempts", "last_error", "next_attempt_at")
_LEASE_REVOKED = (
    _LEASES.update()
    .where(_LEASES.c.id == bindparam("p_id"))
    .values({name: bindparam(f"p_{name}") for name in _LEASE_FIELDS})
)


def read_task(session: Session, task_id: uuid.UUID, *, lock: bool = False) -> Task | None:
    """The task with its leases, and its approvals if it went through approval.

    Locked: the leases are read by a second statement once the task's row lock is held,
    so they are the rows as they are *after* waiting for it; read with the lock they would
    be as they were before, and a finish would revoke again what an operator had just
    revoked.
    """
    connection = session.connection()
    row = connection.execute(_TASK_LOCKED if lock else _TASK, {"task_id": task_id}).first()
    if row is None:
        return None
    task = Task(**row._mapping)
    set_committed_value(task, "leases", _rows(connection, _LEASES_OF, task_id, Lease))
    # Only tasks that asked for approval have any; the others skip the query.
    approvals = _rows(connection, _APPROVALS_OF, task_id, Approval) if task.approval_expires_at else []
    set_committed_value(task, "approvals", approvals)
    return task


def write_back_end(session: Session, task: Task) -> None:
    """Persist what `Revoker.end_task` changed on a task from `read_task`."""
    connection = session.connection()
    connection.execute(
        _TASK_ENDED,
        {
            "p_id": task.id,
            "p_state": task.state,
            "p_finished_at": task.finished_at,
            "p_end_reason": task.end_reason,
            "p_outcome": task.outcome,
            "p_token_released_at": task.token_released_at,
        },
    )
    if task.leases:
        values = [
            {"p_id": lease.id, **{f"p_{name}": getattr(lease, name) for name in _LEASE_FIELDS}}
            for lease in task.leases
        ]
        connection.execute(_LEASE_REVOKED, values)


def insert_rows(session: Session, rows: Sequence[Task] | Sequence[Lease]) -> None:
    """INSERT new rows, every column given explicitly (no default is left to the ORM)."""
    table = cast(Table, type(rows[0]).__table__)
    values = [{column.key: getattr(row, column.key) for column in table.columns} for row in rows]
    session.connection().execute(table.insert(), values)


def _rows(connection: Connection, query: Any, task_id: uuid.UUID, model: type[Any]) -> list[Any]:
    return [model(**row._mapping) for row in connection.execute(query, {"task_id": task_id})]
