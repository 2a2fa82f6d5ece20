"""The SDK against a real `broker serve`; retries against a scripted fake."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
import requests

from broker.client import ApprovalDenied, ApprovalTimeout, BrokerClient, BrokerUnreachable
from broker.client import errors as e
from broker.client.sdk import ActiveTask
from tests.client.conftest import approve, operator_task
from tests.client.fakes import Reply, fake_server
from tests.factories import can_log_in

pytestmark = pytest.mark.slow

PURPOSE = "client sdk test run"


@pytest.fixture
def client(broker, issuers, workload) -> BrokerClient:
    # A fresh token per request, as a rotating source would give.
    class Minting:
        def get(self) -> str:
            return str(issuers["spire"].mint(workload))

    return BrokerClient(broker.url, Minting())


def approve_when_pending(
    broker, issuers, client: BrokerClient, task_id: str, decision: str = "approve"
) -> threading.Thread:
    """An approver acting from another thread, once the workload has had to wait a little."""

    def act() -> None:
        time.sleep(0.7)
        approve(broker, issuers, task_id, decision)

    thread = threading.Thread(target=act, daemon=True)
    thread.start()
    return thread


def test_start_and_finish_revoke_the_database_user(client, stack):
    answer = client.start(
        "analytics-read", owner="alice@example.com", purpose=PURPOSE, context={"environment": "dev"}
    )
    assert answer["state"] == "active"
    creds = answer["credentials"]["db"]["data"]
    assert can_log_in(stack, creds)
    assert client.get(answer["task_id"])["state"] == "active"
    finished = client.finish(answer["task_id"])
    assert finished["outcome"] == "succeeded"
    assert not can_log_in(stack, creds)


def test_the_approval_wait_claims_once_an_approver_approves(broker, issuers, client, stack):
    answer = client.start(
        "deploy-prod", owner="alice@example.com", purpose=PURPOSE, context={"environment": "prod"}
    )
    assert answer["state"] == "pending_approval"
    approver = approve_when_pending(broker, issuers, client, answer["task_id"])
    claimed = client.wait_for_approval(answer["task_id"], timeout=30, poll=0.2)
    approver.join(10)
    task = ActiveTask.from_answer(claimed)
    assert task.id == answer["task_id"]
    assert can_log_in(stack, task.credentials["db"].data)
    client.finish(task.id)
    assert not can_log_in(stack, task.credentials["db"].data)


def test_a_denial_ends_the_wait(broker, issuers, client):
    answer = client.start(
        "deploy-prod", owner="alice@example.com", purpose=PURPOSE, context={"environment": "prod"}
    )
    approve_when_pending(broker, issuers, client, answer["task_id"], decision="deny")
    with pytest.raises(ApprovalDenied) as denied:
        client.wait_for_approval(answer["task_id"], timeout=30, poll=0.2)
    assert denied.value.task_id == answer["task_id"]
    assert denied.value.body["state"] == "denied"


def test_a_wait_without_decision_times_out_naming_the_task(client):
    answer = client.start(
        "deploy-prod", owner="alice@example.com", purpose=PURPOSE, context={"environment": "prod"}
    )
    began = time.monotonic()
    with pytest.raises(ApprovalTimeout) as timeout:
        client.wait_for_approval(answer["task_id"], timeout=0.6, poll=0.2)
    assert time.monotonic() - began < 5
    assert answer["task_id"] in str(timeout.value)
    assert client.get(answer["task_id"])["state"] == "pending_approval"


def test_the_context_manager_waits_for_approval_and_finishes(broker, issuers, client, stack):
    # The task id is not known before the start: approve whatever this workload has pending.
    def approve_pending() -> None:
        headers = issuers["sso"].bearer("dba-dana@example.com", groups=["dba"])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            items = requests.get(f"{broker.url}/approvals?state=pending", headers=headers, timeout=10).json()[
                "items"
            ]
            mine = [item for item in items if item["purpose"] == "context manager approval"]
            if mine:
                approve(broker, issuers, mine[0]["task_id"])
                return
            time.sleep(0.2)

    threading.Thread(target=approve_pending, daemon=True).start()
    with client.task(
        "deploy-prod",
        owner="alice@example.com",
        purpose="context manager approval",
        context={"environment": "prod"},
        wait=30,
    ) as task:
        creds = task.credentials["db"].data
        assert can_log_in(stack, creds)
    assert not can_log_in(stack, creds)
    assert operator_task(broker, issuers, task.id)["outcome"] == "succeeded"


@pytest.mark.parametrize(
    ("raised", "outcome"),
    [(RuntimeError, "failed"), (KeyboardInterrupt, "cancelled")],
    ids=["error", "ctrl-c"],
)
def test_the_context_manager_finishes_with_the_outcome_and_reraises(
    broker, issuers, client, stack, raised, outcome
):
    """§6.10 clients always clean up: the SDK's task context finishes on failure and on Ctrl-C."""
    with (
        pytest.raises(raised),
        client.task(
            "analytics-read", owner="alice@example.com", purpose=PURPOSE, context={"environment": "dev"}
        ) as task,
    ):
        creds = task.credentials["db"].data
        raise raised()
    assert not can_log_in(stack, creds)
    assert operator_task(broker, issuers, task.id)["outcome"] == outcome


def test_a_pending_task_without_wait_is_withdrawn(broker, issuers, client):
    with (
        pytest.raises(ApprovalTimeout) as pending,
        client.task(
            "deploy-prod", owner="alice@example.com", purpose=PURPOSE, context={"environment": "prod"}
        ),
    ):
        pytest.fail("must not run without an approval")
    task = operator_task(broker, issuers, pending.value.task_id)
    assert (task["state"], task["outcome"]) == ("finished", "cancelled")


@pytest.mark.parametrize(
    ("overrides", "error", "code"),
    [
        ({"task": "no-such-task"}, e.UnknownTask, "unknown_task"),
        ({"owner": "mallory@evil.example"}, e.PolicyDenied, "policy_denied"),
        ({"ttl": 100_000}, e.ValidationError, "ttl_exceeds_max"),
    ],
)
def test_refusals_raise_the_class_of_their_code(client, overrides, error, code):
    request = {
        "task": "analytics-read",
        "owner": "alice@example.com",
        "context": {"environment": "dev"},
        **overrides,
    }
    with pytest.raises(error) as refused:
        client.start(request.pop("task"), purpose=PURPOSE, **request)
    assert refused.value.code == code
    assert refused.value.detail


def test_a_bad_token_and_an_unknown_task_id(broker, client):
    with pytest.raises(e.InvalidToken):
        BrokerClient(broker.url, "not-a-jwt").get(str(uuid.uuid4()))
    with pytest.raises(e.NotFound):
        client.get(str(uuid.uuid4()))


def test_credentials_never_show_secret_values_in_repr(client):
    answer = client.start(
        "analytics-read", owner="alice@example.com", purpose=PURPOSE, context={"environment": "dev"}
    )
    task = ActiveTask.from_answer(answer)
    client.finish(task.id)
    password = answer["credentials"]["db"]["data"]["password"]
    username = answer["credentials"]["db"]["data"]["username"]
    for text in (repr(task), repr(task.credentials), str(task.credentials["db"])):
        assert password not in text and username not in text
    assert "username" in repr(task.credentials["db"])


def test_a_retried_start_with_the_same_key_never_leaves_two_live_tasks(broker, issuers, client, workload):
    from broker.client.errors import Conflict

    key = str(uuid.uuid4())
    first = client.start(
        "analytics-read",
        owner="alice@example.com",
        purpose=PURPOSE,
        context={"environment": "dev"},
        idempotency_key=key,
    )
    # The retry a client makes after losing the first answer: the broker names the task it
    # already started under that key, and sends no second set of credentials.
    with pytest.raises(Conflict) as retried:
        client.start(
            "analytics-read",
            owner="alice@example.com",
            purpose=PURPOSE,
            context={"environment": "dev"},
            idempotency_key=key,
        )
    operator = issuers["sso"].bearer("sre-sam@example.com", groups=["sre"])
    live = requests.get(
        f"{broker.url}/tasks", params={"workload": workload, "state": "active"}, headers=operator, timeout=10
    )
    try:
        assert retried.value.body["task_id"] == first["task_id"]
        assert [item["task_id"] for item in live.json()["items"]] == [first["task_id"]]
    finally:
        client.finish(first["task_id"])


# -- retries, against a scripted broker ------------------------------------------------------


class CountingTokens:
    def __init__(self) -> None:
        self.calls = 0

    def get(self) -> str:
        self.calls += 1
        return f"token-{self.calls}"


def active_answer(task_id: str = "0c6c92e4-d127-4b7d-9569-2b2c373b029f") -> dict[str, Any]:
    return {
        "task_id": task_id,
        "state": "active",
        "expires_at": "2030-01-01T00:00:00.000Z",
        "credentials": {},
    }


def test_a_start_is_retried_on_503_with_the_same_key_and_a_fresh_token():
    replies = iter(
        [
            Reply(503, {"code": "vault_unavailable", "detail": "Vault is down"}, {"Retry-After": "0"}),
            Reply(429, {"code": "limit_exceeded", "detail": "slow down", "rule": "x"}, {"Retry-After": "0"}),
            Reply(201, active_answer()),
        ]
    )
    tokens = CountingTokens()
    with fake_server(lambda request: next(replies)) as (url, seen):
        answer = BrokerClient(url, tokens, retries=3).start("t", owner="o", purpose=PURPOSE)
    assert answer["state"] == "active"
    assert len(seen) == 3
    keys = {request.headers["idempotency-key"] for request in seen}
    assert len(keys) == 1 and uuid.UUID(keys.pop()).version == 4
    assert [request.headers["authorization"] for request in seen] == [f"Bearer token-{n}" for n in (1, 2, 3)]


def test_two_starts_carry_different_keys():
    with fake_server(lambda request: Reply(201, active_answer())) as (url, seen):
        client = BrokerClient(url, "t")
        client.start("t", owner="o", purpose=PURPOSE)
        client.start("t", owner="o", purpose=PURPOSE)
    assert seen[0].headers["idempotency-key"] != seen[1].headers["idempotency-key"]


def test_finish_is_retried_after_a_lost_answer_but_a_claim_is_not():
    def respond(request):
        if request.path == "/task/finish" and len(seen) == 1:
            return Reply(200, {}, delay=1.5)  # longer than the client's timeout: the answer is lost
        if request.path == "/task/claim":
            return Reply(200, active_answer(), delay=1.5)
        return Reply(200, {"state": "finished", "leases": []})

    with fake_server(respond) as (url, seen):
        client = BrokerClient(url, "t", timeout=0.5, retries=2)
        assert client.finish("id", "failed")["state"] == "finished"
        assert [request.path for request in seen] == ["/task/finish", "/task/finish"]
        assert seen[1].body == {"task_id": "id", "outcome": "failed"}
        seen.clear()
        with pytest.raises(BrokerUnreachable):
            client.claim("id")
        assert [request.path for request in seen] == ["/task/claim"]


def test_a_non_problem_error_page_is_an_http_error_by_status():
    with fake_server(lambda request: Reply(404, None)) as (url, _), pytest.raises(e.NotFound) as missing:
        BrokerClient(url, "t").task_types()
    assert missing.value.code == "http_error"


def test_a_start_whose_answer_was_lost_finishes_the_task_it_made_and_says_so():
    from broker.client.errors import StartAnswerLost

    lost = "5b0cf1f4-6d3c-4f43-8f4c-4f7b7cf4d2a1"

    def respond(request):
        if request.path == "/task/start" and sum(1 for s in seen if s.path == "/task/start") == 1:
            return Reply(201, active_answer(lost), delay=1.0)  # the client gives up before this
        if request.path == "/task/start":
            return Reply(
                409, {"code": "conflict", "detail": "already started", "task_id": lost, "state": "active"}
            )
        return Reply(200, {"task_id": lost, "state": "finished"})

    with fake_server(respond) as (url, seen), pytest.raises(StartAnswerLost) as raised:
        BrokerClient(url, "t", timeout=0.3, retries=2).start("t", owner="o", purpose=PURPOSE)
    assert raised.value.task_id == lost
    finish = [request for request in seen if request.path == "/task/finish"]
    assert [request.body for request in finish] == [{"task_id": lost, "outcome": "cancelled"}]
    starts = [request for request in seen if request.path == "/task/start"]
    assert len({request.headers["idempotency-key"] for request in starts}) == 1


def test_with_a_key_of_its_own_the_caller_gets_the_conflict_and_decides():
    from broker.client.errors import Conflict, StartAnswerLost

    answer = {
        "code": "conflict",
        "detail": "already started",
        "task_id": "5b0cf1f4-6d3c-4f43-8f4c-4f7b7cf4d2a1",
    }
    with fake_server(lambda request: Reply(409, answer)) as (url, seen), pytest.raises(Conflict) as raised:
        BrokerClient(url, "t").start("t", owner="o", purpose=PURPOSE, idempotency_key="build-42")
    assert not isinstance(raised.value, StartAnswerLost)
    assert [request.path for request in seen] == ["/task/start"]
