"""Task ACL policies: rendered exactly, written once per content, enforced by Vault."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.credentials import (
    CredentialSpec,
    DatabaseCredential,
    LeaseCredential,
    PkiCredential,
    VaultTokenCredential,
)
from broker.vault import VaultRejected, policy_name, render_task_policy, task_token_policies
from broker.vault.policies import dns_label, render_template, workload_label

CREDENTIALS: dict[str, CredentialSpec] = {
    "db": DatabaseCredential(kind="database", role="analytics-ro"),
    "cert": PkiCredential(kind="pki", role="agents", common_name="{task_id}.agents.example.org"),
    "token": VaultTokenCredential(kind="vault_token", policies=["reports-read"]),
    "aws": LeaseCredential(kind="lease", path="aws/creds/deploy"),
    "w": LeaseCredential(kind="lease", path="aws/sts/{workload}", method="write"),
}


def test_rendered_policy_grants_exactly_the_credential_paths():
    text = render_task_policy("analytics-read", CREDENTIALS)
    rules = [line for line in text.splitlines() if not line.startswith("#")]
    assert rules == [
        'path "auth/token/create" {', '  capabilities = ["update"]', "}",
        'path "aws/creds/deploy" {', '  capabilities = ["read"]', "}",
        'path "aws/sts/+" {', '  capabilities = ["create", "update"]', "}",
        'path "database/creds/analytics-ro" {', '  capabilities = ["read"]', "}",
        'path "pki/issue/agents" {', '  capabilities = ["update"]', "}",
    ]  # fmt: skip
    assert render_task_policy("analytics-read", dict(reversed(CREDENTIALS.items()))) == text


def test_task_token_policies_include_child_policies():
    assert task_token_policies("broker-task-a", CREDENTIALS) == ["broker-task-a", "reports-read"]
    assert task_token_policies("broker-task-a", {"db": CREDENTIALS["db"]}) == ["broker-task-a"]


def test_policy_names_are_lowercase_and_checked():
    assert policy_name("broker-task-", "Analytics-Read") == "broker-task-analytics-read"
    with pytest.raises(ValueError, match="policy name"):
        policy_name("broker-task-", 'x" { capabilities = ["sudo"] }')


@pytest.mark.parametrize(
    ("task_id", "label"),
    [("0B9F6A52-7E0C-4C56-9D1A-2F0E3B7C1D11", "0b9f6a52-7e0c-4c56-9d1a-2f0e3b7c1d11"), ("___", "workload")],
)
def test_dns_label(task_id, label):
    assert dns_label(task_id) == label


@pytest.mark.parametrize(
    ("workload", "prefix"),
    [
        ("spiffe://example.org/agents/a1", "spiffe-example-org-agents-a1-"),
        ("github:repo:acme/app:ref:refs/heads/main", "github-repo-acme-app-ref-refs-heads-main-"),
        ("___", "w-"),
        ("x" * 100, "x" * 49 + "-"),
    ],
)
def test_a_workload_label_is_a_readable_prefix_and_a_hash(workload, prefix):
    label = workload_label(workload)
    assert label.startswith(prefix)
    assert len(label) == len(prefix) + 13


_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# Ids that fold to one DNS label: case, punctuation, and a common 63-character head.
_ALIKE = st.sampled_from(
    ["spiffe://example.org/agents/A", "spiffe://example.org/agents/a", "ci:agents-a", "x" * 70]
)
_workloads = st.one_of(
    _ALIKE, st.text(min_size=1, max_size=120), st.builds(lambda s: "x" * 70 + s, st.text(max_size=5))
)


@given(_workloads, _workloads)
def test_distinct_workloads_never_render_the_same(a, b):
    rendered_a = render_template("aws/creds/{workload}", task_id="t", workload=a)
    rendered_b = render_template("aws/creds/{workload}", task_id="t", workload=b)
    assert (rendered_a == rendered_b) == (a == b)
    for label in (workload_label(a), workload_label(b)):
        assert _DNS_LABEL.fullmatch(label), label


def test_folding_alone_would_have_merged_these():
    ids = ["spiffe://example.org/agents/A", "spiffe://example.org/agents/a", "spiffe://example.org/agents-a"]
    assert len({dns_label(i) for i in ids}) == 1
    assert len({workload_label(i) for i in ids}) == 3


def test_render_template_fills_only_known_placeholders():
    rendered = render_template(
        "{task_id}.{workload}.{other}.{0.__class__}", task_id="ABC", workload="spiffe://e.org/a"
    )
    assert rendered == f"abc.{workload_label('spiffe://e.org/a')}.{{other}}.{{0.__class__}}"
    assert workload_label("spiffe://e.org/a").startswith("spiffe-e-org-a-")


def test_sync_writes_the_policy_once_per_content(gateway, root):
    creds = {"db": CREDENTIALS["db"]}
    name = gateway.sync_task_policy("vault-test-sync", creds)
    assert name == "broker-task-vault-test-sync"
    stored = root.call("GET", f"sys/policies/acl/{name}")["data"]["policy"]
    assert stored == render_task_policy("vault-test-sync", creds)

    # Same content again: cached, no write (the marker survives).
    root.call("PUT", f"sys/policies/acl/{name}", {"policy": stored + "# marker\n"})
    gateway.sync_task_policy("vault-test-sync", creds)
    assert root.call("GET", f"sys/policies/acl/{name}")["data"]["policy"].endswith("# marker\n")

    # Changed credentials (policy file reloaded): rewritten.
    changed = {**creds, "cert": CREDENTIALS["cert"]}
    gateway.sync_task_policy("vault-test-sync", changed)
    assert root.call("GET", f"sys/policies/acl/{name}")["data"]["policy"] == render_task_policy(
        "vault-test-sync", changed
    )


def test_policy_is_enforced_for_the_task_token(gateway, start_task, root):
    task = start_task({"db": CREDENTIALS["db"]}, task="vault-test-enforced")
    for method, path in [
        ("GET", "database/creds/app-rw"),
        ("POST", "pki/issue/agents"),
        ("GET", "secret/data/reports/q3"),
        ("POST", "auth/token/create"),
        ("PUT", "sys/policies/acl/broker-task-vault-test-enforced"),
    ]:
        with pytest.raises(VaultRejected) as caught:
            root.call(method, path, {}, token=task.token.token)
        assert caught.value.status == 403, path
