from __future__ import annotations

import pytest


@pytest.fixture
def running_scheduler(services):
    from broker.scheduler.runner import SchedulerRunner

    runner = SchedulerRunner(services)
    runner.start()
    yield runner
    runner.stop()
