"""A gateway task, end to end, with real clients against the real stack (docs/gateway.md).

psql and psycopg read through the handle; a statement the rules forbid gets 42501 and the
table is intact; statements are audited with owner and purpose and no literal; finish,
the deadline and the kill switch each cut an open session within a second and refuse the
handle after; the credential the gateway issued is a lease of the task, revoked with it.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import time
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text

from broker.config import settings_from_mapping
from broker.dev.stack.postgres import free_port
from broker.services import build_services
from tests.conftest import broker_config
from tests.factories import AGENT, dynamic_roles, start_task
from tests.support.fault_proxy import HttpFaultProxy
from tests.support.gateway import (
    GATEWAY_TASK,
    api_and_gateway,
    gateway_policy,
    gateway_section,
    ledger_rows,
    running_gateway,
)
from tests.support.waiting import wait_for

SECRET_LITERAL = "a-literal-only-the-query-knows"


@pytest.fixture
def broker(stack, issuers, tmp_path, clean_db):
    # A recheck far apart: a session cut within a second was cut by the task-end notification.
    policy = gateway_policy(stack, tmp_path / "policy.yaml", ttl=60)
    with api_and_gateway(stack, issuers, policy, recheck_seconds=30) as parts:
        yield parts


@pytest.fixture
def rechecking_broker(stack, issuers, tmp_path, clean_db):
    # No scheduler runs here: a deadline is seen only by the gateway's own recheck.
    policy = gateway_policy(stack, tmp_path / "policy.yaml", ttl=60)
    with api_and_gateway(stack, issuers, policy, recheck_seconds=0.2) as parts:
        yield parts


def started(client, issuers, **overrides: Any) -> tuple[str, dict[str, Any]]:
    response = start_task(client, issuers, GATEWAY_TASK, **overrides)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    return body["task_id"], body["credentials"]["db"]["data"]


def connect(handle: dict[str, Any], **extra: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=handle["host"], port=handle["port"], user=handle["username"], password=handle["password"],
        dbname=handle["dbname"], sslmode="disable", connect_timeout=10, autocommit=True, **extra,
    )  # fmt: skip


def events_count(stack, where: str) -> int:
    engine = create_engine(stack.database_url)
    with engine.connect() as connection:
        value = connection.execute(text(f"SELECT count(*) FROM audit_events WHERE {where}")).scalar_one()
    engine.dispose()
    return int(value)


def audit_rows(stack, event: str) -> list[Any]:
    engine = create_engine(stack.database_url)
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT actor, task_id, owner, purpose, detail FROM audit_events WHERE event = :e ORDER BY seq"
            ),
            {"e": event},
        ).all()
    engine.dispose()
    return list(rows)


def cut_within_a_second(connection: psycopg.Connection[Any]) -> None:
    """The session must be closed by the gateway within 1 s: statements fail from then on."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            connection.execute("SELECT 1")
        except psycopg.Error:
            return
        time.sleep(0.05)
    raise AssertionError("the session was still open a second after the task ended")


def test_psql_reads_through_the_handle(broker, issuers):
    client, _, _ = broker
    _, handle = started(client, issuers)
    env = {
        "PGHOST": handle["host"], "PGPORT": str(handle["port"]), "PGUSER": handle["username"],
        "PGPASSWORD": handle["password"], "PGDATABASE": handle["dbname"], "PGSSLMODE": handle["sslmode"],
        "PATH": "/usr/bin:/bin",
    }  # fmt: skip
    ran = subprocess.run(
        ["psql", "-At", "-c", "select count(*) from analytics.events"],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "3"


def test_a_forbidden_statement_gets_42501_the_table_is_intact_and_the_session_goes_on(broker, issuers, stack):
    client, _, _ = broker
    _, handle = started(client, issuers)
    with connect(handle) as connection:
        for statement in (
            "DELETE FROM analytics.events",
            "DROP TABLE analytics.events",
            "SELECT * FROM pg_authid",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
                connection.execute(statement)
            assert "read-only" in str(refused.value) or "analytics-only" in str(refused.value)
        # Extended protocol (a parameter), and a transaction block: the same session serves.
        count = connection.execute("SELECT count(*) FROM analytics.events WHERE id > %s", (0,)).fetchone()
        assert count == (3,)
        with connection.transaction():
            assert connection.execute("SELECT count(*) FROM analytics.events").fetchone() == (3,)
    superuser = stack.postgres.url("analytics").replace("+psycopg", "")
    with psycopg.connect(superuser) as connection:
        assert connection.execute("SELECT count(*) FROM analytics.events").fetchone() == (3,)


def test_statements_are_audited_with_owner_and_purpose_and_no_literal(broker, issuers, stack):
    client, _, _ = broker
    task_id, handle = started(client, issuers)
    with connect(handle) as connection:
        connection.execute(f"SELECT count(*) FROM analytics.events WHERE name = '{SECRET_LITERAL}'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute(f"DELETE FROM analytics.events WHERE name = '{SECRET_LITERAL}'")
    wait_for(lambda: len(audit_rows(stack, "gateway.statement")) >= 2, timeout=10)
    rows = audit_rows(stack, "gateway.statement")
    by_command = {row.detail["command"]: row for row in rows}
    allowed, refused = by_command["SELECT"], by_command["DELETE"]
    for row in (allowed, refused):
        assert str(row.task_id) == task_id
        assert row.owner == "alice@example.com" and row.purpose == "weekly revenue report"
        assert row.actor == AGENT
        assert row.detail["tables"] == ["analytics.events"]
        assert SECRET_LITERAL not in row.detail["statement"]
    assert allowed.detail["allowed"] is True and "rule" not in allowed.detail
    assert refused.detail["allowed"] is False and refused.detail["rule"] == "read-only"
    every_event = events_count(stack, f"detail::text LIKE '%{SECRET_LITERAL}%'")
    assert every_event == 0
    assert audit_rows(stack, "gateway.connect")


def test_the_gateways_credential_is_a_lease_of_the_task_revoked_with_it(broker, issuers, stack):
    client, _, gateway = broker
    task_id, handle = started(client, issuers)
    roles_before = dynamic_roles(stack)
    with connect(handle) as connection:
        connection.execute("SELECT 1")
    read = client.get(f"/task/{task_id}", headers=issuers["spire"].bearer(AGENT)).get_json()
    names = {lease["name"] for lease in read["leases"]}
    replica = gateway.service.replica
    [issuance] = [name for name in names if not name.endswith(":token")]
    assert re.fullmatch(rf"db@{replica}\.[0-9a-f]{{4}}", issuance)
    assert names == {issuance, f"{issuance}:token"}
    assert len(dynamic_roles(stack) - roles_before) == 1
    finished = client.post("/task/finish", json={"task_id": task_id}, headers=issuers["spire"].bearer(AGENT))
    assert finished.status_code == 200
    assert {lease["state"] for lease in finished.get_json()["leases"]} == {"revoked"}
    assert dynamic_roles(stack) - roles_before == set()


@pytest.mark.parametrize("ending", ["finish", "kill_switch"])
def test_the_tasks_end_cuts_its_open_session_within_a_second_and_refuses_the_handle(broker, issuers, ending):
    client, _, _ = broker
    task_id, handle = started(client, issuers)
    connection = connect(handle)
    connection.execute("SELECT 1")
    agent = issuers["spire"].bearer(AGENT)
    if ending == "finish":
        response = client.post("/task/finish", json={"task_id": task_id}, headers=agent)
    else:
        sre = issuers["sso"].bearer("sre-sam@example.com", groups=["sre"])
        response = client.post(
            "/leases/revoke", json={"task": GATEWAY_TASK, "reason": "incident"}, headers=sre
        )
    assert response.status_code == 200, response.get_json()
    cut_within_a_second(connection)
    connection.close()
    with pytest.raises(psycopg.OperationalError) as refused:
        connect(handle)
    assert "ended" in str(refused.value)


def test_the_deadline_cuts_the_session_and_refuses_the_handle(rechecking_broker, issuers):
    client, _, _ = rechecking_broker
    _, handle = started(client, issuers, ttl_seconds=2)
    connection = connect(handle)
    connection.execute("SELECT 1")
    time.sleep(2)
    cut_within_a_second(connection)
    connection.close()
    with pytest.raises(psycopg.OperationalError):
        connect(handle)


def test_a_wrong_or_unknown_handle_gets_28p01_alike_and_is_audited(broker, issuers, stack):
    client, _, _ = broker
    _, handle = started(client, issuers)
    answers = []
    for wrong in (
        {**handle, "password": "not-the-secret"},
        {**handle, "username": "brk_000000000000000000000000"},
    ):
        with pytest.raises(psycopg.OperationalError) as refused:
            connect(wrong)
        answers.append(str(refused.value).split('for user "')[0])
    assert answers[0] == answers[1] and "password authentication failed" in answers[0]
    wait_for(lambda: len(audit_rows(stack, "gateway.handle_refused")) >= 2, timeout=10)
    whys = sorted(row.detail["why"] for row in audit_rows(stack, "gateway.handle_refused"))
    assert whys == ["unknown handle", "wrong secret"]
    with connect(handle) as connection:  # and the gateway still serves the right one
        assert connection.execute("SELECT 1").fetchone() == (1,)


def test_with_vault_away_at_the_finish_the_gateway_still_cuts_the_session(stack, issuers, tmp_path, clean_db):
    """The database role outlives a finish whose revokes can't reach Vault (they wait in
    `revoke_pending`), so nothing but the gateway can end the session: it must, at once."""
    proxy = HttpFaultProxy.to(stack.vault.addr)
    policy = gateway_policy(stack, tmp_path / "policy.yaml", ttl=60)
    section = gateway_section(free_port(), audit_flush_seconds=0.1, recheck_seconds=30)
    config = broker_config(stack, issuers, policy, gateway=section)
    gateway_settings = settings_from_mapping(config, env={})  # the gateway reaches Vault itself
    config["vault"] = {**config["vault"], "addr": proxy.addr}
    services = build_services(settings_from_mapping(config, env={}))
    from broker.app import create_app

    client = create_app(services=services).test_client()
    try:
        with running_gateway(gateway_settings):
            task_id, handle = started(client, issuers)
            connection = connect(handle)
            connection.execute("SELECT 1")
            proxy.cut()
            finished = client.post(
                "/task/finish", json={"task_id": task_id}, headers=issuers["spire"].bearer(AGENT)
            )
            assert finished.status_code == 200, finished.get_json()
            assert finished.get_json()["state"] == "finished"
            assert "revoke_pending" in {lease["state"] for lease in finished.get_json()["leases"]}
            with pytest.raises(psycopg.Error) as cut:
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline:
                    connection.execute("SELECT 1")
                    time.sleep(0.05)
            assert "the task ended" in str(cut.value)
            connection.close()
    finally:
        proxy.restore()
        proxy.close()
        services.close()


def test_a_credential_that_expires_before_its_task_is_issued_again_under_new_names(broker, issuers, stack):
    """A role's max_ttl (or a second lost to rounding) can end the credential before its task:
    the next session gets a fresh one, recorded as leases of their own, not an error."""
    client, _, gateway = broker
    task_id, handle = started(client, issuers)
    with connect(handle) as connection:
        connection.execute("SELECT 1")
    held = gateway.service._logins
    for key, login in list(held.items()):  # as if Vault's lease had run out
        held[key] = dataclasses.replace(login, expires_at=login.expires_at - timedelta(days=1))
    with connect(handle) as connection:
        assert connection.execute("SELECT count(*) FROM analytics.events").fetchone() == (3,)
    names = [row.name for row in ledger_rows(stack, "SELECT name FROM leases WHERE task_id = :t", t=task_id)]
    assert len(names) == 4 and len(set(names)) == 4
