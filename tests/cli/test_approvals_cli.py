"""`broker approvals …` against a real broker over HTTP: what an approver does from a terminal."""

from __future__ import annotations

import json
import threading

import pytest
from click.testing import CliRunner
from werkzeug.serving import make_server

from broker.cli.main import main
from tests.factories import AGENT, start_body


@pytest.fixture
def broker_url(app):
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def _pending(client, issuers, purpose="release 1.4 to production"):
    body = start_body("deploy-prod", purpose=purpose, context={"environment": "prod"})
    answer = client.post("/task/start", json=body, headers=issuers["spire"].bearer(AGENT))
    assert answer.status_code == 202
    return answer.get_json()["task_id"]


def _cli(url, token, *args):
    return CliRunner().invoke(main, ["approvals", *args, "--url", url, "--token", token])


def _approver_token(issuers):
    return issuers["sso"].mint(
        "dba-dana@example.com", groups=["dba"], extra_claims={"email": "dba-dana@example.com"}
    )


def test_list_show_and_approve_then_the_workload_claims(client, issuers, broker_url):
    task_id = _pending(client, issuers)
    token = _approver_token(issuers)

    listed = _cli(broker_url, token, "list")
    assert listed.exit_code == 0, listed.output
    assert task_id in listed.output and "release 1.4 to production" in listed.output

    shown = _cli(broker_url, token, "show", task_id)
    assert shown.exit_code == 0, shown.output
    request = json.loads(shown.output)
    assert request["owner"] == "alice@example.com" and request["context"] == {"environment": "prod"}

    approved = _cli(broker_url, token, "approve", task_id, "--reason", "CHG-42 approved in CAB")
    assert approved.exit_code == 0, approved.output
    claim = client.post("/task/claim", json={"task_id": task_id}, headers=issuers["spire"].bearer(AGENT))
    assert claim.status_code == 200 and "db" in claim.get_json()["credentials"]

    again = _cli(broker_url, token, "list", "--json")
    assert task_id not in again.output


def test_deny_ends_the_task_and_the_reason_is_required(client, issuers, broker_url):
    task_id = _pending(client, issuers)
    token = _approver_token(issuers)
    assert _cli(broker_url, token, "deny", task_id).exit_code == 2  # --reason missing: usage error
    denied = _cli(broker_url, token, "deny", task_id, "--reason", "no change ticket")
    assert denied.exit_code == 0, denied.output
    assert "denied" in denied.output
    operator = issuers["sso"].bearer("sre-sam@example.com", groups=["sre"])
    assert client.get(f"/task/{task_id}", headers=operator).get_json()["state"] == "denied"


def test_an_approver_outside_the_group_is_refused_with_the_problem_code(client, issuers, broker_url):
    task_id = _pending(client, issuers)
    token = issuers["sso"].mint(
        "dev-dave@example.com", groups=["dev"], extra_claims={"email": "dev-dave@example.com"}
    )
    refused = _cli(broker_url, token, "approve", task_id, "--reason", "looks fine to me")
    assert refused.exit_code == 1
    assert "HTTP 403" in refused.output
    shown = _cli(broker_url, token, "show", task_id)
    assert shown.exit_code == 1 and "not waiting for you" in shown.output
