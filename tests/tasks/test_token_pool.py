"""The task token pool: ready tokens, never an aged one, none unrecorded, nothing left behind on close."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from broker.credentials import DatabaseCredential
from broker.db import make_engine, make_session_factory
from broker.tasks.token_pool import RecordedToken, TaskTokenPool
from broker.vault import TaskToken, VaultGateway

SPECS = {"db": DatabaseCredential(kind="database", role="analytics-ro")}


class MovableClock:
    def __init__(self) -> None:
        self.offset = timedelta()

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


@pytest.fixture
def gateway(settings):
    """The shared stack's OpenBao, with the broker's own least-privilege token."""
    gw = VaultGateway(settings.vault)
    yield gw
    gw.close()


@pytest.fixture
def sessions(stack, clean_db):
    engine = make_engine(stack.database_url, pool_size=2)
    yield make_session_factory(engine)
    engine.dispose()


def rows(sessions, holder=None):
    """The recorded pool rows (of `holder`), by accessor, with their lease left in seconds."""
    sql = "SELECT accessor, holder, extract(epoch FROM lease_until - now()) AS left FROM task_tokens"
    with sessions() as session:
        found = session.execute(text(sql)).all()
    return {row.accessor: float(row.left) for row in found if holder is None or row.holder == holder}


def alive(gateway: VaultGateway, token: TaskToken) -> bool:
    return gateway.token_alive(token.accessor)


def wait_for_depth(pool, depth, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(len(ready) for ready in pool._ready.values()) >= depth:
            return
        time.sleep(0.02)
    raise AssertionError("pool did not refill")


def test_a_taken_token_issues_and_the_pool_refills(gateway, sessions):
    pool = TaskTokenPool(gateway, sessions=sessions, depth=2)
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


def test_an_aged_token_is_revoked_not_handed_out(gateway, sessions):
    clock = MovableClock()
    pool = TaskTokenPool(gateway, clock, sessions=sessions, depth=1)
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


def test_close_revokes_what_is_pooled_and_forgets_its_rows(gateway, sessions):
    pool = TaskTokenPool(gateway, sessions=sessions, depth=2)
    pool.take(task="pool-close", specs=SPECS, ttl_max=300, ttl_needed=60)
    wait_for_depth(pool, 2)
    pooled = [token for ready in pool._ready.values() for token in ready]
    assert set(rows(sessions, pool.holder)) == {token.accessor for token in pooled}
    pool.close()
    assert pooled and not any(alive(gateway, token) for token in pooled)
    assert rows(sessions, pool.holder) == {}


def test_a_lent_token_is_forgotten_after_its_tasks_deadline_and_never_pooled_twice(gateway, sessions):
    import uuid

    clock = MovableClock()
    pool = TaskTokenPool(gateway, clock, sessions=sessions, depth=0, reuse=True)
    try:
        token = pool.take(task="pool-lend", specs=SPECS, ttl_max=300, ttl_needed=60)
        ended_elsewhere, finished_here = uuid.uuid4(), uuid.uuid4()
        lend: dict[str, Any] = {"task": "pool-lend", "specs": SPECS, "ttl_max": 300}
        pool.lend(ended_elsewhere, token, until=clock.now() + timedelta(seconds=60), **lend)
        clock.offset = timedelta(seconds=61)
        # The next lend forgets the first: its task ended elsewhere, by its deadline at the latest.
        pool.lend(finished_here, token, until=clock.now() + timedelta(seconds=60), **lend)
        assert not pool.holds(ended_elsewhere, token.accessor)
        pool.give_back_used(ended_elsewhere)
        assert pool.take_ready(ttl_needed=60, **lend) is None
        assert pool.holds(finished_here, token.accessor)
        record = pool.pool_record(finished_here)
        assert record is not None
        assert record.accessor == token.accessor  # the finish records it
        pool.give_back_used(finished_here)
        pool.give_back_used(finished_here)
        again = pool.take_ready(ttl_needed=60, **lend)
        assert again is not None
        assert again.accessor == token.accessor
        assert pool.take_ready(ttl_needed=60, **lend) is None
    finally:
        pool.close()
        gateway.revoke_task_token(token.accessor)


def test_every_pooled_token_is_on_record_under_its_holder_and_its_lease_is_renewed(gateway, sessions):
    pool = TaskTokenPool(gateway, sessions=sessions, depth=2, lease_seconds=3)
    try:
        taken = pool.take(task="pool-record", specs=SPECS, ttl_max=300, ttl_needed=60)
        assert not isinstance(taken, RecordedToken)  # minted for this start: its task records it
        wait_for_depth(pool, 2)
        pooled = [token for ready in pool._ready.values() for token in ready]
        assert all(isinstance(token, RecordedToken) for token in pooled)
        recorded = rows(sessions, pool.holder)
        assert set(recorded) == {token.accessor for token in pooled}
        time.sleep(2.5)  # past the first lease's end but for the renewals (every second)
        assert all(left > 1.5 for left in rows(sessions, pool.holder).values())
        gateway.revoke_task_token(taken.accessor)
    finally:
        pool.close()


def test_a_token_that_cannot_be_recorded_is_revoked_not_pooled(gateway):
    # A database that refuses every connection: nothing can be recorded, so nothing is pooled.
    engine = make_engine("postgresql+psycopg://nobody@127.0.0.1:9/none", connect_timeout=1)
    pool = TaskTokenPool(gateway, sessions=make_session_factory(engine), depth=1)
    minted: list[TaskToken] = []
    mint = pool._mint

    def mint_and_keep(key, specs):
        minted.append(mint(key, specs))
        return minted[-1]

    pool._mint = mint_and_keep  # type: ignore[method-assign]  # a spy on the pool's own mints
    try:
        taken = pool.take(task="pool-norecord", specs=SPECS, ttl_max=300, ttl_needed=60)
        deadline = time.monotonic() + 10
        while len(minted) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert pool.take_ready(task="pool-norecord", specs=SPECS, ttl_max=300, ttl_needed=60) is None
        [refilled] = [token for token in minted if token.accessor != taken.accessor]
        assert not alive(gateway, refilled)
        gateway.revoke_task_token(taken.accessor)
    finally:
        pool.close()
        engine.dispose()


def test_a_pool_that_holds_tokens_must_record_them(gateway):
    with pytest.raises(ValueError, match="sessions"):
        TaskTokenPool(gateway, depth=2)
