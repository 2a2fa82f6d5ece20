"""Logs: one JSON object a line with the request's id, route, status, task and workload; no secret."""

from __future__ import annotations

import io
import json
import logging

import pytest

from broker import logs
from tests.factories import AGENT, start_body


@pytest.fixture
def json_lines():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    logs.configure("INFO", "json", force=True)
    root.handlers[0].stream = stream  # type: ignore[attr-defined]
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_each_request_logs_one_json_line_with_its_id_route_status_task_and_workload(
    client, issuers, json_lines
):
    answer = client.post(
        "/task/start",
        json=start_body(),
        headers={**issuers["spire"].bearer(AGENT), "X-Request-Id": "req-42.a:b"},
    )
    assert answer.status_code == 201
    assert answer.headers["X-Request-Id"] == "req-42.a:b"
    task_id = answer.get_json()["task_id"]
    finish = client.post("/task/finish", json={"task_id": task_id}, headers=issuers["spire"].bearer(AGENT))
    generated = finish.headers["X-Request-Id"]
    assert len(generated) == 32  # none given: one is made

    lines = json_lines()
    access = [line for line in lines if line["logger"] == "broker.access"]
    assert [line["request_id"] for line in access] == ["req-42.a:b", generated]
    start, end = access
    assert start["route"] == "/task/start" and start["status"] == 201 and start["method"] == "POST"
    assert start["task_id"] == task_id and start["workload"] == AGENT
    assert end["route"] == "/task/finish" and end["task_id"] == task_id
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line)

    # No credential value appears in any line.
    password = answer.get_json()["credentials"]["db"]["data"]["password"]
    assert all(password not in json.dumps(line) for line in lines)


@pytest.mark.parametrize(
    "given", ["", "x" * 129, "has space", "new\nline", 'quote"d', "ünïcode", "a;b"], ids=repr
)
def test_a_request_id_that_is_not_a_plain_token_is_replaced(client, given):
    answer = client.get("/healthz", headers={"X-Request-Id": given} if "\n" not in given else {})
    assert answer.headers["X-Request-Id"] != given
    assert len(answer.headers["X-Request-Id"]) == 32


def test_text_is_the_default_format():
    from broker.config import Settings

    assert Settings.model_fields["log_format"].default == "text"
