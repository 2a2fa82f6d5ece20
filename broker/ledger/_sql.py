"""SQL spelled out from the models, and rows turned into objects without the ORM's unit
of work: the plumbing every part of the ledger shares."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar, cast

from psycopg import Connection, Cursor
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from sqlalchemy import Table
from sqlalchemy.orm import Session, configure_mappers

from broker.audit.chain import pending_rows
from broker.models import Approval, AuditEvent, GatewayHandle, Lease, PooledToken, Task

TASKS = cast(Table, Task.__table__)
LEASES = cast(Table, Lease.__table__)
APPROVALS = cast(Table, Approval.__table__)
AUDIT = cast(Table, AuditEvent.__table__)
POOLED = cast(Table, PooledToken.__table__)
HANDLES = cast(Table, GatewayHandle.__table__)
_JSON_COLUMNS = frozenset({"context", "detail"})


def names(table: Table, only: Iterable[str] | None = None) -> list[str]:
    return [column.name for column in table.columns if only is None or column.name in only]


def insert_sql(table: Table, columns: Sequence[str]) -> str:
    placeholders = ", ".join(f"%({name})s" for name in columns)
    return f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({placeholders})"  # noqa: S608


def select_sql(table: Table, where: str, tail: str = "") -> str:
    return f"SELECT {', '.join(names(table))} FROM {table.name} WHERE {where} {tail}".strip()  # noqa: S608


def update_sql(table: Table, fields: Sequence[str]) -> str:
    assignments = ", ".join(f"{name} = %({name})s" for name in fields if name != "id")
    return f"UPDATE {table.name} SET {assignments} WHERE id = %(id)s"  # noqa: S608 (names from the models)


_AUDIT_COLUMNS = names(AUDIT, ("id", "at", "event", "actor", "task_id",
                       "lease_id", "owner", "purpose", "detail", "row_mac"))  # fmt: skip
_INSERT_AUDIT = insert_sql(AUDIT, _AUDIT_COLUMNS)


def insert_audit(session: Session, connection: Connection[Any]) -> None:
    """INSERT the session's queued audit events, in the caller's round trip."""
    rows = pending_rows(session)
    if rows:
        connection.cursor().executemany(_INSERT_AUDIT, [adapted(row) for row in rows])


Row = TypeVar("Row", Task, Lease, Approval)


def row_object(cls: type[Row], row: Mapping[Any, Any]) -> Row:
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


def values(row: Task | Lease | GatewayHandle, columns: Iterable[str]) -> dict[str, Any]:
    return adapted({name: getattr(row, name) for name in columns})


def adapted(row: Mapping[str, Any]) -> dict[str, Any]:
    # psycopg sends a dict only when told it is JSON; jsonb is what these columns are.
    return {name: Jsonb(value) if name in _JSON_COLUMNS else value for name, value in row.items()}


def dict_cursor(connection: Connection[Any], query: str, task_id: uuid.UUID) -> Cursor[dict[str, Any]]:
    cursor = connection.cursor(row_factory=dict_row)
    cursor.execute(query, {"task_id": task_id})
    return cursor


def one(cursor: Cursor[Any]) -> tuple[Any, ...]:
    row = cursor.fetchone()
    assert row is not None
    return tuple(row)
