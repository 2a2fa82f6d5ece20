"""Revocation: what a task holds, revoked when it ends.

`/task/finish`, the deadline sweep, the retry sweep and operators all end up here, so the
rules hold everywhere: revoke synchronously; what Vault won't revoke now is
`revoke_pending` with a backoff, never forgotten; the task's Vault token goes last. The
states themselves are written by `broker.lifecycle`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from broker import lifecycle, metrics
from broker.audit import record
from broker.clock import Clock
from broker.lifecycle import Ending, Outcome
from broker.models import Lease, Task
from broker.vault import RevokeHandle, VaultError, VaultGateway, VaultUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    base_seconds: float = 2.0
    max_seconds: float = 300.0

    def delay(self, attempts: int) -> float:
        """Capped exponential backoff with full jitter, so a Vault outage ends without a stampede."""
        ceiling = min(self.max_seconds, self.base_seconds * 2 ** max(0, attempts - 1))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 (jitter, not crypto)


class Revoker:
    def __init__(self, vault: VaultGateway, clock: Clock, backoff: Backoff | None = None) -> None:
        self._vault = vault
        self._clock = clock
        self._backoff = backoff or Backoff()

    def end_task(
        self,
        session: Session,
        task: Task,
        *,
        state: Ending,
        actor: str,
        reason: str,
        trigger: str,
        outcome: Outcome | None = None,
    ) -> None:
        """Move an open task to `state` and revoke everything it holds. Idempotent."""
        if not lifecycle.end(task, state, at=self._clock.now(), reason=reason, outcome=outcome):
            return
        unreachable: VaultUnavailable | None = None
        leases = list(task.leases)
        for position, lease in enumerate(leases):
            if unreachable is None:
                silence = self._revoke(session, lease, actor=actor, reason=reason, trigger=trigger)
                more = position + 1 < len(leases)
                if silence is not None and more and (not silence.sent or not self._vault.answers()):
                    unreachable = silence
            elif lease.state != "revoked":
                # Vault is down or hung (no connection, or a timed-out call and a health
                # probe with no answer either): each further call would wait out its own
                # timeout while the caller waits. The retry sweep takes these with the first.
                lease.revoke_reason = lease.revoke_reason or reason
                self._parked(session, lease, actor, trigger, f"not tried: {unreachable}", deferred=True)
        # The task's own Vault token holds nothing once its leases are revoked (and it
        # never left the broker): the scheduler retires it within a sweep, off this path.
        record(
            session,
            self._clock,
            f"task.{state}",
            actor,
            task=task,
            detail={"reason": reason, "outcome": task.outcome, "trigger": trigger},
        )
        metrics.TASKS_FINISHED.labels(state).inc()

    def revoke_held(self, session: Session, task: Task, *, actor: str, trigger: str) -> None:
        """Revoke what a task ended in bulk (the kill switch, a lock) still holds: its
        state was written with the others in one statement, its leases are revoked here."""
        reason = task.end_reason or "ended"
        unreachable: VaultUnavailable | None = None
        for lease in task.leases:
            if lease.state != "active":
                continue
            if unreachable is None:
                unreachable = self._revoke(session, lease, actor=actor, reason=reason, trigger=trigger)
            else:
                # Vault gave no answer: the rest go to the retry sweep's backoff, rather than
                # each waiting out a timeout (and this claim retrying them every run).
                lease.revoke_reason = lease.revoke_reason or reason
                self._parked(session, lease, actor, trigger, f"not tried: {unreachable}", deferred=True)

    def revoke_lease(self, session: Session, lease: Lease, *, actor: str, reason: str, trigger: str) -> bool:
        """Revoke one lease now; on failure park it in `revoke_pending`. True when revoked."""
        self._revoke(session, lease, actor=actor, reason=reason, trigger=trigger)
        return lease.state == "revoked"

    def _revoke(
        self, session: Session, lease: Lease, *, actor: str, reason: str, trigger: str
    ) -> VaultUnavailable | None:
        """`revoke_lease`; returns the error when Vault itself gave no answer."""
        if lease.state == "revoked":
            return None
        now = self._clock.now()
        lease.revoke_attempts += 1
        lease.revoke_reason = lease.revoke_reason or reason
        try:
            self._vault.revoke(RevokeHandle(kind=lease.revoke_kind, ref=lease.revoke_ref))  # type: ignore[arg-type]
        except VaultError as error:
            self._parked(session, lease, actor, trigger, str(error))
            # No status: no answer from Vault at all, as opposed to Vault (or the engine's
            # backend behind it) answering with an error for this one lease.
            return error if isinstance(error, VaultUnavailable) and error.status is None else None
        lifecycle.lease_revoked(lease, at=now)
        metrics.REVOCATIONS.labels(trigger, "revoked").inc()
        record(
            session,
            self._clock,
            "lease.revoked",
            actor,
            lease=lease,
            detail={"reason": reason, "trigger": trigger, "attempts": lease.revoke_attempts},
        )
        return None

    def _parked(
        self, session: Session, lease: Lease, actor: str, trigger: str, error: str, *, deferred: bool = False
    ) -> None:
        self._park(lease, self._clock.now(), error)
        if not deferred:  # a call that failed; a deferred lease was never sent
            metrics.REVOKE_FAILURES.inc()
        metrics.REVOCATIONS.labels(trigger, "pending").inc()
        record(
            session,
            self._clock,
            "lease.revoke_deferred" if deferred else "lease.revoke_failed",
            actor,
            lease=lease,
            detail={"attempt": lease.revoke_attempts, "error": lease.last_error, "trigger": trigger},
        )

    def revoke_token_if_clear(self, task: Task) -> bool:
        """Revoke the task's Vault token once none of its leases is waiting on a retry.

        While a lease is `revoke_pending` the token stays: its lease id is how we retry, and
        revoking the token would only queue the same backend call inside Vault.
        """
        if task.token_accessor is None or task.token_revoked_at is not None:
            return True
        if any(lease.state != "revoked" for lease in task.leases):
            return False
        try:
            self._vault.revoke_task_token(task.token_accessor)
        except VaultError as error:
            log.warning("task token revoke failed for task %s: %s", task.id, error)
            return False
        task.token_revoked_at = self._clock.now()
        return True

    def _park(self, lease: Lease, now: datetime, error: str) -> None:
        retry_at = now + timedelta(seconds=self._backoff.delay(lease.revoke_attempts))
        lifecycle.lease_parked(lease, error=error, retry_at=retry_at)
