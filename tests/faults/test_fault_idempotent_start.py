"""F14: a start whose answer never reaches the client, retried with its Idempotency-Key,
against a real `broker serve` (docs/api.md#idempotent-starts).

An `HttpFaultProxy` in front of the broker forwards the first start, lets the broker
finish it, and drops the answer: the client saw nothing, the broker issued. A Vault
proxy slows the credential read so a retry arrives while the first start is still
issuing. Whatever the timing, the retries never issue again and never leave a second
live task, and the task the key names is one the client can finish.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.factories import AGENT, start_body
from tests.support.fault_proxy import HttpFaultProxy
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow
OPEN = {"issuing", "pending_approval", "active"}


def open_tasks(ledger):
    return [task for task in ledger.tasks() if task["state"] in OPEN]


def post_start(url, headers, key, timeout=30.0):
    return requests.post(
        f"{url}/task/start", json=start_body(), headers={**headers, "Idempotency-Key": key}, timeout=timeout
    )


def test_a_start_whose_answer_was_lost_is_retried_without_a_second_task(
    issuers, fault_config, processes, ledger
):
    server = processes(fault_config(), "serve", workers=2, threads=2)
    server.wait_healthy()
    front = HttpFaultProxy.to(server.url)
    try:
        lost = front.add_rule(r"^/task/start", action="lose_response", times=1)
        headers = issuers["spire"].bearer(AGENT, exp_in=600)
        with pytest.raises(requests.ConnectionError):
            post_start(front.addr, headers, "lost-answer")
        [exchange] = lost.wait_done(1)
        assert exchange.status == 201  # the broker issued; the client never read it

        retry = post_start(front.addr, headers, "lost-answer")
        assert retry.status_code == 409, retry.text
        problem = retry.json()
        assert problem["code"] == "conflict" and problem["state"] == "active"
        assert "credentials" not in problem
        [task] = open_tasks(ledger)
        assert problem["task_id"] == str(task["id"])
        assert len(ledger.leases(task["id"])) == 1  # issued once

        # The client cleans up the task the key names, as broker exec and the SDK do.
        finished = requests.post(
            f"{front.addr}/task/finish", json={"task_id": problem["task_id"]}, headers=headers, timeout=30
        )
        assert finished.status_code == 200
        assert open_tasks(ledger) == []
    finally:
        front.close()


def test_a_retry_while_the_first_start_is_still_issuing_is_told_to_wait(
    issuers, vault_proxy, fault_config, processes, ledger
):
    server = processes(
        fault_config(vault_addr=vault_proxy.addr, timeout=10, orphan_grace_seconds=15),
        "serve",
        workers=2,
        threads=2,
    )
    server.wait_healthy()
    slow = vault_proxy.add_rule(r"^/v1/database/creds/", action="forward", delay_seconds=3, times=1)
    headers = issuers["spire"].bearer(AGENT, exp_in=600)
    with pytest.raises(requests.Timeout):
        post_start(server.url, headers, "in-flight", timeout=1)  # the client gives up
    slow.wait_fired(1)

    during = post_start(server.url, headers, "in-flight")
    assert during.status_code == 409, during.text
    assert during.json()["state"] == "issuing" and "in progress" in during.json()["detail"]

    wait_for(lambda: [t["state"] for t in ledger.tasks()] == ["active"], what="the first start completed")
    after = post_start(server.url, headers, "in-flight")
    assert after.status_code == 409 and after.json()["state"] == "active"
    assert len(ledger.tasks()) == 1 and len(ledger.leases()) == 1


def test_parallel_retries_against_two_workers_make_one_task(issuers, fault_config, processes, ledger):
    server = processes(fault_config(), "serve", workers=2, threads=4)
    server.wait_healthy()
    headers = issuers["spire"].bearer(AGENT, exp_in=600)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post_start(server.url, headers, "parallel"), range(8)))
    codes = sorted(answer.status_code for answer in answers)
    assert codes == [201] + [409] * 7, [answer.text for answer in answers]
    [created] = [answer.json() for answer in answers if answer.status_code == 201]
    assert all(
        answer.json()["task_id"] == created["task_id"] for answer in answers if answer.status_code == 409
    )
    assert len(open_tasks(ledger)) == 1 and len(ledger.leases()) == 1
