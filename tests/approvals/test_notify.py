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


def test_an_approval_request_is_sent_signed_with_the_request_data(stack, issuers, policy_file, clean_db, webhook, monkeypatch):
    from broker.app import create_app
    from broker.services import build_services

    url, received = webhook
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", "s3cret")
    config = broker_config(stack, issuers, policy_file, notify={"webhook_url": url, "secret_env": "TEST_WEBHOOK_SECRET"})
    services = build_services(settings_from_mapping(config, env={}))
    client = create_app(services=services).test_client()
    body = start_body("deploy-prod", purpose="release 1.4 to production", context={"environment": "prod"})
    task_id = client.post("/task/start", json=body, headers=issuers["spire"].bearer(AGENT)).get_json()["task_id"]
    services.notifier.drain()
    services.close()

    [(headers, raw)] = received
    event = json.loads(raw)
    assert event["event"] == "approval.requested"
    assert event["task_id"] == task_id
    assert event["purpose"] == "release 1.4 to production" and event["owner"] == "alice@example.com"
    assert event["workload"] == AGENT and event["context"] == {"environment": "prod"}
    assert headers["X-Broker-Signature"] == sign(b"s3cret", raw)
