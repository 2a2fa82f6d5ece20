"""Checks the fault tests share: read the ledger and Vault the way an operator would.

Vault is always read directly (root token, not through a test's proxy) and Postgres
through its own port, so a fault the test injected never hides what is really left.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import create_engine, text

from tests.factories import live_leases, vault


def lease_alive(stack: Any, lease_id: str) -> bool:
    """Vault still knows the lease (an unknown, revoked or expired one answers 400)."""
    answer = vault(stack, "PUT", "sys/leases/lookup", json={"lease_id": lease_id})
    if answer.status_code == 400:
        return False
    answer.raise_for_status()
    return True


def all_live_leases(stack: Any, prefixes: tuple[str, ...] = ("database/creds/", "pki/issue/")) -> set[str]:
    """Every live lease id under `prefixes`, walking Vault's lease tree (root token)."""
    found: set[str] = set()
    pending = list(prefixes)
    while pending:
        prefix = pending.pop()
        for key in live_leases(stack, prefix):
            if key.endswith("/"):
                pending.append(prefix + key)
            else:
                found.add(prefix + key)
    return found


def token_alive(stack: Any, accessor: str) -> bool:
    answer = vault(stack, "POST", "auth/token/lookup-accessor", json={"accessor": accessor})
    if answer.status_code in (400, 403):
        return False
    answer.raise_for_status()
    return True


def assert_unavailable(response: Any, code: str) -> dict[str, Any]:
    """A fail-closed answer: 503 problem+json with the code and a Retry-After, no secrets."""
    body = response.get_json() if hasattr(response, "get_json") else response.json()
    status = response.status_code
    assert status == 503, (status, body)
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert body["code"] == code, body
    assert int(response.headers["Retry-After"]) > 0
    assert "credentials" not in body
    return dict(body)


class Ledger:
    """Read-only view of the broker's tables, straight from Postgres."""

    def __init__(self, database_url: str) -> None:
        self.engine = create_engine(database_url, pool_size=2)

    def close(self) -> None:
        self.engine.dispose()

    def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(text(sql), params)]

    def tasks(self) -> list[dict[str, Any]]:
        return self.rows("SELECT * FROM tasks ORDER BY created_at")

    def task(self, task_id: uuid.UUID | str) -> dict[str, Any]:
        [row] = self.rows("SELECT * FROM tasks WHERE id = :id", id=str(task_id))
        return row

    def only_task(self) -> dict[str, Any]:
        [row] = self.tasks()
        return row

    def leases(self, task_id: uuid.UUID | str | None = None) -> list[dict[str, Any]]:
        if task_id is None:
            return self.rows("SELECT * FROM leases ORDER BY issued_at")
        return self.rows("SELECT * FROM leases WHERE task_id = :id ORDER BY name", id=str(task_id))

    def events(self, event: str, task_id: uuid.UUID | str | None = None) -> list[dict[str, Any]]:
        if task_id is None:
            return self.rows("SELECT * FROM audit_events WHERE event = :e ORDER BY seq", e=event)
        return self.rows(
            "SELECT * FROM audit_events WHERE event = :e AND task_id = :t ORDER BY seq",
            e=event,
            t=str(task_id),
        )

    def count_by_lease(self, event: str) -> Mapping[str, int]:
        rows = self.rows(
            "SELECT lease_id::text AS lease_id, count(*) AS n FROM audit_events "
            "WHERE event = :e AND lease_id IS NOT NULL GROUP BY lease_id",
            e=event,
        )
        return {row["lease_id"]: int(row["n"]) for row in rows}
