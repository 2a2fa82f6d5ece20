"""Database credentials: issued with the task token, usable until revoked, dead after."""

from __future__ import annotations

import psycopg
import pytest

from broker.credentials import DatabaseCredential
from broker.vault import VaultGateway, VaultRejected, VaultUnavailable

RO = DatabaseCredential(kind="database", mount="database", role="analytics-ro")
RW = DatabaseCredential(kind="database", mount="database", role="app-rw")
WORKLOAD = "spiffe://example.org/agents/a1"


def issue(gateway: VaultGateway, task, spec=RO):
    return gateway.issue(task.token, spec, ttl_seconds=120, task_id=task.task_id, workload=WORKLOAD)


def test_credentials_log_in_until_revoked_and_fail_right_after(gateway, start_task, pg, root):
    task = start_task({"db": RO})
    secret = issue(gateway, task)
    user, password = secret.data["username"], secret.data["password"]

    assert secret.handle.kind == "lease"
    assert secret.vault_lease_id == secret.handle.ref
    assert secret.handle.ref.startswith("database/creds/analytics-ro/")
    assert secret.expires_at <= task.token.expires_at  # the token caps the role's 300 s
    assert pg.can_login(user, password)
    assert not pg.can_login(user, password + "x")  # passwords are checked, not trusted

    gateway.revoke(secret.handle)

    assert not pg.can_login(user, password)
    assert not pg.role_exists(user)
    assert not root.lease_exists(secret.handle.ref)


@pytest.mark.parametrize(
    ("task_ttl", "token_ttl"),
    [(10, 30), (600, 900)],
    ids=["shorter-than-the-roles-default", "longer-than-the-roles-default"],
)
def test_a_database_lease_gets_the_tasks_ttl_not_the_roles_default(
    gateway, start_task, pg, root, task_ttl, token_ttl
):
    """The role's default is 300 s; Vault's own TTL must follow the task (docs/contract.md §6.4)."""
    from datetime import UTC, datetime, timedelta

    task = start_task({"db": RO}, ttl=token_ttl)
    before = datetime.now(UTC)
    secret = gateway.issue(task.token, RO, ttl_seconds=task_ttl, task_id=task.task_id, workload=WORKLOAD)
    after = datetime.now(UTC)
    vault_ttl = root.call("PUT", "sys/leases/lookup", {"lease_id": secret.vault_lease_id})["data"]["ttl"]
    assert task_ttl - (after - before).total_seconds() - 2 <= vault_ttl <= task_ttl
    t = pg.target
    with psycopg.connect(
        host=t.host, port=t.port, user=t.superuser, password=t.password, dbname="postgres"
    ) as conn:
        row = conn.execute(
            "SELECT rolvaliduntil FROM pg_roles WHERE rolname = %s", (secret.data["username"],)
        ).fetchone()
        assert row is not None
        (valid_until,) = row
    # Within [issue began, issue returned] + the task's TTL (whole seconds in Postgres, where
    # Vault pads VALID UNTIL by 5 s so a password never dies before its lease).
    assert (
        before + timedelta(seconds=task_ttl - 1) <= secret.expires_at <= after + timedelta(seconds=task_ttl)
    )
    assert before + timedelta(seconds=task_ttl - 1) <= valid_until <= after + timedelta(seconds=task_ttl + 6)
    gateway.revoke(secret.handle)


def test_revoke_is_idempotent(gateway, start_task):
    task = start_task({"db": RO})
    secret = issue(gateway, task)
    gateway.revoke(secret.handle)
    gateway.revoke(secret.handle)  # already gone: success, not an error


def test_revoke_terminates_sessions_opened_before(gateway, start_task, pg):
    # VALID UNTIL only stops new logins; revocation must kill open sessions too (V13).
    task = start_task({"db": RO})
    secret = issue(gateway, task)
    conn = pg.connect(secret.data["username"], secret.data["password"])
    try:
        assert conn.execute("SELECT count(*) FROM analytics.events").fetchone()[0] >= 3
        gateway.revoke(secret.handle)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()


def test_revoking_the_task_token_kills_a_lease_the_broker_forgot(gateway, start_task, pg, root, wait_until):
    # The crash-safety property: only the token accessor was recorded, the lease never was.
    task = start_task({"db": RO})
    secret = issue(gateway, task)
    user, password = secret.data["username"], secret.data["password"]
    assert pg.can_login(user, password)

    gateway.revoke_task_token(task.token.accessor)

    assert not gateway.token_alive(task.token.accessor)
    # Vault revokes a revoked token's leases in the background, within moments.
    wait_until(lambda: not root.lease_exists(secret.handle.ref), timeout=10)
    wait_until(lambda: not pg.can_login(user, password), timeout=10)
    assert not pg.role_exists(user)
    gateway.revoke_task_token(task.token.accessor)  # idempotent


@pytest.mark.slow
def test_leases_die_with_the_task_token_ttl(gateway, start_task, pg, root, wait_until):
    # Backstop if the broker never revokes: the lease can't outlive its creating token.
    task = start_task({"db": RO}, ttl=2)
    secret = issue(gateway, task)
    assert pg.can_login(secret.data["username"], secret.data["password"])
    wait_until(lambda: not root.lease_exists(secret.handle.ref), timeout=15)
    assert not pg.can_login(secret.data["username"], secret.data["password"])
    assert not gateway.token_alive(task.token.accessor)


def test_read_write_role_can_write(gateway, start_task, pg):
    task = start_task({"db": RW}, task="vault-test-rw")
    secret = issue(gateway, task, RW)
    with pg.connect(secret.data["username"], secret.data["password"]) as conn:
        conn.execute("INSERT INTO analytics.events (name) VALUES ('from-app-rw')")
    gateway.revoke(secret.handle)
    assert not pg.role_exists(secret.data["username"])


def test_read_only_user_reads_through_its_group_and_cannot_write(gateway, start_task, pg):
    task = start_task({"db": RO})
    secret = issue(gateway, task)
    with pg.connect(secret.data["username"], secret.data["password"]) as conn:
        assert conn.execute("SELECT count(*) FROM analytics.events").fetchone()[0] >= 3
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO analytics.events (name) VALUES ('from-analytics-ro')")
    gateway.revoke(secret.handle)
    assert not pg.role_exists(secret.data["username"])


def test_a_user_with_grants_of_its_own_is_revoked_and_dropped(gateway, start_task, pg, pg_target, root):
    # Users made by the creation statements of earlier releases hold direct grants, which
    # DROP ROLE refuses to drop over; the shipped revocation statement revokes them first.
    from broker.dev.stack.vault_setup import database_connection_config, database_roles

    legacy_create = [
        """CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';""",
        'GRANT CONNECT ON DATABASE "analytics" TO "{{name}}";',
        'GRANT USAGE ON SCHEMA analytics TO "{{name}}";',
        'GRANT SELECT ON ALL TABLES IN SCHEMA analytics TO "{{name}}";',
    ]
    shipped = database_roles("analytics", "legacy")["analytics-ro"]
    root.call("POST", "database/config/legacy", database_connection_config(pg_target, ["legacy-ro"]))
    root.call("POST", "database/roles/legacy-ro", {**shipped, "creation_statements": legacy_create})
    try:
        spec = DatabaseCredential(kind="database", role="legacy-ro")
        task = start_task({"db": spec}, task="vault-test-legacy")
        secret = issue(gateway, task, spec)
        assert pg.can_login(secret.data["username"], secret.data["password"])

        gateway.revoke(secret.handle)

        assert not pg.role_exists(secret.data["username"])
        assert not root.lease_exists(secret.handle.ref)
    finally:
        root.call("DELETE", "database/roles/legacy-ro")
        root.call("DELETE", "database/config/legacy")


def test_task_token_can_only_read_its_own_roles(gateway, start_task):
    task = start_task({"db": RO})
    with pytest.raises(VaultRejected) as caught:
        issue(gateway, task, RW)
    assert caught.value.status == 403
    assert caught.value.reason == "permission denied"


def test_issue_with_a_revoked_task_token_is_rejected(gateway, start_task):
    task = start_task({"db": RO})
    gateway.revoke_task_token(task.token.accessor)
    with pytest.raises(VaultRejected):
        issue(gateway, task)


def test_one_gateway_serves_many_threads(gateway, start_task, pg, root):
    from concurrent.futures import ThreadPoolExecutor

    tasks = [start_task({"db": RO}, task="vault-test-threads") for _ in range(12)]

    def cycle(task):
        secret = issue(gateway, task)
        ok = pg.can_login(secret.data["username"], secret.data["password"])
        gateway.revoke(secret.handle)
        gateway.revoke_task_token(task.token.accessor)
        return ok, secret.handle.ref

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(cycle, tasks))
    assert all(ok for ok, _ in results)
    assert len({ref for _, ref in results}) == len(tasks)
    assert not any(root.lease_exists(ref) for _, ref in results)


@pytest.mark.slow
def test_revoke_while_the_target_database_is_down_fails_then_succeeds(
    tmp_path, gateway, start_task, root, wait_until
):
    # V03: a sync revoke that can't reach the database fails (the lease stays, the broker
    # keeps it revoke_pending and retries); once the database is back, it succeeds.
    from broker.dev.stack.postgres import start_postgres
    from broker.dev.stack.vault_setup import (
        PostgresTarget,
        database_connection_config,
        database_roles,
        prepare_database,
    )

    other = start_postgres(tmp_path / "pg")
    try:
        target = PostgresTarget(host="127.0.0.1", port=other.port, superuser="postgres")
        prepare_database(target)
        root.call("POST", "database/config/flaky", database_connection_config(target, ["flaky-ro"]))
        root.call("POST", "database/roles/flaky-ro", {**database_roles("analytics", "flaky")["analytics-ro"]})
        spec = DatabaseCredential(kind="database", role="flaky-ro")
        task = start_task({"db": spec}, task="vault-test-flaky")
        secret = issue(gateway, task, spec)

        other.stop()
        with pytest.raises(VaultUnavailable) as caught:
            gateway.revoke(secret.handle)
        assert caught.value.reason == "backend unreachable"
        assert root.lease_exists(secret.handle.ref)

        other.start()
        gateway.revoke(secret.handle)
        assert not root.lease_exists(secret.handle.ref)
    finally:
        other.stop()
        root.call("DELETE", "database/roles/flaky-ro")
        root.call("DELETE", "database/config/flaky")


def test_a_broker_policy_without_lease_renew_still_issues_with_the_roles_ttl(
    vault_setup, root, start_task, caplog
):
    """An upgrade that kept the old broker policy: starts still work, the lease keeps its
    role's TTL (bounded by the task token), and the refusal is logged once, not per lease."""
    import logging

    from broker.dev.stack.vault_setup import render_broker_policy

    old_policy = render_broker_policy().replace(
        'path "sys/leases/renew"', 'path "sys/leases/renew-not-granted"'
    )
    root.call("PUT", "sys/policies/acl/broker-without-renew", {"policy": old_policy})
    made = root.call(
        "POST",
        "auth/token/create",
        {"policies": ["broker-without-renew"], "no_default_policy": True, "ttl": "10m"},
    )  # Vault's default policy grants sys/leases/renew itself
    settings = vault_setup.vault_settings(timeout_seconds=5)
    settings = settings.model_copy(
        update={"auth": settings.auth.model_copy(update={"token": made["auth"]["client_token"]})}
    )
    old = VaultGateway(settings)
    try:
        task = start_task({"db": RO}, ttl=600)
        with caplog.at_level(logging.WARNING, logger="broker.vault.gateway"):
            secrets = [
                old.issue(task.token, RO, ttl_seconds=60, task_id=task.task_id, workload=WORKLOAD)
                for _ in range(2)
            ]
        for secret in secrets:
            assert (
                root.call("PUT", "sys/leases/lookup", {"lease_id": secret.vault_lease_id})["data"]["ttl"] > 60
            )
            old.revoke(secret.handle)
        assert sum("sys/leases/renew" in record.getMessage() for record in caplog.records) == 1
    finally:
        old.close()
