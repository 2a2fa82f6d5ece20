"""The gateway's Vault API, end to end, with real clients against the real stack
(docs/gateway.md, "Vault API").

hvac and the `bao` CLI read through the handle; the handle is no token to OpenBao itself;
the real token never reaches the client (lookup-self included); a path the rules refuse,
and the paths no task may use, get 403 naming the rule; a finish refuses the handle and
revokes the token the gateway held; junk HTTP never takes the server down.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import psycopg
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.config import settings_from_mapping
from broker.dev.stack.postgres import free_port
from broker.services import build_services
from tests.conftest import broker_config
from tests.factories import AGENT, start_task, vault
from tests.support.gateway import (
    VAULT_TASK,
    api_and_gateway,
    gateway_section,
    ledger_rows,
    send_raw,
    vault_gateway_policy,
)
from tests.support.waiting import wait_for


@pytest.fixture
def broker(stack, issuers, tmp_path, clean_db):
    """The API in this process and a gateway beside it."""
    policy = vault_gateway_policy(tmp_path / "policy.yaml", ttl=60)
    with api_and_gateway(stack, issuers, policy, http_bind=True) as parts:
        yield parts


def started(client: Any, issuers: Any) -> tuple[str, dict[str, Any]]:
    response = start_task(client, issuers, VAULT_TASK)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    return body["task_id"], body["credentials"]["token"]


def requests_audited(stack: Any) -> list[dict[str, Any]]:
    return [
        row.detail
        for row in ledger_rows(
            stack, "SELECT detail FROM audit_events WHERE event = 'gateway.request' ORDER BY seq"
        )
    ]


def real_tokens(gateway: Any) -> list[str]:
    """What the gateway holds (this test runs it in-process): to prove it never leaks."""
    return [held.token for held in gateway.service._vault_tokens.values()]


def read_q3(handle: dict[str, Any]) -> dict[str, Any]:
    client = hvac.Client(url=handle["addr"], token=handle["token"])
    answer = client.secrets.kv.v2.read_secret_version(
        path="reports/q3", mount_point="secret", raise_on_deleted_version=True
    )
    data: dict[str, Any] = answer["data"]["data"]
    return data


def test_the_start_answers_an_address_and_a_handle_token(broker, issuers, stack):
    client, services, _ = broker
    task_id, credential = started(client, issuers)
    assert credential["kind"] == "vault_token" and credential["delivery"] == "gateway"
    handle = credential["data"]
    assert set(handle) == {"addr", "token"}
    assert handle["addr"] == f"http://127.0.0.1:{services.settings.gateway.http_port}"
    handle_id, _, secret = handle["token"].partition(".")
    assert handle_id.startswith("brk_") and len(secret) >= 32  # 192 bits, url-safe base64
    [row] = ledger_rows(
        stack, "SELECT task_id, kind, verifier FROM gateway_handles WHERE id = :id", id=handle_id
    )
    assert str(row.task_id) == task_id and row.kind == "vault_token"
    assert row.verifier.startswith("sha256$") and secret not in row.verifier
    audit = ledger_rows(stack, "SELECT string_agg(a::text, '') AS dump FROM audit_events a")[0].dump
    assert secret not in audit
    # Nothing issued at start: the gateway issues on the handle's first request.
    assert ledger_rows(stack, "SELECT id FROM leases WHERE task_id = :t", t=task_id) == []


def test_hvac_reads_through_the_handle_and_the_token_is_a_lease_of_the_task(broker, issuers, stack):
    client, _, gateway = broker
    task_id, credential = started(client, issuers)
    assert read_q3(credential["data"])
    leases = ledger_rows(
        stack, "SELECT name, kind, state FROM leases WHERE task_id = :t ORDER BY name", t=task_id
    )
    replica = gateway.service.replica
    issuance = leases[0].name
    assert re.fullmatch(rf"token@{replica}\.[0-9a-f]{{4}}", issuance)
    assert [(lease.name, lease.kind) for lease in leases] == [
        (issuance, "vault_token"),
        (f"{issuance}:token", "gateway_token"),
    ]
    wait_for(lambda: any(d["allowed"] and d["status"] == 200 for d in requests_audited(stack)), timeout=5)
    [detail] = [d for d in requests_audited(stack) if d["path"] == "secret/data/reports/q3"]
    assert detail["method"] == "GET" and "rule" not in detail


def test_first_requests_at_once_issue_one_token(broker, issuers, stack):
    client, _, _ = broker
    task_id, credential = started(client, issuers)
    with ThreadPoolExecutor(8) as pool:
        read = list(pool.map(lambda _: read_q3(credential["data"]), range(8)))
    assert all(read)
    assert len(ledger_rows(stack, "SELECT id FROM leases WHERE task_id = :t", t=task_id)) == 2


def test_the_bao_cli_reads_through_the_handle(broker, issuers):
    client, _, _ = broker
    _, credential = started(client, issuers)
    handle = credential["data"]
    bao = Path(sys.executable).parent / "bao"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
        "BAO_ADDR": handle["addr"], "VAULT_ADDR": handle["addr"],
        "BAO_TOKEN": handle["token"], "VAULT_TOKEN": handle["token"],
    }  # fmt: skip
    ran = subprocess.run(
        [str(bao), "read", "-format=json", "secret/data/reports/q3"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["data"]["data"]


def test_the_handle_is_no_token_to_openbao_itself(broker, issuers, stack):
    client, _, _ = broker
    _, credential = started(client, issuers)
    assert vault(stack, "GET", "secret/data/reports/q3", token=credential["data"]["token"]).status_code == 403


def test_lookup_self_through_the_gateway_never_shows_the_real_token(broker, issuers):
    client, _, gateway = broker
    _, credential = started(client, issuers)
    handle = credential["data"]
    answer = requests.get(
        handle["addr"] + "/v1/auth/token/lookup-self", headers={"X-Vault-Token": handle["token"]}, timeout=10
    )
    assert answer.status_code == 200
    body = answer.json()
    assert "id" not in body["data"] and "auth" not in body and "wrap_info" not in body
    assert body["data"]["policies"]  # the rest of the answer is relayed
    [real] = real_tokens(gateway)
    assert real not in answer.text
    # hvac, the same.
    looked = hvac.Client(url=handle["addr"], token=handle["token"]).auth.token.lookup_self()
    assert real not in json.dumps(looked)


def test_a_client_token_is_never_sent_on(broker, issuers, stack):
    """The real token replaces the client's: a Bearer header's root token grants nothing."""
    client, _, _ = broker
    _, credential = started(client, issuers)
    handle = credential["data"]
    answer = requests.get(
        handle["addr"] + "/v1/database/creds/analytics-ro",
        headers={"X-Vault-Token": handle["token"], "Authorization": f"Bearer {stack.openbao.root_token}"},
        timeout=10,
    )
    assert answer.status_code == 403  # the rules first; and had they passed, the task's token


def test_paths_refused_by_the_rules_and_the_deny_list_name_their_rule(broker, issuers, stack):
    client, _, _ = broker
    _, credential = started(client, issuers)
    handle = credential["data"]
    vault_client = hvac.Client(url=handle["addr"], token=handle["token"])
    with pytest.raises(hvac.exceptions.Forbidden) as refused:
        vault_client.secrets.kv.v2.read_secret_version(
            path="payroll/all", mount_point="secret", raise_on_deleted_version=True
        )
    assert "reports-only" in str(refused.value)
    auth = {"X-Vault-Token": handle["token"]}
    for method, path, extra in (
        ("POST", "auth/token/create", {}),
        ("POST", "auth/token/create-orphan", {}),
        ("POST", "auth/token/cre%61te", {}),
        ("POST", "AUTH/token/create", {}),
        ("POST", "auth/token/revoke-self", {}),
        ("POST", "sys/wrapping/wrap", {}),
        ("PUT", "sys/leases/revoke-prefix/database", {}),
        ("GET", "secret/data/reports/q3", {"X-Vault-Wrap-TTL": "60s"}),
    ):
        answer = requests.request(
            method, f"{handle['addr']}/v1/{path}", headers={**auth, **extra}, timeout=10
        )
        assert answer.status_code == 403, path
        assert "gateway-" in answer.json()["errors"][0], path
    for bad in ("auth/token/../token/create", "secret//data/reports/q3", "a/./b"):
        answer = requests.get(f"{handle['addr']}/v1/{bad}", headers=auth, timeout=10)
        assert answer.status_code in (400, 403), bad
    wait_for(lambda: any(d.get("rule") == "gateway-no-wrapping" for d in requests_audited(stack)), timeout=5)
    refusals = [d for d in requests_audited(stack) if not d["allowed"]]
    assert {d["rule"] for d in refusals} >= {"reports-only", "gateway-deny-list", "gateway-no-wrapping"}
    assert all(d["status"] in (400, 403) for d in refusals)


def test_wrong_and_unknown_handles_are_refused_and_audited(broker, issuers, stack):
    client, _, _ = broker
    _, credential = started(client, issuers)
    handle = credential["data"]
    handle_id = handle["token"].partition(".")[0]
    url = handle["addr"] + "/v1/secret/data/reports/q3"
    for token in (f"{handle_id}.wrong-secret", "brk_000000000000000000000000.x", "hvs.nothing", None):
        headers = {"X-Vault-Token": token} if token else {}
        answer = requests.get(url, headers=headers, timeout=10)
        assert answer.status_code == 403 and answer.json()["errors"]
    wait_for(
        lambda: (
            len(ledger_rows(stack, "SELECT 1 FROM audit_events WHERE event = 'gateway.handle_refused'")) >= 4
        ),
        timeout=5,
    )
    whys = {
        r.why
        for r in ledger_rows(
            stack, "SELECT detail->>'why' AS why FROM audit_events WHERE event = 'gateway.handle_refused'"
        )
    }
    assert whys >= {"wrong secret", "unknown handle", "not a handle", "no handle"}


def test_after_finish_the_handle_is_refused_and_the_token_is_revoked(broker, issuers, stack):
    client, _, gateway = broker
    task_id, credential = started(client, issuers)
    handle = credential["data"]
    assert read_q3(handle)
    [real] = real_tokens(gateway)
    finished = client.post("/task/finish", json={"task_id": task_id}, headers=issuers["spire"].bearer(AGENT))
    assert finished.status_code == 200, finished.get_json()
    with pytest.raises(hvac.exceptions.Forbidden):
        read_q3(handle)
    assert vault(stack, "GET", "secret/data/reports/q3", token=real).status_code == 403
    wait_for(lambda: real_tokens(gateway) == [], timeout=5)
    states = {r.state for r in ledger_rows(stack, "SELECT state FROM leases WHERE task_id = :t", t=task_id)}
    assert states == {"revoked"}


def test_a_vault_handle_is_no_postgres_login_and_the_gateway_goes_on(broker, issuers):
    client, services, _ = broker
    _, credential = started(client, issuers)
    handle_id, _, secret = credential["data"]["token"].partition(".")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            host="127.0.0.1", port=services.settings.gateway.postgres_port, user=handle_id,
            password=secret, dbname="analytics", sslmode="disable", connect_timeout=5,
        )  # fmt: skip
    assert read_q3(credential["data"])


def test_at_the_deadline_the_token_is_forgotten_and_the_handle_refused(broker, issuers):
    client, _, gateway = broker
    response = start_task(client, issuers, VAULT_TASK, ttl_seconds=2)
    assert response.status_code == 201, response.get_json()
    handle = response.get_json()["credentials"]["token"]["data"]
    assert read_q3(handle)
    assert len(real_tokens(gateway)) == 1
    wait_for(lambda: real_tokens(gateway) == [], timeout=8)
    with pytest.raises(hvac.exceptions.Forbidden):
        read_q3(handle)


_JUNK = st.one_of(
    st.binary(min_size=1, max_size=2048),
    st.builds(
        lambda m: m.encode() + b" /v1/secret HTTP/1.1\r\nHost: x\r\n\r\n",
        st.text("ABCXYZ_-", min_size=1, max_size=40),
    ),
    st.builds(
        lambda n: b"GET /v1/x HTTP/1.1\r\nX-Big: " + b"a" * n + b"\r\n\r\n", st.integers(60_000, 200_000)
    ),
    st.builds(lambda n: b"GET /v1/x HTTP/1.1\r\n" + b"X-H: y\r\n" * n + b"\r\n", st.integers(90, 300)),
    st.builds(
        lambda n: b"POST /v1/x HTTP/1.1\r\nContent-Length: " + str(n).encode() + b"\r\n\r\nabc",
        st.integers(-5, 10**12),
    ),
    st.just(b"POST /v1/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    st.just(b"GET /v1/%ff%fe HTTP/1.1\r\nX-Vault-Token: brk_x.y\r\n\r\n"),
)


def test_junk_http_never_kills_the_server(broker, issuers):
    client, _, _ = broker
    _, credential = started(client, issuers)
    handle = credential["data"]
    port = urlsplit(handle["addr"]).port
    assert port is not None

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(payload=_JUNK)
    def junk_then_a_good_request(payload: bytes) -> None:
        send_raw(port, payload)

    junk_then_a_good_request()
    assert read_q3(handle)


def test_a_gateway_without_http_bind_refuses_the_start_and_issues_nothing(stack, issuers, tmp_path, clean_db):
    policy = vault_gateway_policy(tmp_path / "policy.yaml")
    config = broker_config(stack, issuers, policy, gateway=gateway_section(free_port()))
    services = build_services(settings_from_mapping(config, env={}))
    from broker.app import create_app

    client = create_app(services=services).test_client()
    try:
        response = start_task(client, issuers, VAULT_TASK)
        assert response.status_code == 502, response.get_json()
        assert response.get_json()["code"] == "issuance_failed"
        assert "Vault API" in response.get_json()["detail"]
        assert "credentials" not in response.get_json()
        assert ledger_rows(stack, "SELECT id FROM gateway_handles") == []
        assert ledger_rows(stack, "SELECT id FROM leases") == []
    finally:
        services.close()
