"""F01/F05: Vault goes away in the middle of a start, after the task's Vault token exists.

The window is hit exactly: the proxy lets `auth/token/create/<role>` through and takes
Vault away on a credential request, either before Vault sees it or after Vault issued the
credential (the answer is lost), or on the third credential of a four-credential task
(two were already issued). The caller must get a 503 and no secret, the task must be
`failed`, and once Vault is back the reconciler must leave nothing alive: no lease, no
database user, no child token, no task token.
"""

from __future__ import annotations

import pytest

from tests.factories import AGENT, dynamic_roles, role_exists, start_body
from tests.faults.faultkit import all_live_leases, assert_unavailable, lease_alive, token_alive
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

CREDS = r"^/v1/database/creds/"
PKI = r"^/v1/pki/issue/"
CHILD_TOKEN = r"^/v1/auth/token/create$"


def issued_by_vault(proxy):
    """What Vault really handed out during the start, answered or lost on the way back."""
    leases, users, tokens = [], [], []
    for exchange in proxy.exchanges:
        if exchange.status != 200:
            continue
        body = exchange.response_json()
        if exchange.path.startswith(("/v1/database/creds/", "/v1/pki/issue/")) and body.get("lease_id"):
            leases.append(body["lease_id"])
        if exchange.path.startswith("/v1/database/creds/"):
            users.append(body["data"]["username"])
        if exchange.path == "/v1/auth/token/create":
            tokens.append(body["auth"]["accessor"])
    return leases, users, tokens


@pytest.mark.parametrize(
    ("task", "path", "moment"),
    [
        ("analytics-read", CREDS, "before_vault_saw_it"),
        ("analytics-read", CREDS, "after_vault_issued"),
        ("everything", PKI, "before_vault_saw_it"),  # db and a child token already issued
    ],
    ids=["creds-request-lost", "creds-answer-lost", "third-of-four-credentials"],
)
def test_vault_cut_while_issuing_fails_closed_and_leaves_no_orphan(
    task, path, moment, stack, issuers, vault_proxy, fault_config, in_process, scheduler_for, ledger
):
    """§6.9 fail closed (and §6.1): Vault lost mid-start answers 503 and leaves nothing alive."""
    services, client = in_process(fault_config(vault_addr=vault_proxy.addr, timeout=2))
    if moment == "before_vault_saw_it":
        cut = vault_proxy.add_rule(path, action="reset", before=lambda _: vault_proxy.cut())
    else:
        cut = vault_proxy.add_rule(path, action="lose_response", after=lambda _: vault_proxy.cut())
    roles_before = dynamic_roles(stack)
    leases_before = all_live_leases(stack)

    answer = client.post("/task/start", json=start_body(task), headers=issuers["spire"].bearer(AGENT))

    assert_unavailable(answer, "vault_unavailable")
    cut.wait_done(1)
    assert vault_proxy.requests_to(r"^/v1/auth/token/create/"), "the task token came first"
    row = ledger.only_task()
    assert row["state"] == "failed"
    assert row["token_accessor"], "the token's accessor was on record before issuing"
    assert ledger.leases(row["id"]) == []
    assert ledger.events("task.failed", row["id"])
    assert token_alive(stack, row["token_accessor"])  # the compensation could not reach Vault

    leases, users, tokens = issued_by_vault(vault_proxy)
    if moment == "after_vault_issued" or task == "everything":
        # Vault really issued credentials nobody recorded and nobody could revoke yet.
        assert leases and users
        assert all(lease_alive(stack, lease) for lease in leases)
        assert all(role_exists(stack, user) for user in users)
        assert all(token_alive(stack, accessor) for accessor in tokens)
    if task == "everything":
        assert len(tokens) == 1

    vault_proxy.restore()
    scheduler_for(services)

    wait_for(lambda: not token_alive(stack, row["token_accessor"]), what="task token revoked")
    wait_for(lambda: ledger.task(row["id"])["token_revoked_at"] is not None, what="token revoke recorded")
    wait_for(lambda: not any(lease_alive(stack, lease) for lease in leases), what="orphan leases revoked")
    wait_for(lambda: all_live_leases(stack) <= leases_before, what="no new live lease in Vault")
    wait_for(lambda: dynamic_roles(stack) <= roles_before, what="no new database user")
    assert not any(role_exists(stack, user) for user in users)
    assert not any(token_alive(stack, accessor) for accessor in tokens)
    assert ledger.task(row["id"])["state"] == "failed"
    assert ledger.leases(row["id"]) == []
