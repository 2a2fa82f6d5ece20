"""What a workload may start: the task types whose `workloads` rules match it.

An entry says what a caller needs to pick and start a task type (name, description, TTLs,
whether a human may have to approve, the credential names and kinds) and nothing of how the
broker issues it: no Vault mounts, roles, paths, ACL or token policy names, and none of the
policy's patterns (owners, subjects, `when` or `required_when` expressions), which the API
keeps from callers everywhere else too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from broker.identity.types import Identity
from broker.policy.engine import CompiledTask, Policy, workload_allowed

# "always": every start waits for approval; "conditional": `required_when` decides per
# request (and an expression that can't be evaluated means approval); "never": no approval.
ApprovalMode = Literal["always", "conditional", "never"]


@dataclass(frozen=True)
class CatalogueCredential:
    name: str
    kind: str


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    description: str
    ttl_default: int
    ttl_max: int
    approval: ApprovalMode
    # Who is asked, so an agent can tell its human; empty when no approval is configured or
    # only `approvers.subjects` names them (subject globs stay private, like owner globs).
    approver_groups: tuple[str, ...]
    credentials: tuple[CatalogueCredential, ...]


def catalogue_for(policy: Policy, identity: Identity) -> list[CatalogueEntry]:
    """The task types `identity` may start, by name; empty for a non-workload identity."""
    return [_entry(task) for name, task in sorted(policy.tasks.items()) if workload_allowed(task, identity)]


def _entry(task: CompiledTask) -> CatalogueEntry:
    return CatalogueEntry(
        name=task.name,
        description=task.description,
        ttl_default=task.ttl_default,
        ttl_max=task.ttl_max,
        approval=_approval_mode(task),
        approver_groups=tuple(sorted(task.approval.groups)) if task.approval else (),
        credentials=tuple(
            CatalogueCredential(name, spec.kind) for name, spec in sorted(task.credentials.items())
        ),
    )


def _approval_mode(task: CompiledTask) -> ApprovalMode:
    if task.approval is None:
        return "never"
    return "always" if task.approval.required_when is None else "conditional"
