"""F13: a `broker serve` replica is SIGKILLed with its task token pools full.

Replica A (two gunicorn workers, no scheduler) fills its workers' pools and hands finished
tasks' tokens back to them; replica B (one worker, with the scheduler) does the same. Then
A's master and workers get SIGKILL: nothing of A runs to revoke its pools. The scheduler
on B must revoke every pooled token A's processes held, once their lease has run out,
while B's own pooled tokens stay alive and usable, and so does the token of a task A
started that is still running: it belongs to the task, not to A's pool.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from tests.factories import AGENT, start_body
from tests.faults.faultkit import token_alive
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

LEASE = 2.0
DEPTH = 3


def start(server, headers, task="analytics-read"):
    answer = requests.post(f"{server.url}/task/start", json=start_body(task), headers=headers, timeout=30)
    assert answer.status_code == 201, answer.text
    return answer.json()


def finish(server, headers, task_id):
    answer = requests.post(
        f"{server.url}/task/finish", json={"task_id": task_id}, headers=headers, timeout=30
    )
    assert answer.status_code == 200, answer.text


def pool_rows(ledger, pids):
    """accessor -> holder of the recorded pooled tokens of processes `pids`."""
    rows = ledger.rows("SELECT accessor, holder FROM task_tokens")
    return {row["accessor"]: row["holder"] for row in rows if int(row["holder"].split(":")[1]) in pids}


def test_sigkill_with_full_pools_leaves_no_pooled_token_alive(
    stack, issuers, fault_config, processes, ledger
):
    config = fault_config(vault_options={"task_token_pool": DEPTH, "task_token_lease_seconds": LEASE})
    victim = processes(config, "serve", workers=2, threads=2, scheduler=False)
    survivor = processes(config, "serve", workers=1, threads=2)
    victim.wait_healthy()
    survivor.wait_healthy()
    headers = issuers["spire"].bearer(AGENT, exp_in=600)
    victim_pids = victim.descendants() | {victim.pid}

    # Fill both workers' pools of two task types; finished tasks hand their tokens back.
    def victims_pools_full():
        for task in ("analytics-read", "churn"):
            finish(victim, headers, start(victim, headers, task)["task_id"])
        holders = set(pool_rows(ledger, victim_pids).values())
        return len(holders) == 2 and len(pool_rows(ledger, victim_pids)) >= 4 * DEPTH

    wait_for(victims_pools_full, timeout=60, interval=0.2, what="both victim workers pooled tokens")
    finish(survivor, headers, start(survivor, headers)["task_id"])
    running = start(victim, headers)  # a task A started, still running when A dies
    running_accessor = ledger.task(running["task_id"])["token_accessor"]
    survivor_pids = survivor.descendants() | {survivor.pid}
    wait_for(lambda: len(pool_rows(ledger, survivor_pids)) >= DEPTH, what="the survivor's pool filled")

    doomed = pool_rows(ledger, victim_pids)
    assert running_accessor not in doomed  # recorded on its task instead
    assert all(token_alive(stack, accessor) for accessor in doomed)

    os.killpg(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(
        lambda: not any(token_alive(stack, accessor) for accessor in doomed),
        timeout=LEASE + 15,
        what=f"all {len(doomed)} pooled tokens of the killed replica revoked",
    )
    reclaimed_after = time.monotonic() - killed_at
    assert reclaimed_after >= LEASE / 3  # not before the lease could have run out
    wait_for(lambda: not pool_rows(ledger, victim_pids), what="their rows dropped")

    # The survivor renewed its lease all along: its pool is on record, alive and used.
    kept = pool_rows(ledger, survivor_pids)
    assert len(kept) >= DEPTH and all(token_alive(stack, accessor) for accessor in kept)
    again = start(survivor, headers)
    assert ledger.task(again["task_id"])["token_accessor"] in kept
    finish(survivor, headers, again["task_id"])

    # The running task's token is its task's, not the dead pool's: alive until it ends.
    assert token_alive(stack, running_accessor)
    finish(survivor, headers, running["task_id"])
    wait_for(lambda: not token_alive(stack, running_accessor), what="the running task's token retired")
    print(f"{len(doomed)} pooled tokens of the killed replica revoked {reclaimed_after:.1f} s after SIGKILL")
