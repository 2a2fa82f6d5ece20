"""The policy decision: may this workload start this task, now, and does it need approval?

The engine is pure: the caller passes the verified identity, the request, the usage counts it
read from the database and the clock, and gets a `Decision` back. Every rule is evaluated even
after one fails, so `broker policy explain` can show the whole picture; the first failure in
the fixed order below is the one a denial names.

Rule names, in evaluation order (shown to callers in `403 policy_denied`; keep them stable):

    ttl, workloads, owners, when[0], when[1], ...,
    limits.max_active_per_workload, limits.max_starts_per_minute

`ttl` never appears as a failure for a too-long request: that raises `TtlExceedsMax` instead,
because the API answers it with `400 ttl_exceeds_max`, not with a policy denial.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from broker import tracing
from broker.credentials import CredentialSpec, DatabaseCredential, LeaseCredential, VaultTokenCredential
from broker.errors import TtlExceedsMax, UnknownTask
from broker.identity.types import Identity
from broker.policy.cel import (
    CelActivation,
    CelCompileError,
    CelRule,
    compile_rule,
    to_cel_value,
    utc,
)
from broker.policy.globs import Glob, first_match
from broker.policy.requests import RequestRules, compile_request_rules
from broker.policy.schema import (
    PathPart,
    PolicyError,
    PolicyFile,
    PolicyIssue,
    TaskPolicy,
    WorkloadMatcher,
)
from broker.policy.statements import StatementRules, compile_statement_rules

RULE_TTL = "ttl"
RULE_WORKLOADS = "workloads"
RULE_OWNERS = "owners"
RULE_MAX_ACTIVE = "limits.max_active_per_workload"
RULE_MAX_STARTS = "limits.max_starts_per_minute"
RULE_APPROVERS = "approval.approvers"
LIMIT_RULES = frozenset({RULE_MAX_ACTIVE, RULE_MAX_STARTS})

# The per-minute window empties within a minute at most.
STARTS_RETRY_AFTER_SECONDS = 60
# A slot frees when one of the workload's tasks finishes, which can't be predicted; this is
# only a polite polling interval for `Retry-After`.
ACTIVE_RETRY_AFTER_SECONDS = 30
_RETRY_AFTER = {
    RULE_MAX_ACTIVE: ACTIVE_RETRY_AFTER_SECONDS,
    RULE_MAX_STARTS: STARTS_RETRY_AFTER_SECONDS,
}


def when_rule_name(index: int) -> str:
    return f"when[{index}]"


@dataclass(frozen=True)
class TaskRequest:
    task: str
    owner: str
    purpose: str
    ttl_seconds: int | None
    context: Mapping[str, Any]


@dataclass(frozen=True)
class Usage:
    """What the workload already holds, counted by the caller from the database."""

    active_for_workload: int
    starts_last_minute: int


@dataclass(frozen=True)
class RuleResult:
    rule: str
    passed: bool
    detail: str
    # For a `when` rule: its expression, and the `request.context` keys it reads that the
    # request did not send (the usual reason a condition fails), so a denial can say both.
    expression: str | None = None
    missing_context: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    task: str
    allowed: bool
    rules: tuple[RuleResult, ...]
    failed_rule: str | None
    detail: str  # the failed rule's detail (callers prefix `failed_rule`), or "all rules passed"
    approval_required: bool
    ttl_seconds: int
    retry_after_seconds: int | None  # set when the failed rule is a limit (answer 429)
    approval_detail: str = ""  # why approval is or isn't required, for `explain`

    @property
    def limit_exceeded(self) -> bool:
        """Denied by a rate/concurrency limit (`429`) rather than by policy (`403`)."""
        return self.failed_rule in LIMIT_RULES


@dataclass(frozen=True)
class CompiledWorkload:
    issuer: str
    subject: Glob
    claims: Mapping[str, Any]

    @classmethod
    def from_spec(cls, spec: WorkloadMatcher) -> CompiledWorkload:
        return cls(spec.issuer, Glob(spec.subject), MappingProxyType(dict(spec.claims)))


@dataclass(frozen=True)
class CompiledApproval:
    required_when: CelRule | None
    groups: frozenset[str]
    subjects: tuple[Glob, ...] | None
    min_approvals: int
    expires_in: int


@dataclass(frozen=True)
class CompiledTask:
    name: str
    spec: TaskPolicy
    workloads: tuple[CompiledWorkload, ...]
    owners: tuple[Glob, ...]
    when: tuple[CelRule, ...]
    approval: CompiledApproval | None
    # Top-level CEL variables any of this task's expressions read: only those are converted.
    cel_variables: frozenset[str]
    # The statement rules of each gateway database credential, compiled at load.
    statements: Mapping[str, StatementRules] = field(default_factory=dict)
    # The request rules of each gateway vault_token credential, compiled at load.
    requests: Mapping[str, RequestRules] = field(default_factory=dict)

    @property
    def description(self) -> str:
        return self.spec.description

    @property
    def credentials(self) -> Mapping[str, CredentialSpec]:
        # Read-only view: the frozen pydantic model still holds a plain, mutable dict.
        return MappingProxyType(self.spec.credentials)

    @property
    def ttl_default(self) -> int:
        return self.spec.ttl.default

    @property
    def ttl_max(self) -> int:
        return self.spec.ttl.max


class Policy:
    """A compiled, immutable policy; share one instance between threads freely."""

    def __init__(self, tasks: Mapping[str, CompiledTask]) -> None:
        self._tasks: Mapping[str, CompiledTask] = MappingProxyType(dict(tasks))

    @property
    def tasks(self) -> Mapping[str, CompiledTask]:
        return self._tasks

    def task(self, name: str) -> CompiledTask:
        try:
            return self._tasks[name]
        except KeyError:
            raise UnknownTask(name) from None

    def evaluate(self, identity: Identity, request: TaskRequest, usage: Usage, now: dt.datetime) -> Decision:
        """Decide on `request`; raises `UnknownTask` and `TtlExceedsMax`, nothing else."""
        with tracing.span("policy.evaluate", **{"broker.task": request.task}):
            return self._evaluate(identity, request, usage, now)

    def _evaluate(self, identity: Identity, request: TaskRequest, usage: Usage, now: dt.datetime) -> Decision:
        task = self.task(request.task)
        workloads = _check_workloads(task, identity)
        try:
            ttl_rule, ttl_seconds = _check_ttl(task, request.ttl_seconds)
        except TtlExceedsMax:
            if workloads.passed:
                raise
            # A workload the task is not for is denied by `workloads`, the first rule, and
            # learns nothing of the task's limits, not even its maximum TTL.
            ttl_rule, ttl_seconds = RuleResult(RULE_TTL, False, "exceeds the maximum"), task.ttl_max
        activation = CelActivation(_cel_values(identity, request, ttl_seconds, now, task.cel_variables))
        rules = (
            workloads,
            ttl_rule,
            _check_owners(task, request.owner),
            *_check_when(task, activation, request.context),
            *_check_limits(task, usage),
        )
        approval_required, approval_detail = _approval_requirement(task, activation)
        return _decide(task.name, rules, ttl_seconds, approval_required, approval_detail)


def _decide(
    task: str,
    rules: tuple[RuleResult, ...],
    ttl_seconds: int,
    approval_required: bool,
    approval_detail: str,
) -> Decision:
    failures = [rule for rule in rules if not rule.passed]
    first = failures[0] if failures else None
    return Decision(
        task=task,
        allowed=first is None,
        rules=rules,
        failed_rule=first.rule if first else None,
        detail=first.detail if first else "all rules passed",
        approval_required=approval_required,
        ttl_seconds=ttl_seconds,
        retry_after_seconds=_retry_after(first, failures),
        approval_detail=approval_detail,
    )


def _retry_after(first: RuleResult | None, failures: list[RuleResult]) -> int | None:
    if first is None or first.rule not in LIMIT_RULES:
        return None
    # Both limits may be hit; retrying before the longer wait would just fail again.
    return max(_RETRY_AFTER[rule.rule] for rule in failures if rule.rule in _RETRY_AFTER)


def _check_ttl(task: CompiledTask, requested: int | None) -> tuple[RuleResult, int]:
    if requested is None:
        return RuleResult(RULE_TTL, True, f"{task.ttl_default}s (default)"), task.ttl_default
    if requested > task.ttl_max:
        raise TtlExceedsMax(requested, task.ttl_max)
    if requested < 1:
        # The API validates this first; still never hand out a zero or negative lifetime.
        return RuleResult(RULE_TTL, False, f"{requested}s is not a positive TTL"), requested
    return RuleResult(RULE_TTL, True, f"{requested}s (max {task.ttl_max}s)"), requested


def _check_workloads(task: CompiledTask, identity: Identity) -> RuleResult:
    if not identity.may("workload"):
        detail = f"issuer {identity.issuer_name!r} is not allowed to start tasks (use: workload)"
        return RuleResult(RULE_WORKLOADS, False, detail)
    misses: list[str] = []
    for index, workload in enumerate(task.workloads):
        miss = _workload_miss(workload, identity)
        if miss is None:
            return RuleResult(RULE_WORKLOADS, True, f"matches workloads[{index}]")
        misses.append(f"workloads[{index}]: {miss}")
    detail = f"no entry matches {identity.issuer_name}:{identity.subject} (" + "; ".join(misses) + ")"
    return RuleResult(RULE_WORKLOADS, False, detail)


def workload_allowed(task: CompiledTask, identity: Identity) -> bool:
    """May `identity` start tasks of this type at all (the `workloads` rule alone)?"""
    return _check_workloads(task, identity).passed


def _workload_miss(workload: CompiledWorkload, identity: Identity) -> str | None:
    """Why `identity` is not this workload entry, or None if it is."""
    if workload.issuer != identity.issuer_name:
        return f"issuer is {identity.issuer_name!r}, not {workload.issuer!r}"
    if not workload.subject.matches(identity.subject):
        return "subject " + workload.subject.explain_miss(identity.subject)
    for name, expected in workload.claims.items():
        if name not in identity.claims:
            return f"claim {name!r} is missing"
        if not _exactly_equal(identity.claims[name], expected):
            return f"claim {name!r} is {identity.claims[name]!r}, not {expected!r}"
    return None


def _exactly_equal(actual: Any, expected: Any) -> bool:
    """Equality that also compares types, so "true" != true, 1 != true and 1 != 1.0."""
    if isinstance(expected, list):
        return (
            isinstance(actual, list | tuple)
            and len(actual) == len(expected)
            and all(_exactly_equal(a, e) for a, e in zip(actual, expected, strict=True))
        )
    return type(actual) is type(expected) and actual == expected


def _check_owners(task: CompiledTask, owner: str) -> RuleResult:
    match = first_match(task.owners, owner)
    if match is not None:
        return RuleResult(RULE_OWNERS, True, f"{owner!r} matches {match.pattern!r}")
    patterns = ", ".join(repr(glob.pattern) for glob in task.owners)
    return RuleResult(RULE_OWNERS, False, f"{owner!r} matches none of {patterns}")


def _check_when(
    task: CompiledTask, activation: CelActivation, context: Mapping[str, Any]
) -> list[RuleResult]:
    results = []
    for index, rule in enumerate(task.when):
        outcome = activation.evaluate(rule)
        missing = () if outcome.passed else context_keys_missing(rule.source, context)
        results.append(
            RuleResult(when_rule_name(index), outcome.passed, outcome.detail, rule.source, missing)
        )
    return results


# `request.context.key`, `request.context["key"]`, `"key" in request.context`, `has(request.context.key)`.
_CONTEXT_KEY = re.compile(
    r"""request\.context\.([A-Za-z_][A-Za-z0-9_]*)"""
    r"""|request\.context\[\s*["']([^"']+)["']\s*\]"""
    r"""|["']([^"']+)["']\s+in\s+request\.context\b"""
)


def context_keys_missing(source: str, context: Mapping[str, Any]) -> tuple[str, ...]:
    """The top-level `request.context` keys `source` names that `context` lacks, in order."""
    named = [next(group for group in match.groups() if group) for match in _CONTEXT_KEY.finditer(source)]
    return tuple(dict.fromkeys(key for key in named if key not in context))


def _check_limits(task: CompiledTask, usage: Usage) -> list[RuleResult]:
    limits = task.spec.limits
    results = []
    if limits.max_active_per_workload is not None:
        limit = limits.max_active_per_workload
        used = usage.active_for_workload
        results.append(_below_limit(RULE_MAX_ACTIVE, used, limit, "active tasks"))
    if limits.max_starts_per_minute is not None:
        limit = limits.max_starts_per_minute
        used = usage.starts_last_minute
        results.append(_below_limit(RULE_MAX_STARTS, used, limit, "starts in the last minute"))
    return results


def _below_limit(rule: str, used: int, limit: int, what: str) -> RuleResult:
    # `used` counts what exists before this start, so reaching the limit already denies.
    return RuleResult(rule, used < limit, f"{used} {what}, limit {limit}")


def _approval_requirement(task: CompiledTask, activation: CelActivation) -> tuple[bool, str]:
    approval = task.approval
    if approval is None:
        return False, "no approval configured"
    if approval.required_when is None:
        return True, "always required"
    outcome = activation.evaluate(approval.required_when)
    if outcome.value is True:
        return True, "required_when is true"
    if outcome.value is False:
        return False, "required_when is false"
    # Anything but a clean `false` (an error, a non-bool) means we can't tell: ask a human.
    return True, f"required because required_when could not be evaluated ({outcome.detail})"


def _cel_values(
    identity: Identity,
    request: TaskRequest,
    ttl_seconds: int,
    now: dt.datetime,
    needed: frozenset[str],
) -> dict[str, Any]:
    """The CEL variables `needed` by the task's expressions, and only those (see cel.py)."""
    builders: dict[str, Callable[[], Any]] = {
        "workload": lambda: {
            "id": identity.id,
            "issuer": identity.issuer_name,
            "subject": identity.subject,
            "claims": to_cel_value(identity.claims),
        },
        "request": lambda: {
            "task": request.task,
            "owner": request.owner,
            "purpose": request.purpose,
            "ttl_seconds": ttl_seconds,
            "context": to_cel_value(request.context),
        },
        "now": lambda: utc(now),
    }
    return {name: builders[name]() for name in needed}


def approver_allowed(task: CompiledTask, approver: Identity) -> RuleResult:
    """May `approver` approve tasks of this type? (Not: is it a different identity; see API.)"""
    approval = task.approval
    if approval is None:
        return RuleResult(RULE_APPROVERS, False, f"task type {task.name!r} takes no approvals")
    if not approver.may("approver"):
        detail = f"issuer {approver.issuer_name!r} is not allowed to approve (use: approver)"
        return RuleResult(RULE_APPROVERS, False, detail)
    if approval.groups and not approval.groups & approver.groups:
        wanted = ", ".join(sorted(approval.groups))
        detail = f"{approver.id!r} is in none of the groups {wanted}"
        return RuleResult(RULE_APPROVERS, False, detail)
    if approval.subjects is not None and first_match(approval.subjects, approver.id) is None:
        patterns = ", ".join(repr(glob.pattern) for glob in approval.subjects)
        return RuleResult(RULE_APPROVERS, False, f"{approver.id!r} matches none of {patterns}")
    return RuleResult(RULE_APPROVERS, True, f"{approver.id!r} may approve {task.name!r}")


# --- compilation -------------------------------------------------------------------------


def compile_policy(model: PolicyFile) -> Policy:
    """Compile every glob and CEL expression; raise `PolicyError` listing all bad ones."""
    issues: list[PolicyIssue] = []
    tasks = {}
    for name, spec in model.tasks.items():
        task = _compile_task(name, spec, issues)
        if task is not None:
            tasks[name] = task
    if issues:
        raise PolicyError(f"{len(issues)} error(s) in CEL expressions", issues)
    return Policy(tasks)


def _compile_task(name: str, spec: TaskPolicy, issues: list[PolicyIssue]) -> CompiledTask | None:
    prefix: tuple[PathPart, ...] = ("tasks", name)
    when = [_compile_cel(rule, (*prefix, "when", index), issues) for index, rule in enumerate(spec.when)]
    approval = _compile_approval(spec, prefix, issues)
    if any(rule is None for rule in when) or (spec.approval is not None and approval is None):
        return None
    statements = _compile_statements(spec, prefix, issues)
    requests = _compile_requests(spec, prefix, issues)
    if statements is None or requests is None:
        return None
    when_rules = tuple(rule for rule in when if rule is not None)
    required_when = approval.required_when if approval else None
    expressions = [*when_rules, *([required_when] if required_when else [])]
    return CompiledTask(
        name=name,
        spec=spec,
        workloads=tuple(CompiledWorkload.from_spec(workload) for workload in spec.workloads),
        owners=tuple(Glob(owner, person=True) for owner in spec.owners),
        when=when_rules,
        approval=approval,
        cel_variables=frozenset().union(*(rule.variables for rule in expressions)),
        statements=MappingProxyType(statements),
        requests=MappingProxyType(requests),
    )


def _compile_statements(
    spec: TaskPolicy, prefix: tuple[PathPart, ...], issues: list[PolicyIssue]
) -> dict[str, StatementRules] | None:
    """Each gateway database credential's `statements:`; None (and `issues`) if one is bad."""
    return _compile_rule_lists(
        spec, prefix, issues, "statements", (DatabaseCredential,), compile_statement_rules
    )


def _compile_requests(
    spec: TaskPolicy, prefix: tuple[PathPart, ...], issues: list[PolicyIssue]
) -> dict[str, RequestRules] | None:
    """Each gateway vault_token or lease credential's `requests:`; None (and `issues`) if one is bad."""
    kinds = (VaultTokenCredential, LeaseCredential)
    return _compile_rule_lists(spec, prefix, issues, "requests", kinds, compile_request_rules)


Rules = TypeVar("Rules", StatementRules, RequestRules)


def _compile_rule_lists(
    spec: TaskPolicy,
    prefix: tuple[PathPart, ...],
    issues: list[PolicyIssue],
    key: str,
    kinds: tuple[type, ...],
    compile_list: Callable[[list[object], tuple[PathPart, ...]], Rules],
) -> dict[str, Rules] | None:
    """The rule list at `key` of each gateway credential of `kinds`, compiled by `compile_list`."""
    compiled: dict[str, Rules] = {}
    failed = False
    for name, credential in spec.credentials.items():
        if not isinstance(credential, kinds) or not getattr(credential, "via_gateway", False):
            continue
        entries: list[object] = [
            entry if isinstance(entry, str) else {"name": entry.name, "when": entry.when}
            for entry in getattr(credential, key)
        ]
        try:
            compiled[name] = compile_list(entries, (*prefix, "credentials", name, key))
        except PolicyError as error:
            issues.extend(error.issues)
            failed = True
    return None if failed else compiled


def _compile_approval(
    spec: TaskPolicy, prefix: tuple[PathPart, ...], issues: list[PolicyIssue]
) -> CompiledApproval | None:
    if spec.approval is None:
        return None
    required_when = None
    if spec.approval.required_when is not None:
        path = (*prefix, "approval", "required_when")
        required_when = _compile_cel(spec.approval.required_when, path, issues)
        if required_when is None:
            return None
    approvers = spec.approval.approvers
    return CompiledApproval(
        required_when=required_when,
        groups=frozenset(approvers.groups),
        subjects=None if approvers.subjects is None else tuple(map(Glob, approvers.subjects)),
        min_approvals=spec.approval.min_approvals,
        expires_in=spec.approval.expires_in,
    )


def _compile_cel(source: str, path: tuple[PathPart, ...], issues: list[PolicyIssue]) -> CelRule | None:
    try:
        return compile_rule(source)
    except CelCompileError as error:
        issues.append(PolicyIssue(path, f"{error.message}: {source!r}"))
        return None
