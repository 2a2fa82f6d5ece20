"""`broker leases list` against a real broker over HTTP: purpose and time left, and a live --watch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner
from werkzeug.serving import make_server

from broker.cli.main import main
from broker.cli.ops import _with_time_left
from tests.factories import AGENT, start_body
from tests.support.broker_procs import interruptible


@pytest.fixture
def broker_url(app):
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def _operator(issuers):
    return issuers["sso"].mint("sre-sam@example.com", groups=["sre"])


def test_the_table_shows_purpose_and_time_left(client, issuers, broker_url):
    started = client.post(
        "/task/start",
        json=start_body(purpose="weekly revenue report"),
        headers=issuers["spire"].bearer(AGENT),
    ).get_json()
    result = CliRunner().invoke(
        main, ["leases", "list", "--state", "active", "--url", broker_url, "--token", _operator(issuers)]
    )
    assert result.exit_code == 0, result.output
    header, row = result.output.splitlines()[:2]
    assert header.split() == ["ID", "STATE", "TASK", "NAME", "WORKLOAD", "OWNER", "PURPOSE", "TIME_LEFT"]
    assert started["leases"][0]["id"] in row and "weekly revenue report" in row
    minutes = int(row.split()[-1].split("m")[0])
    assert 0 <= minutes <= 5  # the demo task's 300 s default


@pytest.mark.parametrize(
    ("lease", "shown"),
    [
        ({"state": "active", "expires_at": "2026-12-04T10:01:05.000+00:00"}, "1m05s"),
        ({"state": "active", "expires_at": "2026-12-04T09:59:59.000+00:00"}, "expired"),
        ({"state": "revoked", "expires_at": "2026-12-04T10:05:00.000+00:00"}, "-"),
        ({"state": "revoke_pending", "expires_at": "2026-12-04T10:05:00.000+00:00"}, "-"),
    ],
)
def test_time_left_is_shown_only_for_active_leases(lease, shown):
    now = datetime(2026, 12, 4, 10, 0, 0, tzinfo=UTC)
    assert _with_time_left(lease, now)["time_left"] == shown


def test_a_long_purpose_is_cut_in_the_table_only():
    row = _with_time_left({"state": "revoked", "purpose": "x" * 100})
    assert len(row["purpose"]) == 40 and row["purpose"].endswith("…")


def test_watch_redraws_until_interrupted(client, issuers, broker_url):
    watcher = interruptible(
        [sys.executable, "-m", "broker", "leases", "list", "--state", "active", "--watch", "--interval", "0.5",
         "--url", broker_url, "--token", _operator(issuers)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "TERM": "dumb"},
    )  # fmt: skip
    seen: list[str] = []
    output = watcher.stdout
    assert output is not None
    reader = threading.Thread(target=lambda: seen.extend(iter(output.readline, "")), daemon=True)
    reader.start()

    def shown(text: str, times: int = 1) -> bool:
        deadline = time.monotonic() + 30
        while "".join(seen).count(text) < times:
            if time.monotonic() > deadline or watcher.poll() is not None:
                return False
            time.sleep(0.1)
        return True

    try:
        assert shown("(Ctrl-C stops)")  # the first frame is up
        client.post(
            "/task/start",
            json=start_body(purpose="appears while watching"),
            headers=issuers["spire"].bearer(AGENT),
        )
        assert shown("appears while watching")  # a later frame has it
        frames = "".join(seen).count("(Ctrl-C stops)")
        assert shown("(Ctrl-C stops)", frames + 1)  # and it keeps redrawing
    finally:
        watcher.send_signal(signal.SIGINT)
        _, err = watcher.communicate(timeout=10)
    assert watcher.returncode == 0, err
