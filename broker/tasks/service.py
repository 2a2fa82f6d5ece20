"""Start, claim, finish and read tasks.

The order of a start is the broker's central promise (SPEC §6.1-6.2):
  1. decide and record the task (`issuing`) in one transaction;
  2. create the task's own Vault token and commit its accessor;
  3. issue every credential with that token, all or nothing;
  4. commit the leases, and only then hand the secrets out.
A crash anywhere after 2 leaves an accessor the reconciler revokes, and with the token
Vault revokes every lease it issued, recorded or not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.attributes import set_committed_value

from broker import metrics
from broker.audit import record
from broker.clock import Clock, rfc3339
from broker.credentials import CredentialSpec
from broker.db import DatabaseUnavailable, unit_of_work
from broker.errors import (
    Conflict,
    DatabaseUnavailableError,
    IssuanceFailed,
    LimitExceeded,
    NotFound,
    PolicyDenied,
    VaultUnavailableError,
)
from broker.errors import TtlExceedsMax as TtlExceedsMaxError
from broker.errors import UnknownTask as UnknownTaskError
from broker.identity import Identity
from broker.leases.revoker import TERMINAL_TASK_STATES, Revoker
from broker.models import Lease, Task, load_task
from broker.notify import Notifier
from broker.policy import (
    CompiledTask,
    Decision,
    PolicySnapshot,
    PolicyStore,
    TaskRequest,
    TtlExceedsMax,
    UnknownTask,
    Usage,
)
from broker.tasks.ledger import activate_with_leases, insert_task, lock_and_count, read_task, write_back_end
from broker.tasks.schemas import StartTask
from broker.vault import (
    IssuedSecret,
    TaskToken,
    VaultError,
    VaultGateway,
    VaultUnavailable,
)
from broker.vault.pool import TaskTokenPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IssuedCredential:
    name: str
    kind: str
    data: Mapping[str, Any]
    expires_at: datetime


@dataclass(frozen=True)
class StartResult:
    task: Task
    credentials: dict[str, IssuedCredential] | None


def request_hash(task: Task, credentials: Mapping[str, CredentialSpec]) -> str:
    """Binds an approval to this exact request: who, which task, for whom, why, how long,
    with what context, and which credentials the policy would issue for it. A policy
    change to the task's credentials between approval and claim voids the approval."""
    canonical = json.dumps(
        {
            "workload": task.workload,
            "task": task.task,
            "owner": task.owner,
            "purpose": task.purpose,
            "ttl_seconds": task.ttl_seconds,
            "context": task.context,
            "credentials": {name: spec.model_dump(mode="json") for name, spec in credentials.items()},
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _workload_lock_key(workload: str, task: str) -> int:
    digest = hashlib.blake2b(f"{workload}\x00{task}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class TaskService:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        policies: PolicyStore,
        vault: VaultGateway,
        clock: Clock,
        revoker: Revoker,
        notifier: Notifier | None = None,
        tokens: TaskTokenPool | None = None,
    ) -> None:
        self._notifier = notifier or Notifier(None)
        self._tokens = tokens or TaskTokenPool(vault, clock, depth=0)
        self._sessions = sessions
        self._policies = policies
        self._vault = vault
        self._clock = clock
        self._revoker = revoker

    # ---- start -------------------------------------------------------------------------

    def start(self, identity: Identity, body: StartTask) -> StartResult:
        # One snapshot for the whole start, so a reload can't change the task type midway.
        snapshot = self._policies.snapshot()
        try:
            compiled = snapshot.policy.task(body.task)
        except UnknownTask:
            raise UnknownTaskError(f"no task type named '{body.task}' in the policy") from None
        task, decision, token = self._decide_and_record(identity, body, snapshot, compiled)
        if not decision.allowed:
            metrics.TASKS_STARTED.labels(body.task, "limited" if decision.limit_exceeded else "denied").inc()
            raise _denial(decision)
        if task.state == "pending_approval":
            metrics.TASKS_STARTED.labels(body.task, "pending_approval").inc()
            self._notifier.send("approval.requested", _approval_summary(task))
            return StartResult(task=task, credentials=None)
        assert token is not None
        active, credentials = self._issue(task, token, identity.id, compiled, actor=identity.id)
        metrics.TASKS_STARTED.labels(body.task, "active").inc()
        return StartResult(task=active, credentials=credentials)

    def _decide_and_record(
        self, identity: Identity, body: StartTask, snapshot: PolicySnapshot, compiled: CompiledTask
    ) -> tuple[Task, Decision, TaskToken | None]:
        policy = snapshot.policy
        request = TaskRequest(
            task=body.task,
            owner=body.owner,
            purpose=body.purpose,
            ttl_seconds=body.ttl_seconds,
            context=body.context,
        )
        # A first look without usage (limits are decided under the lock below). When the
        # request will likely be issued, its token is taken now, before the workload's
        # lock: a slow Vault must not hold the lock the workload's other starts wait on.
        # Denied and approval-bound requests never touch Vault.
        try:
            first_look = policy.evaluate(identity, request, Usage(0, 0), self._clock.now())
        except TtlExceedsMax as error:
            raise TtlExceedsMaxError(str(error)) from None
        tokens: list[TaskToken] = []
        if first_look.allowed and not first_look.approval_required:
            tokens.append(self._take_token(identity, body, compiled))
        with self._compensating(tokens), self._uow() as session:
            # Serialise starts of one workload for one task type so limits can't be raced.
            lock_key = _workload_lock_key(identity.id, body.task)
            now, usage = lock_and_count(session, lock_key=lock_key, workload=identity.id, task=body.task)
            try:
                decision = policy.evaluate(identity, request, usage, now)
            except TtlExceedsMax as error:
                raise TtlExceedsMaxError(str(error)) from None
            task = Task(
                id=uuid.uuid4(),
                task=body.task,
                workload=identity.id,
                workload_issuer=identity.issuer_name,
                owner=body.owner,
                purpose=body.purpose,
                context=body.context,
                ttl_seconds=decision.ttl_seconds,
                request_hash="",
                created_at=now,
                policy_version=f"{snapshot.version}:{snapshot.sha256[:12]}",
            )
            task.request_hash = request_hash(task, compiled.credentials)
            if not decision.allowed:
                record(
                    session,
                    self._clock,
                    "task.denied",
                    identity.id,
                    owner=body.owner,
                    purpose=body.purpose,
                    detail={
                        "task": body.task,
                        "rule": decision.failed_rule,
                        "why": decision.detail,
                        "context": body.context,
                    },
                )
            elif decision.approval_required:
                approval = compiled.approval
                task.state = "pending_approval"
                task.approval_expires_at = now + timedelta(seconds=approval.expires_in if approval else 600)
                session.add(task)
                session.flush()
                record(session, self._clock, "task.approval_requested", identity.id, task=task)
            else:
                task.state = "issuing"
                task.expires_at = now + timedelta(seconds=decision.ttl_seconds)
                # The token's accessor is committed with the task, before anything is issued
                # with it: a crash from here on leaves something the reconciler revokes.
                if not tokens:  # the first look disagreed; rare (a policy reload in between)
                    tokens.append(self._take_token(identity, body, compiled))
                task.token_accessor = tokens[0].accessor
                record(
                    session,
                    self._clock,
                    "task.start_requested",
                    identity.id,
                    task=task,
                    detail={"ttl_seconds": task.ttl_seconds},
                )
                insert_task(session, task)
        if task.token_accessor is None:
            for unused in tokens:  # a limit said no under the lock
                self._tokens.give_back(
                    unused, task=body.task, specs=compiled.credentials, ttl_max=compiled.ttl_max
                )
            return task, decision, None
        return task, decision, tokens[0]

    # ---- issuing -----------------------------------------------------------------------

    def _issue(
        self, task: Task, token: TaskToken, workload: str, compiled: CompiledTask, *, actor: str
    ) -> tuple[Task, dict[str, IssuedCredential]]:
        specs = compiled.credentials
        issued: dict[str, IssuedSecret] = {}
        try:
            for name, spec in specs.items():
                issued[name] = self._vault.issue(
                    token, spec, ttl_seconds=task.ttl_seconds, task_id=str(task.id), workload=workload
                )
        except VaultError as error:
            self._abandon(task, token.accessor, issued, error, actor)
            if isinstance(error, VaultUnavailable):
                raise VaultUnavailableError("Vault could not be reached; nothing was issued") from None
            raise IssuanceFailed("Vault refused one of the task's credentials; nothing was issued") from None
        active = self._commit_leases(task, specs, issued, token, actor)
        assert active.expires_at is not None
        self._tokens.lend(
            active.id,
            token,
            task=compiled.name,
            specs=specs,
            ttl_max=compiled.ttl_max,
            until=active.expires_at,
        )
        return active, {
            name: IssuedCredential(
                name=name,
                kind=specs[name].kind,
                data=secret.data,
                expires_at=min(secret.expires_at, task.expires_at or secret.expires_at),
            )
            for name, secret in issued.items()
        }

    def _take_token(self, identity: Identity, body: StartTask, compiled: CompiledTask) -> TaskToken:
        ttl = min(body.ttl_seconds or compiled.ttl_default, compiled.ttl_max)
        ready = self._tokens.take_ready(
            task=compiled.name, specs=compiled.credentials, ttl_max=compiled.ttl_max, ttl_needed=ttl
        )
        if ready is not None:
            return ready
        # Nothing ready: Vault will be asked. Make sure the ledger answers first, so that a
        # start without its database never reaches Vault at all (catalogue F02).
        self._ping_database()
        try:
            return self._token_for(compiled, ttl)
        except (VaultUnavailableError, IssuanceFailed) as error:
            self._record_start_failure(identity, body, f"task token: {error.detail}")
            raise

    def _ping_database(self) -> None:
        try:
            with self._uow() as session:
                session.execute(text("SELECT 1"))
        except DatabaseUnavailable:
            raise DatabaseUnavailableError("the database is unavailable; nothing was issued") from None

    def _token_for(self, compiled: CompiledTask, ttl: int) -> TaskToken:
        try:
            return self._tokens.take(
                task=compiled.name, specs=compiled.credentials, ttl_max=compiled.ttl_max, ttl_needed=ttl
            )
        except VaultError as error:
            # Refused to create a task token means our own token is gone or misconfigured:
            # to the caller that is the same as Vault being unavailable.
            if isinstance(error, VaultUnavailable) or error.status == 403:
                raise VaultUnavailableError("Vault could not be reached; nothing was issued") from None
            raise IssuanceFailed("Vault refused to create the task's token") from None

    def _record_start_failure(self, identity: Identity, body: StartTask, reason: str) -> None:
        try:
            with self._uow() as session:
                record(
                    session, self._clock, "task.start_failed", identity.id, owner=body.owner,
                    purpose=body.purpose, detail={"task": body.task, "reason": reason[:500]},
                )  # fmt: skip
        except DatabaseUnavailable:
            log.warning("could not record a failed start of %s", body.task)

    @contextmanager
    def _compensating(self, tokens: list[TaskToken]) -> Iterator[None]:
        """If the transaction that records a token's accessor fails, revoke the token."""
        try:
            yield
        except BaseException:
            for token in tokens:
                self._revoke_quietly(token.accessor, {})
            raise

    def _commit_leases(
        self,
        task: Task,
        specs: Mapping[str, CredentialSpec],
        issued: Mapping[str, IssuedSecret],
        token: TaskToken,
        actor: str,
    ) -> Task:
        try:
            with self._uow() as session:
                now = self._clock.now()
                leases = [
                    _lease_row(task, name, specs[name].kind, secret, now) for name, secret in issued.items()
                ]
                for lease, secret in zip(leases, issued.values(), strict=True):
                    record(
                        session,
                        self._clock,
                        "lease.issued",
                        actor,
                        lease=lease,
                        detail={
                            "name": lease.name,
                            "kind": lease.kind,
                            "vault_lease_id": secret.vault_lease_id,
                        },
                    )
                    metrics.LEASES_ISSUED.labels(lease.kind).inc()
                record(
                    session,
                    self._clock,
                    "task.started",
                    actor,
                    task=task,
                    detail={"credentials": sorted(issued), "expires_at": rfc3339(task.expires_at)},
                )
                # No load and lock of the task: the move to active is guarded by its state,
                # so if a finish or the kill switch ended it meanwhile, nothing is written.
                if not activate_with_leases(session, task.id, leases):
                    raise Conflict("the task ended while its credentials were being issued")
                task.state = "active"
            # The task object is detached now; give it its leases without a load.
            set_committed_value(task, "leases", sorted(leases, key=lambda lease: lease.name))
            return task
        except (DatabaseUnavailable, Conflict) as error:
            # Record before release: without committed leases, nothing leaves the broker.
            self._revoke_quietly(token.accessor, issued)
            if isinstance(error, Conflict):
                raise
            raise DatabaseUnavailableError("the database is unavailable; nothing was issued") from None
        except Exception:
            self._revoke_quietly(token.accessor, issued)
            raise

    def _abandon(
        self, task: Task, accessor: str, issued: Mapping[str, IssuedSecret], error: VaultError, actor: str
    ) -> None:
        """All or nothing (SPEC §6.1): revoke what was issued before the error is returned."""
        leftovers = self._revoke_quietly(accessor, issued)
        self._mark_failed(task, f"issuing failed: {error}", actor, token_revoked=not leftovers)

    def _revoke_quietly(self, accessor: str, issued: Mapping[str, IssuedSecret]) -> list[str]:
        """Best effort; what stays alive is left to the reconciler (the accessor is on record)."""
        failed = []
        for name, secret in issued.items():
            try:
                self._vault.revoke(secret.handle)
            except VaultError:
                failed.append(name)
        try:
            self._vault.revoke_task_token(accessor)
        except VaultError:
            failed.append("(task token)")
        if failed:
            log.warning("compensating revoke incomplete: %s", ", ".join(failed))
        return failed

    def _mark_failed(self, task: Task, reason: str, actor: str, *, token_revoked: bool = False) -> None:
        try:
            with self._uow() as session:
                row = load_task(session, task.id, lock=True)
                if row is None or row.state in TERMINAL_TASK_STATES:
                    return
                now = self._clock.now()
                row.state, row.finished_at, row.end_reason = "failed", now, reason[:500]
                if token_revoked and row.token_accessor:
                    row.token_revoked_at = now
                record(session, self._clock, "task.failed", actor, task=row, detail={"reason": reason[:500]})
            task.state = "failed"
        except DatabaseUnavailable:
            log.warning("could not record failure of task %s; the reconciler will", task.id)
        metrics.TASKS_FINISHED.labels("failed").inc()

    # ---- claim (approved tasks) --------------------------------------------------------

    def claim(self, identity: Identity, task_id: uuid.UUID) -> StartResult:
        policy = self._policies.current()
        tokens: list[TaskToken] = []
        with self._compensating(tokens), self._uow() as session:
            task = self._owned(session, identity, task_id, lock=True)
            if task.claimed_at is not None or task.state != "pending_approval":
                raise Conflict(f"the task is {task.state}; an approval can be claimed once")
            now = self._db_now(session)
            if task.approved_at is None:
                raise Conflict("the task is still waiting for approval")
            if task.approval_expires_at is not None and task.approval_expires_at <= now:
                raise Conflict("the approval lapsed; start a new task")
            try:
                compiled = policy.task(task.task)
            except UnknownTask:
                raise Conflict("the task type is no longer in the policy") from None
            current = request_hash(task, compiled.credentials)
            if current != task.request_hash or any(a.request_hash != current for a in task.approvals):
                raise Conflict("the policy changed what this task would get; start a new task")
            task.claimed_at = now
            task.state = "issuing"
            task.expires_at = now + timedelta(seconds=task.ttl_seconds)
            token = self._token_for(compiled, task.ttl_seconds)
            tokens.append(token)
            task.token_accessor = token.accessor
            record(session, self._clock, "task.claimed", identity.id, task=task)
        active, credentials = self._issue(task, token, identity.id, compiled, actor=identity.id)
        return StartResult(task=active, credentials=credentials)

    # ---- finish and read ---------------------------------------------------------------

    def finish(self, identity: Identity, task_id: uuid.UUID, outcome: str) -> Task:
        with self._uow() as session:
            task = _mine(read_task(session, task_id, lock=True), identity)
            if task.state not in TERMINAL_TASK_STATES:
                final_outcome = "cancelled" if task.state == "pending_approval" else outcome
                self._revoker.end_task(
                    session,
                    task,
                    state="finished",
                    actor=identity.id,
                    reason=f"finished by workload ({final_outcome})",
                    trigger="finish",
                    outcome=final_outcome,
                )
                if self._token_reusable(task):
                    task.token_released_at = task.finished_at
                write_back_end(session, task)
        if task.token_released_at is not None:
            self._tokens.give_back_used(task.id)  # only now: the release is committed
        return task

    def _token_reusable(self, task: Task) -> bool:
        """A task token may serve another task once nothing it created is alive: every
        lease revoked (synchronously, just now) and the token held by this process."""
        if task.token_accessor is None or task.token_revoked_at is not None:
            return False
        if any(lease.state != "revoked" for lease in task.leases):
            return False
        return self._tokens.holds(task.id, task.token_accessor)

    def get(self, identity: Identity, task_id: uuid.UUID) -> Task:
        with self._uow() as session:
            task = read_task(session, task_id)
        if identity.may("operator"):
            if task is None:
                raise NotFound("no such task")
            return task
        return _mine(task, identity)

    def _owned(self, session: Session, identity: Identity, task_id: uuid.UUID, *, lock: bool) -> Task:
        return _mine(load_task(session, task_id, lock=lock), identity)

    # ---- plumbing ----------------------------------------------------------------------

    def _uow(self) -> AbstractContextManager[Session]:
        return unit_of_work(self._sessions)

    @staticmethod
    def _db_now(session: Session) -> datetime:
        # The database's clock, so every replica measures deadlines against one time.
        value: datetime = session.scalar(select(func.now()))  # type: ignore[assignment]
        return value


def _mine(task: Task | None, identity: Identity) -> Task:
    # Another workload's task is indistinguishable from a missing one (SPEC §6.6).
    if task is None or task.workload != identity.id:
        raise NotFound("no such task")
    return task


def _approval_summary(task: Task) -> dict[str, Any]:
    return {
        "task_id": str(task.id),
        "task": task.task,
        "workload": task.workload,
        "owner": task.owner,
        "purpose": task.purpose,
        "context": task.context,
        "ttl_seconds": task.ttl_seconds,
        "approval_expires_at": rfc3339(task.approval_expires_at),
    }


def _lease_row(task: Task, name: str, kind: str, secret: IssuedSecret, now: datetime) -> Lease:
    expires = min(secret.expires_at, task.expires_at) if task.expires_at else secret.expires_at
    return Lease(
        id=uuid.uuid4(),
        task_id=task.id,
        task=task.task,
        name=name,
        kind=kind,
        workload=task.workload,
        owner=task.owner,
        purpose=task.purpose,
        state="active",
        issued_at=now,
        expires_at=expires,
        revoke_attempts=0,
        revoke_kind=secret.handle.kind,
        revoke_ref=secret.handle.ref,
        vault_lease_id=secret.vault_lease_id,
    )


_DENIAL_TEXT = {
    "workloads": "this workload may not start this task",
    "owners": "this owner is not allowed for this task",
    "ttl": "the requested TTL is not allowed",
}


def _denial(decision: Decision) -> Exception:
    """The caller learns which rule failed, not the policy's patterns (operators see those in audit)."""
    rule = decision.failed_rule or "policy"
    if decision.limit_exceeded:
        return LimitExceeded(
            f"{rule}: limit reached, retry later", retry_after=decision.retry_after_seconds or 1, rule=rule
        )
    why = _DENIAL_TEXT.get(rule, "the condition is not met")
    return PolicyDenied(f"{rule}: {why}", rule=rule)
