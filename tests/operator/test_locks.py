"""Locks and the kill switch that answers at once (issue 24, docs/api.md#locks).

A lock refuses every matching start, claim and approval with 403 `locked` naming it, and
ends what it matches as the kill switch does; the kill switch records its tasks as ended
in one statement and answers, and the scheduler revokes their leases after, resumed by
whichever scheduler runs next.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from tests.approvals.test_approvals import PROD, approver, claim, decide
from tests.factories import AGENT, OTHER_AGENT, can_log_in, role_exists, start_task, started_task
from tests.support.waiting import wait_for


def dead(stack: Any, creds: dict[str, Any]) -> bool:
    # The database user is gone (not merely refused: mid-revocation it exists without grants).
    return not role_exists(stack, creds["username"])


def sre(issuers: Any) -> dict[str, str]:
    headers: dict[str, str] = issuers["sso"].bearer("sre-sam@example.com", groups=["sre"])
    return headers


def lock(client: Any, issuers: Any, **body: Any) -> dict[str, Any]:
    response = client.post(
        "/locks", json={"reason": "INC-24 agent compromised", **body}, headers=sre(issuers)
    )
    assert response.status_code == 201, response.get_json()
    found: dict[str, Any] = response.get_json()
    return found


def assert_locked(response: Any, lock_id: str) -> None:
    assert response.status_code == 403, response.get_json()
    problem = response.get_json()
    assert (problem["code"], problem["lock_id"]) == ("locked", lock_id)
    assert lock_id in problem["detail"]


def active_leases_of_revoked(client: Any, issuers: Any) -> list[dict[str, Any]]:
    page = client.get("/leases?state=active&task_state=revoked", headers=sre(issuers)).get_json()
    items: list[dict[str, Any]] = page["items"]
    return items


def test_a_lock_refuses_a_matching_start_and_lets_others_through(client, issuers):
    added = lock(client, issuers, workload=AGENT)
    assert_locked(start_task(client, issuers), added["id"])
    started_task(client, issuers, sub=OTHER_AGENT)  # another workload is not locked
    [denied] = client.get("/audit?event=task.denied", headers=sre(issuers)).get_json()["items"]
    assert (denied["actor"], denied["detail"]["rule"], denied["detail"]["lock_id"]) == (
        AGENT,
        "lock",
        added["id"],
    )
    listed = client.get("/locks", headers=sre(issuers)).get_json()["items"]
    assert [item["id"] for item in listed] == [added["id"]]


def test_every_target_given_must_match(client, issuers):
    added = lock(client, issuers, workload=AGENT, owner="bob@example.com")
    started_task(client, issuers)  # alice's start by the agent: the owner does not match
    assert_locked(start_task(client, issuers, owner="bob@example.com"), added["id"])
    by_issuer = lock(client, issuers, issuer="spire", task="analytics-read")
    assert_locked(start_task(client, issuers, sub=OTHER_AGENT), by_issuer["id"])


def test_removing_a_lock_lets_starts_through_again_and_is_audited(client, issuers):
    added = lock(client, issuers, task="analytics-read")
    assert_locked(start_task(client, issuers), added["id"])
    removed = client.delete(f"/locks/{added['id']}", headers=sre(issuers))
    assert removed.status_code == 200 and removed.get_json()["removed_by"].endswith("sre-sam@example.com")
    started_task(client, issuers)
    assert client.get("/locks", headers=sre(issuers)).get_json()["items"] == []
    assert client.delete(f"/locks/{added['id']}", headers=sre(issuers)).status_code == 200  # unchanged
    events = [
        item["event"]
        for item in client.get("/audit?event=lock.removed", headers=sre(issuers)).get_json()["items"]
    ]
    assert events == ["lock.removed"]
    assert (
        client.delete("/locks/00000000-0000-4000-8000-000000000000", headers=sre(issuers)).status_code == 404
    )


def test_a_lock_expires_by_the_database_clock_and_its_expiry_is_recorded_once(
    client, issuers, running_scheduler
):
    added = lock(client, issuers, workload=AGENT, expires_in=1)
    assert_locked(start_task(client, issuers), added["id"])
    wait_for(lambda: start_task(client, issuers).status_code == 201, what="the lock lapses")
    wait_for(
        lambda: client.get("/audit?event=lock.expired", headers=sre(issuers)).get_json()["items"],
        what="lock.expired",
    )
    running_scheduler.jobs.sweep_locks()
    expired = client.get("/audit?event=lock.expired", headers=sre(issuers)).get_json()["items"]
    assert [event["detail"]["lock_id"] for event in expired] == [added["id"]]
    everything = client.get("/locks?state=all", headers=sre(issuers)).get_json()["items"]
    assert [item["id"] for item in everything] == [added["id"]]


def test_a_lock_ends_the_open_tasks_it_matches_and_their_credentials_die(
    client, issuers, stack, running_scheduler
):
    mine = [started_task(client, issuers) for _ in range(2)]
    theirs = started_task(client, issuers, sub=OTHER_AGENT)
    added = lock(client, issuers, workload=AGENT)
    assert added["revocation"]["tasks"] == 2
    for task in mine:
        assert client.get(f"/task/{task['task_id']}", headers=sre(issuers)).get_json()["state"] == "revoked"
        wait_for(partial(dead, stack, task["credentials"]["db"]["data"]), what="revoked")
    wait_for(lambda: not active_leases_of_revoked(client, issuers), what="every lease revoked")
    assert can_log_in(stack, theirs["credentials"]["db"]["data"])
    # A finish of a task the lock ended answers as any finish of an ended task.
    finished = client.post(
        "/task/finish", json={"task_id": mine[0]["task_id"]}, headers=issuers["spire"].bearer(AGENT)
    )
    assert finished.status_code == 200 and finished.get_json()["state"] == "revoked"
    events = client.get("/audit?event=lock.added", headers=sre(issuers)).get_json()["items"]
    assert [event["detail"]["lock_id"] for event in events] == [added["id"]]


def test_a_lock_refuses_an_approval_and_a_claim(client, issuers):
    waiting = client.post("/task/start", json=PROD, headers=issuers["spire"].bearer(AGENT)).get_json()[
        "task_id"
    ]
    approved = client.post("/task/start", json=PROD, headers=issuers["spire"].bearer(AGENT)).get_json()[
        "task_id"
    ]
    assert decide(client, approver(issuers), approved).status_code == 200
    added = lock(client, issuers, task="deploy-prod")
    assert_locked(decide(client, approver(issuers), waiting), added["id"])
    assert_locked(claim(client, issuers, approved), added["id"])


def test_the_kill_switch_answers_before_its_revocations_and_a_new_scheduler_finishes_them(
    client, issuers, stack, services, monkeypatch
):
    from broker.ledger import ended_holding
    from broker.scheduler import jobs as jobs_module
    from broker.scheduler.runner import SchedulerRunner

    mine = [started_task(client, issuers) for _ in range(3)]
    answer = client.post(
        "/leases/revoke", json={"reason": "INC-24", "workload": AGENT, "lock": True}, headers=sre(issuers)
    )
    assert answer.status_code == 200, answer.get_json()
    body = answer.get_json()
    assert body["revocation"] == {"tasks": 3, "pending_leases": 3}
    # No scheduler ran: every task is ended, every credential still alive.
    assert len(active_leases_of_revoked(client, issuers)) == 3
    assert all(can_log_in(stack, task["credentials"]["db"]["data"]) for task in mine)
    assert_locked(start_task(client, issuers), body["lock"]["id"])

    # A first scheduler gets through one task and stops (its claim cut to one task).
    monkeypatch.setattr(jobs_module, "ended_holding", lambda: ended_holding(1))
    with ThreadPoolExecutor(1) as pool:
        assert jobs_module.Jobs(services, pool).revoke_ended() == 1
    monkeypatch.undo()
    assert len(active_leases_of_revoked(client, issuers)) == 2

    # Another one, from the ledger alone, revokes the rest.
    runner = SchedulerRunner(services)
    runner.start()
    try:
        wait_for(lambda: not active_leases_of_revoked(client, issuers), what="every lease revoked")
    finally:
        runner.stop()
    for task in mine:
        assert not can_log_in(stack, task["credentials"]["db"]["data"])
    revoked = client.get("/audit?event=task.revoked", headers=sre(issuers)).get_json()["items"]
    assert len(revoked) == 3


def test_the_kill_switch_ends_tasks_in_one_statement(client, issuers, services):
    started_task(client, issuers)
    with services.engine.connect() as connection:
        # A state the kill switch must leave: the UPDATE's filter is on open states only.
        finished = started_task(client, issuers)
        client.post(
            "/task/finish", json={"task_id": finished["task_id"]}, headers=issuers["spire"].bearer(AGENT)
        )
        answer = client.post(
            "/leases/revoke", json={"reason": "INC-24", "workload": AGENT}, headers=sre(issuers)
        )
        assert answer.get_json()["revocation"]["tasks"] == 1
        state = connection.execute(
            text("SELECT state FROM tasks WHERE id = :id"), {"id": finished["task_id"]}
        ).scalar()
    assert state == "finished"


_ALPHABET = st.characters(blacklist_categories=("Cs", "Cc"))


@pytest.mark.parametrize(
    "body",
    [
        {"reason": "no target"},
        {"reason": "everything", "workload": "*"},
        {"reason": "a glob", "task": "analytics-*"},
        {"reason": "blank", "owner": "  "},
        {"reason": "empty", "workload": ""},
        {"reason": "zero", "workload": AGENT, "expires_in": 0},
        {"reason": "negative", "workload": AGENT, "expires_in": -5},
        {"reason": "unknown field", "workload": AGENT, "scope": "all"},
        {"workload": AGENT},
        {"reason": "", "workload": AGENT},
    ],
)
def test_bad_locks_are_a_clear_400(client, issuers, body):
    response = client.post("/locks", json=body, headers=sre(issuers))
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["code"] == "validation_error"
    assert client.get("/locks?state=all", headers=sre(issuers)).get_json()["items"] == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(
        st.sampled_from(["workload", "owner", "task", "issuer", "reason", "expires_in", "other"]),
        st.one_of(st.text(_ALPHABET, max_size=8), st.integers(-3, 3), st.none(), st.booleans()),
    )
)
def test_a_lock_body_is_either_a_lock_or_a_400(client, issuers, body):
    response = client.post("/locks", json=body, headers=sre(issuers))
    assert response.status_code in (201, 400), response.get_json()
    if response.status_code == 201:
        added = response.get_json()
        assert any(added[name] for name in ("workload", "owner", "task", "issuer"))
        assert "*" not in "".join(str(added[name] or "") for name in ("workload", "owner", "task", "issuer"))
        client.delete(f"/locks/{added['id']}", headers=sre(issuers))
    else:
        assert response.get_json()["code"] == "validation_error"


def test_only_operators_lock(client, issuers):
    body = {"reason": "INC-24", "workload": AGENT}
    assert client.post("/locks", json=body, headers=issuers["spire"].bearer(AGENT)).status_code == 403
    assert client.get("/locks", headers=approver(issuers)).status_code == 403


def test_the_lock_sweep_ends_what_a_lock_matches_that_its_request_did_not(client, issuers, services):
    from broker.scheduler.jobs import Jobs

    task = started_task(client, issuers)
    with services.engine.begin() as connection:  # a lock whose request died before its end
        connection.execute(
            text(
                "INSERT INTO locks (id, workload, reason, created_by) VALUES (gen_random_uuid(), :w, 'x', 't')"
            ),
            {"w": AGENT},
        )
    with ThreadPoolExecutor(1) as pool:
        assert Jobs(services, pool).sweep_locks() == 1
    assert client.get(f"/task/{task['task_id']}", headers=sre(issuers)).get_json()["state"] == "revoked"


def test_a_lock_added_in_one_replica_refuses_a_start_in_another(client, issuers, settings):
    from broker.app import create_app
    from broker.services import build_services

    other = build_services(settings)
    try:
        replica = create_app(services=other).test_client()
        started_task(replica, issuers)  # the replica is warm: its caches hold whatever they hold
        added = lock(client, issuers, workload=AGENT)
        assert_locked(start_task(replica, issuers), added["id"])
    finally:
        other.close()


def test_the_active_locks_gauge(client, issuers, services):
    from broker import metrics
    from broker.scheduler.jobs import Jobs

    lock(client, issuers, workload=AGENT)
    lock(client, issuers, task="analytics-read")
    with ThreadPoolExecutor(1) as pool:
        Jobs(services, pool).sweep_locks()
    assert "broker_locks_active 2.0" in metrics.render()[0].decode()
