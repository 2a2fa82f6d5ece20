from __future__ import annotations

import shutil
from pathlib import Path

import pytest

API_POLICY = Path(__file__).parent.parent / "api" / "policy.yaml"


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    target = tmp_path / "policy.yaml"
    shutil.copy(API_POLICY, target)
    return target


@pytest.fixture
def running_scheduler(services):
    from broker.scheduler.runner import SchedulerRunner

    runner = SchedulerRunner(services)
    runner.start()
    yield runner
    runner.stop()
