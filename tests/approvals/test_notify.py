"""Approvers are told, by a signed webhook, that a task waits for them."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from broker.approvals.notify import sign
from broker.config import settings_from_mapping
from tests.conftest import broker_config
from tests.factories import AGENT, start_body


@pytest.fixture
def webhook():
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()
    server.server_close()


def test_an_approval_request_is_sent_signed_with_the_request_data(
    stack, issuers, policy_file, clean_db, webhook
):
    from broker.app import create_app
    from broker.services import build_services

    url, received = webhook
    config = broker_config(
        stack, issuers, policy_file, notify={"webhook_url": url, "secret_env": "TEST_WEBHOOK_SECRET"}
    )
    services = build_services(settings_from_mapping(config, env={"TEST_WEBHOOK_SECRET": "s3cret"}))
    client = create_app(services=services).test_client()
    body = start_body("deploy-prod", purpose="release 1.4 to production", context={"environment": "prod"})
    task_id = client.post("/task/start", json=body, headers=issuers["spire"].bearer(AGENT)).get_json()[
        "task_id"
    ]
    services.notifier.drain()
    services.close()

    [(headers, raw)] = received
    event = json.loads(raw)
    assert event["event"] == "approval.requested"
    assert event["task_id"] == task_id
    assert event["purpose"] == "release 1.4 to production" and event["owner"] == "alice@example.com"
    assert event["workload"] == AGENT and event["context"] == {"environment": "prod"}
    assert headers["X-Broker-Signature"] == sign(b"s3cret", raw)


def _start_with_notify(stack, issuers, policy_file, url, **notify):
    from broker.app import create_app
    from broker.services import build_services

    config = broker_config(stack, issuers, policy_file, notify={"webhook_url": url, **notify})
    services = build_services(settings_from_mapping(config, env={}))
    client = create_app(services=services).test_client()
    hostile = "release <!channel> <https://evil.example|approve me> [click](https://evil.example) *now*"
    body = start_body("deploy-prod", purpose=hostile, context={"environment": "prod"})
    answer = client.post("/task/start", json=body, headers=issuers["spire"].bearer(AGENT))
    services.notifier.drain()
    services.close()
    return answer, answer.get_json()["task_id"], hostile


def test_slack_gets_the_full_request_a_review_link_and_escaped_text(
    stack, issuers, policy_file, clean_db, webhook
):
    url, received = webhook
    answer, task_id, _ = _start_with_notify(
        stack, issuers, policy_file, url, format="slack", console_url="https://broker.example.com"
    )
    assert answer.status_code == 202
    [(headers, raw)] = received
    message = json.loads(raw)
    text = json.dumps(message)
    assert "<!channel>" not in text and "<https://evil" not in text  # no ping, no disguised link
    section = message["blocks"][1]["text"]["text"]
    for fact in (
        "*Owner:* alice@example.com",
        "*Workload:* " + AGENT,
        '"environment": "prod"',
        "db (database)",
        "dba",
    ):
        assert fact in section
    assert "&lt;!channel&gt;" in section
    [button] = message["blocks"][2]["elements"]
    assert button["url"] == f"https://broker.example.com/console/approvals/{task_id}"
    assert "X-Broker-Signature" not in headers  # no secret configured


def test_teams_gets_an_adaptive_card_with_the_request_and_a_review_action(
    stack, issuers, policy_file, clean_db, webhook
):
    url, received = webhook
    _, task_id, _ = _start_with_notify(
        stack, issuers, policy_file, url, format="teams", console_url="https://broker.example.com/"
    )
    [(_, raw)] = received
    message = json.loads(raw)
    assert message["type"] == "message"
    [attachment] = message["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    facts = {fact["title"]: fact["value"] for fact in card["body"][1]["facts"]}
    assert facts["Owner"] == "alice@example.com" and facts["Task id"] == task_id
    assert "[click](https" not in facts["Purpose"] and "\\[click\\]" in facts["Purpose"]
    assert card["actions"] == [
        {
            "type": "Action.OpenUrl",
            "title": "Review",
            "url": f"https://broker.example.com/console/approvals/{task_id}",
        }
    ]


def test_a_failing_receiver_is_retried_with_backoff_and_never_blocks_a_start(
    stack, issuers, policy_file, clean_db
):
    from broker.app import create_app
    from broker.services import build_services

    attempts = []

    class Flaky(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            attempts.append(1)
            self.send_response(503 if len(attempts) < 3 else 204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = broker_config(
            stack,
            issuers,
            policy_file,
            notify={
                "webhook_url": f"http://127.0.0.1:{server.server_port}/",
                "retries": 3,
                "retry_base_seconds": 0.05,
            },
        )
        services = build_services(settings_from_mapping(config, env={}))
        client = create_app(services=services).test_client()
        body = start_body("deploy-prod", purpose="release 1.4 to production", context={"environment": "prod"})
        assert (
            client.post("/task/start", json=body, headers=issuers["spire"].bearer(AGENT)).status_code == 202
        )
        services.notifier.drain()
        services.close()
    finally:
        server.shutdown()
        server.server_close()
    assert len(attempts) == 3  # two 503s, then delivered


def test_a_dead_receiver_does_not_fail_the_start(stack, issuers, policy_file, clean_db):
    from broker.app import create_app
    from broker.dev.stack.postgres import free_port
    from broker.services import build_services

    config = broker_config(
        stack,
        issuers,
        policy_file,
        notify={"webhook_url": f"http://127.0.0.1:{free_port()}/", "retries": 1, "retry_base_seconds": 0.05},
    )
    services = build_services(settings_from_mapping(config, env={}))
    client = create_app(services=services).test_client()
    body = start_body("deploy-prod", purpose="release 1.4 to production", context={"environment": "prod"})
    assert client.post("/task/start", json=body, headers=issuers["spire"].bearer(AGENT)).status_code == 202
    services.notifier.drain()
    services.close()


def test_a_receiver_that_never_answers_in_time_does_not_slow_the_start(stack, issuers, policy_file, clean_db):
    import time

    from broker.app import create_app
    from broker.services import build_services

    release = threading.Event()

    class Stuck(BaseHTTPRequestHandler):
        def do_POST(self):
            release.wait(10)  # answers only when the test is done, far past the timeout

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Stuck)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = broker_config(
            stack,
            issuers,
            policy_file,
            notify={
                "webhook_url": f"http://127.0.0.1:{server.server_port}/",
                "timeout_seconds": 5,
                "retries": 0,
            },
        )
        services = build_services(settings_from_mapping(config, env={}))
        client = create_app(services=services).test_client()
        body = start_body("deploy-prod", purpose="release 1.4 to production", context={"environment": "prod"})
        started = time.monotonic()
        answer = client.post("/task/start", json=body, headers=issuers["spire"].bearer(AGENT))
        took = time.monotonic() - started
        assert answer.status_code == 202
        assert took < 4  # the start did not wait for the receiver's 5 s timeout
        services.close()
    finally:
        release.set()
        server.shutdown()
        server.server_close()
