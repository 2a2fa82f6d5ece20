"""The task token pool: ready tokens, never an aged one, nothing left behind on close."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from broker.credentials import DatabaseCredential
from broker.vault.pool import TaskTokenPool

SPECS = {"db": DatabaseCredential(kind="database", role="analytics-ro")}


class MovableClock:
    def __init__(self) -> None:
        self.offset = timedelta()

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


def alive(gateway, token) -> bool:
    return gateway.token_alive(token.accessor)


def wait_for_depth(pool, depth, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(len(ready) for ready in pool._ready.values()) >= depth:
            return
        time.sleep(0.02)
    raise AssertionError("pool did not refill")


def test_a_taken_token_issues_and_the_pool_refills(gateway):
    pool = TaskTokenPool(gateway, depth=2)
    try:
        first = pool.take(task="pool-test", specs=SPECS, ttl_max=600, ttl_needed=60)
        assert alive(gateway, first)
        secret = gateway.issue(first, SPECS["db"], ttl_seconds=60, task_id="t", workload="w")
        assert secret.data["username"]
        wait_for_depth(pool, 2)
        second = pool.take(task="pool-test", specs=SPECS, ttl_max=600, ttl_needed=60)
        assert second.accessor != first.accessor
        gateway.revoke(secret.handle)
        for token in (first, second):
            gateway.revoke_task_token(token.accessor)
    finally:
        pool.close()


def test_an_aged_token_is_revoked_not_handed_out(gateway):
    clock = MovableClock()
    pool = TaskTokenPool(gateway, clock, depth=1)
    try:
        pool.take(task="pool-age", specs=SPECS, ttl_max=120, ttl_needed=60)
        wait_for_depth(pool, 1)
        [pooled] = [token for ready in pool._ready.values() for token in ready]
        clock.offset = timedelta(seconds=90)  # 30 s of life left: too little for a 60 s task
        fresh = pool.take(task="pool-age", specs=SPECS, ttl_max=120, ttl_needed=60)
        assert fresh.accessor != pooled.accessor
        assert not alive(gateway, pooled)
    finally:
        pool.close()


def test_close_revokes_what_is_pooled(gateway):
    pool = TaskTokenPool(gateway, depth=2)
    pool.take(task="pool-close", specs=SPECS, ttl_max=300, ttl_needed=60)
    wait_for_depth(pool, 2)
    pooled = [token for ready in pool._ready.values() for token in ready]
    pool.close()
    assert pooled and not any(alive(gateway, token) for token in pooled)


def test_a_lent_token_is_forgotten_after_its_tasks_deadline_and_never_pooled_twice(gateway):
    import uuid

    clock = MovableClock()
    pool = TaskTokenPool(gateway, clock, depth=0, reuse=True)
    try:
        token = pool.take(task="pool-lend", specs=SPECS, ttl_max=300, ttl_needed=60)
        ended_elsewhere, finished_here = uuid.uuid4(), uuid.uuid4()
        lend = {"task": "pool-lend", "specs": SPECS, "ttl_max": 300}
        pool.lend(ended_elsewhere, token, until=clock.now() + timedelta(seconds=60), **lend)
        clock.offset = timedelta(seconds=61)
        # The next lend forgets the first: its task ended elsewhere, by its deadline at the latest.
        pool.lend(finished_here, token, until=clock.now() + timedelta(seconds=60), **lend)
        assert not pool.holds(ended_elsewhere, token.accessor)
        pool.give_back_used(ended_elsewhere)
        assert pool.take_ready(ttl_needed=60, **lend) is None
        assert pool.holds(finished_here, token.accessor)
        pool.give_back_used(finished_here)
        pool.give_back_used(finished_here)
        assert pool.take_ready(ttl_needed=60, **lend) == token
        assert pool.take_ready(ttl_needed=60, **lend) is None
    finally:
        pool.close()
        gateway.revoke_task_token(token.accessor)
