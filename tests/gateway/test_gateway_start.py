"""A start with a gateway credential answers a handle, never the credential (docs/gateway.md).

Nothing is issued from Vault for it at start (the gateway issues it on first use), the
handle is recorded with the task before the answer leaves, only a SCRAM verifier of its
secret is stored, and the handle is no login to the database itself.
"""

from __future__ import annotations

import base64

import psycopg
import pytest
from sqlalchemy import create_engine, text

from broker.config import settings_from_mapping
from broker.dev.stack.postgres import free_port
from broker.services import build_services
from tests.conftest import broker_config
from tests.factories import dynamic_roles, start_task
from tests.support.gateway import GATEWAY_TASK, gateway_policy, gateway_section


@pytest.fixture
def gateway_client(stack, issuers, tmp_path, clean_db):
    policy = gateway_policy(stack, tmp_path / "policy.yaml")
    config = broker_config(stack, issuers, policy, gateway=gateway_section(free_port()))
    services = build_services(settings_from_mapping(config, env={}))
    from broker.app import create_app

    yield create_app(services=services).test_client(), services
    services.close()


def test_the_start_answers_a_handle_and_issues_nothing_from_vault(gateway_client, issuers, stack):
    client, services = gateway_client
    roles_before = dynamic_roles(stack)
    response = start_task(client, issuers, GATEWAY_TASK)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    db = body["credentials"]["db"]
    assert db["delivery"] == "gateway"
    handle = db["data"]
    assert set(handle) == {"host", "port", "username", "password", "dbname", "sslmode"}
    assert handle["host"] == "127.0.0.1"
    assert handle["port"] == services.settings.gateway.postgres_port
    assert handle["username"].startswith("brk_")
    assert handle["dbname"] == "analytics"
    assert handle["sslmode"] == "prefer"
    # At least 128 bits of secret: 24 random bytes, url-safe base64.
    assert len(base64.urlsafe_b64decode(handle["password"] + "==")) >= 16
    assert db["expires_at"] == body["expires_at"]
    # Nothing issued: no lease, no database role; the gateway issues on first use.
    assert body["leases"] == []
    assert dynamic_roles(stack) == roles_before


def test_the_handle_is_on_record_before_the_answer_and_only_as_a_verifier(gateway_client, issuers, stack):
    client, _ = gateway_client
    body = start_task(client, issuers, GATEWAY_TASK).get_json()
    handle = body["credentials"]["db"]["data"]
    engine = create_engine(stack.database_url)
    with engine.connect() as connection:
        row = connection.execute(
            text("SELECT task_id, name, kind, verifier FROM gateway_handles WHERE id = :id"),
            {"id": handle["username"]},
        ).one()
        dump = connection.execute(
            text("SELECT string_agg(t::text, '') FROM (SELECT * FROM gateway_handles) t")
        ).scalar_one()
        audit = connection.execute(text("SELECT string_agg(a::text, '') FROM audit_events a")).scalar_one()
        issued = connection.execute(
            text("SELECT detail->>'handle' FROM audit_events WHERE event = 'gateway.handle_issued'")
        ).scalar_one()
    engine.dispose()
    assert str(row.task_id) == body["task_id"] and (row.name, row.kind) == ("db", "database")
    assert row.verifier.startswith("SCRAM-SHA-256$4096:")
    assert handle["password"] not in dump
    assert handle["password"] not in audit
    assert issued == handle["username"]  # the event names the handle's public half


def test_the_handle_is_no_login_to_the_database_itself(gateway_client, issuers, stack):
    client, _ = gateway_client
    handle = start_task(client, issuers, GATEWAY_TASK).get_json()["credentials"]["db"]["data"]
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            host="127.0.0.1", port=stack.postgres.port, user=handle["username"],
            password=handle["password"], dbname="analytics", connect_timeout=3,
        )  # fmt: skip


def test_a_broker_without_a_gateway_refuses_the_start_and_issues_nothing(stack, issuers, tmp_path, clean_db):
    policy = gateway_policy(stack, tmp_path / "policy.yaml")
    services = build_services(settings_from_mapping(broker_config(stack, issuers, policy), env={}))
    from broker.app import create_app

    client = create_app(services=services).test_client()
    try:
        roles_before = dynamic_roles(stack)
        response = start_task(client, issuers, GATEWAY_TASK)
        assert response.status_code == 502, response.get_json()
        assert response.get_json()["code"] == "issuance_failed"
        assert "gateway" in response.get_json()["detail"]
        assert "credentials" not in response.get_json()
        assert dynamic_roles(stack) == roles_before
    finally:
        services.close()
