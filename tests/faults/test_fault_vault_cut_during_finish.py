"""F06/F08: Vault is unreachable when a workload finishes its task.

Finish still answers 200 (the task is over for the workload), every lease is honestly
`revoke_pending` with its attempts and last error instead of being called revoked, a
second finish is harmless, the scheduler keeps retrying while Vault is away and revokes
every credential once it is back.
"""

from __future__ import annotations

import pytest

from tests.factories import AGENT, can_log_in, start_body
from tests.faults.faultkit import lease_alive, token_alive
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow


def test_finish_during_vault_outage_parks_every_lease_then_retries_until_revoked(
    stack, issuers, vault_proxy, fault_config, in_process, scheduler_for, ledger
):
    services, client = in_process(fault_config(vault_addr=vault_proxy.addr, timeout=2))
    headers = issuers["spire"].bearer(AGENT)
    started = client.post("/task/start", json=start_body("everything"), headers=headers)
    assert started.status_code == 201, started.get_json()
    task_id = started.get_json()["task_id"]
    creds = started.get_json()["credentials"]
    leases = {row["name"]: row for row in ledger.leases(task_id)}
    assert set(leases) == {"db", "token", "cert", "rw"}

    vault_proxy.cut()
    finished = client.post("/task/finish", json={"task_id": task_id}, headers=headers)

    assert finished.status_code == 200, finished.get_json()
    body = finished.get_json()
    assert body["state"] == "finished"
    assert len(body["leases"]) == 4
    for lease in body["leases"]:
        assert lease["state"] == "revoke_pending", lease
        assert lease["last_error"]
        assert lease["revoked_at"] is None
    # One revoke was tried; Vault gave no answer, so the others were parked without a call.
    assert sorted(lease["revoke_attempts"] for lease in body["leases"]) == [0, 0, 0, 1]
    assert len(ledger.events("lease.revoke_failed", task_id)) == 1
    assert len(ledger.events("lease.revoke_deferred", task_id)) == 3
    # Nothing was revoked behind the ledger's back: the credential still works.
    assert can_log_in(stack, creds["db"]["data"])

    again = client.post("/task/finish", json={"task_id": task_id}, headers=headers)
    assert again.status_code == 200
    assert again.get_json()["state"] == "finished"
    assert sorted(lease["revoke_attempts"] for lease in again.get_json()["leases"]) == [0, 0, 0, 1]

    scheduler_for(services)

    def retried_while_down():
        rows = ledger.leases(task_id)
        return all(row["state"] == "revoke_pending" and row["revoke_attempts"] >= 2 for row in rows)

    wait_for(retried_while_down, what="the scheduler retried every lease while Vault was away")
    assert ledger.events("lease.revoked", task_id) == []

    vault_proxy.restore()

    wait_for(
        lambda: all(row["state"] == "revoked" for row in ledger.leases(task_id)),
        what="every lease revoked after Vault came back",
    )
    task = ledger.task(task_id)
    wait_for(lambda: ledger.task(task_id)["token_revoked_at"] is not None, what="task token revoked")
    assert not token_alive(stack, task["token_accessor"])
    for row in ledger.leases(task_id):
        assert row["revoked_at"] is not None
        if row["vault_lease_id"]:
            assert not lease_alive(stack, row["vault_lease_id"]), row["name"]
    assert not token_alive(stack, creds["token"]["data"]["accessor"])
    assert not can_log_in(stack, creds["db"]["data"])
    assert not can_log_in(stack, creds["rw"]["data"])
    # Each lease revoked exactly once, and every failed attempt is on record.
    revoked = ledger.count_by_lease("lease.revoked")
    failed = ledger.count_by_lease("lease.revoke_failed")
    for row in ledger.leases(task_id):
        assert revoked[str(row["id"])] == 1
        assert row["revoke_attempts"] == failed[str(row["id"])] + 1
    seen = client.get(f"/task/{task_id}", headers=headers).get_json()
    assert {lease["state"] for lease in seen["leases"]} == {"revoked"}
