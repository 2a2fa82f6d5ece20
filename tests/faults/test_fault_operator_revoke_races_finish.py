"""F09 for operators: an operator revokes a lease while its workload is finishing the task.

Both are ordinary requests a user makes; both must succeed (the lease is revoked once,
the task is finished) and neither may fail with a database error. The window is made
deterministic on the network: the Vault proxy holds the finish's `sys/leases/revoke`
(the finish now holds its task row) until Postgres shows the operator's request waiting
for a row lock, then lets it through.
"""

from __future__ import annotations

import threading

import pytest
from werkzeug.test import TestResponse

from tests.factories import AGENT, start_body
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow


def test_operator_revoke_during_finish_both_succeed(
    stack, issuers, vault_proxy, fault_config, in_process, ledger
):
    _, client = in_process(fault_config(vault_addr=vault_proxy.addr, timeout=10))
    workload = issuers["spire"].bearer(AGENT)
    operator = issuers["sso"].bearer("sre@example.com", groups=["sre"])
    started = client.post("/task/start", json=start_body(), headers=workload)
    assert started.status_code == 201
    task_id = started.get_json()["task_id"]
    [lease] = ledger.leases(task_id)

    def lock_waiters() -> int:
        rows = ledger.rows("SELECT count(*) AS n FROM pg_locks WHERE NOT granted")
        return int(rows[0]["n"])

    finish_in_vault = threading.Event()

    def hold_until_operator_waits(_exchange):
        finish_in_vault.set()
        wait_for(lock_waiters, timeout=15, interval=0.02, what="the operator waits for a row lock")

    vault_proxy.add_rule(r"^/v1/sys/leases/revoke$", before=hold_until_operator_waits)
    answers: dict[str, TestResponse] = {}

    def finish():
        answers["finish"] = client.post("/task/finish", json={"task_id": task_id}, headers=workload)

    def revoke():
        answers["operator"] = client.post(
            f"/leases/{lease['id']}/revoke", json={"reason": "operator test"}, headers=operator
        )

    finishing = threading.Thread(target=finish)
    finishing.start()
    assert finish_in_vault.wait(15)
    revoking = threading.Thread(target=revoke)
    revoking.start()
    finishing.join(60)
    revoking.join(60)

    statuses = {name: answer.status_code for name, answer in answers.items()}
    bodies = {name: answer.get_json() for name, answer in answers.items()}
    assert statuses == {"finish": 200, "operator": 200}, bodies
    [after] = ledger.leases(task_id)
    assert after["state"] == "revoked"
    assert len(ledger.events("lease.revoked", task_id)) == 1
    assert ledger.task(task_id)["state"] == "finished"


def test_finish_waiting_behind_an_operator_revoke_does_not_revoke_the_lease_again(
    stack, issuers, vault_proxy, fault_config, in_process, ledger
):
    """The other order: the operator revokes one of two leases (the task stays active) and
    holds the task row while Vault works; the workload's finish waits for that row. Once
    it gets it, it must see the lease as revoked: one revocation per lease, ever."""
    _, client = in_process(fault_config(vault_addr=vault_proxy.addr, timeout=10))
    workload = issuers["spire"].bearer(AGENT)
    operator = issuers["sso"].bearer("sre@example.com", groups=["sre"])
    started = client.post("/task/start", json=start_body("churn"), headers=workload)
    assert started.status_code == 201
    task_id = started.get_json()["task_id"]
    leases = {row["name"]: row for row in ledger.leases(task_id)}
    assert set(leases) == {"db", "token"}

    def lock_waiters() -> int:
        rows = ledger.rows("SELECT count(*) AS n FROM pg_locks WHERE NOT granted")
        return int(rows[0]["n"])

    operator_in_vault = threading.Event()

    def hold_until_finish_waits(_exchange):
        operator_in_vault.set()
        wait_for(lock_waiters, timeout=15, interval=0.02, what="the finish waits for the task row")

    vault_proxy.add_rule(r"^/v1/sys/leases/revoke$", before=hold_until_finish_waits)
    answers: dict[str, TestResponse] = {}

    def revoke():
        answers["operator"] = client.post(
            f"/leases/{leases['db']['id']}/revoke", json={"reason": "operator test"}, headers=operator
        )

    def finish():
        answers["finish"] = client.post("/task/finish", json={"task_id": task_id}, headers=workload)

    revoking = threading.Thread(target=revoke)
    revoking.start()
    assert operator_in_vault.wait(15)
    finishing = threading.Thread(target=finish)
    finishing.start()
    revoking.join(60)
    finishing.join(60)

    assert {name: answer.status_code for name, answer in answers.items()} == {"operator": 200, "finish": 200}
    assert ledger.task(task_id)["state"] == "finished"
    assert {row["state"] for row in ledger.leases(task_id)} == {"revoked"}
    revoked = ledger.count_by_lease("lease.revoked")
    assert revoked == {str(leases["db"]["id"]): 1, str(leases["token"]["id"]): 1}
    [db_event] = [
        e for e in ledger.events("lease.revoked", task_id) if str(e["lease_id"]) == str(leases["db"]["id"])
    ]
    assert db_event["actor"] == "corp-sso:sre@example.com"
