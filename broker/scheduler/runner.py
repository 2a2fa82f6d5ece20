"""Runs the jobs on APScheduler 3.x interval triggers (UTC, in-memory, no pickled job store)."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor as JobExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from broker.scheduler.jobs import Jobs
from broker.services import Services

log = logging.getLogger(__name__)


class SchedulerRunner:
    def __init__(self, services: Services) -> None:
        self.services = services
        settings = services.settings.scheduler
        self._pool = ThreadPoolExecutor(settings.revoke_workers, thread_name_prefix="revoke")
        self.jobs = Jobs(services, self._pool)
        self._scheduler = BackgroundScheduler(
            timezone="UTC",
            executors={"default": JobExecutor(8)},
            # One run at a time per job; a late run is merged, never queued (S09): work is
            # found from the database, so a skipped tick misses nothing.
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        )
        sweep = settings.sweep_interval_seconds
        self._add(self.jobs.expire_due, sweep, "expire")
        self._add(self.jobs.retry_pending, sweep, "retry")
        self._add(self.jobs.lapse_approvals, sweep, "approvals")
        self._add(self.jobs.seal_audit, sweep, "audit")
        self._add(self.jobs.retire_tokens, sweep, "tokens")
        self._add(self.jobs.reconcile, settings.reconcile_interval_seconds, "reconcile")
        self._add(self.jobs.renew_own_token, 300, "renew")
        self._add(self.jobs.purge_spent_jtis, 300, "purge_jtis")

    def _add(self, func: Any, seconds: float, name: str) -> None:
        self._scheduler.add_job(func, "interval", seconds=seconds, id=name, name=name)

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        self._scheduler.shutdown(wait=True)
        self._pool.shutdown(wait=True)

    def run_forever(self) -> None:
        """`broker scheduler`: until SIGTERM/SIGINT; SIGHUP reloads the policy."""
        stopping = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopping.set())
        signal.signal(signal.SIGINT, lambda *_: stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: self.services.policies.reload())
        self.start()
        log.info("scheduler running")
        stopping.wait()
        self.stop()
