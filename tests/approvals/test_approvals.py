"""High-risk tasks: a different identity approves, narrowly and once (docs/contract.md §6.5)."""

from __future__ import annotations

import uuid

import pytest

from tests.factories import AGENT, OTHER_AGENT, can_log_in, dynamic_roles, start_body

PROD = start_body("deploy-prod", purpose="release 1.4 to production", context={"environment": "prod"})


def request_prod(client, issuers, sub=AGENT):
    response = client.post("/task/start", json=PROD, headers=issuers["spire"].bearer(sub))
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def approver(issuers, sub="dba-dana@example.com", groups=("dba",)):
    return issuers["sso"].bearer(sub, groups=list(groups), extra_claims={"email": sub})


def decide(client, headers, task_id, decision="approve", reason="change ticket CHG-42"):
    return client.post(
        f"/approvals/{task_id}", json={"decision": decision, "reason": reason}, headers=headers
    )


def claim(client, issuers, task_id, sub=AGENT):
    return client.post("/task/claim", json={"task_id": task_id}, headers=issuers["spire"].bearer(sub))


def test_a_prod_start_waits_for_approval_and_issues_nothing(client, issuers, stack):
    before = dynamic_roles(stack)
    body = request_prod(client, issuers)
    assert body["state"] == "pending_approval"
    assert body["approval_expires_at"].endswith("Z")
    assert "credentials" not in body
    assert dynamic_roles(stack) == before


def test_low_risk_context_needs_no_approval(client, issuers):
    body = start_body("deploy-prod", context={"environment": "staging"})
    assert client.post("/task/start", json=body, headers=issuers["spire"].bearer(AGENT)).status_code == 201


def test_approve_then_claim_once(client, issuers, stack):
    """§6.5 single-use approvals: an approval covers one task, once."""
    task_id = request_prod(client, issuers)["task_id"]
    assert claim(client, issuers, task_id).status_code == 409  # not approved yet
    approved = decide(client, approver(issuers), task_id)
    assert approved.status_code == 200, approved.get_json()
    assert approved.get_json()["approval"]["state"] == "approved"

    claimed = claim(client, issuers, task_id)
    assert claimed.status_code == 200, claimed.get_json()
    assert claimed.get_json()["state"] == "active"
    creds = claimed.get_json()["credentials"]["db"]["data"]
    assert can_log_in(stack, creds)

    again = claim(client, issuers, task_id)
    assert again.status_code == 409
    assert "credentials" not in again.get_json()


def test_only_the_requesting_workload_may_claim(client, issuers):
    task_id = request_prod(client, issuers)["task_id"]
    decide(client, approver(issuers), task_id)
    assert claim(client, issuers, task_id, sub=OTHER_AGENT).status_code == 404


@pytest.mark.parametrize(
    ("sub", "groups", "status"),
    [
        ("dba-dana@example.com", ["dba"], 200),
        ("sre-sam@example.com", ["sre"], 403),
        ("alice@example.com", ["dba"], 403),
    ],
    ids=["dba-approves", "not-an-approver-group", "the-owner"],
)
def test_who_may_approve(client, issuers, sub, groups, status):
    task_id = request_prod(client, issuers)["task_id"]
    assert decide(client, approver(issuers, sub, groups), task_id).status_code == status


def test_the_requesting_workload_cannot_approve(client, issuers):
    """§6.5 single-use approvals: the approver differs from the requesting workload."""
    task_id = request_prod(client, issuers)["task_id"]
    response = decide(client, issuers["spire"].bearer(AGENT), task_id)
    assert response.status_code == 403  # its issuer has no `approver` use


def test_a_deny_ends_the_task_and_a_retry_is_a_new_task(client, issuers):
    first = request_prod(client, issuers)["task_id"]
    denied = decide(client, approver(issuers), first, "deny", "no change ticket")
    assert denied.get_json()["state"] == "denied"
    assert claim(client, issuers, first).status_code == 409
    assert decide(client, approver(issuers, "dba-dora@example.com"), first).status_code == 409
    second = request_prod(client, issuers)["task_id"]
    assert second != first


def test_an_approver_decides_once(client, issuers):
    task_id = request_prod(client, issuers)["task_id"]
    assert decide(client, approver(issuers), task_id, "deny", "hmm").status_code == 200
    assert decide(client, approver(issuers), task_id).status_code == 409


def test_pending_list_shows_what_the_approver_may_decide(client, issuers):
    task_id = request_prod(client, issuers)["task_id"]
    mine = client.get("/approvals?state=pending", headers=approver(issuers)).get_json()["items"]
    assert [item["task_id"] for item in mine] == [task_id]
    assert mine[0]["purpose"] == PROD["purpose"] and mine[0]["owner"] == PROD["owner"]
    as_owner = client.get("/approvals?state=pending", headers=approver(issuers, "alice@example.com"))
    assert as_owner.get_json()["items"] == []


def _pending_page(client, headers, query=""):
    response = client.get(f"/approvals?state=pending{query}", headers=headers)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    return [item["task_id"] for item in body["items"]], body["next_cursor"]


@pytest.mark.parametrize("scan_batch", [2, 200])
def test_tasks_an_approver_may_not_decide_never_hide_the_ones_they_may(
    client, issuers, monkeypatch, scan_batch
):
    monkeypatch.setattr("broker.approvals.service._SCAN_BATCH", scan_batch)
    dana_owns = {**PROD, "owner": "dba-dana@example.com"}
    for _ in range(5):  # separation of duties: dana may not decide these
        assert (
            client.post("/task/start", json=dana_owns, headers=issuers["spire"].bearer(AGENT)).status_code
            == 202
        )
    alices = request_prod(client, issuers)["task_id"]
    assert _pending_page(client, approver(issuers), "&limit=1") == ([alices], None)


def test_the_pending_list_pages_oldest_first(client, issuers, monkeypatch):
    monkeypatch.setattr("broker.approvals.service._SCAN_BATCH", 2)
    ids = [request_prod(client, issuers)["task_id"] for _ in range(3)]
    first, cursor = _pending_page(client, approver(issuers), "&limit=2")
    assert first == ids[:2] and cursor
    second, last = _pending_page(client, approver(issuers), f"&limit=2&cursor={cursor}")
    assert second == ids[2:] and last is None


@pytest.mark.parametrize(
    "query",
    [
        "?state=approved",
        "?limit=0",
        "?limit=x",
        "?cursor=bogus",
        "?colour=red",
        "?state=pending&state=pending",
    ],
)
def test_a_bad_pending_query_is_a_validation_error(client, issuers, query):
    response = client.get(f"/approvals{query}", headers=approver(issuers))
    assert response.status_code == 400
    assert response.get_json()["code"] == "validation_error"


def test_a_lapsed_approval_cannot_be_claimed(client, issuers, services):
    """§6.5 single-use approvals: an approval is good until it lapses, not after."""
    from sqlalchemy import text

    task_id = request_prod(client, issuers)["task_id"]
    decide(client, approver(issuers), task_id)
    with services.engine.begin() as connection:
        connection.execute(text("UPDATE tasks SET approval_expires_at = now() - interval '1 second'"))
    response = claim(client, issuers, task_id)
    assert response.status_code == 409
    assert "lapsed" in response.get_json()["detail"]


def test_concurrent_claims_issue_exactly_once(app, issuers, stack):
    import threading

    client = app.test_client()
    task_id = request_prod(client, issuers)["task_id"]
    decide(client, approver(issuers), task_id)
    before = dynamic_roles(stack)
    results = []
    barrier = threading.Barrier(4)

    def attempt():
        local = app.test_client()
        barrier.wait()
        results.append(claim(local, issuers, task_id).status_code)

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [200, 409, 409, 409]
    assert len(dynamic_roles(stack) - before) == 1


def test_a_policy_change_between_approval_and_claim_voids_the_approval(
    client, issuers, services, policy_file
):
    """§6.5 single-use approvals: an approval covers its exact request; a changed one needs a new task."""
    task_id = request_prod(client, issuers)["task_id"]
    decide(client, approver(issuers), task_id)
    text = policy_file.read_text()
    policy_file.write_text(
        text.replace(
            "      db: {kind: database, mount: database, role: analytics-ro}\n",
            "      db: {kind: database, mount: database, role: app-rw}\n",
        )
    )
    assert services.policies.reload()
    response = claim(client, issuers, task_id)
    assert response.status_code == 409
    assert "policy changed" in response.get_json()["detail"]


def test_an_approver_sees_what_approval_would_issue_and_who_may_approve(client, issuers):
    task_id = request_prod(client, issuers)["task_id"]
    listed = client.get("/approvals?state=pending", headers=approver(issuers)).get_json()["items"]
    [item] = [item for item in listed if item["task_id"] == task_id]
    assert item["would_issue"] == [{"name": "db", "kind": "database"}]
    assert item["approvers"] == {"groups": ["dba"], "min_approvals": 1}
    assert "analytics-ro" not in str(item) and "database/" not in str(item)  # no role or path
    one = client.get(f"/approvals/{task_id}", headers=approver(issuers))
    assert one.status_code == 200 and one.get_json() == item


def test_one_pending_request_is_404_to_whoever_may_not_decide_it(client, issuers):
    task_id = request_prod(client, issuers)["task_id"]
    outsider = approver(issuers, sub="dev-dave@example.com", groups=("dev",))
    assert client.get(f"/approvals/{task_id}", headers=outsider).status_code == 404
    workload = issuers["spire"].bearer(AGENT)
    assert client.get(f"/approvals/{task_id}", headers=workload).status_code == 403
    decide(client, approver(issuers), task_id)
    assert client.get(f"/approvals/{task_id}", headers=approver(issuers)).status_code == 404  # decided
    assert client.get(f"/approvals/{uuid.uuid4()}", headers=approver(issuers)).status_code == 404
