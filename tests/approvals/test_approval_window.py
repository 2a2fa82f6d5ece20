"""Approvals after their window (docs/contract.md §6.5): a task whose approval window lapsed
is neither listed as pending nor decidable, even before the scheduler's lapse job has ended
it, because the window is checked against the database clock at request time. And the lapse
job ends only tasks still waiting: an approved or denied task keeps its state.

Real Postgres and OpenBao; the window is a one-second `approval.expires_in` in a policy the
test writes, so the lapse is real time passing, not a row edited by hand.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from broker.scheduler.jobs import Jobs
from tests.factories import AGENT, start_body

PROD = start_body("deploy-prod", purpose="release 1.4 to production", context={"environment": "prod"})
WINDOW = 1  # seconds: the smallest `approval.expires_in` the policy schema allows


@pytest.fixture
def short_window(services: Any, policy_file: Path) -> None:
    policy = policy_file.read_text()
    assert "      expires_in: 600\n" in policy  # deploy-prod's window, the one shortened here
    policy_file.write_text(policy.replace("      expires_in: 600\n", f"      expires_in: {WINDOW}\n"))
    assert services.policies.reload()


def _request(client: Any, issuers: Any) -> str:
    response = client.post("/task/start", json=PROD, headers=issuers["spire"].bearer(AGENT))
    assert response.status_code == 202, response.get_json()
    return str(response.get_json()["task_id"])


def _approver(issuers: Any) -> dict[str, str]:
    sub = "dba-dana@example.com"
    return dict(issuers["sso"].bearer(sub, groups=["dba"], extra_claims={"email": sub}))


def _decide(client: Any, issuers: Any, task_id: str, decision: str = "approve") -> Any:
    return client.post(
        f"/approvals/{task_id}", json={"decision": decision, "reason": "CHG-42"}, headers=_approver(issuers)
    )


def _listed(client: Any, issuers: Any) -> list[str]:
    response = client.get("/approvals?state=pending", headers=_approver(issuers))
    assert response.status_code == 200, response.get_json()
    return [item["task_id"] for item in response.get_json()["items"]]


def _state(services: Any, task_id: str) -> str:
    with services.engine.connect() as connection:
        return str(
            connection.execute(text("SELECT state FROM tasks WHERE id = :id"), {"id": task_id}).scalar_one()
        )


def _lapse() -> None:
    time.sleep(WINDOW + 0.3)


def test_a_lapsed_request_is_not_listed_or_readable_as_pending(client, issuers, services, short_window):
    task_id = _request(client, issuers)
    assert _listed(client, issuers) == [task_id]  # within its window it is listed
    _lapse()
    assert _state(services, task_id) == "pending_approval"  # the lapse job has not run
    assert _listed(client, issuers) == []
    assert client.get(f"/approvals/{task_id}", headers=_approver(issuers)).status_code == 404


@pytest.mark.parametrize("decision", ["approve", "deny"])
def test_a_lapsed_request_cannot_be_decided(client, issuers, services, short_window, decision):
    task_id = _request(client, issuers)
    _lapse()
    answer = _decide(client, issuers, task_id, decision)
    assert answer.status_code == 409
    assert "lapsed" in answer.get_json()["detail"]
    assert _state(services, task_id) == "pending_approval"  # nothing recorded; the lapse job ends it
    with services.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM approvals")).scalar_one() == 0


def test_the_lapse_job_ends_only_the_tasks_still_waiting(client, issuers, services, short_window):
    approved, denied, waiting = (_request(client, issuers) for _ in range(3))
    assert _decide(client, issuers, approved).status_code == 200
    claimed = client.post("/task/claim", json={"task_id": approved}, headers=issuers["spire"].bearer(AGENT))
    assert claimed.status_code == 200, claimed.get_json()
    assert _decide(client, issuers, denied, "deny").status_code == 200
    _lapse()  # every window has passed, the decided tasks' too
    with ThreadPoolExecutor(2) as pool:
        assert Jobs(services, pool).lapse_approvals() == 1
    assert _state(services, waiting) == "approval_expired"
    assert _state(services, approved) == "active"
    assert _state(services, denied) == "denied"
