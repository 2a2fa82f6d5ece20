"""`broker locks add|list|remove` and `broker leases kill --lock` against a real broker over HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from werkzeug.serving import make_server

from broker.cli.main import main
from tests.factories import AGENT, start_task, started_task


@pytest.fixture
def broker_url(app: Any) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def run(broker_url: str, issuers: Any, *args: str) -> Any:
    token = issuers["sso"].mint("sre-sam@example.com", groups=["sre"])
    return CliRunner().invoke(main, [*args, "--url", broker_url, "--token", token])


def test_add_list_remove(client, issuers, broker_url):
    started_task(client, issuers)
    added = run(broker_url, issuers, "locks", "add", "--workload", AGENT, "--reason", "INC-24 compromised")
    assert added.exit_code == 0, added.output
    lock_id = added.output.split()[1]
    assert "1 task(s) ended" in added.output
    assert start_task(client, issuers).status_code == 403
    listed = run(broker_url, issuers, "locks", "list", "--json")
    assert listed.exit_code == 0 and lock_id in listed.output
    removed = run(broker_url, issuers, "locks", "remove", lock_id)
    assert removed.exit_code == 0 and "removed" in removed.output
    assert start_task(client, issuers).status_code == 201


def test_a_lock_without_a_target_is_a_usage_error(broker_url, issuers):
    assert run(broker_url, issuers, "locks", "add", "--reason", "nothing").exit_code == 2


def test_kill_with_lock(client, issuers, broker_url):
    started_task(client, issuers)
    result = run(broker_url, issuers, "leases", "kill", "--workload", AGENT, "--reason", "INC-24", "--lock")
    assert result.exit_code == 0, result.output
    assert "1 task(s) ended; 1 lease(s) being revoked by the scheduler" in result.output
    assert "lock " in result.output and start_task(client, issuers).status_code == 403
