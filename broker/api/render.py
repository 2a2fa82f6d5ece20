"""JSON shapes of docs/contract.md §5. Secret values appear only in `credentials`, built per response."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.approvals.service import Pending
from broker.audit.export import row_json
from broker.clock import rfc3339
from broker.models import AuditEvent, Lease, Lock, Task
from broker.operator.service import KillResult


def lease_json(lease: Lease) -> dict[str, Any]:
    return {
        "id": str(lease.id),
        "task_id": str(lease.task_id),
        "task": lease.task,
        "name": lease.name,
        "kind": lease.kind,
        "workload": lease.workload,
        "owner": lease.owner,
        "purpose": lease.purpose,
        "state": lease.state,
        "issued_at": rfc3339(lease.issued_at),
        "expires_at": rfc3339(lease.expires_at),
        "revoked_at": rfc3339(lease.revoked_at),
        "revoke_attempts": lease.revoke_attempts,
        "last_error": lease.last_error,
        "next_attempt_at": rfc3339(lease.next_attempt_at),
        "revoke_reason": lease.revoke_reason,
        "vault_lease_id": lease.vault_lease_id,
    }


def lock_json(lock: Lock) -> dict[str, Any]:
    return {
        "id": str(lock.id),
        "workload": lock.workload,
        "owner": lock.owner,
        "task": lock.task,
        "issuer": lock.issuer,
        "reason": lock.reason,
        "created_by": lock.created_by,
        "created_at": rfc3339(lock.created_at),
        "expires_at": rfc3339(lock.expires_at),
        "removed_at": rfc3339(lock.removed_at),
        "removed_by": lock.removed_by,
    }


def waiting_json(task: Task) -> dict[str, Any]:
    """A start that waits for approval: what was asked, and until when approval can come."""
    return {
        "task_id": str(task.id),
        "state": task.state,
        "task": task.task,
        "owner": task.owner,
        "purpose": task.purpose,
        "workload": task.workload,
        "approval_expires_at": rfc3339(task.approval_expires_at),
    }


def task_json(task: Task, *, with_leases: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task_id": str(task.id),
        "task": task.task,
        "state": task.state,
        "workload": task.workload,
        "owner": task.owner,
        "purpose": task.purpose,
        "context": task.context,
        "ttl_seconds": task.ttl_seconds,
        "created_at": rfc3339(task.created_at),
        "expires_at": rfc3339(task.expires_at),
        "finished_at": rfc3339(task.finished_at),
        "outcome": task.outcome,
        "end_reason": task.end_reason,
        "approval_expires_at": rfc3339(task.approval_expires_at),
        "approval": _approval_json(task),
    }
    if with_leases:
        body["leases"] = [lease_json(lease) for lease in task.leases]
    return body


def pending_json(pending: Pending) -> dict[str, Any]:
    """A task as its approvers see it: the request, and what approving would let it claim."""
    body = task_json(pending.task, with_leases=False)
    body["would_issue"] = [{"name": name, "kind": kind} for name, kind in pending.would_issue]
    body["approvers"] = {"groups": list(pending.approver_groups), "min_approvals": pending.min_approvals}
    return body


def _approval_json(task: Task) -> dict[str, Any] | None:
    if task.approval_expires_at is None:
        return None
    if any(a.decision == "deny" for a in task.approvals):
        state = "denied"
    elif task.claimed_at is not None:
        state = "claimed"
    elif task.approved_at is not None:
        state = "approved"
    elif task.state == "approval_expired":
        state = "lapsed"
    elif task.state != "pending_approval":
        state = "cancelled"  # finished, revoked or failed before anyone decided
    else:
        state = "pending"
    return {
        "state": state,
        "expires_at": rfc3339(task.approval_expires_at),
        "approved_at": rfc3339(task.approved_at),
        "claimed_at": rfc3339(task.claimed_at),
        "decisions": [
            {
                "approver": a.approver,
                "decision": a.decision,
                "reason": a.reason,
                "at": rfc3339(a.created_at),
            }
            for a in task.approvals
        ],
    }


def credentials_json(credentials: Mapping[str, Any]) -> dict[str, Any]:
    return {
        name: {
            "kind": item.kind,
            "delivery": item.delivery,
            "data": dict(item.data),
            "expires_at": rfc3339(item.expires_at),
        }
        for name, item in credentials.items()
    }


def audit_json(row: AuditEvent) -> dict[str, Any]:
    # The API's shape (docs/api.md, "Audit event") predates the export's: it has the insert
    # order `seq` and `sealed` (unsealed rows show here, not in the export), no `prev_hash`.
    shared = {key: value for key, value in row_json(row).items() if key != "prev_hash"}
    return {**shared, "seq": row.seq, "sealed": row.chain_seq is not None}


def kill_json(result: KillResult) -> dict[str, Any]:
    """The kill switch's answer: the tasks it ended, and what the scheduler has yet to revoke."""
    return {
        "tasks": [str(task_id) for task_id in result.tasks],
        "revocation": {"tasks": len(result.tasks), "pending_leases": result.pending_leases},
        "lock": lock_json(result.lock) if result.lock is not None else None,
    }
