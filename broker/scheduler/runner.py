"""Runs the jobs on APScheduler 3.x interval triggers (UTC, in-memory, no pickled job store)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor as JobExecutor
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.background import BackgroundScheduler

from broker.migrate import SchemaState, schema_state_of
from broker.scheduler.jobs import Jobs
from broker.services import Services

log = logging.getLogger(__name__)
# How often a scheduler held by a schema that is behind looks again: one tiny query.
SCHEMA_POLL_SECONDS = 2.0


class SchedulerRunner:
    def __init__(self, services: Services) -> None:
        self.services = services
        settings = services.settings.scheduler
        self._pool = ThreadPoolExecutor(settings.revoke_workers, thread_name_prefix="revoke")
        self.jobs = Jobs(services, self._pool)
        self._scheduler = BackgroundScheduler(
            timezone="UTC",
            executors={"default": JobExecutor(8)},
            # One run at a time per job; a late run is merged, never queued: work is found
            # from the database, so a skipped tick misses nothing, and a second run beside
            # the first would only contend for the same rows.
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        )
        sweep = settings.sweep_interval_seconds
        self._sweep = sweep
        self._add(self._expire, sweep, "expire")
        self._add(self.jobs.retry_pending, sweep, "retry")
        self._add(self.jobs.revoke_ended, sweep, "revoke_ended")
        self._add(self.jobs.sweep_locks, sweep, "locks")
        self._add(self.jobs.lapse_approvals, sweep, "approvals")
        self._add(self.jobs.seal_audit, sweep, "audit")
        self._add(self.jobs.retire_tokens, sweep, "tokens")
        self._add(self.jobs.reconcile, settings.reconcile_interval_seconds, "reconcile")
        self._add(self.jobs.renew_own_token, 300, "renew")
        self._add(self.jobs.purge_spent_jtis, 300, "purge_jtis")

    def _add(self, func: Any, seconds: float, name: str) -> None:
        self._scheduler.add_job(func, "interval", seconds=seconds, id=name, name=name)

    def _expire(self) -> None:
        self.jobs.expire_due()
        self._wake_at_next_deadline()

    def _wake_at_next_deadline(self) -> None:
        """A deadline due before the next sweep gets a run of its own at that instant: a
        task is expired at its deadline, not up to a sweep interval after it."""
        try:
            wait = self.jobs.seconds_to_next_deadline()
        except Exception:
            log.warning("could not look up the next deadline; the sweep will find it", exc_info=True)
            return
        # Not for a deadline already past: that task is locked by a finish (SKIP LOCKED
        # passed it by) and an immediate rerun would spin on it; the next sweep takes it.
        if wait is None or not 0 < wait < self._sweep:
            return
        at = datetime.now(UTC) + timedelta(seconds=wait)
        with contextlib.suppress(SchedulerNotRunningError):  # stopping
            self._scheduler.add_job(
                self._expire, "date", run_date=at, id="expire-at-deadline", name="expire at deadline",
                replace_existing=True,
            )  # fmt: skip

    def start(self) -> None:
        self._scheduler.start()

    def stop(self) -> None:
        self._scheduler.shutdown(wait=True)
        self._pool.shutdown(wait=True)

    def run_forever(self, hup_seen: threading.Event | None = None) -> None:
        """`broker scheduler`: until SIGTERM/SIGINT; SIGHUP reloads the policy (also one
        that arrived while the process was starting, recorded in `hup_seen`)."""
        stopping = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopping.set())
        signal.signal(signal.SIGINT, lambda *_: stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: self.services.policies.reload())
        if hup_seen is not None and hup_seen.is_set():
            self.services.policies.reload()
        if not self._wait_for_schema(stopping):
            return
        self.start()
        log.info("scheduler running")
        stopping.wait()
        self.stop()

    def _wait_for_schema(self, stopping: threading.Event) -> bool:
        """Hold the jobs while the schema is behind this build; False if stopped meanwhile.

        Every job would fail each sweep on a missing table or column, a traceback per
        second; one error that names the fix says more. The jobs start once the database
        is migrated, so the scheduler of `broker serve` survives a late `broker migrate`.
        A schema a newer build migrated does not hold them: deadlines must still be met.
        """
        engine = self.services.engine
        state = schema_state_of(engine)
        if state is SchemaState.AHEAD:
            log.warning("the database schema is newer than this build: a newer build migrated it")
        if state is not SchemaState.BEHIND:
            return True
        log.error("the database schema is behind this build: run `broker migrate`; the scheduler waits")
        while not stopping.wait(SCHEMA_POLL_SECONDS):
            if schema_state_of(engine) in (SchemaState.OK, SchemaState.AHEAD):
                log.info("the database schema was migrated: scheduler starting")
                return True
        return False
