"""Helpers that build requests and read Vault/Postgres state the way a user would check it."""

from __future__ import annotations

from typing import Any

import psycopg
import requests

AGENT = "spiffe://example.org/agents/reporter"
OTHER_AGENT = "spiffe://example.org/agents/intruder"


def start_body(task: str = "analytics-read", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": task,
        "owner": "alice@example.com",
        "purpose": "weekly revenue report",
        "context": {"environment": "staging"},
    }
    body.update(overrides)
    return body


def start_task(
    client: Any, issuers: Any, task: str = "analytics-read", sub: str = AGENT, **overrides: Any
) -> Any:
    """POST /task/start as the SPIFFE workload `sub`; the response, whatever its status."""
    return client.post(
        "/task/start", json=start_body(task, **overrides), headers=issuers["spire"].bearer(sub)
    )


def started_task(
    client: Any, issuers: Any, task: str = "analytics-read", sub: str = AGENT, **overrides: Any
) -> dict[str, Any]:
    """`start_task` that must succeed (201); its JSON body."""
    response = start_task(client, issuers, task, sub, **overrides)
    assert response.status_code == 201, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


def db_dsn(stack: Any, creds: dict[str, Any]) -> str:
    return f"postgresql://{creds['username']}:{creds['password']}@127.0.0.1:{stack.postgres.port}/analytics"


def can_log_in(stack: Any, creds: dict[str, Any]) -> bool:
    try:
        with psycopg.connect(db_dsn(stack, creds), connect_timeout=3) as conn:
            conn.execute("SELECT count(*) FROM analytics.events")
        return True
    except psycopg.OperationalError:
        return False


def role_exists(stack: Any, username: str) -> bool:
    with psycopg.connect(stack.postgres.url("postgres").replace("+psycopg", "")) as conn:
        return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (username,)).fetchone() is not None


def dynamic_roles(stack: Any) -> set[str]:
    with psycopg.connect(stack.postgres.url("postgres").replace("+psycopg", "")) as conn:
        rows = conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'v-%'").fetchall()
    return {row[0] for row in rows}


def vault(stack: Any, method: str, path: str, token: str | None = None, **kwargs: Any) -> requests.Response:
    headers = {"X-Vault-Token": token or stack.openbao.root_token}
    return requests.request(method, f"{stack.vault.addr}/v1/{path}", headers=headers, timeout=10, **kwargs)


def live_leases(stack: Any, prefix: str) -> list[str]:
    answer = vault(stack, "LIST", f"sys/leases/lookup/{prefix}")
    if answer.status_code == 404:
        return []
    answer.raise_for_status()
    return list(answer.json()["data"]["keys"])
