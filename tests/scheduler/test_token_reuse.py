"""Task token reuse: a token passes to the next task only when nothing it made is alive.

A finish in the process that started the task, which revoked every lease synchronously,
releases the task's Vault token to that process's pool. Every other ending (a revoke that
failed, the deadline, the kill switch, a finish elsewhere) leaves the token to the
scheduler, which revokes it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import text

from broker.scheduler.jobs import Jobs
from broker.vault import VaultUnavailable
from tests.factories import AGENT, can_log_in, start_body, vault

pytestmark = pytest.mark.slow


def token_row(services: Any, task_id: str) -> dict[str, Any]:
    with services.engine.connect() as connection:
        row = connection.execute(
            text("SELECT token_accessor, token_revoked_at, token_released_at FROM tasks WHERE id = :id"),
            {"id": task_id},
        ).one()
    return dict(row._mapping)


def token_alive(stack: Any, accessor: str) -> bool:
    answer = vault(stack, "POST", "auth/token/lookup-accessor", json={"accessor": accessor})
    return answer.status_code == 200


def retire(services: Any) -> int:
    with ThreadPoolExecutor(2) as pool:
        return Jobs(services, pool).retire_tokens()


def test_a_task_finished_where_it_started_hands_its_token_to_the_next_task(client, issuers, services, stack):
    headers = issuers["spire"].bearer(AGENT)
    first = client.post("/task/start", json=start_body(), headers=headers).get_json()
    first_creds = first["credentials"]["db"]["data"]
    finished = client.post("/task/finish", json={"task_id": first["task_id"]}, headers=headers).get_json()
    assert [lease["state"] for lease in finished["leases"]] == ["revoked"]
    assert not can_log_in(stack, first_creds)

    released = token_row(services, first["task_id"])
    assert released["token_released_at"] is not None and released["token_revoked_at"] is None
    assert token_alive(stack, released["token_accessor"])
    assert retire(services) == 0  # a released token is not the scheduler's to revoke

    second = client.post("/task/start", json=start_body(), headers=headers).get_json()
    assert token_row(services, second["task_id"])["token_accessor"] == released["token_accessor"]
    second_creds = second["credentials"]["db"]["data"]
    assert can_log_in(stack, second_creds)
    client.post("/task/finish", json={"task_id": second["task_id"]}, headers=headers)
    assert not can_log_in(stack, second_creds)


def test_a_token_whose_lease_vault_would_not_revoke_is_never_reused(
    client, issuers, services, stack, monkeypatch
):
    headers = issuers["spire"].bearer(AGENT)
    first = client.post("/task/start", json=start_body(), headers=headers).get_json()
    accessor = token_row(services, first["task_id"])["token_accessor"]

    def refuse(handle: Any) -> None:
        raise VaultUnavailable("revoke lease", "timed out")

    with monkeypatch.context() as patch:
        patch.setattr(services.vault, "revoke", refuse)
        finished = client.post("/task/finish", json={"task_id": first["task_id"]}, headers=headers).get_json()
    assert [lease["state"] for lease in finished["leases"]] == ["revoke_pending"]
    assert token_row(services, first["task_id"])["token_released_at"] is None

    second = client.post("/task/start", json=start_body(), headers=headers).get_json()
    assert token_row(services, second["task_id"])["token_accessor"] != accessor
    assert token_alive(stack, accessor)  # the pending lease is retried under it, then it goes
    client.post("/task/finish", json={"task_id": second["task_id"]}, headers=headers)


def test_a_task_that_ended_at_its_deadline_has_its_token_revoked_not_reused(client, issuers, services, stack):
    headers = issuers["spire"].bearer(AGENT)
    first = client.post("/task/start", json=start_body(), headers=headers).get_json()
    accessor = token_row(services, first["task_id"])["token_accessor"]
    with services.engine.begin() as connection:
        connection.execute(
            text("UPDATE tasks SET expires_at = now() - interval '1 second' WHERE id = :id"),
            {"id": first["task_id"]},
        )
    with ThreadPoolExecutor(2) as pool:
        assert Jobs(services, pool).expire_due() == 1
    # Finishing it afterwards changes nothing, and in particular releases nothing.
    late = client.post("/task/finish", json={"task_id": first["task_id"]}, headers=headers).get_json()
    assert late["state"] == "expired"
    assert token_row(services, first["task_id"])["token_released_at"] is None

    assert retire(services) == 1
    assert not token_alive(stack, accessor)
    second = client.post("/task/start", json=start_body(), headers=headers).get_json()
    assert token_row(services, second["task_id"])["token_accessor"] != accessor
    client.post("/task/finish", json={"task_id": second["task_id"]}, headers=headers)
