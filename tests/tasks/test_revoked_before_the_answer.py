"""Promises that hold *at the moment the answer arrives* (docs/contract.md §6.1, §6.3).

Vault revokes a token's leases in the background once the token dies, within moments,
so a check made a little after the answer can't tell "the broker revoked it before
answering" from "Vault cleaned up after the token". These tests take that help away:
an `HttpFaultProxy` between the broker and OpenBao refuses every task token revoke, so
only the broker's own lease revokes can have removed a credential, and each check runs
right after the answer, with no sleep and no polling. The proxy also records what was
sent, so the revoke's `sync` flag is checked on the wire.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from broker.config import settings_from_mapping
from tests.conftest import broker_config
from tests.factories import AGENT, can_log_in, role_exists, start_body, vault
from tests.faults.faultkit import lease_alive
from tests.support.fault_proxy import HttpFaultProxy

TOKEN_REVOKE = r"^/v1/auth/token/revoke-accessor"
LEASE_REVOKE = r"^/v1/sys/leases/revoke$"


@pytest.fixture
def proxy(stack: Any) -> Iterator[HttpFaultProxy]:
    proxy = HttpFaultProxy.to(stack.vault.addr)
    # No task token dies during these tests, so Vault never revokes a lease on its own.
    proxy.add_rule(TOKEN_REVOKE, action="reset", times=None)
    yield proxy
    proxy.close()


@pytest.fixture
def client(
    stack: Any, issuers: Any, policy_file: Any, clean_db: None, proxy: HttpFaultProxy
) -> Iterator[Any]:
    from broker.app import create_app
    from broker.services import build_services

    config = broker_config(stack, issuers, policy_file)
    config["vault"]["addr"] = proxy.addr
    services = build_services(settings_from_mapping(config, env={}))
    yield create_app(services=services).test_client()
    services.close()
    _revoke_task_tokens(stack, proxy)


def _revoke_task_tokens(stack: Any, proxy: HttpFaultProxy) -> None:
    # What the proxy kept alive: the reconciler's job, done here so no token outlives the test.
    for exchange in proxy.requests_to(r"^/v1/auth/token/create"):
        accessor = exchange.response_json().get("auth", {}).get("accessor")
        if accessor:
            vault(stack, "POST", "auth/token/revoke-accessor", json={"accessor": accessor})


def _issued(proxy: HttpFaultProxy, path: str) -> list[dict[str, Any]]:
    """Vault's answers to the broker's credential reads under `path` (what was issued)."""
    return [ex.response_json() for ex in proxy.requests_to(path) if ex.status == 200]


def test_all_or_nothing_the_first_credential_is_dead_when_the_error_arrives(client, issuers, stack, proxy):
    """§6.1 all or nothing: a failed 2nd credential means the 1st is revoked *before* the 5xx."""
    answer = client.post(
        "/task/start", json=start_body("half-broken"), headers=issuers["spire"].bearer(AGENT)
    )

    assert answer.status_code == 502, answer.get_json()
    [first] = _issued(proxy, r"^/v1/database/creds/analytics-ro")
    # Straight after the answer: no sleep, no poll, and no token revoke got through.
    assert not role_exists(stack, first["data"]["username"])
    assert not lease_alive(stack, first["lease_id"])
    assert all(ex.outcome == "reset" for ex in proxy.requests_to(TOKEN_REVOKE))


def test_revoke_on_finish_the_credential_is_dead_when_finish_answers(client, issuers, stack, proxy):
    """§6.3 revoke on finish, at once: revoked synchronously (`sync: true`) before /task/finish answers."""
    headers = issuers["spire"].bearer(AGENT)
    started = client.post("/task/start", json=start_body(), headers=headers).get_json()
    creds = started["credentials"]["db"]["data"]
    assert can_log_in(stack, creds)

    finished = client.post("/task/finish", json={"task_id": started["task_id"]}, headers=headers)

    assert finished.status_code == 200, finished.get_json()
    assert [lease["state"] for lease in finished.get_json()["leases"]] == ["revoked"]
    assert not can_log_in(stack, creds)
    assert not role_exists(stack, creds["username"])
    [revoke] = proxy.requests_to(LEASE_REVOKE)
    # OpenBao's server default is sync=true, but its docs and the CLI say false, and a
    # false answers 202 and only queues the revocation: the broker must say what it means.
    assert json.loads(revoke.request_body)["sync"] is True
    assert revoke.status == 204
