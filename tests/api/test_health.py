from __future__ import annotations

import pytest

from broker.config import settings_from_mapping
from broker.stack.postgres import free_port, start_postgres
from tests.conftest import broker_config


def test_healthz_is_always_ok(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_readyz_is_ok_when_both_answer(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json()["checks"] == {"database": "ok", "vault": "ok"}


def _client_for(config):
    from broker.app import create_app

    return create_app(settings_from_mapping(config, env={})).test_client()


def test_readyz_names_vault_when_it_is_down(stack, issuers, policy_file):
    config = broker_config(stack, issuers, policy_file)
    config["vault"]["addr"] = f"http://127.0.0.1:{free_port()}"
    response = _client_for(config).get("/readyz")
    assert response.status_code == 503
    assert response.mimetype == "application/problem+json"
    assert response.get_json()["checks"] == {"database": "ok", "vault": "unavailable"}
    assert "vault" in response.get_json()["detail"]


@pytest.mark.slow
def test_readyz_names_the_database_when_postgres_stops(stack, issuers, policy_file, workdir):
    own = start_postgres(workdir / "readyz-pg")
    config = broker_config(stack, issuers, policy_file)
    config["database_url"] = own.url("postgres")
    client = _client_for(config)
    assert client.get("/readyz").status_code == 200
    own.stop()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["checks"]["database"] == "unavailable"
    assert "database" in response.get_json()["detail"]
    assert response.headers["Retry-After"]
    own.start()
    assert client.get("/readyz").status_code == 200
    own.stop()


def test_the_api_document_lists_every_endpoint_of_the_contract(client):
    document = client.get("/openapi.json").get_json()
    assert document["openapi"].startswith("3.1")
    paths = document["paths"]
    for path, method in [
        ("/task/start", "post"), ("/task/finish", "post"), ("/task/claim", "post"), ("/task/{id}", "get"),
        ("/approvals/{id}", "post"), ("/approvals", "get"), ("/leases", "get"), ("/leases/{id}", "get"),
        ("/leases/{id}/revoke", "post"), ("/leases/revoke", "post"), ("/tasks", "get"), ("/audit", "get"),
        ("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get"),
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
    response = _client_for(config).post("/task/start", json=start_body(), headers=issuers["spire"].bearer(AGENT))
    assert response.status_code == 503
    assert response.get_json()["code"] == "identity_unavailable"
    assert response.headers["Retry-After"]
