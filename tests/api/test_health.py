from __future__ import annotations

import logging
import time

import pytest
import yaml
from sqlalchemy import create_engine, text

from broker.config import settings_from_mapping
from broker.dev.stack.postgres import free_port, start_postgres
from broker.migrate import upgrade_to_head
from tests.conftest import broker_config
from tests.factories import AGENT, start_body
from tests.support.broker_procs import BrokerProcess


def test_healthz_is_always_ok(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_readyz_is_ok_when_both_answer(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json()["checks"] == {"database": "ok", "schema": "ok", "vault": "ok"}


def _client_for(config):
    from broker.app import create_app

    return create_app(settings_from_mapping(config, env={})).test_client()


def test_readyz_names_vault_when_it_is_down(stack, issuers, policy_file):
    config = broker_config(stack, issuers, policy_file)
    config["vault"]["addr"] = f"http://127.0.0.1:{free_port()}"
    response = _client_for(config).get("/readyz")
    assert response.status_code == 503
    assert response.mimetype == "application/problem+json"
    assert response.get_json()["checks"] == {"database": "ok", "schema": "ok", "vault": "unavailable"}
    assert "vault" in response.get_json()["detail"]


@pytest.mark.slow
def test_readyz_names_the_database_when_postgres_stops(stack, issuers, policy_file, workdir):
    own = start_postgres(workdir / "readyz-pg")
    upgrade_to_head(own.url("postgres"))
    config = broker_config(stack, issuers, policy_file)
    config["database_url"] = own.url("postgres")
    client = _client_for(config)
    assert client.get("/readyz").status_code == 200
    own.stop()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["checks"]["database"] == "unavailable"
    assert response.get_json()["checks"]["schema"] == "unknown"
    assert "database" in response.get_json()["detail"]
    assert response.headers["Retry-After"]
    own.start()
    assert client.get("/readyz").status_code == 200
    own.stop()


def _services_of(client):
    return client.application.extensions["broker.services"]


def test_a_database_never_migrated_is_not_ready_and_the_start_says_how_to_fix_it(
    stack, issuers, policy_file, empty_database, caplog
):
    config = broker_config(stack, issuers, policy_file, database_url=empty_database)
    with caplog.at_level(logging.WARNING):
        client = _client_for(config)
    fixes = [record for record in caplog.records if "`broker migrate`" in record.getMessage()]
    assert [record.levelno for record in fixes] == [logging.ERROR]
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["code"] == "not_ready"
    assert response.get_json()["checks"] == {"database": "ok", "schema": "behind", "vault": "ok"}
    assert "schema behind" in response.get_json()["detail"]
    start = client.post("/task/start", json=start_body(), headers=issuers["spire"].bearer(AGENT))
    assert start.status_code == 503, start.get_json()  # not a 500: the answer says why
    assert start.get_json()["code"] == "database_unavailable"
    assert "broker migrate" in start.get_json()["detail"]
    upgrade_to_head(empty_database)
    migrated = client.get("/readyz")
    _services_of(client).close()
    assert migrated.status_code == 200
    assert migrated.get_json()["checks"]["schema"] == "ok"


@pytest.mark.parametrize(
    ("revision", "status", "schema"),
    [
        ("0001", 503, "behind"),  # an older revision: this build's queries need the newer columns
        ("f" * 12, 200, "ahead"),  # a newer build migrated it (rolling upgrade): stay in service
    ],
)
def test_readyz_compares_the_database_revision_with_the_shipped_head(
    stack, issuers, policy_file, empty_database, revision, status, schema
):
    upgrade_to_head(empty_database)
    engine = create_engine(empty_database)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = :revision"), {"revision": revision})
    engine.dispose()
    client = _client_for(broker_config(stack, issuers, policy_file, database_url=empty_database))
    response = client.get("/readyz")
    _services_of(client).close()
    assert response.status_code == status
    assert response.get_json()["checks"] == {"database": "ok", "schema": schema, "vault": "ok"}


@pytest.mark.slow
def test_the_scheduler_waits_for_the_migration_with_one_error_not_a_traceback_per_sweep(
    stack, issuers, policy_file, empty_database, tmp_path
):
    config_path = tmp_path / "broker.yaml"
    config_path.write_text(
        yaml.safe_dump(broker_config(stack, issuers, policy_file, database_url=empty_database))
    )
    scheduler = BrokerProcess(["scheduler"], config_path, tmp_path / "scheduler.log")

    def log():
        return scheduler.log_path.read_text(errors="replace")

    try:
        _eventually(lambda: "`broker migrate`" in log(), what="the error naming the fix")
        time.sleep(2)  # eight sweeps at 0.25 s, had the jobs started
        assert log().count("`broker migrate`") == 1
        assert "Traceback" not in log()
        upgrade_to_head(empty_database)
        _eventually(lambda: "scheduler running" in log(), what="the jobs to start")
        assert scheduler.proc.poll() is None
    finally:
        scheduler.stop()
    assert "Traceback" not in log()


def _eventually(predicate, *, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_the_api_document_lists_every_endpoint_of_the_contract(client):
    document = client.get("/openapi.json").get_json()
    assert document["openapi"].startswith("3.1")
    paths = document["paths"]
    for path, method in [
        ("/task/start", "post"),
        ("/task/finish", "post"),
        ("/task/claim", "post"),
        ("/task/{id}", "get"),
        ("/approvals/{id}", "post"),
        ("/approvals", "get"),
        ("/leases", "get"),
        ("/leases/{id}", "get"),
        ("/leases/{id}/revoke", "post"),
        ("/leases/revoke", "post"),
        ("/tasks", "get"),
        ("/audit", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ]:
        assert method in paths[path], path
    start = document["components"]["schemas"]["StartTask"]
    assert start["properties"]["purpose"]["minLength"] == 8
    assert start["additionalProperties"] is False


def test_metrics_count_starts(client, issuers):
    from tests.factories import AGENT, start_body

    client.post("/task/start", json=start_body(), headers=issuers["spire"].bearer(AGENT))
    text = client.get("/metrics").get_data(as_text=True)
    assert 'broker_tasks_started_total{result="active",task="analytics-read"}' in text


def test_an_unreachable_jwks_endpoint_fails_closed_with_503(stack, issuers, policy_file, clean_db):
    from tests.factories import AGENT, start_body

    config = broker_config(stack, issuers, policy_file)
    spire = next(entry for entry in config["issuers"] if entry["name"] == "spire")
    del spire["jwks_file"]
    spire["jwks_uri"] = f"http://127.0.0.1:{free_port()}/jwks.json"
    response = _client_for(config).post(
        "/task/start", json=start_body(), headers=issuers["spire"].bearer(AGENT)
    )
    assert response.status_code == 503
    assert response.get_json()["code"] == "identity_unavailable"
    assert response.headers["Retry-After"]
