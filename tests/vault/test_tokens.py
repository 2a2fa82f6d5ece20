"""Per-task tokens and vault_token children."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker.credentials import DatabaseCredential, VaultTokenCredential
from broker.vault import VaultGateway, VaultRejected

REPORTS = VaultTokenCredential(kind="vault_token", policies=["reports-read"])
RO = DatabaseCredential(kind="database", role="analytics-ro")


def issue_child(gateway: VaultGateway, task):
    return gateway.issue(task.token, REPORTS, ttl_seconds=60, task_id=task.task_id, workload="w")


def test_task_token_is_an_orphan_nonrenewable_token_with_the_task_ttl(start_task, root):
    task = start_task({"db": RO, "token": REPORTS}, ttl=120)
    data = root.call("POST", "auth/token/lookup-accessor", {"accessor": task.token.accessor})["data"]

    assert data["orphan"] is True
    assert data["renewable"] is False
    assert data["explicit_max_ttl"] == 120
    assert 0 < data["ttl"] <= 120
    assert data["role"] == "broker-task"
    assert set(data["policies"]) == {"broker-task-vault-test", "reports-read", "default"}
    assert data["meta"]["task_id"] == task.task_id
    assert data["meta"]["workload"] == "test"
    assert task.token.expires_at <= datetime.now(UTC) + timedelta(seconds=121)


def test_task_token_ttl_is_capped_by_the_role(start_task):
    task = start_task({"db": RO}, ttl=7200)
    # The role's token_explicit_max_ttl (3600) wins; expires_at reports what Vault granted.
    assert task.token.expires_at <= datetime.now(UTC) + timedelta(seconds=3601)


def test_token_and_secret_values_stay_out_of_repr(gateway, start_task):
    task = start_task({"token": REPORTS})
    child = issue_child(gateway, task)
    assert task.token.token not in repr(task.token)
    assert child.data["token"] not in repr(child)


def test_child_token_reads_its_policy_paths_only(gateway, start_task, root):
    task = start_task({"token": REPORTS})
    child = issue_child(gateway, task)
    token = child.data["token"]

    assert child.handle.kind == "token"
    assert child.handle.ref == child.data["accessor"]
    assert child.vault_lease_id is None
    assert "reports-read" in child.data["policies"]
    assert child.expires_at <= task.token.expires_at

    report = root.call("GET", "secret/data/reports/q3", token=token)
    assert report["data"]["data"]["quarter"] == "q3"
    for method, path in [("GET", "database/creds/analytics-ro"), ("GET", "secret/data/other/x")]:
        with pytest.raises(VaultRejected) as caught:
            root.call(method, path, token=token)
        assert caught.value.status == 403
    info = root.call("GET", "auth/token/lookup-self", token=token)["data"]
    assert info["renewable"] is False
    assert info["orphan"] is False  # a child: it dies with the task token


def test_child_token_dies_with_the_task_token(gateway, start_task, root):
    task = start_task({"token": REPORTS})
    child = issue_child(gateway, task)
    gateway.revoke_task_token(task.token.accessor)

    assert not gateway.token_alive(child.handle.ref)
    with pytest.raises(VaultRejected):
        root.call("GET", "secret/data/reports/q3", token=child.data["token"])


def test_revoking_the_child_handle_leaves_the_task_token(gateway, start_task):
    task = start_task({"token": REPORTS})
    child = issue_child(gateway, task)
    gateway.revoke(child.handle)
    gateway.revoke(child.handle)  # idempotent

    assert not gateway.token_alive(child.handle.ref)
    assert gateway.token_alive(task.token.accessor)


def test_child_cannot_get_policies_the_task_token_lacks(gateway, start_task):
    task = start_task({"db": RO})  # no vault_token credential: the token lacks reports-read
    with pytest.raises(VaultRejected):
        issue_child(gateway, task)


@pytest.mark.parametrize("policies", [["broker"], ["root"], ["broker-task-x", "some-other-policy"]])
def test_the_role_refuses_policies_outside_its_allowlist(gateway, policies):
    with pytest.raises(VaultRejected) as caught:
        gateway.create_task_token(task_id="t", task="x", policies=policies, ttl_seconds=60, meta={})
    assert caught.value.status == 400


def test_token_alive_and_revoke_of_an_unknown_accessor(gateway):
    assert not gateway.token_alive("no-such-accessor")
    gateway.revoke_task_token("no-such-accessor")  # already gone = success
    gateway.revoke_task_token("no-such-accessor")
