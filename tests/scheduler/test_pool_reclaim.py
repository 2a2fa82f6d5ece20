"""Pooled task tokens are on record, and the scheduler revokes those no live process holds
(docs/contract.md §6.2). A process "dies" here by no longer renewing its lease, as a
SIGKILLed one does (tests/faults/test_fault_pool_worker_killed.py kills real processes);
a live process's pool is left alone, and a pool whose lease lapsed lends nothing the
scheduler may have revoked.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import text

from broker.config import settings_from_mapping
from broker.scheduler.jobs import Jobs
from broker.tasks.token_pool import TaskTokenPool
from tests.conftest import broker_config
from tests.factories import AGENT, start_body, vault

pytestmark = pytest.mark.slow
LEASE = 1.5


@pytest.fixture
def settings(stack, issuers, policy_file, clean_db):
    config = broker_config(stack, issuers, policy_file)
    config["vault"]["task_token_pool"] = 2
    config["vault"]["task_token_lease_seconds"] = LEASE
    return settings_from_mapping(config, env={})


def token_alive(stack: Any, accessor: str) -> bool:
    return vault(stack, "POST", "auth/token/lookup-accessor", json={"accessor": accessor}).status_code == 200


def recorded(services: Any, holder: str | None = None) -> set[str]:
    with services.engine.connect() as connection:
        rows = connection.execute(text("SELECT accessor, holder FROM task_tokens")).all()
    return {row.accessor for row in rows if holder is None or row.holder == holder}


def pooled(pool: TaskTokenPool) -> set[str]:
    return {token.accessor for ready in pool._ready.values() for token in ready}


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return value


def reconcile(services: Any) -> int:
    with ThreadPoolExecutor(2) as executor:
        return Jobs(services, executor).reconcile()


def die(pool: TaskTokenPool) -> None:
    """What SIGKILL leaves of a pool: its rows, its live tokens, and no more renewals."""
    pool._stopping.set()
    pool._wanted.put(None)


def fill(client, issuers, pool: TaskTokenPool) -> set[str]:
    headers = issuers["spire"].bearer(AGENT)
    started = client.post("/task/start", json=start_body(), headers=headers)
    assert started.status_code == 201, started.get_json()
    tokens: set[str] = wait_for(lambda: len(pooled(pool)) >= 2 and pooled(pool))
    return tokens


def test_a_dead_processs_pooled_tokens_are_revoked_and_a_live_ones_are_not(
    app, services, issuers, stack, settings
):
    from broker.app import create_app
    from broker.services import build_services

    dead_services = build_services(settings)
    try:
        dead = dead_services.token_pool
        dead_tokens = fill(create_app(services=dead_services).test_client(), issuers, dead)
        live_tokens = fill(app.test_client(), issuers, services.token_pool)
        assert recorded(services, dead.holder) == dead_tokens
        assert recorded(services, services.token_pool.holder) == live_tokens

        die(dead)
        assert reconcile(services) == 0  # the lease still runs: nothing is reclaimed early
        assert all(token_alive(stack, accessor) for accessor in dead_tokens)

        time.sleep(LEASE + 0.2)
        assert reconcile(services) == len(dead_tokens)
        assert not any(token_alive(stack, accessor) for accessor in dead_tokens)
        assert recorded(services) == live_tokens  # the live process renewed; untouched
        assert all(token_alive(stack, accessor) for accessor in live_tokens)
    finally:
        dead_services.close()


def test_a_pool_whose_lease_lapsed_lends_nothing_the_scheduler_may_revoke(client, services, issuers, stack):
    pool = services.token_pool
    headers = issuers["spire"].bearer(AGENT)
    lapsed = fill(client, issuers, pool)
    pool._stopping.set()  # the database is out of reach for longer than the lease
    time.sleep(LEASE + 0.2)
    assert reconcile(services) == 2

    # By its own clock the pool knows its lease is in doubt: a start mints a fresh token.
    started = client.post("/task/start", json=start_body(), headers=headers).get_json()
    assert started["state"] == "active"
    with services.engine.connect() as connection:
        accessor = connection.execute(
            text("SELECT token_accessor FROM tasks WHERE id = :id"), {"id": started["task_id"]}
        ).scalar_one()
    assert accessor not in lapsed and token_alive(stack, accessor)


def test_a_start_that_takes_a_reclaimed_token_fails_closed_and_drops_the_pool(
    client, services, issuers, stack
):
    pool = services.token_pool
    headers = issuers["spire"].bearer(AGENT)
    lapsed = fill(client, issuers, pool)
    pool._stopping.set()
    time.sleep(LEASE + 0.2)
    assert reconcile(services) == 2
    # A clock that ran slow: the pool believes its lease still holds. The handover in the
    # start's own transaction finds the row gone and refuses the token.
    pool._renewed_at = time.monotonic()

    refused = client.post("/task/start", json=start_body(), headers=headers)
    assert refused.status_code == 503, refused.get_json()
    assert refused.get_json()["code"] == "vault_unavailable"
    assert pooled(pool).isdisjoint(lapsed)  # dropped; a refill may have pooled fresh ones
    with services.engine.connect() as connection:
        states = connection.execute(text("SELECT state FROM tasks")).scalars().all()
    assert states == ["active"]  # fill's start only; the refused one recorded no task
    assert not any(token_alive(stack, accessor) for accessor in lapsed)

    again = client.post("/task/start", json=start_body(), headers=headers)
    assert again.status_code == 201
