"""The broker's own token can do what the gateway needs, and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.dev.stack.vault_setup import render_broker_policy
from broker.vault import VaultRejected

ROOT = Path(__file__).resolve().parents[2]


def test_broker_policy_is_the_documented_one(vault_setup, root):
    stored = root.call("GET", f"sys/policies/acl/{vault_setup.broker_policy}")["data"]["policy"]
    assert stored == render_broker_policy()
    assert stored == (ROOT / "vault-config" / "broker-policy.hcl").read_text()
    assert "sudo" not in [line.strip() for line in stored.splitlines() if not line.lstrip().startswith("#")]


def test_broker_token_is_periodic_orphan_with_only_its_policy(vault_setup, root):
    data = root.call("POST", "auth/token/lookup-accessor", {"accessor": vault_setup.broker_token_accessor})[
        "data"
    ]
    assert data["policies"] == ["broker"]
    assert data["orphan"] is True
    assert data["renewable"] is True
    assert data["period"] == 24 * 3600


def test_renew_self_extends_the_broker_token(gateway, vault_setup, root):
    gateway.renew_self()
    gateway.renew_self()
    data = root.call("POST", "auth/token/lookup-accessor", {"accessor": vault_setup.broker_token_accessor})[
        "data"
    ]
    assert data["ttl"] > 24 * 3600 - 60


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "secret/data/reports/q3", None),
        ("GET", "database/creds/analytics-ro", None),
        ("POST", "pki/issue/agents", {"common_name": "x.agents.example.org"}),
        ("LIST", "sys/leases/lookup/database/creds/analytics-ro/", None),
        ("PUT", "sys/leases/revoke-prefix/database/creds", None),
        ("PUT", "sys/leases/revoke-force/database/creds", None),
        ("PUT", "sys/policies/acl/reports-read", {"policy": 'path "*" { capabilities = ["sudo"] }'}),
        ("PUT", "sys/policies/acl/broker", {"policy": 'path "*" { capabilities = ["sudo"] }'}),
        ("POST", "auth/token/create", {"policies": ["reports-read"]}),
        ("POST", "auth/token/create-orphan", {"policies": ["reports-read"]}),
        ("POST", "auth/token/roles/broker-task", {"allowed_policies": ["broker"]}),
        ("POST", "sys/mounts/evil", {"type": "kv"}),
        ("POST", "database/roles/analytics-ro", {"db_name": "analytics"}),
        ("GET", "database/config/analytics", None),
    ],
)
def test_broker_token_cannot(vault_setup, root, method, path, body):
    with pytest.raises(VaultRejected) as caught:
        root.call(method, path, body, token=vault_setup.broker_token)
    assert caught.value.status == 403


def test_broker_token_cannot_grant_a_task_token_the_broker_policy(gateway):
    with pytest.raises(VaultRejected):
        gateway.create_task_token(
            task_id="t", task="x", policies=["broker-task-x", "broker"], ttl_seconds=60, meta={}
        )
