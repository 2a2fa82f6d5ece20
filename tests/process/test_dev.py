"""`make dev` stays honest: the printed example and the README tour run end to end on a fresh
local stack, a second `broker dev` either runs beside it or stops with a clear error, and
`broker dev` never takes another process's answers for its own broker's."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import pytest

from broker.dev.stack.postgres import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_broker_dev_smoke_runs_the_example_and_tears_down(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "broker", "dev", "--smoke", "--dir", str(tmp_path / "dev")],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "its database user read 3 rows" in result.stdout
    assert "the credentials are refused, as promised" in result.stdout
    env = (tmp_path / "dev" / "env.sh").read_text()
    for name in (
        "BROKER_URL",
        "AGENT_TOKEN",
        "OPERATOR_TOKEN",
        "APPROVER_TOKEN",
        "PSQL",
        "BROKER_TOKEN",
        "BROKER_AUDIT_KEY",
        "SECOND_AGENT_TOKEN",
        "CI_TOKEN",
        "BROKER_WORKLOAD_TOKEN",
    ):
        assert f"export {name}=" in env


def readme_tour(heading: str = "A 60-second tour") -> str:
    """The ```sh blocks of one section of README.md, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```", section, re.DOTALL | re.MULTILINE)
    assert blocks, "the tour has no sh block"
    return "\n".join(blocks)


def run_script(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # As a fresh shell would: nothing of the test's own Postgres or broker settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "BROKER_"))}
    return subprocess.run(
        ["bash", "-c", "set -eu -o pipefail\n" + script],
        capture_output=True, text=True, timeout=120, env=env, cwd=cwd, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_the_printed_example_and_the_readme_tour_run_as_pasted_and_a_second_dev_is_refused(tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("the example uses curl")
    checkout = tmp_path / "checkout"  # where `make dev` runs: env.sh lands in ./.broker-dev
    checkout.mkdir()
    # The README runs `.venv/bin/...` from the checkout: this test's own environment is that venv.
    (checkout / ".venv").symlink_to(Path(sys.prefix))
    port = free_port()
    log = tmp_path / "dev.out"
    with log.open("w") as out:
        dev = subprocess.Popen(
            [sys.executable, "-m", "broker", "dev", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=checkout,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C stops" not in log.read_text():
            assert dev.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        env_file = checkout / ".broker-dev" / "env.sh"
        assert f"export BROKER_URL='http://127.0.0.1:{port}'" in env_file.read_text()

        # 1. The printed example, pasted.
        printed = log.read_text().split("In another shell:", 1)[1].split("Ctrl-C stops", 1)[0]
        ran = run_script("\n".join(line.removeprefix("  ") for line in printed.splitlines()), checkout)
        output = ran.stdout + ran.stderr
        assert ran.returncode == 0, output[-3000:]
        assert re.search(r"^\s+3\s*$", ran.stdout, re.MULTILINE), output[-3000:]  # psql: count(*) = 3
        assert '"state": "finished"' in ran.stdout and "refused after finish, as promised" in ran.stdout
        assert "approval: approved" in ran.stdout and "claimed: active with db, token" in ran.stdout
        assert "deploy task: finished" in ran.stdout, output[-3000:]  # nothing it started is left live
        assert "chain intact" in ran.stdout, output[-3000:]
        assert "password" not in ran.stdout  # the credentials went to psql, not to the terminal

        # 2. The README's tour, pasted in the checkout.
        toured = run_script(readme_tour(), checkout)
        output = toured.stdout + toured.stderr
        assert toured.returncode == 0, output[-3000:]
        assert re.search(r"^\s+3\s*$", toured.stdout, re.MULTILINE), output[-3000:]
        assert '"state": "finished"' in toured.stdout and "refused after finish, as promised" in toured.stdout
        assert "<task_id>" not in readme_tour() and "password" not in toured.stdout

        # 2b. The README's other two ways, the SDK and `broker exec`, pasted too.
        ways = run_script(readme_tour("Three ways to run a task"), checkout)
        output = ways.stdout + ways.stderr
        assert ways.returncode == 0, output[-3000:]
        assert "rows: 3" in ways.stdout and "finished: its database user is gone" in ways.stdout, output[
            -3000:
        ]
        assert re.search(r"^\s+3\s*$", ways.stdout, re.MULTILINE), output[-3000:]  # psql under broker exec
        assert "the job sees ['DB_PASSWORD', 'DB_USERNAME']" in ways.stdout, output[-3000:]
        assert "password" not in ways.stdout.lower().replace("db_password", "")

        # 2c. The gateway: the handle reads, a delete is refused, both are audited.
        gated = run_script(readme_tour("Used, never held: the gateway"), checkout)
        output = gated.stdout + gated.stderr
        assert gated.returncode == 0, output[-3000:]
        assert re.search(r"^\s+3\s*$", gated.stdout, re.MULTILINE), output[-3000:]
        assert "refused by the task's statement rule 'read-only'" in gated.stdout, output[-3000:]
        assert "refused by the gateway: the task may only read" in gated.stdout, output[-3000:]
        assert "SELECT allowed alice@example.com" in gated.stdout, output[-3000:]
        assert "DELETE refused by read-only alice@example.com" in gated.stdout, output[-3000:]
        assert "password" not in gated.stdout.lower()

        # 2d. `broker dev token` mints what the stack trusts: another agent, a person.
        minted = run_script(
            "source .broker-dev/env.sh\n"
            "ETL=$(.venv/bin/broker dev token --issuer spire --subject spiffe://example.org/agents/etl)\n"
            "curl -s -o /dev/null -w '%{http_code}\\n' -X POST \"$BROKER_URL/task/start\" "
            "-H \"Authorization: Bearer $ETL\" -H 'Content-Type: application/json' "
            '-d \'{"task":"issue-cert","owner":"alice@example.com","purpose":"mutual TLS for a job"}\'\n'
            "SRE=$(.venv/bin/broker dev token --issuer corp-sso --subject sre-sue@example.com --group sre)\n"
            'curl -s -o /dev/null -w \'%{http_code}\\n\' "$BROKER_URL/leases" -H "Authorization: Bearer $SRE"\n'
            'BROKER_WORKLOAD_TOKEN=$ETL .venv/bin/broker leases list --token "$SRE" --task issue-cert\n',
            checkout,
        )
        assert minted.returncode == 0, minted.stdout + minted.stderr
        assert minted.stdout.splitlines()[:2] == ["201", "200"], minted.stdout + minted.stderr
        assert "spiffe://example.org/agents/etl" in minted.stdout

        # 3. A second `broker dev` on the same directory stops at once, and leaves the first alone.
        second = subprocess.run(
            [sys.executable, "-m", "broker", "dev", "--port", str(free_port())],
            capture_output=True, text=True, timeout=60, cwd=checkout, check=False,
        )  # fmt: skip
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"another broker dev (pid {dev.pid}) is using {checkout / '.broker-dev'}" in second.stderr
        assert "The broker is ready" not in second.stdout
        # 4. One on the first's port stops before starting anything, naming the port.
        third = subprocess.run(
            [sys.executable, "-m", "broker", "dev", "--port", str(port), "--dir", str(tmp_path / "third")],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert third.returncode == 2, third.stdout + third.stderr
        assert f"port {port} is in use by another process" in third.stderr
        assert "starting Postgres" not in third.stdout
        assert env_file.exists() and dev.poll() is None  # the first stack is untouched
        assert run_script(f'source {env_file}\ncurl -sf "$BROKER_URL/readyz"', checkout).returncode == 0
    finally:
        os.killpg(dev.pid, signal.SIGTERM)
        dev.wait(timeout=60)
    assert dev.returncode == 0, log.read_text()[-2000:]
    assert not (checkout / ".broker-dev").exists()  # emptied at exit: nothing stale to source


class _Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_args):
        pass


def test_a_readyz_from_another_process_is_not_taken_for_our_broker(tmp_path):
    from broker.dev.cli import _wait_ready

    impostor = http.server.HTTPServer(("127.0.0.1", 0), _Ready)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{impostor.server_address[1]}"
    # Our "broker" never binds the port (as when gunicorn finds it in use) and then exits.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    try:
        with pytest.raises(click.ClickException, match="exited during start-up"):
            _wait_ready(url, child, tmp_path / "serve.pid", timeout=20)
    finally:
        impostor.shutdown()
        child.wait()


def test_without_port_a_taken_default_port_gives_a_free_one(monkeypatch, capsys):
    import socket

    from broker.dev import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(cli, "DEFAULT_PORT", taken.getsockname()[1])
        chosen = cli._choose_port(None, smoke=False)
    assert chosen != cli.DEFAULT_PORT
    assert (
        f"port {cli.DEFAULT_PORT} is in use by another process; using port {chosen}"
        in capsys.readouterr().out
    )
