"""The kill switch pulled while a start is committing its leases (docs/contract.md §5 kill switch, §6.2-6.3).

Whatever the interleaving, a task the kill switch ends must not keep a live credential:
either the start loses (409, everything it issued is revoked) or it wins and the kill
switch's statement then ends the task, and the scheduler revokes the leases it committed.

The interleaving is made deterministic: the Vault proxy holds the start at its
credential request; a test transaction holds the task row; the start (now past Vault)
queues for the row first, the kill switch second; then the row is released. Postgres
hands the row to the start, which commits its leases, then to the kill switch.
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text
from werkzeug.test import TestResponse

from tests.factories import AGENT, can_log_in, start_body
from tests.faults.faultkit import lease_alive
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow


def test_kill_switch_waiting_behind_a_start_commit_revokes_the_committed_leases(
    stack, issuers, vault_proxy, fault_config, in_process, ledger, scheduler_for
):
    services, client = in_process(fault_config(vault_addr=vault_proxy.addr, timeout=10))
    workload = issuers["spire"].bearer(AGENT)
    operator = issuers["sso"].bearer("sre@example.com", groups=["sre"])

    def lock_waiters() -> int:
        return int(ledger.rows("SELECT count(*) AS n FROM pg_locks WHERE NOT granted")[0]["n"])

    at_vault, go_on = threading.Event(), threading.Event()

    def hold_the_start(_exchange):
        at_vault.set()
        assert go_on.wait(30)

    vault_proxy.add_rule(r"^/v1/database/creds/", before=hold_the_start)
    answers: dict[str, TestResponse] = {}

    def start():
        answers["start"] = client.post("/task/start", json=start_body(), headers=workload)

    def kill():
        answers["kill"] = client.post(
            "/leases/revoke", json={"reason": "incident", "workload": AGENT}, headers=operator
        )

    starting = threading.Thread(target=start)
    starting.start()
    assert at_vault.wait(30)
    task_id = ledger.only_task()["id"]
    with ledger.engine.connect() as holder:
        holder.execute(text("SELECT 1 FROM tasks WHERE id = :id FOR UPDATE"), {"id": task_id})
        go_on.set()
        wait_for(lambda: lock_waiters() >= 1, interval=0.02, what="the start queues for the task row")
        killing = threading.Thread(target=kill)
        killing.start()
        wait_for(lambda: lock_waiters() >= 2, interval=0.02, what="the kill switch queues behind it")
        holder.rollback()
    starting.join(60)
    killing.join(60)

    assert answers["kill"].status_code == 200, answers["kill"].get_json()
    task = ledger.task(task_id)
    assert task["state"] == "revoked"
    leases = ledger.leases(task_id)
    if answers["start"].status_code == 201:
        assert leases, "the start committed its leases"
        # The kill switch ended the task in its statement; the scheduler revokes its leases.
        scheduler_for(services)

        def all_revoked():
            rows = ledger.leases(task_id)
            return rows if {row["state"] for row in rows} == {"revoked"} else None

        leases = wait_for(all_revoked, what="the scheduler revokes the committed leases")
        assert not any(lease_alive(stack, row["vault_lease_id"]) for row in leases)
        assert not can_log_in(stack, answers["start"].get_json()["credentials"]["db"]["data"])
    else:
        assert answers["start"].status_code == 409
        assert leases == []
