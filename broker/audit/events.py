"""Every event the broker records in the audit log, with what it means.

Written once here: the console's filter lists these, docs/audit.md describes each, and a
test holds every `record(...)` call in the source to this table, so an event can't be
recorded that a reader of the log was never told about. The order is a task's life, as
the console shows it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

AUDIT_EVENTS: Mapping[str, str] = MappingProxyType(
    {
        "task.start_requested": "a start was allowed and recorded, before anything is issued",
        "task.approval_requested": "a start waits for approval",
        "task.denied": "the policy said no",
        "task.start_failed": "a start could not be carried out (Vault refused or was away)",
        "lease.issued": "one credential was issued",
        "task.started": "every credential was issued and recorded",
        "approval.granted": "an approver approved",
        "task.approved": "enough approvals were given",
        "approval.denied": "an approver denied",
        "task.claimed": "the workload claimed an approved task's credentials",
        "task.finished": "the workload finished",
        "task.expired": "the deadline passed",
        "task.revoked": "an operator ended it",
        "task.failed": "issuing failed; what was issued was revoked",
        "task.approval_expired": "nobody decided in time",
        "task.orphan_revoked": "a start that crashed between Vault and the database was cleaned up",
        "lease.revoked": "one credential was revoked",
        "lease.revoke_failed": "Vault did not confirm a revocation; retried with backoff",
        "lease.revoke_deferred": "Vault was down, so the revocation was left to the retry sweep",
        "operator.kill_switch": "an operator ended every task matching a filter",
        "lock.added": "an operator locked a workload, owner, task type or issuer: its starts are refused",
        "lock.removed": "an operator removed a lock",
        "lock.expired": "a lock's expiry passed: what it refused may start again",
        "gateway.handle_issued": "a start gave a gateway credential's handle (its id; never its secret)",
        "gateway.connect": "a session connected through the gateway with a task's handle",
        "gateway.statement": "a statement through the gateway, allowed or refused (normalised, no values)",
        "gateway.request": "a Vault API request through the gateway, relayed or refused (method, path)",
        "gateway.disconnect": "a gateway session ended (the client left, or the task ended)",
        "gateway.handle_refused": "a connection to the gateway with a wrong, unknown or spent handle",
        "gateway.issue_failed": "the gateway could not issue a task's credential on first use",
    }
)
