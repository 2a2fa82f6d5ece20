"""deploy/github-action: `node main.js` then `node post.js` as the runner runs them.

The runner is imitated with INPUT_* variables, GITHUB_ENV/OUTPUT/STATE files (state comes
back to the post step as STATE_<name>), and a local stand-in for GitHub's OIDC endpoint
that hands out tokens of a TestIssuer the real broker trusts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.client.conftest import approve_in_background, operator_task
from tests.client.fakes import fake_server, github_oidc
from tests.factories import can_log_in

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("node") is None, reason="node is not installed (the action runs on node20)"
    ),
]

ACTION = Path(__file__).resolve().parents[2] / "deploy" / "github-action"


def read_file_commands(path: Path) -> dict[str, str]:
    """Parse GITHUB_ENV/OUTPUT/STATE as the runner does: `k=v` lines and `k<<DELIM` blocks."""
    values: dict[str, str] = {}
    lines = path.read_text().split("\n")
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if not line:
            continue
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            body = []
            while lines[index] != delimiter:
                body.append(lines[index])
                index += 1
            index += 1
            values[name] = "\n".join(body)
        else:
            name, value = line.split("=", 1)
            values[name] = value
    return values


@pytest.fixture
def subject() -> str:
    # A job of acme/app on main; the environment part keeps each test a workload of its own.
    return f"repo:acme/app:environment:test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def runner(tmp_path, issuers, subject):
    ci = issuers["ci"]

    def token(audience: str) -> str:
        return str(ci.mint(subject, aud=audience, extra_claims={"ref": "refs/heads/main", "actor": "alice"}))

    with fake_server(github_oidc(token)) as (oidc_url, seen):
        files = {name: tmp_path / name.lower() for name in ("GITHUB_ENV", "GITHUB_OUTPUT", "GITHUB_STATE")}
        for path in files.values():
            path.touch()
        base = {
            "PATH": os.environ["PATH"],
            "ACTIONS_ID_TOKEN_REQUEST_URL": f"{oidc_url}/token?api-version=2.0",
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "runner-request-token",
            **{name: str(path) for name, path in files.items()},
        }

        def run(script: str, inputs: dict[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
            env = {**base, **{f"INPUT_{name.upper()}": value for name, value in inputs.items()}, **extra}
            return subprocess.run(
                ["node", str(ACTION / script)],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )

        run.files = files  # type: ignore[attr-defined]
        run.oidc = seen  # type: ignore[attr-defined]
        yield run


def inputs(broker, **overrides: str) -> dict[str, str]:
    values = {
        "url": broker.url,
        "task": "analytics-read",
        "owner": "alice@example.com",
        "purpose": "github action test",
        "context": "environment: staging\n",
        "ttl": "",
        "wait": "0",
        "audience": "credential-broker",
    }
    values.update(overrides)
    return values


def post_env(runner) -> dict[str, str]:
    return {
        f"STATE_{name}": value for name, value in read_file_commands(runner.files["GITHUB_STATE"]).items()
    }


def test_main_masks_exports_and_post_revokes(broker, issuers, stack, runner, subject):
    main = runner("main.js", inputs(broker))
    assert main.returncode == 0, main.stdout + main.stderr

    env = read_file_commands(runner.files["GITHUB_ENV"])
    assert set(env) == {"DB_USERNAME", "DB_PASSWORD", "BROKER_TASK_ID", "BROKER_TASK_EXPIRES_AT"}
    creds = {"username": env["DB_USERNAME"], "password": env["DB_PASSWORD"]}
    assert can_log_in(stack, creds)

    lines = main.stdout.splitlines()
    masks = [index for index, line in enumerate(lines) if line.startswith("::add-mask::")]
    assert {lines[index].removeprefix("::add-mask::") for index in masks} >= set(creds.values())
    exported = next(index for index, line in enumerate(lines) if "exported" in line)
    assert max(masks) < exported  # masked before anything was written out
    for secret in creds.values():  # and shown nowhere else
        assert all(secret not in line for index, line in enumerate(lines) if index not in masks)
        assert secret not in main.stderr

    outputs = read_file_commands(runner.files["GITHUB_OUTPUT"])
    assert outputs["task-id"] == env["BROKER_TASK_ID"]
    assert outputs["expires-at"] == env["BROKER_TASK_EXPIRES_AT"]
    assert read_file_commands(runner.files["GITHUB_STATE"]) == {"task_id": env["BROKER_TASK_ID"]}

    post = runner("post.js", inputs(broker), **post_env(runner), BROKER_TASK_OUTCOME="failure")
    assert post.returncode == 0, post.stdout + post.stderr
    assert not can_log_in(stack, creds)
    task = operator_task(broker, issuers, env["BROKER_TASK_ID"])
    assert (task["state"], task["outcome"], task["workload"]) == ("finished", "failed", f"ci:{subject}")
    assert all(secret not in post.stdout + post.stderr for secret in creds.values())
    # Every call used a token for the broker's audience, fetched fresh.
    assert {request.query["audience"][0] for request in runner.oidc} == {"credential-broker"}


def test_a_refused_start_fails_the_step_and_post_has_nothing_to_do(broker, runner):
    main = runner("main.js", inputs(broker, context='{"environment": "moon"}'))
    assert main.returncode == 1
    assert "::error::credential broker: 403 policy_denied" in main.stdout
    assert read_file_commands(runner.files["GITHUB_ENV"]) == {}
    post = runner("post.js", inputs(broker), **post_env(runner))
    assert post.returncode == 0
    assert "nothing to finish" in post.stdout


def test_an_approval_is_waited_for_and_an_unapproved_one_withdrawn(broker, issuers, stack, runner):
    # Without `wait` the step fails, and the post step withdraws the pending request.
    main = runner("main.js", inputs(broker, task="ci-deploy", context="environment=prod"))
    assert main.returncode == 1 and "needs approval" in main.stdout
    post = runner("post.js", inputs(broker), **post_env(runner))
    assert post.returncode == 0, post.stdout
    withdrawn = read_file_commands(runner.files["GITHUB_STATE"])["task_id"]
    assert operator_task(broker, issuers, withdrawn)["outcome"] == "cancelled"

    for path in runner.files.values():
        path.write_text("")
    purpose = "github action waits for a DBA"
    thread = approve_in_background(broker, issuers, purpose)
    main = runner(
        "main.js", inputs(broker, task="ci-deploy", context="environment=prod", purpose=purpose, wait="60")
    )
    thread.join(5)
    assert main.returncode == 0, main.stdout + main.stderr
    env = read_file_commands(runner.files["GITHUB_ENV"])
    creds = {"username": env["DB_USERNAME"], "password": env["DB_PASSWORD"]}
    assert can_log_in(stack, creds)
    assert re.search(r"waits for approval", main.stdout)
    post = runner("post.js", inputs(broker), **post_env(runner))
    assert post.returncode == 0
    assert not can_log_in(stack, creds)
