"""Revocation without anyone calling finish: deadlines, retries after outages, orphans."""

from __future__ import annotations

import time
from datetime import datetime

import pytest
from sqlalchemy import create_engine, text

from broker.config import settings_from_mapping
from tests.conftest import broker_config
from tests.factories import AGENT, can_log_in, dynamic_roles, start_body
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def settings(stack, issuers, policy_file, clean_db):
    # One Vault token per task here, retired by the scheduler once the task ended: the
    # path every token takes when it can't be reused (tests/scheduler/test_token_reuse.py).
    config = broker_config(stack, issuers, policy_file)
    config["vault"]["task_token_reuse"] = False
    return settings_from_mapping(config, env={})


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_a_task_is_revoked_at_its_deadline_with_nobody_calling_finish(
    client, issuers, stack, running_scheduler
):
    headers = issuers["spire"].bearer(AGENT)
    started = client.post("/task/start", json=start_body("short"), headers=headers).get_json()
    creds = started["credentials"]["db"]["data"]
    assert can_log_in(stack, creds)

    def ended():
        task = client.get(f"/task/{started['task_id']}", headers=headers).get_json()
        return task if task["state"] == "expired" else None

    task = wait_for(ended, timeout=10)
    [lease] = task["leases"]
    assert lease["state"] == "revoked"
    lag = (parse(lease["revoked_at"]) - parse(task["expires_at"])).total_seconds()
    assert 0 <= lag <= 2.0
    assert not can_log_in(stack, creds)


def test_finish_during_a_vault_outage_parks_leases_then_revokes_them(stack, issuers, policy_file, clean_db):
    from broker.app import create_app
    from broker.scheduler.runner import SchedulerRunner
    from broker.services import build_services

    host, port = stack.vault.addr.removeprefix("http://").split(":")
    proxy = TcpProxy(host, int(port))
    config = broker_config(stack, issuers, policy_file)
    config["vault"]["addr"] = proxy.addr
    config["vault"]["timeout_seconds"] = 1
    config["scheduler"].update(retry_base_seconds=0.2, retry_max_seconds=1)
    services = build_services(settings_from_mapping(config, env={}))
    client = create_app(services=services).test_client()
    headers = issuers["spire"].bearer(AGENT)
    runner = SchedulerRunner(services)
    try:
        started = client.post("/task/start", json=start_body(), headers=headers).get_json()
        creds = started["credentials"]["db"]["data"]
        proxy.cut()
        finished = client.post("/task/finish", json={"task_id": started["task_id"]}, headers=headers)
        assert finished.status_code == 200
        [lease] = finished.get_json()["leases"]
        assert finished.get_json()["state"] == "finished"
        assert lease["state"] == "revoke_pending"
        assert lease["revoke_attempts"] == 1
        assert lease["last_error"]
        assert can_log_in(stack, creds)  # not yet: Vault never heard the revoke

        runner.start()
        time.sleep(1.5)  # retries keep failing while Vault is away
        during = client.get(f"/task/{started['task_id']}", headers=headers).get_json()["leases"][0]
        assert during["state"] == "revoke_pending"
        assert during["revoke_attempts"] >= 2

        proxy.restore()

        def revoked():
            task = client.get(f"/task/{started['task_id']}", headers=headers).get_json()
            return task["leases"][0]["state"] == "revoked"

        wait_for(revoked, timeout=10)
        assert not can_log_in(stack, creds)
    finally:
        runner.stop()
        proxy.close()
        services.close()


CRASH_SCRIPT = """
import os, signal, sys
from broker.config import load_settings
from broker.services import build_services
from broker.tasks.issuing import Issuer
from broker.policy import TaskRequest
from broker.identity import Identity
from datetime import datetime, UTC

def crash(*args, **kwargs):
    # Vault has issued; the leases were never committed.
    os.kill(os.getpid(), signal.SIGKILL)

Issuer._commit_leases = crash
services = build_services(load_settings(sys.argv[1]))
identity = Identity(
    id=sys.argv[2], issuer_name="spire", issuer="https://spire.test", subject=sys.argv[2],
    kind="spiffe", uses=frozenset({"workload"}), groups=frozenset(), claims={}, expires_at=datetime.now(UTC),
)
body = TaskRequest(task="analytics-read", owner="alice@example.com", purpose="crash between vault and commit",
                   ttl_seconds=None, context={"environment": "staging"})
services.tasks.start(identity, body)
print("not reached")
"""


def test_a_crash_between_vault_and_commit_leaves_nothing_alive(stack, config_file, services, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    before = dynamic_roles(stack)
    result = subprocess.run(
        [sys.executable, str(script), str(config_file), AGENT], capture_output=True, timeout=60, check=False
    )
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    orphans = dynamic_roles(stack) - before
    assert len(orphans) == 1  # Vault issued a database user the broker never recorded

    engine = create_engine(stack.database_url)
    with engine.connect() as connection:
        state, accessor = connection.execute(text("SELECT state, token_accessor FROM tasks")).one()
    assert state == "issuing" and accessor

    from broker.scheduler.jobs import Jobs

    time.sleep(services.settings.scheduler.orphan_grace_seconds + 0.5)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        assert Jobs(services, pool).reconcile() == 1
    with engine.connect() as connection:
        assert connection.execute(text("SELECT state FROM tasks")).scalar_one() == "failed"
    engine.dispose()
    wait_for(lambda: not (dynamic_roles(stack) & orphans), timeout=10)


def test_an_unclaimed_approval_lapses(client, issuers, services):
    from concurrent.futures import ThreadPoolExecutor

    from broker.scheduler.jobs import Jobs

    headers = issuers["spire"].bearer(AGENT)
    body = start_body("deploy-prod", context={"environment": "prod"})
    pending = client.post("/task/start", json=body, headers=headers)
    assert pending.status_code == 202
    engine = create_engine(services.settings.database_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as connection:
        connection.execute(text("UPDATE tasks SET approval_expires_at = now() - interval '1 second'"))
    engine.dispose()
    with ThreadPoolExecutor(2) as pool:
        assert Jobs(services, pool).lapse_approvals() == 1
    task = client.get(f"/task/{pending.get_json()['task_id']}", headers=headers).get_json()
    assert task["state"] == "approval_expired"


def test_the_task_token_is_retired_after_finish(client, issuers, services, stack):
    from concurrent.futures import ThreadPoolExecutor

    from broker.scheduler.jobs import Jobs
    from tests.factories import vault

    headers = issuers["spire"].bearer(AGENT)
    task_id = client.post("/task/start", json=start_body(), headers=headers).get_json()["task_id"]
    with services.engine.connect() as connection:
        accessor = connection.execute(text("SELECT token_accessor FROM tasks")).scalar_one()
    client.post("/task/finish", json={"task_id": task_id}, headers=headers)
    assert vault(stack, "POST", "auth/token/lookup-accessor", json={"accessor": accessor}).status_code == 200
    with ThreadPoolExecutor(2) as pool:
        assert Jobs(services, pool).retire_tokens() == 1
        assert Jobs(services, pool).retire_tokens() == 0
    assert vault(stack, "POST", "auth/token/lookup-accessor", json={"accessor": accessor}).status_code == 400


def test_a_token_vault_refuses_stays_for_the_next_run_while_the_rest_of_its_batch_retire(
    client, issuers, services, stack, monkeypatch
):
    from concurrent.futures import ThreadPoolExecutor

    from broker.scheduler.jobs import Jobs
    from broker.vault import VaultRejected, VaultUnavailable
    from tests.factories import vault

    for index in range(3):
        headers = issuers["spire"].bearer(f"spiffe://example.org/agents/retire-{index}")
        task_id = client.post("/task/start", json=start_body(), headers=headers).get_json()["task_id"]
        assert client.post("/task/finish", json={"task_id": task_id}, headers=headers).status_code == 200
    with services.engine.connect() as connection:
        oldest, *others = connection.execute(
            text("SELECT token_accessor FROM tasks ORDER BY finished_at")
        ).scalars()
    failure: dict[str, Exception] = {}
    calls: list[str] = []
    revoke = services.vault.revoke_task_token

    def flaky(accessor):
        calls.append(accessor)
        if accessor in failure:
            raise failure[accessor]
        revoke(accessor)

    monkeypatch.setattr(services.vault, "revoke_task_token", flaky)

    def unretired():
        with services.engine.connect() as connection:
            query = "SELECT token_accessor FROM tasks WHERE token_revoked_at IS NULL ORDER BY finished_at"
            return list(connection.execute(text(query)).scalars())

    with ThreadPoolExecutor(4) as pool:
        jobs = Jobs(services, pool)
        down = VaultUnavailable("revoke token", "timed out")
        failure.update({accessor: down for accessor in [oldest, *others]})
        # Vault down: the batch stops at the first failure (no timeout per row with the
        # rows locked), nothing is marked, and nothing spins.
        assert jobs.retire_tokens() == 0
        assert calls == [oldest] and unretired() == [oldest, *others]

        # Vault refuses only the oldest: the rest of the batch retires, the oldest waits.
        failure = {oldest: VaultRejected("revoke token", "permission denied", status=403)}
        calls.clear()
        assert jobs.retire_tokens() == 2
        assert calls.count(oldest) == 1 and unretired() == [oldest]
        for accessor in others:
            assert (
                vault(stack, "POST", "auth/token/lookup-accessor", json={"accessor": accessor}).status_code
                == 400
            )

        failure.clear()
        assert jobs.retire_tokens() == 1
        assert unretired() == []
    assert vault(stack, "POST", "auth/token/lookup-accessor", json={"accessor": oldest}).status_code == 400


def test_a_deadline_before_the_next_sweep_gets_a_run_at_that_instant(stack, issuers, policy_file, clean_db):
    """With sweeps a minute apart, a 2 s task is still expired at its deadline: the sweep
    that saw it coming woke the scheduler for that instant."""
    from broker.app import create_app
    from broker.scheduler.runner import SchedulerRunner
    from broker.services import build_services

    config = broker_config(stack, issuers, policy_file)
    config["scheduler"]["sweep_interval_seconds"] = 60
    services = build_services(settings_from_mapping(config, env={}))
    client = create_app(services=services).test_client()
    runner = SchedulerRunner(services)
    try:
        runner.start()  # its first interval sweep is a minute away
        started = client.post(
            "/task/start", json=start_body("short", ttl_seconds=2), headers=issuers["spire"].bearer(AGENT)
        )
        assert started.status_code == 201, started.get_json()
        runner._expire()  # one sweep, as the interval would run it, while the task is active
        task_id = started.get_json()["task_id"]

        def expired():
            task = client.get(f"/task/{task_id}", headers=issuers["spire"].bearer(AGENT)).get_json()
            return task if task["state"] == "expired" else None

        task = wait_for(expired, timeout=20)
        assert task["leases"][0]["state"] == "revoked"
        assert not can_log_in(stack, started.get_json()["credentials"]["db"]["data"])
    finally:
        runner.stop()
        services.close()
