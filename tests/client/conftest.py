"""A real `broker serve` (with its scheduler) for the client tests, one per test module.

Module-scoped rather than per test: starting gunicorn costs seconds, and the client tests
only talk HTTP. Each test acts as a workload of its own (`workload` fixture), so the test
policy's per-workload limits never carry over from one test to the next.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.conftest import TEST_POLICY, broker_config
from tests.support.broker_procs import BrokerProcess
from tests.support.tokens import TestIssuer

APPROVER = "dba-dana@example.com"
# Added to the shared test policy: the CI issuer's counterpart of deploy-prod.
CI_TASKS = {
    "ci-deploy": {
        "description": "A CI job's deploy, approved by a DBA",
        "ttl": {"default": 120, "max": 600},
        "workloads": [{"issuer": "ci", "subject": "repo:acme/app:**", "claims": {"ref": "refs/heads/main"}}],
        "owners": ["*@example.com"],
        "approval": {"approvers": {"groups": ["dba"]}, "min_approvals": 1, "expires_in": 600},
        "credentials": {"db": {"kind": "database", "mount": "database", "role": "analytics-ro"}},
    }
}


@pytest.fixture(scope="module")
def broker(
    stack: Any, issuers: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerProcess]:
    directory = tmp_path_factory.mktemp("client-broker")
    policy = directory / "policy.yaml"
    document = yaml.safe_load(TEST_POLICY.read_text())
    document["tasks"].update(CI_TASKS)
    policy.write_text(yaml.safe_dump(document))
    config = directory / "broker.yaml"
    config.write_text(yaml.safe_dump(broker_config(stack, issuers, policy)))
    process = BrokerProcess.serve(config, directory / "broker.log", workers=1, threads=4)
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()


@pytest.fixture
def workload(issuers: dict[str, TestIssuer]) -> str:
    """A SPIFFE ID of this test's own, allowed by the test policy's `agents/*` matchers."""
    return issuers["spire"].spiffe_id(f"agents/client-{uuid.uuid4().hex[:10]}")


@pytest.fixture
def agent_token(issuers: dict[str, Any], workload: str) -> str:
    return str(issuers["spire"].mint(workload, exp_in=600))


def operator_task(broker: BrokerProcess, issuers: dict[str, Any], task_id: str) -> dict[str, Any]:
    """The task as an operator sees it (outcome, lease states), never secret values."""
    headers = issuers["sso"].bearer("sre-sam@example.com", groups=["sre"])
    response = requests.get(f"{broker.url}/task/{task_id}", headers=headers, timeout=10)
    response.raise_for_status()
    return dict(response.json())


def approve(broker: BrokerProcess, issuers: dict[str, Any], task_id: str, decision: str = "approve") -> None:
    headers = issuers["sso"].bearer(APPROVER, groups=["dba"])
    body = {"decision": decision, "reason": "change ticket CHG-42"}
    response = requests.post(f"{broker.url}/approvals/{task_id}", json=body, headers=headers, timeout=10)
    assert response.status_code == 200, response.text


def approve_in_background(broker: BrokerProcess, issuers: dict[str, Any], purpose: str) -> threading.Thread:
    """A DBA who approves the pending task with this purpose as soon as it shows up."""

    def approver() -> None:
        headers = issuers["sso"].bearer("dba-dana@example.com", groups=["dba"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            items = requests.get(f"{broker.url}/approvals", headers=headers, timeout=10).json()["items"]
            mine = [item["task_id"] for item in items if item["purpose"] == purpose]
            if mine:
                approve(broker, issuers, mine[0])
                return
            time.sleep(0.3)

    thread = threading.Thread(target=approver, daemon=True)
    thread.start()
    return thread


def write_token(path: Path, token: str) -> Path:
    path.write_text(token)
    return path
