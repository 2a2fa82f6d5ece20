"""`POST /task/start` with an Idempotency-Key (docs/api.md#idempotent-starts), against the
real Postgres and OpenBao: a retry never issues twice and never leaves a second live task.
Lost answers and parallel retries against a real `broker serve` are in
tests/faults/test_fault_idempotent_start.py.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from broker.policy.engine import TaskRequest
from broker.tasks.service import start_hash
from tests.factories import AGENT, OTHER_AGENT, start_body

OPEN = ("issuing", "pending_approval", "active")


def tasks(services: Any) -> list[dict[str, Any]]:
    with services.engine.connect() as connection:
        rows = connection.execute(text("SELECT * FROM tasks ORDER BY created_at")).all()
    return [dict(row._mapping) for row in rows]


def leases(services: Any) -> int:
    with services.engine.connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM leases")).scalar_one())


def start(client, issuers, key: str | None = "key-1", agent: str = AGENT, **body: Any):
    headers = issuers["spire"].bearer(agent)
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post("/task/start", json=start_body(**body), headers=headers)


def test_a_retry_of_an_active_start_names_the_task_and_issues_nothing(client, issuers, services):
    first = start(client, issuers)
    assert first.status_code == 201
    retry = start(client, issuers)
    assert retry.status_code == 409
    problem = retry.get_json()
    assert problem["code"] == "conflict"
    assert problem["task_id"] == first.get_json()["task_id"]
    assert problem["state"] == "active"
    assert "credentials" not in problem and "sent only once" in problem["detail"]
    assert len(tasks(services)) == 1 and leases(services) == 1


def test_the_body_counts_as_parsed_not_as_bytes(client, issuers, services):
    headers = {**issuers["spire"].bearer(AGENT), "Idempotency-Key": "k", "Content-Type": "application/json"}
    first = client.post(
        "/task/start",
        data='{"task":"analytics-read","owner":"alice@example.com","purpose":"weekly revenue report",'
        '"context":{"environment":"staging"}}',
        headers=headers,
    )
    assert first.status_code == 201
    respaced = '{ "context": {"environment": "staging"}, "purpose": "weekly revenue report",\n' \
        ' "owner": "alice@example.com", "task": "analytics-read" }'  # fmt: skip
    headers["Authorization"] = issuers["spire"].bearer(AGENT)["Authorization"]
    assert client.post("/task/start", data=respaced, headers=headers).status_code == 409


def test_the_same_key_with_another_request_is_refused(client, issuers, services):
    first = start(client, issuers).get_json()
    other = start(client, issuers, purpose="a different reason entirely")
    assert other.status_code == 422
    problem = other.get_json()
    assert problem["code"] == "idempotency_key_reused"
    assert problem["task_id"] == first["task_id"]
    assert "different request" in problem["detail"]
    assert start(client, issuers, task="everything").status_code == 422  # another task type too
    assert len(tasks(services)) == 1


def test_keys_are_per_workload(client, issuers, services):
    mine = start(client, issuers)
    theirs = start(client, issuers, agent=OTHER_AGENT)
    assert mine.status_code == theirs.status_code == 201
    assert mine.get_json()["task_id"] != theirs.get_json()["task_id"]


def test_without_a_key_every_start_is_a_new_task(client, issuers, services):
    assert start(client, issuers, key=None).status_code == 201
    assert start(client, issuers, key=None).status_code == 201
    assert len(tasks(services)) == 2


def test_a_retry_of_a_start_waiting_for_approval_gets_the_same_answer(client, issuers, services):
    body: dict[str, Any] = {"task": "deploy-prod", "context": {"environment": "prod"}}
    first = start(client, issuers, **body)
    assert first.status_code == 202
    retry = start(client, issuers, **body)
    assert retry.status_code == 202
    assert retry.get_json() == first.get_json()
    assert len(tasks(services)) == 1


def test_a_retry_after_the_task_ended_names_it_and_after_its_ttl_starts_anew(client, issuers, services):
    headers = issuers["spire"].bearer(AGENT)
    first = start(client, issuers, task="short", ttl_seconds=2).get_json()
    client.post("/task/finish", json={"task_id": first["task_id"]}, headers=headers)
    ended = start(client, issuers, task="short", ttl_seconds=2)
    assert ended.status_code == 409
    assert ended.get_json()["task_id"] == first["task_id"]
    assert ended.get_json()["state"] == "finished"

    time.sleep(2.2)  # the first task's TTL has passed: the key is free for a new task
    again = start(client, issuers, task="short", ttl_seconds=2)
    assert again.status_code == 201
    assert again.get_json()["task_id"] != first["task_id"]
    rows = {str(row["id"]): row for row in tasks(services)}
    assert rows[first["task_id"]]["idempotency_key"] is None  # released to the new task
    assert rows[again.get_json()["task_id"]]["idempotency_key"] == "key-1"


def test_a_denied_or_limited_start_is_not_remembered(client, issuers, services):
    denied = start(client, issuers, owner="mallory@evil.example")
    assert denied.status_code == 403
    assert start(client, issuers).status_code == 201  # same key, a request the policy allows


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("x" * 256, "too long"),
        ("", "empty"),
        ("caf\u00e9", "not ASCII"),
        ("tab\there", "a control character"),
        ("a, b", "two keys, as WSGI joins a repeated header"),
        ('"unterminated', "a broken quoted string"),
    ],
)
def test_a_key_that_is_not_short_printable_ascii_is_refused(client, issuers, services, key, why):
    headers = {**issuers["spire"].bearer(AGENT), "Idempotency-Key": key}
    answer = client.post("/task/start", json=start_body(), headers=headers)
    assert answer.status_code == 400, why
    assert answer.get_json()["code"] == "validation_error"
    assert "Idempotency-Key" in answer.get_json()["detail"]
    assert tasks(services) == []


def test_keys_as_structured_field_strings_and_at_the_limit(client, issuers, services):
    assert start(client, issuers, key='"quoted key"').status_code == 201
    assert start(client, issuers, key="quoted key").status_code == 409  # the same key, bare
    assert start(client, issuers, key="k" * 255, purpose="another weekly report").status_code == 201


def test_a_key_sent_twice_is_refused(client, issuers, services):
    headers = [*issuers["spire"].bearer(AGENT).items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    answer = client.post("/task/start", json=start_body(), headers=headers)
    assert answer.status_code == 400


def test_simultaneous_starts_with_one_key_make_one_task(app, issuers, services):
    answers: list[int] = []
    gate = threading.Barrier(6)

    def go() -> None:
        client = app.test_client()
        headers = {**issuers["spire"].bearer(AGENT), "Idempotency-Key": "together"}
        gate.wait()
        answers.append(client.post("/task/start", json=start_body(), headers=headers).status_code)

    threads = [threading.Thread(target=go) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == [201, 409, 409, 409, 409, 409]
    assert len(tasks(services)) == 1 and leases(services) == 1


def test_simultaneous_starts_of_two_task_types_with_one_key_make_one_task(app, issuers, services):
    # Different task types take different workload locks; the unique index decides.
    answers: list[int] = []
    gate = threading.Barrier(2)

    def go(task: str) -> None:
        client = app.test_client()
        headers = {**issuers["spire"].bearer(AGENT), "Idempotency-Key": "two-types"}
        gate.wait()
        answers.append(client.post("/task/start", json=start_body(task), headers=headers).status_code)

    threads = [threading.Thread(target=go, args=(task,)) for task in ("analytics-read", "everything")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 201 in answers and sorted(answers)[1] in (409, 422)
    assert len([row for row in tasks(services) if row["state"] in OPEN]) == 1


# Every field of the start body is in the retry hash: a field left out would let a retry with
# another owner, purpose, TTL or context be answered as the first start (issue 30).
_json_leaf = st.none() | st.booleans() | st.integers(-(2**31), 2**31) | st.text(max_size=8)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_requests = st.builds(
    TaskRequest,
    task=st.text(min_size=1, max_size=12),
    owner=st.text(min_size=1, max_size=12),
    purpose=st.text(max_size=12),
    ttl_seconds=st.none() | st.integers(1, 86400),
    context=st.dictionaries(st.text(max_size=6), _json, max_size=4),
)


@settings(max_examples=200, deadline=None)
@given(
    request=_requests,
    other=_requests,
    field=st.sampled_from(["task", "owner", "purpose", "ttl_seconds", "context"]),
)
def test_any_one_field_changed_is_another_request(
    request: TaskRequest, other: TaskRequest, field: str
) -> None:
    changed = replace(request, **{field: getattr(other, field)})
    assume(getattr(changed, field) != getattr(request, field))
    assert start_hash(changed) != start_hash(request)


def _reordered(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _reordered(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [_reordered(item) for item in value]
    return value


@settings(max_examples=100, deadline=None)
@given(request=_requests)
def test_keys_reordered_at_any_depth_are_the_same_request(request: TaskRequest) -> None:
    assert start_hash(replace(request, context=_reordered(dict(request.context)))) == start_hash(request)


@pytest.mark.parametrize(
    "change",
    [
        {"task": "everything"},
        {"owner": "bob@example.com"},
        {"purpose": "another weekly report"},
        {"ttl_seconds": 600},
        {"context": {"environment": "staging"}},
        {"context": {"environment": "staging", "ticket": {"id": 8, "tags": ["a"]}}},
    ],
    ids=["task", "owner", "purpose", "ttl_seconds", "context", "context-nested"],
)
def test_a_retry_with_one_field_changed_is_refused(client, issuers, services, change: dict[str, Any]) -> None:
    # The first start carries a nested context, so the last change differs only deep inside it.
    first_body: dict[str, Any] = {"context": {"environment": "staging", "ticket": {"id": 7, "tags": ["a"]}}}
    assert start(client, issuers, **first_body).status_code == 201
    retry = start(client, issuers, **{**first_body, **change})
    assert retry.status_code == 422
    assert retry.get_json()["code"] == "idempotency_key_reused"
    assert len(tasks(services)) == 1
