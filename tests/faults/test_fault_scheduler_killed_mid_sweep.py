"""A `broker scheduler` SIGKILLed in the middle of a deadline sweep (F14-like).

The sweeper dies after Vault revoked the lease, before its transaction committed: its
row locks die with its connection, so another scheduler picks the task up, and the lease
ends `revoked` exactly once in the ledger (the dead sweeper's work was rolled back, the
second one's Vault revoke of an already-gone lease counts as done).
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.factories import AGENT, can_log_in, start_body
from tests.faults.faultkit import lease_alive, token_alive
from tests.support.broker_procs import BrokerProcess
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow


def test_a_sweeper_killed_between_vault_and_commit_is_taken_over_without_double_revoke(
    stack, issuers, vault_proxy, fault_config, in_process, processes, ledger
):
    _, client = in_process(fault_config())  # the workload talks to Vault directly
    headers = issuers["spire"].bearer(AGENT)
    started = client.post("/task/start", json=start_body("flash", ttl_seconds=2), headers=headers)
    assert started.status_code == 201
    task_id = started.get_json()["task_id"]
    creds = started.get_json()["credentials"]["db"]["data"]

    config = fault_config(vault_addr=vault_proxy.addr)
    sweepers: list[BrokerProcess] = []

    def kill_the_sweeper(_exchange):
        os.kill(sweepers[0].pid, signal.SIGKILL)
        sweepers[0].proc.wait(timeout=10)

    revoke = vault_proxy.add_rule(r"^/v1/sys/leases/revoke$", action="lose_response", after=kill_the_sweeper)
    sweepers.append(processes(config, "scheduler"))
    [exchange] = revoke.wait_done(1, timeout=30)
    assert exchange.status in (200, 204)  # Vault did revoke it
    assert sweepers[0].proc.returncode == -signal.SIGKILL
    assert not can_log_in(stack, creds)
    [lease] = ledger.leases(task_id)
    assert lease["state"] == "active"  # the dead sweeper's transaction never committed
    assert ledger.task(task_id)["state"] == "active"

    processes(config, "scheduler")

    wait_for(lambda: ledger.task(task_id)["state"] == "expired", what="the other scheduler expired it")
    [lease] = ledger.leases(task_id)
    assert lease["state"] == "revoked"
    assert lease["revoke_attempts"] == 1
    assert len(ledger.events("lease.revoked", task_id)) == 1
    assert len(ledger.events("task.expired", task_id)) == 1
    assert not lease_alive(stack, lease["vault_lease_id"])
    wait_for(lambda: ledger.task(task_id)["token_revoked_at"] is not None, what="task token revoked")
    assert not token_alive(stack, ledger.task(task_id)["token_accessor"])
