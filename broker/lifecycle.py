"""A task's life and its leases': the states, the moves between them, and the only code
that writes a state.

Every path that starts, activates or ends a task (a start, a claim, a finish, the
deadline, an operator, the kill switch, a denial, the reconciler) moves it through the
functions here, so a move the table below does not allow is a bug caught where it is
made, and a new path that ends tasks (a gateway, a lock) cannot invent a state of its
own. The ledger (`broker.ledger`) is the other place that writes states: in SQL, for the
statements that move many rows at once, with the names declared here.

This module imports nothing of the broker at run time, so every layer may use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from broker.models import Lease, Task

TaskState = Literal[
    "issuing",  # intent recorded, credentials being issued (internal, seconds at most)
    "pending_approval",
    "active",
    "finished",
    "expired",
    "revoked",
    "denied",
    "approval_expired",
    "failed",
]
OpenState = Literal["issuing", "pending_approval", "active"]
EndState = Literal["finished", "expired", "revoked", "denied", "approval_expired", "failed"]
# The ends `end` writes; a failure and a denial have writers of their own.
Ending = Literal["finished", "expired", "revoked"]
LeaseState = Literal["active", "revoke_pending", "revoked"]
Outcome = Literal["succeeded", "failed", "cancelled"]

TASK_STATES: tuple[TaskState, ...] = get_args(TaskState)
TASK_OPEN_STATES: tuple[OpenState, ...] = get_args(OpenState)
# Every state but the open ones: a task here has nothing left to revoke or decide.
TERMINAL_TASK_STATES: frozenset[str] = frozenset(get_args(EndState))
LEASE_STATES: tuple[LeaseState, ...] = get_args(LeaseState)
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)

# Where a task may go from each state. `None` is a task not yet recorded.
TASK_MOVES: Mapping[TaskState | None, frozenset[TaskState]] = {
    None: frozenset({"issuing", "pending_approval"}),
    # The claim of an approved task; a decision; its window lapsing; a finish (the
    # workload cancels); an operator's revoke or the kill switch.
    "pending_approval": frozenset({"issuing", "denied", "approval_expired", "finished", "revoked"}),
    # Its leases committed; issuing failed or the start was orphaned; a finish or the kill
    # switch racing the start (which then finds the task ended and issues nothing).
    "issuing": frozenset({"active", "failed", "finished", "revoked"}),
    "active": frozenset({"finished", "expired", "revoked"}),
    **{state: frozenset() for state in get_args(EndState)},
}
LEASE_MOVES: Mapping[LeaseState, frozenset[LeaseState]] = {
    "active": frozenset({"revoked", "revoke_pending"}),
    # A retry that fails again stays parked, with a later attempt.
    "revoke_pending": frozenset({"revoked", "revoke_pending"}),
    "revoked": frozenset(),
}

# Every field that ending a task may change on the task and on its leases (a finish also
# sets `token_released_at`, the revoker `token_revoked_at`). `broker.ledger` writes exactly
# these back for tasks it read without the ORM; a test holds them against every
# assignment in this module, the revoker and the finish.
TASK_END_FIELDS = ("state", "finished_at", "end_reason", "outcome", "token_released_at", "token_revoked_at")
LEASE_END_FIELDS = (
    "state",
    "revoked_at",
    "revoke_reason",
    "revoke_attempts",
    "last_error",
    "next_attempt_at",
)


class IllegalMove(RuntimeError):
    """A move the table does not allow: a bug in the caller, never a client's error."""


def may_become(state: TaskState) -> tuple[TaskState, ...]:
    """The states a task may be in to move to `state` (for the ledger's guarded UPDATEs)."""
    return tuple(source for source, targets in TASK_MOVES.items() if source is not None and state in targets)


def is_open(task: Task) -> bool:
    return task.state not in TERMINAL_TASK_STATES


# ---- the start -----------------------------------------------------------------------


def await_approval(task: Task, *, approval_expires_at: datetime) -> None:
    """A new task whose policy asks for approval: it waits, with nothing issued."""
    _move(task, "pending_approval")
    task.approval_expires_at = approval_expires_at


def begin_issuing(task: Task, *, expires_at: datetime, token_accessor: str) -> None:
    """A new or newly claimed task about to be issued with the token `token_accessor`.

    The accessor is recorded with the state, before anything is issued with it: a crash
    from here on leaves something the reconciler revokes."""
    _move(task, "issuing")
    task.expires_at = expires_at
    task.token_accessor = token_accessor


def activate(task: Task) -> None:
    """Its leases are committed (the ledger's guarded UPDATE made the same move)."""
    _move(task, "active")


# ---- the end -------------------------------------------------------------------------


def end(task: Task, state: Ending, *, at: datetime, reason: str, outcome: Outcome | None = None) -> bool:
    """End an open task as `state`; False (and nothing written) if it had already ended.

    Only the task's own fields: revoking what it holds is `broker.leases.Revoker`'s."""
    if not is_open(task):
        return False
    _move(task, state)
    task.finished_at, task.end_reason = at, reason
    if outcome is not None:
        task.outcome = outcome
    return True


def fail(task: Task, *, at: datetime, reason: str) -> bool:
    """A start that could not complete (issuing failed, or it was orphaned)."""
    if not is_open(task):
        return False
    _move(task, "failed")
    task.finished_at, task.end_reason = at, reason[:500]
    return True


def deny(task: Task, *, at: datetime, reason: str) -> bool:
    """An approver said no."""
    if not is_open(task):
        return False
    _move(task, "denied")
    task.finished_at, task.end_reason = at, f"denied: {reason}"
    return True


# ---- leases --------------------------------------------------------------------------


def lease_revoked(lease: Lease, *, at: datetime) -> None:
    _move_lease(lease, "revoked")
    lease.revoked_at, lease.next_attempt_at = at, None


def lease_parked(lease: Lease, *, error: str, retry_at: datetime) -> None:
    """Vault did not revoke it: `revoke_pending`, retried at `retry_at`, never forgotten."""
    _move_lease(lease, "revoke_pending")
    lease.last_error = error[:500]
    lease.next_attempt_at = retry_at


# ---- the checks ----------------------------------------------------------------------


def _move(task: Task, to: TaskState) -> None:
    source: TaskState | None = task.state  # None on a task not yet recorded
    if to not in TASK_MOVES[source]:
        raise IllegalMove(f"task {task.id}: {source} -> {to}")
    task.state = to


def _move_lease(lease: Lease, to: LeaseState) -> None:
    if to not in LEASE_MOVES[lease.state]:
        raise IllegalMove(f"lease {lease.id}: {lease.state} -> {to}")
    lease.state = to
