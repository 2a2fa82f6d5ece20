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
    for name in ("BROKER_URL", "AGENT_TOKEN", "OPERATOR_TOKEN", "APPROVER_TOKEN", "PSQL"):
        assert f"export {name}=" in env
