"""The task lifecycle against the real OpenBao and Postgres (docs/contract.md §5, §6.1-6.3, §6.6-6.7)."""

from __future__ import annotations

import uuid

import pytest

from tests.factories import (
    AGENT,
    OTHER_AGENT,
    can_log_in,
    dynamic_roles,
    live_leases,
    start_body,
    vault,
)
from tests.factories import start_task as start


def finish(client, issuers, task_id, sub=AGENT, **extra):
    return client.post(
        "/task/finish", json={"task_id": task_id, **extra}, headers=issuers["spire"].bearer(sub)
    )


def test_start_answers_the_documented_shape(client, issuers):
    response = start(client, issuers)
    assert response.status_code == 201
    body = response.get_json()
    assert body["state"] == "active"
    assert body["task"] == "analytics-read"
    assert body["workload"] == AGENT
    assert body["owner"] == "alice@example.com"
    assert body["purpose"] == "weekly revenue report"
    assert uuid.UUID(body["task_id"])
    assert body["expires_at"].endswith("Z")
    db = body["credentials"]["db"]
    assert db["kind"] == "database"
    assert set(db["data"]) >= {"username", "password"}
    assert db["expires_at"] <= body["expires_at"]
    [lease] = body["leases"]
    assert {lease["name"], lease["kind"], lease["state"]} == {"db", "database", "active"}
    assert lease["owner"] == "alice@example.com" and lease["purpose"] == "weekly revenue report"


def test_every_credential_kind_works_until_finish(client, issuers, stack):
    response = start(client, issuers, "everything")
    assert response.status_code == 201, response.get_json()
    creds = {name: item["data"] for name, item in response.get_json()["credentials"].items()}
    task_id = response.get_json()["task_id"]

    assert can_log_in(stack, creds["db"])
    assert can_log_in(stack, creds["rw"])
    token = creds["token"]["token"]
    assert vault(stack, "GET", "secret/data/reports/q3", token=token).status_code == 200
    # Only its policy: the database engine is out of reach for the child token.
    assert vault(stack, "GET", "database/creds/analytics-ro", token=token).status_code == 403
    assert "BEGIN CERTIFICATE" in creds["cert"]["certificate"]
    assert task_id in creds["cert"]["certificate"] or creds["cert"]["serial_number"]

    ended = finish(client, issuers, task_id)
    assert ended.status_code == 200
    assert {lease["state"] for lease in ended.get_json()["leases"]} == {"revoked"}
    assert not can_log_in(stack, creds["db"])
    assert not can_log_in(stack, creds["rw"])
    assert vault(stack, "GET", "secret/data/reports/q3", token=token).status_code == 403
    assert not set(live_leases(stack, "pki/issue/agents/")) & {
        lease["vault_lease_id"].rsplit("/", 1)[-1]
        for lease in ended.get_json()["leases"]
        if lease["vault_lease_id"]
    }


def test_all_or_nothing_revokes_the_first_credential_when_the_second_fails(client, issuers, stack):
    before = dynamic_roles(stack)
    leases_before = set(live_leases(stack, "database/creds/analytics-ro/"))
    response = start(client, issuers, "half-broken")
    assert response.status_code == 502, response.get_json()
    assert response.get_json()["code"] == "issuance_failed"
    assert "credentials" not in response.get_json()
    assert dynamic_roles(stack) - before == set()
    assert set(live_leases(stack, "database/creds/analytics-ro/")) <= leases_before


def test_finish_is_idempotent_and_records_the_outcome(client, issuers):
    task_id = start(client, issuers).get_json()["task_id"]
    first = finish(client, issuers, task_id, outcome="failed")
    second = finish(client, issuers, task_id, outcome="succeeded")
    assert first.status_code == second.status_code == 200
    assert first.get_json() == second.get_json()
    assert first.get_json()["outcome"] == "failed"
    assert first.get_json()["finished_at"] is not None


@pytest.mark.parametrize("action", ["finish", "read"])
def test_another_workloads_task_is_not_found(client, issuers, action, stack):
    """§6.6 scoped reads: another workload's task is a 404, to read and to finish."""
    started = start(client, issuers)
    task_id = started.get_json()["task_id"]
    if action == "finish":
        response = finish(client, issuers, task_id, sub=OTHER_AGENT)
    else:
        response = client.get(f"/task/{task_id}", headers=issuers["spire"].bearer(OTHER_AGENT))
    assert response.status_code == 404
    assert response.get_json()["code"] == "not_found"
    owner_view = client.get(f"/task/{task_id}", headers=issuers["spire"].bearer(AGENT)).get_json()
    assert owner_view["state"] == "active"
    assert can_log_in(stack, started.get_json()["credentials"]["db"]["data"])


def test_read_shows_states_and_never_secret_values(client, issuers):
    started = start(client, issuers).get_json()
    password = started["credentials"]["db"]["data"]["password"]
    read = client.get(f"/task/{started['task_id']}", headers=issuers["spire"].bearer(AGENT))
    assert read.status_code == 200
    assert "credentials" not in read.get_json()
    assert password not in read.get_data(as_text=True)
    assert read.get_json()["leases"][0]["state"] == "active"


def test_an_operator_may_read_any_task(client, issuers):
    task_id = start(client, issuers).get_json()["task_id"]
    operator = issuers["sso"].bearer("sre-sam@example.com", groups=["sre"])
    assert client.get(f"/task/{task_id}", headers=operator).status_code == 200


@pytest.mark.parametrize(
    ("overrides", "status", "code"),
    [
        ({"task": "no-such-task"}, 404, "unknown_task"),
        ({"ttl_seconds": 901}, 400, "ttl_exceeds_max"),
        ({"owner": "mallory@evil.example"}, 403, "policy_denied"),
        ({"context": {"environment": "moon"}}, 403, "policy_denied"),
        ({"context": {}}, 403, "policy_denied"),
    ],
    ids=["unknown-task", "ttl-over-max", "owner", "when-false", "when-missing-key"],
)
def test_refusals_issue_nothing(client, issuers, stack, overrides, status, code):
    before = dynamic_roles(stack)
    task = overrides.pop("task", "analytics-read")
    response = start(client, issuers, task, **overrides)
    assert response.status_code == status, response.get_json()
    assert response.get_json()["code"] == code
    assert dynamic_roles(stack) == before


def test_a_denial_names_the_failed_rule(client, issuers):
    response = start(client, issuers, context={"environment": "moon"})
    assert response.get_json()["detail"].startswith("when[0]")
    response = start(client, issuers, sub="spiffe://example.org/robots/x")
    assert response.get_json()["detail"].startswith("workloads")


def test_a_when_denial_quotes_the_condition_and_names_the_missing_context_keys(client, issuers):
    condition = 'request.context.environment in ["dev", "staging", "prod"]'
    unmet = start(client, issuers, context={"environment": "moon"}).get_json()
    assert unmet["detail"] == f"when[0]: the condition `{condition}` is not met"
    assert unmet["rule"] == "when[0]"
    missing = start(client, issuers, context={"env": "prod"}).get_json()
    assert (
        missing["detail"]
        == f"when[0]: the condition `{condition}` is not met; the request's context has no 'environment'"
    )
    # The patterns of the other rules stay hidden.
    other = start(client, issuers, sub="spiffe://example.org/robots/x").get_json()
    assert "spiffe://example.org/agents" not in other["detail"]


def test_limits_answer_429_with_retry_after(client, issuers):
    for _ in range(3):
        assert start(client, issuers).status_code == 201
    response = start(client, issuers)
    assert response.status_code == 429
    assert response.get_json()["code"] == "limit_exceeded"
    assert int(response.headers["Retry-After"]) >= 1
    assert "max_active_per_workload" in response.get_json()["detail"]


def test_a_token_from_an_approver_issuer_cannot_start_tasks(client, issuers):
    headers = issuers["sso"].bearer("alice@example.com", groups=["sre", "dba"])
    response = client.post("/task/start", json=start_body(), headers=headers)
    assert response.status_code == 403
    assert response.get_json()["code"] == "forbidden"


def test_vault_down_is_503_and_nothing_is_issued(stack, issuers, policy_file, clean_db):
    from broker.app import create_app
    from broker.config import settings_from_mapping
    from broker.dev.stack.postgres import free_port
    from tests.conftest import broker_config

    config = broker_config(stack, issuers, policy_file)
    config["vault"]["addr"] = f"http://127.0.0.1:{free_port()}"
    client = create_app(settings_from_mapping(config, env={})).test_client()
    response = client.post("/task/start", json=start_body(), headers=issuers["spire"].bearer(AGENT))
    assert response.status_code == 503
    assert response.get_json()["code"] == "vault_unavailable"
    assert int(response.headers["Retry-After"]) > 0


def test_database_down_is_503_and_nothing_is_issued(stack, issuers, policy_file, workdir):
    from broker.app import create_app
    from broker.config import settings_from_mapping
    from broker.dev.stack.postgres import start_postgres
    from broker.migrate import upgrade_to_head
    from tests.conftest import broker_config

    own = start_postgres(workdir / "db-down-pg")
    upgrade_to_head(own.url("postgres"))
    config = broker_config(stack, issuers, policy_file)
    config["database_url"] = own.url("postgres")
    client = create_app(settings_from_mapping(config, env={})).test_client()
    own.stop()
    before = dynamic_roles(stack)
    response = client.post("/task/start", json=start_body(), headers=issuers["spire"].bearer(AGENT))
    assert response.status_code == 503
    assert response.get_json()["code"] == "database_unavailable"
    assert dynamic_roles(stack) == before


def test_no_secret_reaches_the_database_logs_or_audit(client, issuers, stack, caplog):
    """§6.7 no secret at rest: secret values never reach the database, logs or audit."""
    import logging

    import psycopg

    caplog.set_level(logging.DEBUG)
    started = start(client, issuers, "everything").get_json()
    finish(client, issuers, started["task_id"])
    secrets = []
    for item in started["credentials"].values():
        data = item["data"]
        secrets += [data.get("password"), data.get("token"), data.get("private_key")]
    secrets = [value for value in secrets if value]
    assert len(secrets) >= 4

    with psycopg.connect(stack.database_url.replace("+psycopg", "")) as conn:
        dump = "\n".join(
            str(row)
            for table in ("tasks", "leases", "approvals", "audit_events", "audit_head", "used_jtis")
            for row in conn.execute(f"SELECT * FROM {table}").fetchall()
        )
    operator = issuers["sso"].bearer("sre-sam@example.com", groups=["sre"])
    audit = client.get("/audit", headers=operator).get_data(as_text=True)
    for secret in secrets:
        assert secret not in dump
        assert secret not in caplog.text
        assert secret not in audit
    assert started["task_id"] in dump


def test_vault_ttls_never_exceed_the_task(client, issuers, stack):
    """The backstop if the broker vanished: Vault revokes the leases with the task token."""
    import psycopg

    body = start(client, issuers, ttl_seconds=60).get_json()
    lease_id = body["leases"][0]["vault_lease_id"]
    lease = vault(stack, "PUT", "sys/leases/lookup", json={"lease_id": lease_id}).json()["data"]
    assert lease["ttl"] <= 900  # the task type's maximum
    with psycopg.connect(stack.database_url.replace("+psycopg", "")) as conn:
        row = conn.execute("SELECT token_accessor FROM tasks WHERE id = %s", (body["task_id"],)).fetchone()
        assert row is not None
        (accessor,) = row
    token = vault(stack, "POST", "auth/token/lookup-accessor", json={"accessor": accessor}).json()["data"]
    assert 0 < token["ttl"] <= 900  # the task type's maximum: pooled tokens are minted for it
    assert token["orphan"] is True
    assert token["renewable"] is False
