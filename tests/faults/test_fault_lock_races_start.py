"""A lock committed while a start is at Vault (docs/api.md#locks).

The start passed the lock check before the lock existed; its activation is guarded by the
locks too, so it cannot become active once the lock is committed: it answers 409, what it
issued is revoked, and the scheduler's lock sweep ends the task it had recorded. The lock
is written straight into the table here, as a lock whose request died before ending what
it matched would leave it.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import text

from tests.factories import AGENT, start_body
from tests.faults.faultkit import lease_alive

pytestmark = pytest.mark.slow


def test_a_start_past_the_lock_check_cannot_activate_once_the_lock_is_committed(
    stack, issuers, vault_proxy, fault_config, in_process, ledger
):
    from broker.scheduler.jobs import Jobs

    services, client = in_process(fault_config(vault_addr=vault_proxy.addr, timeout=10))
    at_vault, go_on = threading.Event(), threading.Event()

    def hold_the_start(_exchange: Any) -> None:
        at_vault.set()
        assert go_on.wait(30)

    vault_proxy.add_rule(r"^/v1/database/creds/", before=hold_the_start)
    answers: dict[str, Any] = {}
    starting = threading.Thread(
        target=lambda: answers.update(
            start=client.post("/task/start", json=start_body(), headers=issuers["spire"].bearer(AGENT))
        )
    )
    starting.start()
    assert at_vault.wait(30)
    with ledger.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO locks (id, workload, reason, created_by)"
                " VALUES (gen_random_uuid(), :workload, 'INC-24 race', 'test')"
            ),
            {"workload": AGENT},
        )
    go_on.set()
    starting.join(60)

    assert answers["start"].status_code == 409, answers["start"].get_json()
    task = ledger.only_task()
    assert ledger.leases(task["id"]) == []
    assert not any(lease_alive(stack, row["vault_lease_id"]) for row in ledger.leases(task["id"]))
    with ThreadPoolExecutor(1) as pool:
        Jobs(services, pool).sweep_locks()
    assert ledger.task(task["id"])["state"] == "revoked"
