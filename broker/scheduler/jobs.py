"""Scheduler jobs. Each claims its rows with `FOR UPDATE SKIP LOCKED` in short
transactions, so any number of threads, workers and replicas take distinct rows and no
lease is revoked twice or missed; a killed sweeper's locks vanish with its connection.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from broker import lifecycle, metrics
from broker.audit import record, seal_pending
from broker.audit.chain import SEAL_BATCH
from broker.db import unit_of_work
from broker.identity.replay import PostgresJtiStore
from broker.ledger import (
    FORGET_POOLED,
    MARK_RETIRED,
    RETIRE_BATCH,
    REVOKE_ENDED_BATCH,
    database_now,
    due_retry,
    due_tasks,
    end_matching,
    ended_holding,
    lapse_expired_locks,
    lapse_pending_approvals,
    lapsed_pooled,
    list_locks,
    lock_targets,
    read_tasks,
    revoke_pending_count,
    spent_token,
    stuck_start,
    until_next_deadline,
    write_back_ended,
)
from broker.models import SchedulerHeartbeat, Task
from broker.operator.service import lock_detail
from broker.services import Services
from broker.vault import VaultError, VaultUnavailable

log = logging.getLogger(__name__)
SYSTEM_ACTOR = "system:scheduler"
# Due tasks one sweeper thread expires per transaction: measured with bench/run --storm
# 1000 on 2 cores, 1 -> 8.1 s, 5 -> 5.9 s, 10 -> 4.9-5.1 s, 20 -> 3.8-4.0 s to clear the storm.
EXPIRE_BATCH = 20
RUNNER = f"{socket.gethostname()}"
# How long after a lock is added the locks sweep still ends what it matches (`sweep_locks`).
LOCK_SWEEP_WINDOW = timedelta(seconds=60)


class Jobs:
    def __init__(self, services: Services, pool: ThreadPoolExecutor) -> None:
        self._s = services
        self._pool = pool
        self._workers = services.settings.scheduler.revoke_workers

    # ---- deadlines ---------------------------------------------------------------------

    def expire_due(self) -> int:
        """Expire every active task past its deadline, revoking in parallel."""
        done = self._drain(self._expire_one, batch=EXPIRE_BATCH)
        self._heartbeat("expire")
        return done

    def seconds_to_next_deadline(self) -> float | None:
        """Until the earliest deadline of an active task, by the database's clock (the one
        deadlines are set and checked with); None when no task is active."""
        with unit_of_work(self._s.sessions) as session:
            value = session.scalar(until_next_deadline())
        return None if value is None else float(value)

    def _expire_one(self, session: Session) -> int:
        """Expire a small batch of due tasks in one transaction (fewer round trips and
        commits in a storm; the batch is small so a slow revoke delays few deadlines)."""
        tasks = read_tasks(session, due_tasks(EXPIRE_BATCH).with_for_update(skip_locked=True))
        for task in tasks:
            self._s.revoker.end_task(
                session, task, state="expired", actor=SYSTEM_ACTOR, reason="deadline reached",
                trigger="deadline",
            )  # fmt: skip
            if task.expires_at is not None and task.finished_at is not None:
                lag = (task.finished_at - task.expires_at).total_seconds()
                metrics.REVOCATION_LAG.observe(max(0.0, lag))
        if tasks:
            write_back_ended(session, tasks)
        return len(tasks)

    # ---- retries -----------------------------------------------------------------------

    def retry_pending(self) -> int:
        done = self._drain(self._retry_one)
        with unit_of_work(self._s.sessions) as session:
            pending = session.scalar(revoke_pending_count())
        metrics.PENDING_REVOCATIONS.set(pending or 0)
        self._heartbeat("retry")
        return done

    def _retry_one(self, session: Session) -> bool:
        # Lock the lease and its task together; SKIP LOCKED never waits, so no deadlock with finish.
        row = session.execute(due_retry().with_for_update(skip_locked=True)).first()
        if row is None:
            return False
        lease, _task = row
        self._s.revoker.revoke_lease(
            session, lease, actor=SYSTEM_ACTOR, reason=lease.revoke_reason or "retry", trigger="retry"
        )
        return True

    # ---- what the kill switch and locks ended ------------------------------------------

    def revoke_ended(self) -> int:
        """Revoke the leases of tasks ended in bulk (the kill switch, a lock) that are still
        `active`: a small batch of tasks per transaction, claimed SKIP LOCKED, so the revoke
        workers of every replica share them; from the ledger, so a restart resumes it."""
        done = self._drain(self._revoke_ended_batch, batch=REVOKE_ENDED_BATCH)
        self._heartbeat("revoke_ended")
        return done

    def _revoke_ended_batch(self, session: Session) -> int:
        tasks = read_tasks(session, ended_holding().with_for_update(of=Task, skip_locked=True))
        for task in tasks:
            self._s.revoker.revoke_held(session, task, actor=SYSTEM_ACTOR, trigger="kill_switch")
        if tasks:
            write_back_ended(session, tasks)
        return len(tasks)

    def sweep_locks(self) -> int:
        """Record each lock whose expiry passed (`lock.expired`, once: the UPDATE that marks
        it is the claim), end open tasks a live lock matches that its own request did not
        (a start recorded while the lock committed; a request that died midway), and set
        the active-locks gauge. Lock by lock, with the kill switch's statement (on the
        tasks' indexes), for a lock's first minute: nothing to scan without young locks."""
        with unit_of_work(self._s.sessions) as session:
            for lock in lapse_expired_locks(session):
                record(session, self._s.clock, "lock.expired", SYSTEM_ACTOR, owner=lock.owner,
                       purpose=lock.reason, detail=lock_detail(lock))  # fmt: skip
            live = list_locks(session, include_ended=False)
            # Only a young lock can have missed a task: a start in flight when it committed
            # records its task within seconds (and cannot activate it). An older one is not
            # swept again, so a lock on a target without an index on it (an issuer, say)
            # costs a scan of the tasks for a minute, not for as long as it lasts.
            young = database_now(session) - LOCK_SWEEP_WINDOW
            for lock in (lock for lock in live if lock.created_at > young):
                why = f"lock {lock.id}: {lock.reason}"
                for task in end_matching(session, lock_targets(lock), reason=why):
                    record(session, self._s.clock, "task.revoked", SYSTEM_ACTOR, task=task,
                           detail={"reason": why, "outcome": None, "trigger": "lock"})  # fmt: skip
                    metrics.TASKS_FINISHED.labels("revoked").inc()
        metrics.ACTIVE_LOCKS.set(len(live))
        self._heartbeat("locks")
        return len(live)

    # ---- approvals ---------------------------------------------------------------------

    def lapse_approvals(self) -> int:
        with unit_of_work(self._s.sessions) as session:
            lapsed = lapse_pending_approvals(session)
            for task in lapsed:
                record(session, self._s.clock, "task.approval_expired", SYSTEM_ACTOR, task=task)
        self._heartbeat("approvals")
        return len(lapsed)

    # ---- task tokens and orphans ------------------------------------------------------

    def retire_tokens(self) -> int:
        """Revoke the Vault token of every ended task whose leases are all revoked."""
        done = self._drain(self._retire_batch, batch=RETIRE_BATCH)
        self._heartbeat("tokens")
        return done

    def _retire_batch(self, session: Session) -> int:
        """Revoke a batch of spent tokens in Vault; mark only those Vault revoked."""
        connection = session.connection()
        claimed = connection.execute(spent_token().with_for_update(of=Task, skip_locked=True)).all()
        retired = []
        for row in claimed:
            try:
                self._s.vault.revoke_task_token(row.token_accessor)
            except VaultUnavailable as error:
                # Down or slow: each further call would wait out its timeout too, with
                # these task rows locked (a repeated finish waits on them). Next run.
                log.warning("task token revoke failed for task %s: %s; retiring later", row.id, error)
                break
            except VaultError as error:
                log.warning("task token revoke refused for task %s: %s", row.id, error)
                continue
            retired.append(row.id)
        if retired:
            connection.execute(MARK_RETIRED, {"ids": retired, "at": self._s.clock.now()})
        # A refused token makes the count short, which ends this loop: it waits for the
        # next run rather than being retried by this loop's next batch straight away.
        return len(retired)

    def reconcile(self) -> int:
        """Revoke what a crash left behind: a task still `issuing` after the grace period
        (a start that died between Vault and its commit) has its Vault token revoked, and
        with the token every lease Vault issued under it, recorded or not; and the pooled
        tokens of every process that stopped renewing its lease on them."""
        grace = timedelta(seconds=self._s.settings.scheduler.orphan_grace_seconds)
        done = self._drain(lambda session: self._reconcile_one(session, grace))
        done += self._drain(self._reclaim_pooled, batch=RETIRE_BATCH)
        self._heartbeat("reconcile")
        return done

    def _reconcile_one(self, session: Session, grace: timedelta) -> bool:
        task = session.scalars(stuck_start(grace).with_for_update(skip_locked=True)).first()
        if task is None:
            return False
        self._fail_stuck(session, task)
        return True

    def _reclaim_pooled(self, session: Session) -> int:
        """Revoke a batch of pooled tokens no live process holds, and drop their rows
        (those Vault expired need no call). The rows stay locked while Vault is asked, so
        a start of a holder that came back waits, then finds its token gone."""
        connection = session.connection()
        claimed = connection.execute(lapsed_pooled(RETIRE_BATCH).with_for_update(skip_locked=True)).all()
        reclaimed = []
        for row in claimed:
            if not row.expired:
                try:
                    self._s.vault.revoke_task_token(row.accessor)
                except VaultUnavailable as error:
                    log.warning("pooled task token revoke failed (holder %s): %s; later", row.holder, error)
                    break
                except VaultError as error:
                    log.warning("pooled task token revoke refused (holder %s): %s", row.holder, error)
                    continue
            reclaimed.append(row.accessor)
        if reclaimed:
            connection.execute(FORGET_POOLED, {"accessors": reclaimed})
            metrics.POOLED_TOKENS_RECLAIMED.inc(len(reclaimed))
            log.info("revoked %d pooled task tokens of processes gone", len(reclaimed))
        return len(reclaimed)

    def _fail_stuck(self, session: Session, task: Task) -> None:
        for lease in task.leases:
            self._s.revoker.revoke_lease(
                session, lease, actor=SYSTEM_ACTOR, reason="orphaned start", trigger="reconcile"
            )
        lifecycle.fail(
            task, at=self._s.clock.now(), reason="start did not complete; its Vault token was revoked"
        )
        self._s.revoker.revoke_token_if_clear(task)
        metrics.ORPHANS_RECONCILED.inc()
        record(session, self._s.clock, "task.orphan_revoked", SYSTEM_ACTOR, task=task)

    # ---- audit -------------------------------------------------------------------------

    def seal_audit(self) -> int:
        """Link new audit events into the hash chain (one sealer at a time, by row lock)."""
        sealed, batch = 0, SEAL_BATCH
        # A short batch took every event there was (newer ones are the next sweep's), so
        # no empty seal transaction follows it just to confirm that.
        while batch == SEAL_BATCH:
            with unit_of_work(self._s.sessions) as session:
                batch = seal_pending(session, self._s.audit_key, SEAL_BATCH)
            sealed += batch
        self._heartbeat("audit")
        return sealed

    # ---- housekeeping ------------------------------------------------------------------

    def renew_own_token(self) -> None:
        try:
            self._s.vault.renew_self()
        except VaultError as error:
            log.error("could not renew the broker's Vault token: %s", error)
            return
        self._heartbeat("renew")

    def purge_spent_jtis(self) -> None:
        skew = timedelta(seconds=self._s.settings.limits.clock_skew_seconds)
        PostgresJtiStore(self._s.engine).purge_expired(self._s.clock.now() - skew)

    # ---- plumbing ----------------------------------------------------------------------

    def _drain(self, claim: Callable[[Session], int | bool], batch: int = 1) -> int:
        """Run `claim` in parallel loops until none finds work; each call is one transaction
        and returns how many rows it handled, at most `batch`."""

        def step() -> int:
            try:
                with unit_of_work(self._s.sessions) as session:
                    return int(claim(session))
            except Exception:
                log.exception("scheduler step failed; retried next run")
                return 0

        def loop() -> int:
            count = 0
            while (done := step()) > 0:
                count += done
                if done < batch:
                    break
            return count

        # Probe once in this thread: an idle sweep costs one transaction, not one per
        # worker; only when there is work do the parallel loops start. A short batch
        # means the claim found all there was, so neither the fan-out nor a loop pays one
        # more (empty) claim transaction to learn it.
        first = step()
        if first < batch:
            return first
        futures = [self._pool.submit(loop) for _ in range(self._workers)]
        return first + sum(future.result() for future in futures)

    def _heartbeat(self, job: str) -> None:
        now = self._s.clock.now()
        metrics.LAST_SWEEP.labels(job).set(now.timestamp())
        try:
            with unit_of_work(self._s.sessions) as session:
                session.execute(
                    insert(SchedulerHeartbeat)
                    .values(job=job, last_success_at=now, runner=RUNNER)
                    .on_conflict_do_update(
                        index_elements=[SchedulerHeartbeat.job],
                        set_={"last_success_at": now, "runner": RUNNER},
                    )
                )
        except Exception:
            log.warning("could not record the %s heartbeat", job)
