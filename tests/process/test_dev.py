"""`make dev` stays honest: the printed example runs end to end on a fresh local stack."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_broker_dev_smoke_runs_the_example_and_tears_down(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "broker", "dev", "--smoke", "--dir", str(tmp_path / "dev")],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "its database user read 3 rows" in result.stdout
    assert "the credentials are refused, as promised" in result.stdout
    env = (tmp_path / "dev" / "env.sh").read_text()
    for name in ("BROKER_URL", "AGENT_TOKEN", "OPERATOR_TOKEN", "APPROVER_TOKEN", "PSQL", "BROKER_TOKEN", "BROKER_AUDIT_KEY"):
        assert f"export {name}=" in env


def test_the_printed_example_runs_as_pasted(tmp_path):
    """The README's first command prints shell commands; paste them into bash and they work."""
    import os
    import re
    import shutil
    import signal
    import time

    from broker.dev.stack.postgres import free_port

    if shutil.which("curl") is None:
        pytest.skip("the example uses curl")
    log = tmp_path / "dev.out"
    with log.open("w") as out:
        dev = subprocess.Popen(
            [sys.executable, "-m", "broker", "dev", "--dir", str(tmp_path / "dev"), "--port", str(free_port())],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C stops" not in log.read_text():
            assert dev.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        printed = log.read_text().split("In another shell:", 1)[1].split("Ctrl-C stops", 1)[0]
        script = "set -eu -o pipefail\n" + "\n".join(line.removeprefix("  ") for line in printed.splitlines())
        # Step 4 says "run step 2's psql again": do, and expect the login to be refused.
        psql = next(line for line in script.splitlines() if line.startswith("$PSQL "))
        script += f"\nif {psql}; then echo STILL-WORKS; else echo REFUSED-AFTER-FINISH; fi\n"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "BROKER_"))}
        ran = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, env=env, check=False)
        output = ran.stdout + ran.stderr
        assert ran.returncode == 0, output[-3000:]
        assert re.search(r"^\s+3\s*$", ran.stdout, re.MULTILINE), output[-3000:]  # psql: count(*) = 3
        assert '"state": "finished"' in ran.stdout and '"state": "active"' in ran.stdout
        assert "REFUSED-AFTER-FINISH" in ran.stdout, output[-3000:]
        assert "chain intact" in ran.stdout, output[-3000:]
    finally:
        os.killpg(dev.pid, signal.SIGTERM)
        dev.wait(timeout=60)
