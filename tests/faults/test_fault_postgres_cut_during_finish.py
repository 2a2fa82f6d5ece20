"""F07: Postgres goes away during /task/finish, after Vault revoked, before the commit.

The finish can't record anything, so it must not claim success: 503
`database_unavailable`. Vault already revoked the credential (fail toward revocation).
The workload's retry once Postgres is back answers 200 with every lease `revoked`,
recorded once, and the credential stays dead.
"""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from tests.factories import AGENT, can_log_in, start_body
from tests.faults.faultkit import assert_unavailable, lease_alive, token_alive
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def pg_proxy(stack):
    proxy = TcpProxy("127.0.0.1", stack.postgres.port)
    yield proxy
    proxy.close()


def test_postgres_cut_during_finish_answers_503_and_the_retry_finishes(
    stack, issuers, vault_proxy, pg_proxy, fault_config, in_process, scheduler_for, ledger
):
    url = make_url(stack.database_url).set(port=pg_proxy.port).render_as_string(hide_password=False)
    services, client = in_process(fault_config(vault_addr=vault_proxy.addr, database_url=url))
    headers = issuers["spire"].bearer(AGENT)
    started = client.post("/task/start", json=start_body(), headers=headers)
    assert started.status_code == 201
    task_id = started.get_json()["task_id"]
    creds = started.get_json()["credentials"]["db"]["data"]
    [lease] = ledger.leases(task_id)
    revoke = vault_proxy.add_rule(r"^/v1/sys/leases/revoke$", after=lambda _: pg_proxy.cut())

    first = client.post("/task/finish", json={"task_id": task_id}, headers=headers)

    assert_unavailable(first, "database_unavailable")
    revoke.wait_done(1)
    assert not lease_alive(stack, lease["vault_lease_id"])  # Vault revoked it anyway
    assert not can_log_in(stack, creds)
    assert ledger.task(task_id)["state"] == "active"  # nothing could be recorded
    assert ledger.events("lease.revoked", task_id) == []

    pg_proxy.restore()
    again = client.post("/task/finish", json={"task_id": task_id}, headers=headers)

    assert again.status_code == 200, again.get_json()
    body = again.get_json()
    assert body["state"] == "finished"
    assert [item["state"] for item in body["leases"]] == ["revoked"]
    assert len(ledger.events("lease.revoked", task_id)) == 1
    assert len(ledger.events("task.finished", task_id)) == 1
    assert not can_log_in(stack, creds)
    # The task's own Vault token is released for the next task (the finish revoked all
    # its leases) or, failing that, retired by the scheduler; never left behind.
    scheduler_for(services)

    def token_done() -> bool:
        row = ledger.task(task_id)
        return row["token_revoked_at"] is not None or row["token_released_at"] is not None

    wait_for(token_done, what="task token released or retired")
    row = ledger.task(task_id)
    # Alive only if pooled for the next task: released, never also revoked.
    assert token_alive(stack, row["token_accessor"]) == (row["token_released_at"] is not None)


def test_after_postgres_drops_every_connection_one_request_fails_not_one_per_pooled_connection(
    stack, issuers, pg_proxy, fault_config, in_process
):
    # No pre-ping (a round trip per checkout): a failover costs one 503, after which the
    # whole pool reconnects, however many idle connections it held.
    url = make_url(stack.database_url).set(port=pg_proxy.port).render_as_string(hide_password=False)
    # No token pool: its refill and lease renewal would use the database in the background
    # and could meet the dead connection before the first request does.
    services, client = in_process(fault_config(database_url=url, vault_options={"task_token_pool": 0}))
    headers = issuers["spire"].bearer(AGENT)
    task_id = client.post("/task/start", json=start_body(), headers=headers).get_json()["task_id"]
    held = [services.engine.connect() for _ in range(4)]  # several connections in the pool
    for connection in held:
        connection.close()
    pg_proxy.cut()
    pg_proxy.restore()

    answers = [client.get(f"/task/{task_id}", headers=headers).status_code for _ in range(5)]

    assert answers == [503, 200, 200, 200, 200]
    assert client.post("/task/finish", json={"task_id": task_id}, headers=headers).status_code == 200
