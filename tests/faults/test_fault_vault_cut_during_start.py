"""F01: Vault goes away in the middle of a start, after the task's Vault token exists.

The window is hit exactly: the proxy lets `auth/token/create/...` through and takes Vault
away on the first `database/creds/...` request, either before Vault sees it or after
Vault issued the credential (the answer is lost). The caller must get a 503 and no
secret, the task must be `failed`, and once Vault is back the reconciler must leave
nothing alive: no lease, no database user, no task token.
"""

from __future__ import annotations

import pytest

from tests.factories import AGENT, dynamic_roles, live_leases, role_exists, start_body
from tests.faults.faultkit import assert_unavailable, lease_alive, token_alive, wait_for

pytestmark = pytest.mark.slow

CREDS = r"^/v1/database/creds/"


@pytest.mark.parametrize("moment", ["before_vault_saw_it", "after_vault_issued"])
def test_vault_cut_while_issuing_fails_closed_and_leaves_no_orphan(
    moment, stack, issuers, vault_proxy, fault_config, in_process, scheduler_for, ledger
):
    services, client = in_process(fault_config(vault_addr=vault_proxy.addr, timeout=2))
    if moment == "before_vault_saw_it":
        creds = vault_proxy.add_rule(CREDS, action="reset", before=lambda _: vault_proxy.cut())
    else:
        creds = vault_proxy.add_rule(CREDS, action="lose_response", after=lambda _: vault_proxy.cut())
    roles_before = dynamic_roles(stack)
    leases_before = set(live_leases(stack, "database/creds/analytics-ro"))

    answer = client.post("/task/start", json=start_body(), headers=issuers["spire"].bearer(AGENT))

    assert_unavailable(answer, "vault_unavailable")
    [exchange] = creds.wait_fired(1)
    assert vault_proxy.requests_to(r"^/v1/auth/token/create/"), "the task token came first"
    task = ledger.only_task()
    assert task["state"] == "failed"
    assert task["token_accessor"], "the token's accessor was on record before issuing"
    assert ledger.leases(task["id"]) == []
    assert ledger.events("task.failed", task["id"])

    orphan = None
    if moment == "after_vault_issued":
        # Vault really issued a credential nobody recorded, and couldn't be told to revoke it.
        assert exchange.status == 200
        orphan = exchange.response_json()
        assert role_exists(stack, orphan["data"]["username"])
        assert lease_alive(stack, orphan["lease_id"])
    assert token_alive(stack, task["token_accessor"])  # the compensation could not reach Vault

    vault_proxy.restore()
    scheduler_for(services)

    wait_for(lambda: not token_alive(stack, task["token_accessor"]), what="task token revoked")
    wait_for(lambda: ledger.task(task["id"])["token_revoked_at"] is not None, what="token revoke recorded")
    wait_for(
        lambda: set(live_leases(stack, "database/creds/analytics-ro")) <= leases_before,
        what="no new live database lease",
    )
    wait_for(lambda: dynamic_roles(stack) <= roles_before, what="no new database user")
    if orphan is not None:
        assert not lease_alive(stack, orphan["lease_id"])
        assert not role_exists(stack, orphan["data"]["username"])
    final = ledger.task(task["id"])
    assert final["state"] == "failed"
    assert ledger.leases(task["id"]) == []
