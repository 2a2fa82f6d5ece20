"""Start, claim, finish and read tasks.

A start decides and records the task, then hands it to `broker.tasks.issuing`, which
issues all or nothing and commits the leases before any secret leaves (its docstring
gives the order). A claim is the same issuing for a task an approver let through.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy.orm import Session, sessionmaker

from broker import lifecycle, metrics
from broker.approvals.notify import Notifier
from broker.audit import record
from broker.canonical import stored_form
from broker.clock import Clock, rfc3339
from broker.credentials import CredentialSpec, hashed_form
from broker.db import unit_of_work
from broker.errors import (
    Conflict,
    IdempotencyKeyReused,
    LimitExceeded,
    Locked,
    NotFound,
    PolicyDenied,
    UnknownTask,
)
from broker.gateway.handles import GatewayAddress
from broker.identity import Identity
from broker.leases.revoker import Revoker
from broker.ledger import (
    Admission,
    database_now,
    idempotency_clash,
    insert_task,
    load_task,
    lock_and_count,
    matching_lock,
    read_task,
    release_idempotency_key,
    take_pooled,
    targets_of,
    write_back_end,
)
from broker.lifecycle import TASK_OPEN_STATES, Outcome
from broker.models import Task
from broker.policy import CompiledTask, Decision, PolicySnapshot, PolicyStore, TaskRequest, Usage
from broker.tasks.issuing import IssuedCredential, Issuer, TokenHold, deadline
from broker.tasks.token_pool import RecordedToken, TaskTokenPool
from broker.vault import TaskToken, VaultGateway, VaultUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recorded:
    """What a start's decision recorded, handed from the locked transaction to the issuing.

    - `repeated`: a retry under the key of a task that waits for approval (no decision);
    - `refused`: denied or limited (the task is not recorded; the denial is audited);
    - `locked`: refused by an operator's lock (not recorded; audited as a denial by `lock`);
    - `pending_approval`: recorded, waiting, nothing issued;
    - `issuing`: recorded with `token`'s accessor, to be issued with it."""

    task: Task
    outcome: Literal["repeated", "refused", "locked", "pending_approval", "issuing"]
    decision: Decision | None
    token: TaskToken | None
    # For `locked`: the lock that refused it.
    lock: uuid.UUID | None = None


@dataclass(frozen=True)
class StartResult:
    task: Task
    credentials: dict[str, IssuedCredential] | None


def request_hash(task: Task, credentials: Mapping[str, CredentialSpec]) -> str:
    """Binds an approval to this exact request: who, which task, for whom, why, how long,
    with what context, and which credentials the policy would issue for it. A policy
    change to the task's credentials between approval and claim voids the approval.

    The context as Postgres gives it back: the claim hashes the stored row, the start the
    request, and both must agree (`broker.canonical`)."""
    canonical = json.dumps(
        {
            "workload": task.workload,
            "task": task.task,
            "owner": task.owner,
            "purpose": task.purpose,
            "ttl_seconds": task.ttl_seconds,
            "context": stored_form(task.context),
            "credentials": {name: hashed_form(spec) for name, spec in credentials.items()},
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class IdempotencyKey:
    """A start's Idempotency-Key (scoped to its workload) and the hash of its request."""

    value: str
    request_hash: str


def start_hash(request: TaskRequest) -> str:
    """The request as the workload sent it (parsed: key order and spacing don't count), for
    telling a retry from another request under the same Idempotency-Key."""
    canonical = json.dumps(
        {
            "task": request.task,
            "owner": request.owner,
            "purpose": request.purpose,
            "ttl_seconds": request.ttl_seconds,
            "context": request.context,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _key_holder(keyed: Task | None, now: datetime) -> Task | None:
    """The task that still holds its Idempotency-Key: while it is open, and after it ended
    until its deadline (or, if it never became active, its TTL after it was asked for)."""
    if keyed is None or keyed.state in TASK_OPEN_STATES:
        return keyed
    until = keyed.expires_at or keyed.created_at + timedelta(seconds=keyed.ttl_seconds)
    return keyed if now < until else None


def _answer_for_key(holder: Task, key: IdempotencyKey) -> Task:
    """A retry's answer: the task itself if it waits for approval (the 202 again), else
    the error that names it. Credentials are sent once; the broker keeps no copy."""
    named = {"task_id": str(holder.id), "state": holder.state}
    if holder.idempotency_hash != key.request_hash:
        raise IdempotencyKeyReused(
            "this Idempotency-Key already started a task with a different request; use a new key"
            " for a new request", **named,
        )  # fmt: skip
    if holder.state == "pending_approval":
        return holder
    if holder.state == "issuing":
        raise Conflict("the start with this Idempotency-Key is still in progress; retry shortly", **named)
    if holder.state == "active":
        raise Conflict(
            "this Idempotency-Key already started a task, which is active; its credentials are"
            " sent only once: use them if you have them, or finish the task", **named,
        )  # fmt: skip
    raise Conflict(f"this Idempotency-Key already started a task, which is {holder.state}", **named)


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
        gateway: GatewayAddress | None = None,
    ) -> None:
        self._notifier = notifier or Notifier(None)
        self._tokens = tokens or TaskTokenPool(vault, clock, depth=0)  # records nothing: holds nothing
        self._sessions = sessions
        self._policies = policies
        self._vault = vault
        self._clock = clock
        self._revoker = revoker
        self._issuer = Issuer(sessions, vault, clock, self._tokens, gateway)

    # ---- start -------------------------------------------------------------------------

    def start(
        self, identity: Identity, request: TaskRequest, *, idempotency_key: str | None = None
    ) -> StartResult:
        # One snapshot for the whole start, so a reload can't change the task type midway.
        snapshot = self._policies.snapshot()
        compiled = snapshot.policy.task(request.task)
        key = IdempotencyKey(idempotency_key, start_hash(request)) if idempotency_key else None
        try:
            recorded = self._decide_and_record(identity, request, snapshot, compiled, key)
        except Exception as error:
            if idempotency_clash(error):  # the same key, another task type, at the same moment
                raise Conflict("a start with this Idempotency-Key is in progress; retry shortly") from None
            raise
        task, decision = recorded.task, recorded.decision
        match recorded.outcome:
            case "repeated":  # a retry of a start that waits for approval: the same answer
                return StartResult(task=task, credentials=None)
            case "locked":
                assert recorded.lock is not None
                metrics.TASKS_STARTED.labels(request.task, "locked").inc()
                raise Locked(recorded.lock)
            case "refused":
                assert decision is not None
                outcome = "limited" if decision.limit_exceeded else "denied"
                metrics.TASKS_STARTED.labels(request.task, outcome).inc()
                raise _denial(decision)
            case "pending_approval":
                metrics.TASKS_STARTED.labels(request.task, "pending_approval").inc()
                self._notifier.send("approval.requested", _approval_summary(task, compiled))
                return StartResult(task=task, credentials=None)
            case "issuing":
                assert recorded.token is not None
                active, credentials = self._issuer.issue(
                    task, recorded.token, identity.id, compiled, actor=identity.id
                )
                metrics.TASKS_STARTED.labels(request.task, "active").inc()
                return StartResult(task=active, credentials=credentials)

    def _decide_and_record(
        self,
        identity: Identity,
        request: TaskRequest,
        snapshot: PolicySnapshot,
        compiled: CompiledTask,
        key: IdempotencyKey | None,
    ) -> Recorded:
        """What this start recorded; for a retry whose key names a task waiting for
        approval, that task (`_answer_for_key` raises the other answers to a retry)."""
        # A first look without usage (limits are decided under the lock below). When the
        # request will likely be issued, its token is taken now, before the workload's
        # lock: a slow Vault must not hold the lock the workload's other starts wait on.
        # Denied and approval-bound requests never touch Vault.
        first_look = snapshot.policy.evaluate(identity, request, Usage(0, 0), self._clock.now())
        hold = TokenHold()
        if first_look.allowed and not first_look.approval_required:
            hold.keep(self._issuer.take_token(identity, request, compiled, first_look.ttl_seconds))
        holder: Task | None = None
        with self._issuer.compensating(hold), self._uow() as session:
            # Serialise starts of one workload for one task type so limits can't be raced,
            # and so a retry waits for the start it repeats and then finds its task.
            lock_key = _workload_lock_key(identity.id, request.task)
            admission = lock_and_count(
                session, lock_key=lock_key, workload=identity.id, task=request.task,
                owner=request.owner, issuer=identity.issuer_name,
                idempotency_key=key.value if key else None,
            )  # fmt: skip
            if admission.lock is not None:  # before anything else: a locked start learns nothing more
                recorded = self._locked(session, identity, request, admission.lock)
            elif (holder := _key_holder(admission.keyed, admission.now)) is None:
                if admission.keyed is not None:  # its task let go of the key: it starts this one
                    release_idempotency_key(session, admission.keyed.id)
                recorded = self._record(session, identity, request, snapshot, compiled, admission, hold, key)
        if holder is not None:
            assert key is not None
            self._give_back(hold, compiled)
            return Recorded(_answer_for_key(holder, key), "repeated", None, None)
        if recorded.token is None:  # not issued: refused or waiting for approval
            self._give_back(hold, compiled)
        return recorded

    def _record(
        self,
        session: Session,
        identity: Identity,
        request: TaskRequest,
        snapshot: PolicySnapshot,
        compiled: CompiledTask,
        admission: Admission,
        hold: TokenHold,
        key: IdempotencyKey | None,
    ) -> Recorded:
        """Decide under the workload's lock, and record the task (or the denial)."""
        now, usage = admission.now, admission.usage
        decision = snapshot.policy.evaluate(identity, request, usage, now)
        task = Task(
            id=uuid.uuid4(),
            task=request.task,
            workload=identity.id,
            workload_issuer=identity.issuer_name,
            owner=request.owner,
            purpose=request.purpose,
            context=request.context,
            ttl_seconds=decision.ttl_seconds,
            request_hash="",
            created_at=now,
            policy_version=f"{snapshot.version}:{snapshot.sha256[:12]}",
            idempotency_key=key.value if key else None,
            idempotency_hash=key.request_hash if key else None,
        )
        task.request_hash = request_hash(task, compiled.credentials)
        if not decision.allowed:
            self._denied(session, identity, request, rule=decision.failed_rule, why=decision.detail)
            return Recorded(task, "refused", decision, None)
        if decision.approval_required:
            approval = compiled.approval
            expires_in = approval.expires_in if approval else 600
            lifecycle.await_approval(task, approval_expires_at=now + timedelta(seconds=expires_in))
            record(session, self._clock, "task.approval_requested", identity.id, task=task)
            insert_task(session, task)
            return Recorded(task, "pending_approval", decision, None)
        # The first look disagreed (rare: a policy reload in between): take the token now.
        token = hold.token or hold.keep(
            self._issuer.take_token(identity, request, compiled, decision.ttl_seconds)
        )
        lifecycle.begin_issuing(
            task, expires_at=deadline(now, decision.ttl_seconds), token_accessor=token.accessor
        )
        record(
            session,
            self._clock,
            "task.start_requested",
            identity.id,
            task=task,
            detail={"ttl_seconds": task.ttl_seconds},
        )
        if not insert_task(session, task, pooled_token=isinstance(token, RecordedToken)):
            raise self._reclaimed()
        return Recorded(task, "issuing", decision, token)

    def _denied(self, session: Session, identity: Identity, request: TaskRequest, **detail: Any) -> None:
        """`task.denied`: no task is recorded, so the event carries the owner and purpose."""
        record(
            session, self._clock, "task.denied", identity.id, owner=request.owner, purpose=request.purpose,
            detail={"task": request.task, **detail, "context": request.context},
        )  # fmt: skip

    def _locked(
        self, session: Session, identity: Identity, request: TaskRequest, lock: uuid.UUID
    ) -> Recorded:
        """A start an operator's lock refuses: audited as a denial, so the log shows what a
        locked-out workload still tried."""
        self._denied(session, identity, request, rule="lock", lock_id=str(lock))
        placeholder = Task(id=uuid.uuid4(), task=request.task, workload=identity.id, owner=request.owner)
        return Recorded(placeholder, "locked", None, None, lock=lock)

    def _give_back(self, hold: TokenHold, compiled: CompiledTask) -> None:
        if hold.token is not None:
            self._tokens.give_back(
                hold.token, task=compiled.name, specs=compiled.credentials, ttl_max=compiled.ttl_max
            )

    # ---- claim (approved tasks) --------------------------------------------------------

    def claim(self, identity: Identity, task_id: uuid.UUID) -> StartResult:
        policy = self._policies.current()
        hold = TokenHold()
        with self._issuer.compensating(hold), self._uow() as session:
            task = self._owned(session, identity, task_id, lock=True)
            # Before the state: a lock also ended the task, and the workload is told why.
            if (lock := matching_lock(session, targets_of(task))) is not None:
                raise Locked(lock)
            if task.claimed_at is not None or task.state != "pending_approval":
                raise Conflict(f"the task is {task.state}; an approval can be claimed once")
            now = database_now(session)
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
            token = hold.keep(self._issuer.token_for(compiled, task.ttl_seconds))
            lifecycle.begin_issuing(
                task, expires_at=deadline(now, task.ttl_seconds), token_accessor=token.accessor
            )
            if isinstance(token, RecordedToken) and not take_pooled(session, token.accessor):
                raise self._reclaimed()
            record(session, self._clock, "task.claimed", identity.id, task=task)
        active, credentials = self._issuer.issue(task, token, identity.id, compiled, actor=identity.id)
        return StartResult(task=active, credentials=credentials)

    def _reclaimed(self) -> Exception:
        """The pooled token a start took was revoked by the scheduler: this process's
        lease on its pool had lapsed (the database was out of reach for longer than the
        lease), so the rest of its pool goes too. Rare; the client retries (503)."""
        log.warning("a pooled task token was reclaimed before its start recorded it; pool dropped")
        self._tokens.forfeit_ready()
        return VaultUnavailable("task token", "the pooled token was reclaimed; retry")

    # ---- finish and read ---------------------------------------------------------------

    def finish(self, identity: Identity, task_id: uuid.UUID, outcome: Outcome) -> Task:
        with self._uow() as session:
            task = _mine(read_task(session, task_id, lock=True), identity)
            if lifecycle.is_open(task):
                final_outcome: Outcome = "cancelled" if task.state == "pending_approval" else outcome
                self._revoker.end_task(
                    session,
                    task,
                    state="finished",
                    actor=identity.id,
                    reason=f"finished by workload ({final_outcome})",
                    trigger="finish",
                    outcome=final_outcome,
                )
                # The released token is recorded as pooled again in the same commit.
                back = self._tokens.pool_record(task.id) if self._token_reusable(task) else None
                if back is not None:
                    task.token_released_at = task.finished_at
                write_back_end(session, task, back_to_pool=back)
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


def _mine(task: Task | None, identity: Identity) -> Task:
    # Another workload's task is indistinguishable from a missing one (docs/contract.md §6.6).
    if task is None or task.workload != identity.id:
        raise NotFound("no such task")
    return task


def _approval_summary(task: Task, compiled: CompiledTask) -> dict[str, Any]:
    """The whole request an approver decides on, and what it would issue (names and kinds)."""
    approval = compiled.approval
    return {
        "task_id": str(task.id),
        "task": task.task,
        "workload": task.workload,
        "owner": task.owner,
        "purpose": task.purpose,
        "context": task.context,
        "ttl_seconds": task.ttl_seconds,
        "approval_expires_at": rfc3339(task.approval_expires_at),
        "credentials": [{"name": name, "kind": spec.kind} for name, spec in compiled.credentials.items()],
        "approver_groups": sorted(approval.groups) if approval else [],
        "min_approvals": approval.min_approvals if approval else 1,
    }


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
    failed = next((result for result in decision.rules if result.rule == rule), None)
    if failed is not None and failed.expression is not None:
        # A `when` rule is a condition on the request: the caller can only meet it if told
        # what it says and what the request lacked (docs/policy.md#rules-and-their-names).
        why = f"the condition `{failed.expression}` is not met"
        if failed.missing_context:
            why += f"; the request's context has no {', '.join(map(repr, failed.missing_context))}"
    else:
        why = _DENIAL_TEXT.get(rule, "the condition is not met")
    return PolicyDenied(f"{rule}: {why}", rule=rule)
