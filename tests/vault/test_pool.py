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
