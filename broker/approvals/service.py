"""Deciding on pending tasks (docs/contract.md §6.5).

An approval covers one task and its exact request (the request hash), once, until it
lapses. The approver must differ from the requesting workload and from the owner, and
must satisfy the task type's `approval.approvers` rule. One `deny` ends the task.

Who is who is decided on names in one normal form (broker/identity/people.py), so a
respelling (case, invisible characters, compatibility forms, look-alike letters) of the
owner or the workload is still them, and one person is one vote however many issuers
vouch for them (docs/security.md, "Separation of duties").
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from broker import lifecycle
from broker.approvals.notify import Notifier
from broker.audit import record
from broker.clock import Clock
from broker.db import unit_of_work
from broker.errors import Conflict, Forbidden, Locked, NotFound
from broker.identity import Identity
from broker.identity.people import InvalidPerson, check_person, same_person_key
from broker.ledger import database_now, load_task, matching_lock, targets_of, waiting_for_approval
from broker.models import Approval, Task
from broker.paging import Page, decode_position, encode_cursor
from broker.policy import PolicyStore, UnknownTask, approver_allowed


def _names_of(identity: Identity) -> set[str]:
    """Every name under which this human or workload might appear as a requester or owner.

    Unverified emails count too: here a name can only refuse, never grant.
    """
    names = {identity.id, identity.subject}
    for claim in ("email", "preferred_username", "upn"):
        value = identity.claims.get(claim)
        if isinstance(value, str) and value:
            names.add(value)
    return {same_person_key(name) for name in names}


def _workload_names(task: Task) -> set[str]:
    """The requesting workload's id and, for an OIDC workload, its bare subject.

    The subject too, so a person whose tokens from a workload issuer start tasks can't
    approve them with a token from another issuer under the same name.
    """
    names = {task.workload}
    prefix = f"{task.workload_issuer}:"
    if task.workload.startswith(prefix):
        names.add(task.workload[len(prefix) :])
    return {same_person_key(name) for name in names}


@dataclass(frozen=True)
class Pending:
    """A task waiting for approval, as its approvers see it."""

    task: Task
    would_issue: tuple[tuple[str, str], ...]  # (credential name, kind)
    approver_groups: tuple[str, ...]
    min_approvals: int


def person_of(identity: Identity) -> str:
    """The name one person's votes are counted under, the same through every issuer.

    An OIDC approver's email when its issuer vouches for it (`email_verified` is not
    false), else its subject; a SPIFFE approver's SPIFFE ID. Issuers that assert one email
    make one person; accounts under unrelated names stay two (docs/security.md).
    """
    if identity.kind == "oidc":
        email = identity.claims.get("email")
        if isinstance(email, str) and email.strip() and identity.claims.get("email_verified") is not False:
            return same_person_key(email)
    return same_person_key(identity.subject)


def _comparable(identity: Identity) -> bool:
    # A name with hidden characters or mixed look-alike scripts can't be compared with
    # confidence; such an approver is refused rather than counted as someone else.
    email = identity.claims.get("email")
    names = [identity.subject, *([email] if isinstance(email, str) and email else [])]
    try:
        for name in names:
            check_person(name)
    except InvalidPerson:
        return False
    return True


class ApprovalService:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        policies: PolicyStore,
        clock: Clock,
        notifier: Notifier | None = None,
    ) -> None:
        self._notifier = notifier or Notifier(None)
        self._sessions = sessions
        self._policies = policies
        self._clock = clock

    def decide(self, approver: Identity, task_id: uuid.UUID, decision: str, reason: str) -> Task:
        with unit_of_work(self._sessions) as session:
            task = load_task(session, task_id, lock=True)
            if task is None:
                raise NotFound("no such task")
            # Before the state: a lock also ended the task, and the approver is told why.
            if (lock := matching_lock(session, targets_of(task))) is not None:
                raise Locked(lock)
            self._check_may_decide(approver, task)
            person = person_of(approver)
            if any(a.approver == approver.id or a.person == person for a in task.approvals):
                raise Conflict("this approver has already decided on this task")
            now = database_now(session)
            if task.approval_expires_at is not None and task.approval_expires_at <= now:
                raise Conflict("the approval window has lapsed; the workload must start a new task")
            if task.approved_at is not None:
                raise Conflict("the task is already approved")
            session.add(
                Approval(
                    id=uuid.uuid4(),
                    task_id=task.id,
                    approver=approver.id,
                    person=person,
                    decision=decision,
                    reason=reason,
                    request_hash=task.request_hash,
                    created_at=now,
                )
            )
            session.flush()
            session.refresh(task, attribute_names=["approvals"])
            self._apply(session, approver, task, decision, reason, now)
        self._notifier.send(
            "approval.granted" if decision == "approve" else "approval.denied",
            {
                "task_id": str(task.id),
                "task": task.task,
                "approver": approver.id,
                "reason": reason,
                "state": task.state,
                "workload": task.workload,
            },
        )
        return task

    def _apply(
        self, session: Session, approver: Identity, task: Task, decision: str, reason: str, now: datetime
    ) -> None:
        detail = {"decision": decision, "reason": reason}
        if decision == "deny":
            lifecycle.deny(task, at=now, reason=reason)
            record(session, self._clock, "approval.denied", approver.id, task=task, detail=detail)
            return
        # Counted by person: two issuers vouching for one email are one approval.
        approvals = {a.person for a in task.approvals if a.decision == "approve"}
        needed = self._min_approvals(task)
        record(
            session,
            self._clock,
            "approval.granted",
            approver.id,
            task=task,
            detail={**detail, "approvals": len(approvals), "needed": needed},
        )
        if len(approvals) >= needed:
            task.approved_at = now
            record(session, self._clock, "task.approved", approver.id, task=task)

    def _check_may_decide(self, approver: Identity, task: Task) -> None:
        if task.state != "pending_approval" or task.claimed_at is not None:
            raise Conflict(f"the task is {task.state}; there is nothing to decide")
        # Separation of duties: neither the requester nor the accountable owner approves.
        if _workload_names(task) & _names_of(approver):
            raise Forbidden("the requesting workload can't approve its own task")
        if not _comparable(approver):
            raise Forbidden("this approver's name holds hidden characters or mixed scripts")
        if same_person_key(task.owner) in _names_of(approver):
            raise Forbidden("the task's owner can't approve it")
        try:
            compiled = self._policies.current().task(task.task)
        except UnknownTask:
            raise Conflict("the task type is no longer in the policy") from None
        verdict = approver_allowed(compiled, approver)
        if not verdict.passed:
            raise Forbidden(f"not an approver for this task type: {verdict.detail}")

    def _min_approvals(self, task: Task) -> int:
        try:
            approval = self._policies.current().task(task.task).approval
        except UnknownTask:
            return 1
        return approval.min_approvals if approval is not None else 1

    def pending_one(self, approver: Identity, task_id: uuid.UUID) -> Pending:
        """One task that waits for this approver's decision; anything else is 404, so an
        approver learns nothing of tasks they may not decide."""
        with unit_of_work(self._sessions) as session:
            task = load_task(session, task_id)
            if task is None or not self._waits_for(approver, task, session):
                raise NotFound("no task waits for your decision under that id")
        return self._pending(task)

    def _waits_for(self, approver: Identity, task: Task, session: Session) -> bool:
        if task.state != "pending_approval" or task.approved_at is not None:
            return False
        lapses = task.approval_expires_at
        return lapses is not None and lapses > database_now(session) and self._may_decide_now(approver, task)

    def _pending(self, task: Task) -> Pending:
        """What the approver decides on: the request, and what the policy would issue for it
        now (names and kinds: no role, mount or path, which only operators see)."""
        try:
            compiled = self._policies.current().task(task.task)
        except UnknownTask:
            return Pending(task, (), (), 1)
        approval = compiled.approval
        return Pending(
            task=task,
            would_issue=tuple((name, spec.kind) for name, spec in compiled.credentials.items()),
            approver_groups=tuple(sorted(approval.groups)) if approval else (),
            min_approvals=approval.min_approvals if approval else 1,
        )

    def pending_for(self, approver: Identity, limit: int, cursor: str | None = None) -> Page[Pending]:
        """Tasks waiting for a decision that this approver may make, oldest first.

        Which tasks an approver may decide depends on the policy and on who they are, so
        the filter runs here, over the pending tasks in batches, until a page is full:
        tasks they may not decide never crowd out the ones they may.
        """
        after = decode_position(cursor) if cursor else None
        visible: list[Task] = []
        with unit_of_work(self._sessions) as session:
            while len(visible) <= limit:
                rows = session.scalars(waiting_for_approval(after, _SCAN_BATCH)).all()
                visible.extend(task for task in rows if self._may_decide_now(approver, task))
                if len(rows) < _SCAN_BATCH:
                    break
                after = (rows[-1].created_at, rows[-1].id)
        more = len(visible) > limit
        items = visible[:limit]
        cursor_out = encode_cursor(items[-1].created_at, items[-1].id) if more else None
        return Page([self._pending(task) for task in items], cursor_out)

    def _may_decide_now(self, approver: Identity, task: Task) -> bool:
        try:
            self._check_may_decide(approver, task)
        except (Forbidden, Conflict):
            return False
        person = person_of(approver)
        return not any(a.approver == approver.id or a.person == person for a in task.approvals)


# Pending tasks read per query while filling a page of `GET /approvals`.
_SCAN_BATCH = 200
