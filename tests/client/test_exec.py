"""`broker exec` as a user runs it, against a real `broker serve`, OpenBao and Postgres."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.client.conftest import approve_in_background, operator_task, write_token
from tests.factories import can_log_in

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

# The command broker exec runs: it proves the credentials work by logging in with them,
# then hands them to the test (through a file, as only a test would) so the test can check
# they are dead afterwards.
CHILD = r"""
import json, os, sys, time
import psycopg

port, loot, action = sys.argv[1], sys.argv[2], sys.argv[3]
dsn = os.environ.get("DATABASE_URL") or (
    f"postgresql://{os.environ['DB_USERNAME']}:{os.environ['DB_PASSWORD']}@127.0.0.1:{port}/analytics"
)
with psycopg.connect(dsn, connect_timeout=5) as conn:
    conn.execute("SELECT count(*) FROM analytics.events")
print("child: logged in", flush=True)
facts = {
    "username": os.environ["DB_USERNAME"],
    "password": os.environ["DB_PASSWORD"],
    "task_id": os.environ["BROKER_TASK_ID"],
    "expires_at": os.environ["BROKER_TASK_EXPIRES_AT"],
}
env_file = os.environ.get("CHECK_ENV_FILE")
if env_file:
    facts["env_file_mode"] = oct(os.stat(env_file).st_mode & 0o777)
    facts["env_file_names"] = sorted(line.split("=", 1)[0] for line in open(env_file).read().splitlines())
with open(loot + ".tmp", "w") as handle:
    json.dump(facts, handle)
os.rename(loot + ".tmp", loot)
if action == "sleep":
    time.sleep(120)
elif action == "kill9":
    os.kill(os.getpid(), 9)
sys.exit(int(action))
"""


@pytest.fixture
def child(tmp_path: Path) -> Path:
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return path


def exec_argv(
    broker, token_file: Path, *extra: str, task: str = "analytics-read", env: str = "staging"
) -> list[str]:
    return [
        sys.executable, "-m", "broker.client.cli",
        "--url", broker.url,
        "--token-file", str(token_file),
        "--task", task,
        "--owner", "alice@example.com",
        "--purpose", "client exec test",
        "--context", f"environment={env}",
        *extra,
    ]  # fmt: skip


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "ACTIONS_ID_TOKEN", "SPIFFE_"))
    }
    env.update(extra)
    return env


def run_exec(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, check=False, cwd=ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=120
    )


def assert_nothing_secret(facts: dict[str, Any], *outputs: str) -> None:
    for output in outputs:
        assert facts["password"] not in output
        assert facts["username"] not in output


@pytest.fixture
def token_file(tmp_path: Path, agent_token: str) -> Path:
    return write_token(tmp_path / "token", agent_token)


def test_success_revokes_the_credentials_the_command_used(
    broker, issuers, stack, child, token_file, tmp_path
):
    loot = tmp_path / "loot.json"
    done = run_exec(
        exec_argv(
            broker, token_file, "--", sys.executable, str(child), str(stack.postgres.port), str(loot), "0"
        )
    )
    assert done.returncode == 0, done.stderr
    assert "child: logged in" in done.stdout
    facts = json.loads(loot.read_text())
    assert not can_log_in(stack, facts)
    task = operator_task(broker, issuers, facts["task_id"])
    assert (task["state"], task["outcome"]) == ("finished", "succeeded")
    assert {lease["state"] for lease in task["leases"]} == {"revoked"}
    assert f"task {facts['task_id']} finished (succeeded); credentials revoked" in done.stderr
    assert facts["expires_at"] == task["expires_at"]
    assert_nothing_secret(facts, done.stdout, done.stderr)


@pytest.mark.parametrize(("action", "status"), [("3", 3), ("kill9", 137)], ids=["exit-3", "sigkill"])
def test_a_failing_command_keeps_its_status_and_is_revoked(
    broker, issuers, stack, child, token_file, tmp_path, action, status
):
    loot = tmp_path / "loot.json"
    done = run_exec(
        exec_argv(
            broker, token_file, "--", sys.executable, str(child), str(stack.postgres.port), str(loot), action
        )
    )
    assert done.returncode == status, done.stderr
    facts = json.loads(loot.read_text())
    assert not can_log_in(stack, facts)
    task = operator_task(broker, issuers, facts["task_id"])
    assert (task["state"], task["outcome"]) == ("finished", "failed")
    assert_nothing_secret(facts, done.stdout, done.stderr)


def test_sigterm_to_the_wrapper_stops_the_command_and_still_revokes(
    broker, issuers, stack, child, token_file, tmp_path
):
    loot = tmp_path / "loot.json"
    argv = exec_argv(
        broker, token_file, "--", sys.executable, str(child), str(stack.postgres.port), str(loot), "sleep"
    )
    wrapper = subprocess.Popen(
        argv, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not loot.exists() and time.monotonic() < deadline and wrapper.poll() is None:
        time.sleep(0.1)
    assert loot.exists(), wrapper.communicate(timeout=5)
    facts = json.loads(loot.read_text())
    assert can_log_in(stack, facts)  # alive while the command runs

    wrapper.send_signal(signal.SIGTERM)
    stdout, stderr = wrapper.communicate(timeout=60)
    assert wrapper.returncode == 128 + signal.SIGTERM, stderr
    assert not can_log_in(stack, facts)
    task = operator_task(broker, issuers, facts["task_id"])
    assert (task["state"], task["outcome"]) == ("finished", "cancelled")
    assert_nothing_secret(facts, stdout, stderr)


def test_env_templates_and_an_env_file_that_is_private_and_removed(
    broker, issuers, stack, child, token_file, tmp_path
):
    loot, env_file = tmp_path / "loot.json", tmp_path / "task.env"
    url = (
        f"DATABASE_URL=postgresql://{{DB_USERNAME}}:{{DB_PASSWORD}}@127.0.0.1:{stack.postgres.port}/analytics"
    )
    done = run_exec(
        exec_argv(
            broker, token_file, "--env", url, "--env-file", str(env_file),
            "--", sys.executable, str(child), "0", str(loot), "0",  # port 0: only DATABASE_URL can work
        ),
        CHECK_ENV_FILE=str(env_file),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    facts = json.loads(loot.read_text())
    assert facts["env_file_mode"] == "0o600"
    assert facts["env_file_names"] == sorted(
        ["DB_USERNAME", "DB_PASSWORD", "BROKER_TASK_ID", "BROKER_TASK_EXPIRES_AT", "DATABASE_URL"]
    )
    assert not env_file.exists()
    assert not can_log_in(stack, facts)
    assert_nothing_secret(facts, done.stdout, done.stderr)


def test_an_existing_env_file_is_refused_before_anything_is_issued(broker, token_file, tmp_path):
    env_file = tmp_path / "task.env"
    env_file.write_text("keep me\n")
    done = run_exec(exec_argv(broker, token_file, "--env-file", str(env_file), "--", "true"))
    assert done.returncode == 125
    assert "cannot create --env-file" in done.stderr
    assert env_file.read_text() == "keep me\n"


def test_a_refused_start_is_status_125_with_the_problem_code(broker, token_file):
    done = run_exec(exec_argv(broker, token_file, "--", "true", env="moon"))
    assert done.returncode == 125
    assert "policy_denied" in done.stderr


def test_a_task_needing_approval_is_withdrawn_without_wait(broker, issuers, token_file):
    done = run_exec(exec_argv(broker, token_file, "--", "true", task="deploy-prod", env="prod"))
    assert done.returncode == 125
    assert "needs approval" in done.stderr
    task_id = done.stderr.split("task ", 1)[1].split()[0]
    task = operator_task(broker, issuers, task_id)
    assert (task["state"], task["outcome"]) == ("finished", "cancelled")


def test_a_missing_command_is_127_and_the_task_is_finished(broker, issuers, token_file):
    done = run_exec(exec_argv(broker, token_file, "--", "/nonexistent/command"))
    assert done.returncode == 127
    task_id = done.stderr.split("task ", 1)[1].split()[0]
    assert operator_task(broker, issuers, task_id)["outcome"] == "failed"


def test_wait_for_an_approval_then_run(broker, issuers, stack, child, token_file, tmp_path):
    purpose = "exec waits for a DBA"
    thread = approve_in_background(broker, issuers, purpose)
    loot = tmp_path / "loot.json"
    argv = exec_argv(
        broker,
        token_file,
        "--wait",
        "60",
        "--",
        sys.executable,
        str(child),
        str(stack.postgres.port),
        str(loot),
        "0",
        task="deploy-prod",
        env="prod",
    )
    argv[argv.index("client exec test")] = purpose
    done = run_exec(argv)
    thread.join(5)
    assert done.returncode == 0, done.stderr
    assert "waits for approval" in done.stderr and "approved and claimed" in done.stderr
    facts = json.loads(loot.read_text())
    assert not can_log_in(stack, facts)
    assert operator_task(broker, issuers, facts["task_id"])["outcome"] == "succeeded"
    assert_nothing_secret(facts, done.stdout, done.stderr)
