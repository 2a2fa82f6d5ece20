"""`broker mcp` end to end: the SDK's stdio client, a real broker, OpenBao and Postgres."""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import anyio
import pytest
import requests

from broker.mcp.redact import encodings
from tests.factories import can_log_in
from tests.mcp.conftest import McpRun, Workload, mcp_server

pytestmark = pytest.mark.slow

START = {"task": "analytics-read", "owner": "alice@example.com", "purpose": "weekly revenue report"}
STAGING = {**START, "context": {"environment": "staging"}}
# Reads the analytics database with the issued credentials, and hands them to the test (not
# to the model) through a file, so the test can check afterwards that they are dead.
READ_DB = """
import json, os, sys, psycopg
user, password = os.environ["DB_USERNAME"], os.environ["DB_PASSWORD"]
dsn = f"postgresql://{user}:{password}@127.0.0.1:{sys.argv[1]}/analytics"
with psycopg.connect(dsn, connect_timeout=5) as conn:
    count = conn.execute("SELECT count(*) FROM analytics.events").fetchone()[0]
print("events:", count, "task:", os.environ["BROKER_TASK_ID"])
print("token in env:", "BROKER_WORKLOAD_TOKEN" in os.environ)
with open(sys.argv[2], "w") as handout:
    json.dump({"username": user, "password": password}, handout)
"""
PRINT_PASSWORD = """
import base64, os, sys, urllib.parse
user, password = os.environ["DB_USERNAME"], os.environ["DB_PASSWORD"]
raw = password.encode()
print("raw", password)
print("b64", base64.b64encode(raw).decode())
print("b64url", base64.urlsafe_b64encode(raw).decode().rstrip("="))
print("url", urllib.parse.quote(password, safe=""))
print("dsn", "postgresql://" + urllib.parse.quote(user) + ":" + urllib.parse.quote(password) + "@db/x")
print("hex", raw.hex())
print("basic", base64.b64encode(f"{user}:{password}".encode()).decode())
print("stderr", password, file=sys.stderr)
"""


def run_db_read(workload_task: str, handout: Path, stack: Any) -> dict[str, Any]:
    return {
        "task_id": workload_task,
        "command": [sys.executable, "-c", READ_DB, str(stack.postgres.port), str(handout)],
    }


def test_the_tools_and_their_input_schemas(workload: Workload, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with mcp_server(workload, tmp_path / "mcp.log") as run:
            tools = {tool.name: tool for tool in (await run.session.list_tools()).tools}
            assert set(tools) == {
                "list_task_types",
                "start_task",
                "task_status",
                "run_with_credentials",
                "finish_task",
            }
            schema = {name: tool.input_schema for name, tool in tools.items()}
            assert schema["list_task_types"]["properties"] == {}
            assert set(schema["start_task"]["required"]) == {"task", "owner", "purpose"}
            assert set(schema["start_task"]["properties"]) == {
                "task",
                "owner",
                "purpose",
                "context",
                "ttl_seconds",
            }
            assert schema["start_task"]["properties"]["purpose"]["minLength"] == 8
            assert schema["task_status"]["required"] == ["task_id"]
            run_schema = schema["run_with_credentials"]
            assert set(run_schema["required"]) == {"task_id", "command"}
            assert run_schema["properties"]["command"]["type"] == "array"
            assert run_schema["properties"]["command"]["items"] == {"type": "string"}
            assert run_schema["properties"]["timeout_seconds"]["maximum"] == 3600
            assert schema["finish_task"]["properties"]["outcome"]["enum"] == [
                "succeeded",
                "failed",
                "cancelled",
            ]
            assert not any("approve" in name for name in tools)

            listed = await run.ok("list_task_types")
            names = [item["name"] for item in listed["items"]]
            assert "analytics-read" in names and "deploy-prod" in names

    anyio.run(scenario)


def test_start_run_finish_and_the_credentials_die(workload: Workload, tmp_path: Path, stack: Any) -> None:
    handout = tmp_path / "handout.json"

    async def scenario() -> None:
        async with mcp_server(workload, tmp_path / "mcp.log") as run:
            started = await run.ok("start_task", STAGING)
            assert started["state"] == "active"
            assert started["credentials"] == [
                {
                    "name": "db",
                    "kind": "database",
                    "state": "active",
                    "expires_at": started["credentials"][0]["expires_at"],
                }
            ]
            task_id = started["task_id"]
            ran = await run.ok("run_with_credentials", run_db_read(task_id, handout, stack))
            assert ran["exit_status"] == 0, ran
            assert f"task: {task_id}" in ran["stdout"]
            assert "events: " in ran["stdout"]
            assert "token in env: False" in ran["stdout"]
            creds = json.loads(handout.read_text())
            assert can_log_in(stack, creds)

            finished = await run.ok("finish_task", {"task_id": task_id})
            assert finished["state"] == "finished"
            assert {item["state"] for item in finished["credentials"]} == {"revoked"}
            assert not can_log_in(stack, creds)
            again = await run.call("run_with_credentials", run_db_read(task_id, handout, stack))
            assert again.is_error
            assert "not_active" in again.content[0].text

    anyio.run(scenario)


def test_printed_secrets_are_redacted_in_every_encoding(
    workload: Workload, tmp_path: Path, stack: Any
) -> None:
    handout = tmp_path / "handout.json"

    async def scenario() -> None:
        async with mcp_server(workload, tmp_path / "mcp.log") as run:
            task_id = (await run.ok("start_task", STAGING))["task_id"]
            await run.ok("run_with_credentials", run_db_read(task_id, handout, stack))
            password = json.loads(handout.read_text())["password"]
            username = json.loads(handout.read_text())["username"]
            printed = await run.ok(
                "run_with_credentials",
                {"task_id": task_id, "command": [sys.executable, "-c", PRINT_PASSWORD]},
            )
            assert printed["exit_status"] == 0
            lines = dict(line.split(" ", 1) for line in printed["stdout"].splitlines())
            for label in ("raw", "b64", "b64url", "url", "hex"):
                assert lines[label] == "[REDACTED:db]", (label, lines[label])
            assert lines["dsn"] == "postgresql://[REDACTED:db]:[REDACTED:db]@db/x"
            assert "[REDACTED:db]" in lines["basic"]
            assert printed["stderr"] == "stderr [REDACTED:db]\n"
            output = printed["stdout"] + printed["stderr"]
            basic = base64.b64encode(f"{username}:{password}".encode()).decode()
            for form in (
                password,
                quote(password, safe=""),
                quote_plus(password),
                basic,
                password.encode().hex(),
            ):
                assert form not in output
            await run.ok("finish_task", {"task_id": task_id})

    anyio.run(scenario)


def test_closing_the_client_finishes_open_tasks(workload: Workload, tmp_path: Path, stack: Any) -> None:
    handout = tmp_path / "handout.json"
    started: dict[str, Any] = {}

    async def scenario() -> None:
        async with mcp_server(workload, tmp_path / "mcp.log") as run:
            started.update(await run.ok("start_task", STAGING))
            await run.ok("run_with_credentials", run_db_read(started["task_id"], handout, stack))
            assert can_log_in(stack, json.loads(handout.read_text()))
        # Leaving the block closed the server's stdin and waited for it to exit.

    anyio.run(scenario)
    task = workload.get(started["task_id"])
    assert (task["state"], task["outcome"]) == ("finished", "cancelled")
    assert not can_log_in(stack, json.loads(handout.read_text()))
    assert "finished task" in (tmp_path / "mcp.log").read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_finishes_open_tasks(
    workload: Workload, tmp_path: Path, stack: Any, signum: signal.Signals
) -> None:
    handout = tmp_path / "handout.json"
    started: dict[str, Any] = {}

    async def scenario() -> None:
        async with mcp_server(workload, tmp_path / "mcp.log") as run:
            started.update(await run.ok("start_task", STAGING))
            await run.ok("run_with_credentials", run_db_read(started["task_id"], handout, stack))
            pid = run.pid()
            os.kill(pid, signum)
            deadline = time.monotonic() + 15
            while workload.get(started["task_id"])["state"] != "finished" and time.monotonic() < deadline:
                await anyio.sleep(0.1)

    anyio.run(scenario)
    task = workload.get(started["task_id"])
    assert (task["state"], task["outcome"]) == ("finished", "cancelled")
    assert not can_log_in(stack, json.loads(handout.read_text()))


def test_a_timeout_kills_the_whole_process_group(workload: Workload, tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    spawn = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '60'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )

    async def scenario() -> None:
        async with mcp_server(workload, tmp_path / "mcp.log") as run:
            task_id = (await run.ok("start_task", STAGING))["task_id"]
            began = time.monotonic()
            result = await run.ok(
                "run_with_credentials",
                {"task_id": task_id, "command": [sys.executable, "-c", spawn], "timeout_seconds": 2},
            )
            assert time.monotonic() - began < 15
            assert result["timed_out"] is True and result["exit_status"] is None
            assert result["stdout"] == "started\n"
            grandchild = int(pid_file.read_text())
            assert (
                not Path(f"/proc/{grandchild}").exists()
                or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]
            )
            await run.ok("finish_task", {"task_id": task_id})

    anyio.run(scenario)


def test_an_approval_granted_from_another_thread_is_claimed_by_the_server(
    workload: Workload, tmp_path: Path, stack: Any, issuers: Any
) -> None:
    handout = tmp_path / "handout.json"
    approver = issuers["sso"].mint("dba-dana@example.com", groups=["dba"])
    decided = threading.Event()

    def approve(task_id: str) -> None:
        time.sleep(1.0)
        answer = requests.post(
            f"{workload.url}/approvals/{task_id}",
            json={"decision": "approve", "reason": "change ticket CHG-42"},
            headers={"Authorization": f"Bearer {approver}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        decided.set()

    async def scenario() -> None:
        async with mcp_server(workload, tmp_path / "mcp.log") as run:
            pending = await run.ok(
                "start_task", {**START, "task": "deploy-prod", "context": {"environment": "prod"}}
            )
            task_id = pending["task_id"]
            assert pending["state"] == "pending_approval"
            assert pending["approval"]["approver_groups"] == ["dba"]
            assert pending["approval"]["console_url"] == f"{workload.url}/console/approvals/{task_id}"
            assert pending["credentials_held"] is False
            early = await run.call("run_with_credentials", run_db_read(task_id, handout, stack))
            assert early.is_error and "pending_approval" in early.content[0].text

            thread = threading.Thread(target=approve, args=(task_id,))
            thread.start()
            status = await run.ok("task_status", {"task_id": task_id})
            assert status["state"] == "pending_approval"
            while not decided.is_set():
                await anyio.sleep(0.1)
            thread.join()
            status = await run.ok("task_status", {"task_id": task_id})
            assert status["state"] == "active" and status["credentials_held"] is True
            assert [item["name"] for item in status["credentials"]] == ["db"]
            assert status["approval"]["state"] == "claimed"
            ran = await run.ok("run_with_credentials", run_db_read(task_id, handout, stack))
            assert ran["exit_status"] == 0, ran
            await run.ok("finish_task", {"task_id": task_id})
            assert not can_log_in(stack, json.loads(handout.read_text()))

    anyio.run(scenario)


def test_no_secret_reaches_a_result_an_error_or_the_log(
    workload: Workload, tmp_path: Path, stack: Any
) -> None:
    handouts = [tmp_path / "first.json", tmp_path / "second.json"]
    errors: list[str] = []

    async def scenario() -> McpRun:
        async with mcp_server(workload, tmp_path / "mcp.log", "--log-level", "DEBUG") as run:
            await run.ok("list_task_types")
            first = (await run.ok("start_task", STAGING))["task_id"]
            second = (await run.ok("start_task", {**STAGING, "ttl_seconds": 120}))["task_id"]
            for task_id, handout in zip((first, second), handouts, strict=True):
                await run.ok("run_with_credentials", run_db_read(task_id, handout, stack))
                await run.ok(
                    "run_with_credentials",
                    {"task_id": task_id, "command": [sys.executable, "-c", PRINT_PASSWORD]},
                )
                await run.ok("task_status", {"task_id": task_id})
            failing = [
                ("run_with_credentials", {"task_id": first, "command": ["/no/such/program"]}),
                (
                    "run_with_credentials",
                    {
                        "task_id": first,
                        "command": [
                            sys.executable,
                            "-c",
                            "import os; raise SystemExit(os.environ['DB_PASSWORD'])",
                        ],
                    },
                ),
                ("start_task", {**STAGING, "owner": "mallory@evil.example"}),
                ("start_task", {**STAGING, "task": "no-such-task"}),
                ("start_task", {**STAGING, "ttl_seconds": 100000}),
                ("task_status", {"task_id": "00000000-0000-4000-8000-000000000000"}),
                (
                    "run_with_credentials",
                    {"task_id": "00000000-0000-4000-8000-000000000000", "command": ["true"]},
                ),
            ]
            for name, arguments in failing:
                result = await run.call(name, arguments)
                if result.is_error:
                    errors.append(result.content[0].text)
            await run.ok("finish_task", {"task_id": first})
            return run  # `second` is left for the shutdown to finish

    run = anyio.run(scenario)
    assert len(errors) >= 5, errors
    assert any(error.startswith("policy_denied") or "policy_denied" in error for error in errors)
    texts = [result.model_dump_json() for result in run.results]
    texts += errors
    texts.append(run.log())
    secrets = set()
    for handout in handouts:
        creds = json.loads(handout.read_text())
        secrets |= encodings(creds["password"]) | encodings(creds["username"])
    leaks = sorted({secret for secret in secrets for text in texts if secret in text})
    assert leaks == []
    for handout in handouts:
        assert not can_log_in(stack, json.loads(handout.read_text()))
