"""F02/F03: the broker's Postgres goes away during a start.

Before anything was decided: 503 and Vault is never called. After Vault issued but
before the leases were committed (the Vault proxy cuts the Postgres proxy the moment
Vault answers `database/creds/...`): 503, no secret leaves the broker, and the start's
own compensation has already revoked the credential and the task token by the time the
error is returned. Once Postgres is back, the reconciler closes the stuck task row.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy.engine import make_url

from tests.factories import AGENT, dynamic_roles, role_exists, start_body
from tests.faults.faultkit import all_live_leases, assert_unavailable, lease_alive, token_alive
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def pg_proxy(stack):
    proxy = TcpProxy("127.0.0.1", stack.postgres.port)
    yield proxy
    proxy.close()


def via(proxy: TcpProxy, url: str) -> str:
    return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def test_postgres_down_before_start_answers_503_without_calling_vault(
    stack, issuers, vault_proxy, pg_proxy, fault_config, in_process, ledger
):
    """§6.9 fail closed: without the database nothing is issued, Vault is never asked, and the answer says why."""
    _, client = in_process(
        fault_config(vault_addr=vault_proxy.addr, database_url=via(pg_proxy, stack.database_url))
    )
    pg_proxy.cut()

    answer = client.post("/task/start", json=start_body(), headers=issuers["spire"].bearer(AGENT))

    assert_unavailable(answer, "database_unavailable")
    # Nor later: no background token refill may start for a start that was refused.
    time.sleep(0.5)
    assert vault_proxy.exchanges == []
    assert ledger.tasks() == []


def test_postgres_cut_between_vault_and_commit_revokes_before_answering(
    stack, issuers, vault_proxy, pg_proxy, fault_config, in_process, scheduler_for, ledger
):
    """§6.2 record before release: leases that can't be committed never leave the broker and are revoked before the 503."""
    # No token pool: its background refill, cut off from Postgres, revokes the token it
    # can't record, and that revoke (still in flight, or not) is not the start's to judge.
    services, client = in_process(
        fault_config(
            vault_addr=vault_proxy.addr,
            database_url=via(pg_proxy, stack.database_url),
            vault_options={"task_token_pool": 0},
        )
    )
    creds = vault_proxy.add_rule(r"^/v1/database/creds/", after=lambda _: pg_proxy.cut())
    roles_before = dynamic_roles(stack)
    leases_before = all_live_leases(stack)

    answer = client.post("/task/start", json=start_body(), headers=issuers["spire"].bearer(AGENT))

    assert_unavailable(answer, "database_unavailable")
    [exchange] = creds.wait_done(1)
    assert exchange.status == 200 and exchange.outcome == "answered"  # Vault did issue
    issued = exchange.response_json()
    # Revoked synchronously, before the 503 went out: no reconciler has run yet.
    assert not lease_alive(stack, issued["lease_id"])
    assert not role_exists(stack, issued["data"]["username"])
    assert dynamic_roles(stack) <= roles_before
    assert all_live_leases(stack) <= leases_before
    task = ledger.only_task()
    assert task["state"] == "issuing"  # the broker could not write anything more
    assert task["token_accessor"]
    assert not token_alive(stack, task["token_accessor"])
    assert ledger.leases(task["id"]) == []
    revokes = vault_proxy.requests_to(r"^/v1/(sys/leases/revoke|auth/token/revoke-accessor)")
    assert revokes, "the compensation went to Vault"
    assert all(ex.outcome == "answered" for ex in revokes)

    pg_proxy.restore()
    scheduler_for(services)

    wait_for(lambda: ledger.task(task["id"])["state"] == "failed", what="stuck start closed as failed")
    wait_for(lambda: ledger.task(task["id"])["token_revoked_at"] is not None, what="task token revoked")
    assert ledger.events("task.orphan_revoked", task["id"])
    assert ledger.leases(task["id"]) == []
    # The broker works again once Postgres is back.
    again = client.post("/task/start", json=start_body(), headers=issuers["spire"].bearer(AGENT))
    assert again.status_code == 201, again.get_json()
    assert (
        client.post(
            "/task/finish",
            json={"task_id": again.get_json()["task_id"]},
            headers=issuers["spire"].bearer(AGENT),
        ).status_code
        == 200
    )


def test_postgres_and_vault_both_lost_between_vault_and_commit_reconciled_later(
    stack, issuers, vault_proxy, pg_proxy, fault_config, in_process, scheduler_for, ledger
):
    """The double fault: the commit fails (Postgres gone) and so does the compensation
    (Vault gone). Still 503 and no secret; the committed token accessor is how the
    reconciler finds and revokes the orphan once both are back."""
    # No token pool: its background refill, cut off from Postgres, revokes the token it
    # can't record, and that revoke would trip the Vault cut below before the start's own
    # calls are done (a race the test would lose on a busy box).
    services, client = in_process(
        fault_config(
            vault_addr=vault_proxy.addr,
            database_url=via(pg_proxy, stack.database_url),
            vault_options={"task_token_pool": 0},
        )
    )
    creds = vault_proxy.add_rule(r"^/v1/database/creds/", after=lambda _: pg_proxy.cut())
    vault_proxy.add_rule(
        r"^/v1/(sys/leases/revoke|auth/token/revoke-accessor)$",
        action="reset",
        before=lambda _: vault_proxy.cut(),
    )
    roles_before = dynamic_roles(stack)

    answer = client.post("/task/start", json=start_body(), headers=issuers["spire"].bearer(AGENT))

    assert_unavailable(answer, "database_unavailable")
    [exchange] = creds.wait_done(1)
    orphan = exchange.response_json()
    assert lease_alive(stack, orphan["lease_id"])  # nobody could revoke it
    assert role_exists(stack, orphan["data"]["username"])
    task = ledger.only_task()
    assert task["state"] == "issuing" and task["token_accessor"]

    vault_proxy.clear_rules()
    vault_proxy.restore()
    pg_proxy.restore()
    scheduler_for(services)

    wait_for(lambda: ledger.task(task["id"])["state"] == "failed", what="stuck start closed as failed")
    wait_for(lambda: not lease_alive(stack, orphan["lease_id"]), what="orphan lease revoked")
    wait_for(lambda: dynamic_roles(stack) <= roles_before, what="orphan database user dropped")
    assert not token_alive(stack, task["token_accessor"])
    wait_for(lambda: ledger.task(task["id"])["token_revoked_at"] is not None, what="task token revoked")
