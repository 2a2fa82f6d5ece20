"""`OperatorClient` against a real `broker serve`: what an operator and an approver can do; its
retries against a scripted fake."""

from __future__ import annotations

from typing import Any

import pytest

from broker.client import BrokerClient, BrokerUnreachable, OperatorClient
from broker.client import errors as e
from tests.client.conftest import APPROVER
from tests.client.fakes import Reply, fake_server

pytestmark = pytest.mark.slow

PURPOSE = "operator client test run"


@pytest.fixture
def agent(broker, agent_token) -> BrokerClient:
    return BrokerClient(broker.url, agent_token)


@pytest.fixture
def operator(broker, issuers) -> OperatorClient:
    return OperatorClient(broker.url, issuers["sso"].mint("sre-sam@example.com", groups=["sre"]))


@pytest.fixture
def approver(broker, issuers) -> OperatorClient:
    return OperatorClient(
        broker.url, issuers["sso"].mint(APPROVER, groups=["dba"], extra_claims={"email": APPROVER})
    )


def start(agent: BrokerClient, task: str = "analytics-read") -> dict[str, Any]:
    environment = "prod" if task == "deploy-prod" else "dev"
    return agent.start(task, owner="alice@example.com", purpose=PURPOSE, context={"environment": environment})


def test_an_operator_finds_reads_and_revokes_a_workloads_lease(operator, agent, workload):
    started = start(agent)
    page = operator.list_leases(workload=workload, state="active", limit=10)
    assert [item["id"] for item in page["items"]] == [lease["id"] for lease in started["leases"]]
    [lease_id] = [item["id"] for item in page["items"]]
    assert operator.get_lease(lease_id)["task_id"] == started["task_id"]
    assert operator.revoke_lease(lease_id, "INC-1 operator client test")["state"] == "revoked"
    assert operator.get_task(started["task_id"])["state"] == "revoked"
    assert operator.list_leases(workload=workload, state="active")["items"] == []


def test_lists_page_with_the_cursor_and_filter_tasks_and_audit(operator, agent, workload):
    ids = [start(agent)["task_id"] for _ in range(2)]
    first = operator.list_tasks(workload=workload, limit=1)
    second = operator.list_tasks(workload=workload, limit=1, cursor=first["next_cursor"])
    assert [first["items"][0]["task_id"], second["items"][0]["task_id"]] == ids[::-1]  # newest first
    assert second["next_cursor"] is None
    events = {item["event"] for item in operator.list_audit(task_id=ids[0])["items"]}
    assert {"task.start_requested", "task.started"} <= events
    for task_id in ids:
        agent.finish(task_id)


def test_the_kill_switch_ends_every_open_task_of_the_workload(operator, agent, workload):
    ids = {start(agent)["task_id"] for _ in range(2)}
    result = operator.kill_switch("INC-2 operator client test", workload=workload)
    assert set(result["tasks"]) == ids and result["revocation"] == {"tasks": 2, "pending_leases": 2}
    assert {operator.get_task(task_id)["state"] for task_id in ids} == {"revoked"}
    with pytest.raises(e.ValidationError):
        operator.kill_switch("no filter at all")


def test_an_approver_finds_and_decides_what_waits_for_them(approver, agent):
    task_id = start(agent, "deploy-prod")["task_id"]
    assert approver.find_pending(task_id)["purpose"] == PURPOSE
    assert task_id in {item["task_id"] for item in approver.list_pending()["items"]}
    decided = approver.decide(task_id, "approve", "CHG-42 operator client test")
    assert (decided["state"], decided["approval"]["state"]) == ("pending_approval", "approved")
    assert approver.find_pending(task_id) is None
    with pytest.raises(e.Conflict):
        approver.decide(task_id, "deny", "changed my mind")
    agent.finish(agent.claim(task_id)["task_id"])


def test_what_a_token_may_not_do_is_forbidden(approver, operator, agent):
    with pytest.raises(e.Forbidden):
        approver.list_leases()
    task_id = start(agent, "deploy-prod")["task_id"]
    with pytest.raises(e.Forbidden):
        operator.decide(task_id, "approve", "not an approver")
    agent.finish(task_id, "cancelled")


# -- paging and retries, against a scripted broker ---------------------------------------------


def test_finding_a_pending_task_follows_every_page():
    pages = {
        None: {"items": [{"task_id": "a"}], "next_cursor": "c1"},
        "c1": {"items": [{"task_id": "b"}], "next_cursor": None},
    }

    def respond(request):
        return Reply(200, pages[request.query.get("cursor", [None])[0]])

    with fake_server(respond) as (url, seen):
        client = OperatorClient(url, "t")
        assert client.find_pending("b") == {"task_id": "b"}
        assert client.find_pending("z") is None
    assert [request.query for request in seen[:2]] == [
        {"state": ["pending"], "limit": ["500"]},
        {"state": ["pending"], "limit": ["500"], "cursor": ["c1"]},
    ]


def test_a_revoke_is_retried_after_a_lost_answer_but_a_decision_is_not():
    def respond(request):
        if len(seen) == 1:
            return Reply(200, {}, delay=1.5)  # longer than the client's timeout: the answer is lost
        return Reply(200, {"id": "l", "state": "revoked"})

    with fake_server(respond) as (url, seen):
        client = OperatorClient(url, "t", timeout=0.5, retries=2)
        assert client.revoke_lease("l", "why")["state"] == "revoked"
        assert [request.path for request in seen] == ["/leases/l/revoke"] * 2
        assert seen[1].body == {"reason": "why"}
        seen.clear()
        with pytest.raises(BrokerUnreachable):
            client.decide("t1", "approve", "why")
        assert [request.path for request in seen] == ["/approvals/t1"]
