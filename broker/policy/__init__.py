"""Policy-as-code: load, validate and compile the policy file; decide task starts.

Typical use::

    store = PolicyStore(settings.policy_file)          # raises PolicyError if unusable
    decision = store.current().evaluate(identity, TaskRequest(...), usage, now)

The CLI group lives in `broker.cli.policy` (imported separately: it needs click).
"""

from broker.errors import TtlExceedsMax, UnknownTask
from broker.policy.engine import (
    RULE_MAX_ACTIVE,
    RULE_MAX_STARTS,
    RULE_OWNERS,
    RULE_TTL,
    RULE_WORKLOADS,
    CompiledApproval,
    CompiledTask,
    Decision,
    Policy,
    RuleResult,
    TaskRequest,
    Usage,
    approver_allowed,
    compile_policy,
    when_rule_name,
)
from broker.policy.globs import Glob
from broker.policy.loader import PolicySnapshot, PolicyStore, load_policy, parse_policy
from broker.policy.schema import PolicyError, PolicyFile, PolicyIssue, PolicyUnreadable, TaskPolicy

__all__ = [
    "RULE_MAX_ACTIVE",
    "RULE_MAX_STARTS",
    "RULE_OWNERS",
    "RULE_TTL",
    "RULE_WORKLOADS",
    "CompiledApproval",
    "CompiledTask",
    "Decision",
    "Glob",
    "Policy",
    "PolicyError",
    "PolicyFile",
    "PolicyIssue",
    "PolicySnapshot",
    "PolicyStore",
    "PolicyUnreadable",
    "RuleResult",
    "TaskPolicy",
    "TaskRequest",
    "TtlExceedsMax",
    "UnknownTask",
    "Usage",
    "approver_allowed",
    "compile_policy",
    "load_policy",
    "parse_policy",
    "when_rule_name",
]
