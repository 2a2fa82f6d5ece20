"""Several sweepers on one database take distinct rows: each lease revoked once, none missed."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import text

from broker.scheduler.jobs import Jobs
from broker.services import build_services
from tests.factories import live_leases, start_body

pytestmark = pytest.mark.slow


def test_competing_sweepers_revoke_each_lease_exactly_once(client, issuers, settings, services, stack):
    task_ids = []
    for index in range(30):
        sub = f"spiffe://example.org/agents/sweep-{index}"
        response = client.post("/task/start", json=start_body(), headers=issuers["spire"].bearer(sub))
        assert response.status_code == 201
        task_ids.append(response.get_json()["task_id"])
    with services.engine.begin() as connection:
        connection.execute(text("UPDATE tasks SET expires_at = now() - interval '1 second'"))

    replicas = [build_services(settings) for _ in range(3)]
    pools = [ThreadPoolExecutor(services.settings.scheduler.revoke_workers) for _ in replicas]
    counts: list[int] = []
    barrier = threading.Barrier(len(replicas))

    def sweep(replica, pool):
        barrier.wait()
        counts.append(Jobs(replica, pool).expire_due())

    threads = [threading.Thread(target=sweep, args=pair) for pair in zip(replicas, pools, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for replica, pool in zip(replicas, pools, strict=True):
        pool.shutdown()
        replica.close()

    assert sum(counts) == 30
    with services.engine.connect() as connection:
        per_lease = connection.execute(
            text(
                "SELECT lease_id, count(*) FROM audit_events WHERE event = 'lease.revoked' GROUP BY lease_id"
            )
        ).all()
        states = connection.execute(text("SELECT state, count(*) FROM leases GROUP BY state")).all()
        attempts = connection.execute(text("SELECT max(revoke_attempts) FROM leases")).scalar_one()
        vault_ids = {
            row[0].rsplit("/", 1)[-1] for row in connection.execute(text("SELECT vault_lease_id FROM leases"))
        }
    assert len(per_lease) == 30 and {count for _, count in per_lease} == {1}
    assert states == [("revoked", 30)]
    assert attempts == 1
    assert not vault_ids & set(live_leases(stack, "database/creds/analytics-ro/"))
