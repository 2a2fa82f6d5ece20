"""F04: a real `broker serve` worker is SIGKILLed after Vault issued, before the commit.

The Vault proxy watches for the worker's `database/creds/...` request; once Vault has
answered (a database user now exists) it finds the process holding that connection and
kills it with SIGKILL, so neither the commit nor any compensation can run. The caller
gets no credential; the scheduler that `broker serve` runs beside gunicorn finds the task
stuck in `issuing` and revokes its token, and with it the orphaned credential.
"""

from __future__ import annotations

import os
import signal

import pytest
import requests

from tests.factories import AGENT, role_exists, start_body
from tests.faults.faultkit import all_live_leases, lease_alive, token_alive
from tests.support.broker_procs import pid_with_connection
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow


def test_sigkill_between_vault_and_commit_leaves_an_orphan_the_reconciler_revokes(
    stack, issuers, vault_proxy, fault_config, processes, ledger
):
    server = processes(fault_config(vault_addr=vault_proxy.addr), "serve", workers=1, threads=2)
    server.wait_healthy()
    leases_before = all_live_leases(stack)
    killed: dict[str, object] = {}

    def kill_the_requester(exchange):
        # Vault issued: the orphan exists now, and only Vault knows its lease.
        killed["role_existed"] = role_exists(stack, exchange.response_json()["data"]["username"])
        pid = pid_with_connection(exchange.client_port, vault_proxy.port, server.descendants())
        killed["pid"] = pid
        if pid is not None:
            os.kill(pid, signal.SIGKILL)

    creds = vault_proxy.add_rule(r"^/v1/database/creds/", action="lose_response", after=kill_the_requester)
    headers = issuers["spire"].bearer(AGENT)

    try:
        answer = requests.post(f"{server.url}/task/start", json=start_body(), headers=headers, timeout=30)
    except requests.ConnectionError:
        answer = None  # the worker died with the connection
    [exchange] = creds.wait_done(1)
    assert killed["pid"] is not None, "found the worker that asked Vault"
    assert killed["role_existed"]
    assert answer is None or (answer.status_code >= 500 and "credentials" not in answer.text), answer
    orphan = exchange.response_json()
    [task] = ledger.tasks()
    assert task["token_accessor"], "the token's accessor was committed before issuing"
    assert ledger.leases(task["id"]) == []  # Vault issued it, the ledger never heard

    wait_for(lambda: ledger.task(task["id"])["state"] == "failed", timeout=30, what="orphan reconciled")
    wait_for(lambda: not lease_alive(stack, orphan["lease_id"]), what="orphan lease revoked in Vault")
    wait_for(lambda: not role_exists(stack, orphan["data"]["username"]), what="orphan database user dropped")
    assert not token_alive(stack, task["token_accessor"])
    assert all_live_leases(stack) <= leases_before
    wait_for(lambda: ledger.task(task["id"])["token_revoked_at"] is not None, what="task token revoked")
    assert ledger.events("task.orphan_revoked", task["id"])
    assert ledger.leases(task["id"]) == []

    # gunicorn replaced the worker; the replica keeps serving.
    vault_proxy.clear_rules()
    again = wait_for(lambda: _start(server.url, headers), timeout=30, what="a new worker serves starts again")
    assert again["task_id"] != str(task["id"])
    finished = requests.post(
        f"{server.url}/task/finish", json={"task_id": again["task_id"]}, headers=headers, timeout=30
    )
    assert finished.status_code == 200
    assert killed["pid"] not in server.descendants()


def _start(url, headers):
    try:
        answer = requests.post(f"{url}/task/start", json=start_body(), headers=headers, timeout=30)
    except requests.ConnectionError:
        return None
    return answer.json() if answer.status_code == 201 else None
