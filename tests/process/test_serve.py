"""`broker serve` as a real process: readiness, policy reload on SIGHUP, metrics, its scheduler."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import requests

from tests.factories import AGENT, can_log_in, start_body
from tests.support.broker_procs import descendants_of

pytestmark = pytest.mark.slow


def start_status(served, issuers, owner="alice@example.com"):
    response = requests.post(
        f"{served.url}/task/start",
        json=start_body(owner=owner),
        headers=issuers["spire"].bearer(AGENT),
        timeout=30,
    )
    return response.status_code


def eventually(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def scheduler_pids(served):
    found = set()
    for pid in descendants_of(served.pid):
        with contextlib.suppress(OSError):  # gone meanwhile
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[1:4] == [b"-m", b"broker", b"scheduler"]:
                found.add(pid)
    return found


def test_serve_is_ready_and_issues(served, issuers):
    assert requests.get(f"{served.url}/healthz", timeout=5).json() == {"status": "ok"}
    assert requests.get(f"{served.url}/readyz", timeout=5).status_code == 200
    assert start_status(served, issuers) == 201
    metrics = requests.get(f"{served.url}/metrics", timeout=5).text
    assert "broker_tasks_started_total" in metrics


def test_a_client_connection_is_kept_alive_across_a_task(served, issuers):
    # Agents and load balancers reuse connections; closing each one after its answer
    # costs them a handshake per request (and the workers an accept for each).
    host, port = served.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {**issuers["spire"].bearer(AGENT), "Content-Type": "application/json"}
    try:
        connection.request("POST", "/task/start", body=json.dumps(start_body()), headers=headers)
        started = connection.getresponse()
        body = json.loads(started.read())
        assert started.status == 201 and started.getheader("Connection", "").lower() != "close"
        socket_used = connection.sock
        connection.request(
            "POST", "/task/finish", body=json.dumps({"task_id": body["task_id"]}), headers=headers
        )
        finished = connection.getresponse()
        assert finished.status == 200 and json.loads(finished.read())["state"] == "finished"
        assert connection.sock is socket_used  # the same TCP connection carried both
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"GET /leases?workload=" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
        (b"POST /task/start HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, "bad_request"),
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n",
            431,
            "headers_too_large",
        ),
    ],
    ids=["uri-too-long", "bad-content-length", "header-too-large"],
)
def test_what_the_http_server_refuses_is_problem_json_too(served, raw, status, code):
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(raw)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].startswith(f"HTTP/1.1 {status} ".encode())
    assert b"content-type: application/problem+json" in head.lower()
    problem = json.loads(body)
    assert (problem["status"], problem["code"]) == (status, code)
    assert b"aaaa" not in body and b"bbbb" not in body  # the client's bytes are not echoed


CHUNKED_START = (
    b"POST /task/start HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\nAuthorization: Bearer %s\r\n\r\n"
)


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\n{}\r\n0\r\n\r\n",  # a chunk size that is not hex
        b"2\r\n{}XX0\r\n\r\n",  # no CRLF after the chunk's data
        b'40\r\n{"task": ',  # the chunk ends before its size, then the client stops sending
        b"2;\x01junk\r\n{}\r\n0\r\n\r\n",  # a chunk extension with a control byte
        b'2;a="open\r\n{}\r\n0\r\n\r\n',  # an unterminated quoted chunk extension
    ],
    ids=["bad-size", "missing-crlf", "truncated", "extension-junk", "extension-open-quote"],
)
def test_a_malformed_chunked_body_is_a_400_problem(served, issuers, body):
    token = issuers["spire"].bearer(AGENT)["Authorization"].split()[1].encode()
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(CHUNKED_START % token + body)
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 400 BAD REQUEST", answer[:300]
    assert b"content-type: application/problem+json" in head.lower()
    problem = json.loads(rest)
    assert (problem["status"], problem["code"]) == (400, "bad_request")
    assert b"Traceback" not in rest and b"junk" not in rest and b"open" not in rest
    # Where the next request would start is unknown: the connection is not reused.
    assert b"connection: close" in head.lower()


def test_sighup_reloads_the_policy_in_every_worker_and_keeps_it_on_a_bad_file(served, issuers, policy_file):
    assert start_status(served, issuers, owner="bob@partner.example") == 403
    text = policy_file.read_text()
    policy_file.write_text(
        text.replace('owners: ["*@example.com"]', 'owners: ["*@example.com", "*@partner.example"]', 1)
    )
    served.send_signal(signal.SIGHUP)
    # Several requests, so both workers have answered under the new policy.
    assert eventually(
        lambda: all(start_status(served, issuers, "bob@partner.example") in (201, 429) for _ in range(4))
    )

    policy_file.write_text("tasks: {broken: [")
    served.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert start_status(served, issuers, "bob@partner.example") in (201, 429)  # the last good policy stays
    assert requests.get(f"{served.url}/readyz", timeout=5).status_code == 200


def test_broker_reload_signals_this_master_through_its_pid_file(served, issuers, policy_file):
    import subprocess
    import sys

    from broker.server import default_pid_file

    port = served.url.rsplit(":", 1)[1]
    pid_file = default_pid_file(f"127.0.0.1:{port}")
    assert eventually(pid_file.exists) and pid_file.read_text().strip() == str(served.pid)
    assert start_status(served, issuers, owner="bob@partner.example") == 403
    text = policy_file.read_text()
    policy_file.write_text(
        text.replace('owners: ["*@example.com"]', 'owners: ["*@example.com", "*@partner.example"]', 1)
    )
    reload = subprocess.run(
        [sys.executable, "-m", "broker", "reload", "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert reload.returncode == 0, reload.stderr
    assert f"pid {served.pid}" in reload.stdout
    assert eventually(
        lambda: all(start_status(served, issuers, "bob@partner.example") in (201, 429) for _ in range(4))
    )


def test_the_operator_cli_lists_and_revokes_over_rest(served, issuers):
    from click.testing import CliRunner

    from broker.cli.main import main

    started = requests.post(
        f"{served.url}/task/start", json=start_body(), headers=issuers["spire"].bearer(AGENT), timeout=30
    ).json()
    lease_id = started["leases"][0]["id"]
    env = {
        "BROKER_URL": served.url,
        "BROKER_TOKEN": issuers["sso"].mint("sre-sam@example.com", groups=["sre"]),
    }
    runner = CliRunner()
    listed = runner.invoke(main, ["leases", "list", "--state", "active"], env=env)
    assert listed.exit_code == 0, listed.output
    assert lease_id in listed.output and "alice@example.com" in listed.output
    revoked = runner.invoke(main, ["leases", "revoke", lease_id, "--reason", "INC-1 test"], env=env)
    assert revoked.exit_code == 0, revoked.output
    assert f"{lease_id}: revoked" in revoked.output
    killed = runner.invoke(
        main, ["leases", "kill", "--owner", "nobody@example.com", "--reason", "drill"], env=env
    )
    assert killed.exit_code == 0 and "0 task(s) ended" in killed.output
    denied = runner.invoke(
        main, ["leases", "list"], env={**env, "BROKER_TOKEN": issuers["spire"].mint(AGENT)}
    )
    assert denied.exit_code == 1 and "HTTP 403 forbidden" in denied.output


def test_the_master_restarts_a_scheduler_that_died_and_deadlines_are_kept(served, issuers, stack):
    [killed] = scheduler_pids(served)
    os.kill(killed, signal.SIGKILL)

    def replaced():
        pids = scheduler_pids(served)
        return len(pids) == 1 and killed not in pids

    assert eventually(replaced, timeout=60), "no new scheduler after the first one was killed"

    headers = issuers["spire"].bearer(AGENT)
    response = requests.post(
        f"{served.url}/task/start", json=start_body("short"), headers=headers, timeout=30
    )
    assert response.status_code == 201, response.text
    started = response.json()
    creds = started["credentials"]["db"]["data"]
    assert can_log_in(stack, creds)

    def task():
        return requests.get(f"{served.url}/task/{started['task_id']}", headers=headers, timeout=30).json()

    assert eventually(lambda: task()["state"] == "expired", timeout=60), task()
    [lease] = task()["leases"]
    assert lease["state"] == "revoked"
    assert not can_log_in(stack, creds)
