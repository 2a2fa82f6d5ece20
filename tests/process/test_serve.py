"""`broker serve` as a real process: readiness, policy reload on SIGHUP, metrics."""

from __future__ import annotations

import signal
import time

import pytest
import requests

from tests.factories import AGENT, start_body

pytestmark = pytest.mark.slow


def start_status(served, issuers, owner="alice@example.com"):
    response = requests.post(
        f"{served.url}/task/start", json=start_body(owner=owner), headers=issuers["spire"].bearer(AGENT), timeout=30
    )
    return response.status_code


def eventually(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_serve_is_ready_and_issues(served, issuers):
    assert requests.get(f"{served.url}/healthz", timeout=5).json() == {"status": "ok"}
    assert requests.get(f"{served.url}/readyz", timeout=5).status_code == 200
    assert start_status(served, issuers) == 201
    metrics = requests.get(f"{served.url}/metrics", timeout=5).text
    assert "broker_tasks_started_total" in metrics


def test_sighup_reloads_the_policy_in_every_worker_and_keeps_it_on_a_bad_file(served, issuers, policy_file):
    assert start_status(served, issuers, owner="bob@partner.example") == 403
    text = policy_file.read_text()
    policy_file.write_text(text.replace('owners: ["*@example.com"]', 'owners: ["*@example.com", "*@partner.example"]', 1))
    served.send_signal(signal.SIGHUP)
    # Several requests, so both workers have answered under the new policy.
    assert eventually(lambda: all(start_status(served, issuers, "bob@partner.example") in (201, 429) for _ in range(4)))

    policy_file.write_text("tasks: {broken: [")
    served.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert start_status(served, issuers, "bob@partner.example") in (201, 429)  # the last good policy stays
    assert requests.get(f"{served.url}/readyz", timeout=5).status_code == 200
