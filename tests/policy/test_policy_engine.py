"""Policy.evaluate: every rule, its order, its detail, and the approval decision."""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import pytest

from broker.identity.types import Identity, IdentityUse
from broker.policy import (
    Decision,
    Policy,
    PolicyFile,
    TaskRequest,
    TtlExceedsMax,
    UnknownTask,
    Usage,
    approver_allowed,
    compile_policy,
)

NOW = dt.datetime(2025, 3, 14, 15, 9, 26, tzinfo=dt.UTC)
AGENT = "spiffe://example.org/agents/a1"
NO_USAGE = Usage(active_for_workload=0, starts_last_minute=0)

BASE_TASK: dict[str, Any] = {
    "description": "test task",
    "ttl": {"default": 300, "max": 900},
    "workloads": [
        {"issuer": "spire", "subject": "spiffe://example.org/agents/*"},
        {
            "issuer": "ci",
            "subject": "repo:acme/app:**",
            "claims": {"ref": "refs/heads/main", "protected": True, "run_attempt": 1},
        },
    ],
    "owners": ["*@example.com", "team-?"],
    "when": ['request.context.environment in ["dev", "staging", "prod"]'],
    "limits": {"max_active_per_workload": 5, "max_starts_per_minute": 30},
    "credentials": {"db": {"kind": "database", "role": "analytics-ro"}},
}


def make_policy(**overrides: Any) -> Policy:
    task = copy.deepcopy(BASE_TASK)
    for key, value in overrides.items():
        if value is None:
            task.pop(key, None)
        else:
            task[key] = value
    return compile_policy(PolicyFile.model_validate({"tasks": {"t": task}}))


def spire(subject: str = AGENT, uses: frozenset[IdentityUse] = frozenset({"workload"})) -> Identity:
    return Identity(
        id=subject,
        issuer_name="spire",
        issuer="https://spire.example.org",
        subject=subject,
        kind="spiffe",
        uses=uses,
        groups=frozenset(),
        claims={"sub": subject},
        expires_at=NOW + dt.timedelta(minutes=5),
    )


def ci(claims: Mapping[str, Any] | None = None, sub: str = "repo:acme/app:ref:refs/heads/main") -> Identity:
    base = {"sub": sub, "ref": "refs/heads/main", "protected": True, "run_attempt": 1}
    return Identity(
        id=f"ci:{sub}",
        issuer_name="ci",
        issuer="https://ci.example.com",
        subject=sub,
        kind="oidc",
        uses=frozenset({"workload"}),
        groups=frozenset(),
        claims=base if claims is None else claims,
        expires_at=NOW + dt.timedelta(minutes=5),
    )


def approver(groups: frozenset[str] = frozenset({"dba"}), sub: str = "bob@example.com") -> Identity:
    return Identity(
        id=f"corp-sso:{sub}",
        issuer_name="corp-sso",
        issuer="https://sso.example.com",
        subject=sub,
        kind="oidc",
        uses=frozenset({"approver", "operator"}),
        groups=groups,
        claims={"sub": sub},
        expires_at=NOW + dt.timedelta(minutes=5),
    )


def request(
    owner: str = "alice@example.com",
    ttl: int | None = None,
    context: Mapping[str, Any] | None = None,
) -> TaskRequest:
    ctx = {"environment": "prod"} if context is None else context
    return TaskRequest(task="t", owner=owner, purpose="nightly report", ttl_seconds=ttl, context=ctx)


def decide(
    policy: Policy | None = None,
    identity: Identity | None = None,
    req: TaskRequest | None = None,
    usage: Usage = NO_USAGE,
) -> Decision:
    return (policy or make_policy()).evaluate(identity or spire(), req or request(), usage, NOW)


def rule(decision: Decision, name: str) -> tuple[bool, str]:
    found = {r.rule: (r.passed, r.detail) for r in decision.rules}
    return found[name]


# --- the happy path and the rule list ------------------------------------------------------


def test_allowed_decision_lists_every_rule_in_order() -> None:
    decision = decide()
    assert decision.allowed
    assert decision.failed_rule is None
    assert decision.detail == "all rules passed"
    assert [r.rule for r in decision.rules] == [
        "workloads",
        "ttl",
        "owners",
        "when[0]",
        "limits.max_active_per_workload",
        "limits.max_starts_per_minute",
    ]
    assert all(r.passed for r in decision.rules)
    assert decision.ttl_seconds == 300
    assert decision.retry_after_seconds is None
    assert not decision.approval_required


def test_unknown_task_raises() -> None:
    policy = make_policy()
    with pytest.raises(UnknownTask) as raised:
        policy.evaluate(spire(), TaskRequest("nope", "a@example.com", "purpose!", None, {}), NO_USAGE, NOW)
    assert raised.value.name == "nope"


def test_policy_is_read_only() -> None:
    policy = make_policy()
    with pytest.raises(TypeError):
        policy.tasks["x"] = policy.task("t")  # type: ignore[index]


# --- workloads: issuer, subject, claims ----------------------------------------------------


@pytest.mark.parametrize(
    ("identity", "passed", "detail_part"),
    [
        (spire(), True, "matches workloads[0]"),
        (spire("spiffe://example.org/agents/x/y"), False, "use `**`"),
        (spire("spiffe://other.org/agents/a1"), False, "does not match"),
        (ci(), True, "matches workloads[1]"),
        (ci(sub="repo:acme/other:ref:refs/heads/main"), False, "does not match"),
        (spire(uses=frozenset({"approver"})), False, "not allowed to start tasks"),
    ],
    ids=[
        "spire-agent",
        "spire-nested-path",
        "spire-other-domain",
        "ci-main",
        "ci-other-repo",
        "no-workload-use",
    ],
)
def test_workloads_issuer_and_subject(identity: Identity, passed: bool, detail_part: str) -> None:
    assert rule(decide(identity=identity), "workloads")[0] is passed
    assert detail_part in rule(decide(identity=identity), "workloads")[1]


def test_issuer_mismatch_even_when_subject_matches() -> None:
    # A `ci` token whose sub looks like a SPIFFE ID must not pass as the `spire` entry.
    impostor = ci(sub=AGENT)
    passed, detail = rule(decide(identity=impostor), "workloads")
    assert not passed
    assert "workloads[0]: issuer is 'ci', not 'spire'" in detail


GOOD_CLAIMS = {"ref": "refs/heads/main", "protected": True, "run_attempt": 1}


@pytest.mark.parametrize(
    ("changes", "passed", "detail_part"),
    [
        ({}, True, "matches"),
        ({"extra": "ignored"}, True, "matches"),
        ({"ref": None}, False, "claim 'ref' is missing"),
        ({"ref": "refs/heads/dev"}, False, "claim 'ref' is 'refs/heads/dev'"),
        ({"protected": "true"}, False, "claim 'protected' is 'true', not True"),
        ({"protected": 1}, False, "claim 'protected' is 1, not True"),
        ({"run_attempt": True}, False, "claim 'run_attempt' is True, not 1"),
        ({"run_attempt": 1.0}, False, "claim 'run_attempt' is 1.0, not 1"),
        ({"run_attempt": "1"}, False, "claim 'run_attempt' is '1', not 1"),
    ],
    ids=[
        "all-equal",
        "extra-claims-ok",
        "missing-claim",
        "other-value",
        "string-true-vs-bool",
        "int-vs-bool",
        "bool-vs-int",
        "float-vs-int",
        "string-vs-int",
    ],
)
def test_claims_exact_match(changes: dict[str, Any], passed: bool, detail_part: str) -> None:
    claims = {"sub": "repo:acme/app:ref:refs/heads/main", **GOOD_CLAIMS, **changes}
    claims = {k: v for k, v in claims.items() if v is not None}
    result = rule(decide(identity=ci(claims=claims)), "workloads")
    assert result[0] is passed
    assert detail_part in result[1]


@pytest.mark.parametrize(
    ("claim", "passed"),
    [(["a", "b"], True), (("a", "b"), True), (["b", "a"], False), (["a"], False), ("a", False)],
    ids=["same-list", "tuple-equals-list", "other-order", "shorter", "scalar-vs-list"],
)
def test_list_claims_must_equal_exactly(claim: Any, passed: bool) -> None:
    policy = make_policy(workloads=[{"issuer": "ci", "subject": "**", "claims": {"groups": ["a", "b"]}}])
    identity = ci(claims={"sub": "x", "groups": claim})
    assert rule(decide(policy, identity), "workloads")[0] is passed


# --- owners --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("owner", "passed"),
    [
        ("alice@example.com", True),
        ("team-a", True),
        ("team-ab", False),
        ("alice@example.com.evil", False),
        ("alice@Example.com", True),
        ("\uff41lice@example.com ", True),
        ("", False),
        ("mallory@evil.test\n@example.com", False),
        ("mallory@evil.test\u200b@example.com", False),
        ("\u0430lice@example.com", False),
    ],
    ids=[
        "domain-glob",
        "question-glob",
        "question-one-char-only",
        "anchored",
        "case-insensitive",
        "nfkc-and-trailing-space",
        "empty",
        "line-break",
        "invisible",
        "mixed-script",
    ],
)
def test_owners(owner: str, passed: bool) -> None:
    assert rule(decide(req=request(owner=owner)), "owners")[0] is passed


# --- CEL `when` rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "context", "passed", "detail"),
    [
        ('request.context.environment == "prod"', {"environment": "prod"}, True, "true"),
        ('request.context.environment == "prod"', {"environment": "dev"}, False, "false"),
        (
            "request.context.environment",
            {"environment": "prod"},
            False,
            "result is string, not bool",
        ),
        ('request.context.environment == "prod"', {}, False, "error: no such key 'environment'"),
        (
            'has(request.context.environment) && request.context.environment == "x"',
            {},
            False,
            "false",
        ),
        ("request.context.n / 0 == 1", {"n": 1}, False, "error: division by zero"),
        ("request.context.n + 1.5 > 0", {"n": 1}, False, "error: No such overload"),
        ('int("x") == 1', {}, False, "error:"),
        ("request.ttl_seconds == 300", {}, True, "true"),
        ('request.owner.endsWith("@example.com")', {}, True, "true"),
        ('request.task == "t" && request.purpose.size() >= 8', {}, True, "true"),
        ('workload.id == "spiffe://example.org/agents/a1"', {}, True, "true"),
        (
            'workload.issuer == "spire" && workload.subject.startsWith("spiffe://")',
            {},
            True,
            "true",
        ),
        ("workload.claims.sub == workload.subject", {}, True, "true"),
        ('now > timestamp("2025-01-01T00:00:00Z")', {}, True, "true"),
        ("now.getHours() == 15", {}, True, "true"),
        ('request.context.tags.exists(t, t == "pci")', {"tags": ["a", "pci"]}, True, "true"),
        (
            "request.context.nested.deep == 1",
            {"nested": MappingProxyType({"deep": 1})},
            True,
            "true",
        ),
        ("size(request.context.s) == 1", {"s": frozenset({"x"})}, True, "true"),
    ],
    ids=[
        "true",
        "false",
        "non-bool-string",
        "missing-context-key",
        "has-guard",
        "division-by-zero",
        "type-mismatch",
        "function-error",
        "ttl-is-effective-default",
        "owner-string-function",
        "task-and-purpose",
        "workload-id",
        "workload-issuer-is-name",
        "workload-claims",
        "now-is-timestamp",
        "now-hours-utc",
        "comprehension-macro",
        "mapping-proxy-converted",
        "frozenset-converted",
    ],
)
def test_when_rules(expression: str, context: dict[str, Any], passed: bool, detail: str) -> None:
    decision = decide(make_policy(when=[expression]), req=request(context=context))
    result = rule(decision, "when[0]")
    assert result[0] is passed
    assert detail in result[1]
    assert decision.allowed is passed


def test_every_when_rule_is_evaluated_and_the_first_failure_is_named() -> None:
    policy = make_policy(when=["true", "false", "1 == 2", "true"])
    decision = decide(policy)
    assert [rule(decision, f"when[{i}]")[0] for i in range(4)] == [True, False, False, True]
    assert decision.failed_rule == "when[1]"
    assert decision.detail == "false"


def test_naive_now_is_taken_as_utc() -> None:
    policy = make_policy(when=["now.getHours() == 15"])
    naive = NOW.replace(tzinfo=None)
    assert policy.evaluate(spire(), request(), NO_USAGE, naive).allowed


def test_unconvertible_claims_fail_closed_rules_that_read_them() -> None:
    policy = make_policy(when=['workload.claims.sub != ""'])
    identity = spire()
    odd = Identity(**{**identity.__dict__, "claims": {"sub": "x", "weird": object()}})
    # `object()` becomes its str(): converted, not a crash, and the rule still evaluates.
    assert decide(policy, odd).allowed


# --- limits --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "failed_rule", "retry_after"),
    [
        (Usage(4, 29), None, None),
        (Usage(5, 0), "limits.max_active_per_workload", 30),
        (Usage(0, 30), "limits.max_starts_per_minute", 60),
        (Usage(6, 31), "limits.max_active_per_workload", 60),
    ],
    ids=["below-both", "active-at-limit", "starts-at-limit", "both-over-longest-wait"],
)
def test_limits(usage: Usage, failed_rule: str | None, retry_after: int | None) -> None:
    decision = decide(usage=usage)
    assert decision.failed_rule == failed_rule
    assert decision.retry_after_seconds == retry_after
    assert decision.limit_exceeded is (failed_rule is not None)


def test_limit_retry_after_only_when_a_limit_is_the_denial() -> None:
    decision = decide(req=request(owner="mallory@evil.io"), usage=Usage(5, 30))
    assert decision.failed_rule == "owners"
    assert decision.retry_after_seconds is None
    assert not decision.limit_exceeded


def test_absent_limits_are_not_rules() -> None:
    decision = decide(make_policy(limits={}), usage=Usage(1000, 1000))
    assert decision.allowed
    assert not any(r.rule.startswith("limits.") for r in decision.rules)


# --- ttl -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ttl", "effective", "passed"),
    [(None, 300, True), (1, 1, True), (900, 900, True), (0, 0, False), (-5, -5, False)],
    ids=["default", "minimum", "exactly-max", "zero", "negative"],
)
def test_ttl(ttl: int | None, effective: int, passed: bool) -> None:
    decision = decide(req=request(ttl=ttl))
    assert decision.ttl_seconds == effective
    assert rule(decision, "ttl")[0] is passed


def test_ttl_above_max_raises_instead_of_deciding() -> None:
    with pytest.raises(TtlExceedsMax) as raised:
        decide(req=request(ttl=901))
    assert (raised.value.requested, raised.value.max) == (901, 900)


def test_a_workload_the_task_is_not_for_learns_nothing_of_its_maximum_ttl() -> None:
    decision = decide(identity=spire("spiffe://example.org/strangers/x"), req=request(ttl=901))
    assert not decision.allowed
    assert decision.failed_rule == "workloads"
    assert "900" not in decision.detail


def test_ttl_default_reaches_cel_as_effective_ttl() -> None:
    policy = make_policy(when=["request.ttl_seconds <= 600"])
    assert decide(policy, req=request(ttl=None)).allowed
    assert not decide(policy, req=request(ttl=700)).allowed


# --- approval ------------------------------------------------------------------------------

APPROVERS = {"groups": ["dba"]}


@pytest.mark.parametrize(
    ("approval", "context", "required", "detail_part"),
    [
        (None, {"environment": "prod"}, False, "no approval configured"),
        ({"approvers": APPROVERS}, {"environment": "dev"}, True, "always required"),
        (
            {"approvers": APPROVERS, "required_when": 'request.context.environment == "prod"'},
            {"environment": "prod"},
            True,
            "required_when is true",
        ),
        (
            {"approvers": APPROVERS, "required_when": 'request.context.environment == "prod"'},
            {"environment": "dev"},
            False,
            "required_when is false",
        ),
        (
            {"approvers": APPROVERS, "required_when": 'request.context.change_ticket == ""'},
            {"environment": "dev"},
            True,
            "could not be evaluated (error: no such key 'change_ticket')",
        ),
        (
            {"approvers": APPROVERS, "required_when": "request.context.environment"},
            {"environment": "dev"},
            True,
            "could not be evaluated (result is string, not bool)",
        ),
    ],
    ids=[
        "not-configured",
        "always",
        "required-when-true",
        "required-when-false",
        "error",
        "non-bool",
    ],
)
def test_approval_required(
    approval: dict[str, Any] | None, context: dict[str, Any], required: bool, detail_part: str
) -> None:
    policy = make_policy(approval=approval, when=[])
    decision = decide(policy, req=request(context=context))
    assert decision.allowed
    assert decision.approval_required is required
    assert detail_part in decision.approval_detail


def test_approval_is_computed_for_denied_requests_too() -> None:
    policy = make_policy(approval={"approvers": APPROVERS})
    decision = decide(policy, req=request(owner="x@evil.io"))
    assert not decision.allowed
    assert decision.approval_required


@pytest.mark.parametrize(
    ("approvers", "identity", "passed", "detail_part"),
    [
        ({"groups": ["dba"]}, approver(), True, "may approve"),
        ({"groups": ["dba", "sre"]}, approver(frozenset({"sre", "x"})), True, "may approve"),
        ({"groups": ["dba"]}, approver(frozenset({"sre"})), False, "in none of the groups dba"),
        ({"groups": ["dba"]}, approver(frozenset()), False, "in none of the groups"),
        ({"subjects": ["corp-sso:*@example.com"]}, approver(frozenset()), True, "may approve"),
        (
            {"subjects": ["corp-sso:*@example.com"]},
            approver(sub="bob@evil.io"),
            False,
            "matches none",
        ),
        ({"groups": ["dba"], "subjects": ["corp-sso:carol@*"]}, approver(), False, "matches none"),
        ({"groups": ["dba"], "subjects": ["corp-sso:bob@*"]}, approver(), True, "may approve"),
        ({"groups": ["dba"]}, spire(), False, "not allowed to approve"),
    ],
    ids=[
        "group-member",
        "any-group-intersects",
        "wrong-group",
        "no-groups",
        "subject-glob-only",
        "subject-glob-miss",
        "group-ok-subject-miss",
        "group-and-subject",
        "issuer-without-approver-use",
    ],
)
def test_approver_allowed(
    approvers: dict[str, Any], identity: Identity, passed: bool, detail_part: str
) -> None:
    task = make_policy(approval={"approvers": approvers}).task("t")
    result = approver_allowed(task, identity)
    assert result.rule == "approval.approvers"
    assert result.passed is passed
    assert detail_part in result.detail


def test_approver_allowed_without_approval_configured() -> None:
    result = approver_allowed(make_policy().task("t"), approver())
    assert not result.passed
    assert "takes no approvals" in result.detail


# --- purity / performance guard ------------------------------------------------------------


def test_only_referenced_cel_variables_are_converted() -> None:
    assert make_policy().task("t").cel_variables == frozenset({"request"})
    policy = make_policy(when=[], approval={"approvers": APPROVERS, "required_when": "now == now"})
    assert policy.task("t").cel_variables == frozenset({"now"})
    assert make_policy(when=[]).task("t").cel_variables == frozenset()


def test_same_inputs_same_decision() -> None:
    policy = make_policy()
    assert decide(policy) == decide(policy)


# The policy example of the product contract (docs/contract.md §4), verbatim.
SPEC_EXAMPLE = """
tasks:
  analytics-read:
    description: Read the analytics database
    ttl: {default: 300, max: 900}                 # seconds
    workloads:                                    # who may start it (any entry matches)
      - {issuer: spire, subject: "spiffe://example.org/agents/*"}   # glob on the sub / SPIFFE ID
      - {issuer: github, subject: "repo:acme/app:*", claims: {ref: refs/heads/main}}
    owners: ["*@example.com"]                     # glob(s) the declared owner must match
    when:                                         # CEL expressions, all must be true
      - 'request.context.environment in ["staging", "prod"]'
    limits: {max_active_per_workload: 5, max_starts_per_minute: 30}
    approval:                                     # omit for low-risk tasks
      required_when: 'request.context.environment == "prod"'   # omit = always
      approvers: {groups: [dba]}                  # approver token's groups must meet this
      min_approvals: 1                            # distinct approvers needed (default 1)
      expires_in: 600                             # an unused approval lapses
    credentials:
      db:    {kind: database, mount: database, role: analytics-ro}
      token: {kind: vault_token, policies: [reports-read]}
      cert:  {kind: pki, mount: pki, role: agents, common_name: "{task_id}.agents.example.org"}
      aws:   {kind: lease, path: aws/creds/deploy}    # any Vault path that returns a lease
"""


def github(sub: str, ref: str) -> Identity:
    return Identity(
        id=f"github:{sub}", issuer_name="github", issuer="https://token.actions.githubusercontent.com",
        subject=sub, kind="oidc", uses=frozenset({"workload"}), groups=frozenset(),
        claims={"sub": sub, "ref": ref}, expires_at=NOW + dt.timedelta(minutes=5),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("identity", "allowed"),
    [
        (github("repo:acme/app:ref:refs/heads/main", "refs/heads/main"), True),
        (github("repo:acme/app:ref:refs/heads/dev", "refs/heads/dev"), False),
        (github("repo:acme/app-evil:ref:refs/heads/main", "refs/heads/main"), False),
        (spire("spiffe://example.org/agents/reporter"), True),
        (spire("spiffe://example.org/agents/team/reporter"), False),
        (spire("spiffe://example.org/other/reporter"), False),
    ],
    ids=["main-branch-job", "other-branch", "other-repo", "agent", "nested-agent", "not-an-agent"],
)
def test_the_contracts_example_policy_admits_whom_it_says(identity: Identity, allowed: bool) -> None:
    from broker.policy import parse_policy

    policy = parse_policy(SPEC_EXAMPLE)
    req = TaskRequest(task="analytics-read", owner="alice@example.com", purpose="weekly revenue report",
                      ttl_seconds=None, context={"environment": "staging"})  # fmt: skip
    decision = policy.evaluate(identity, req, NO_USAGE, NOW)
    assert decision.allowed is allowed, decision.detail
    if not allowed:
        assert decision.failed_rule == "workloads"


@pytest.mark.parametrize(
    ("source", "context", "missing"),
    [
        ('request.context.environment == "prod"', {}, ("environment",)),
        ('request.context.environment == "prod"', {"environment": "dev"}, ()),
        (
            'request.context["change-ticket"] != "" && request.context.env == "x"',
            {"env": "x"},
            ("change-ticket",),
        ),
        ('"ticket" in request.context && has(request.context.team)', {}, ("ticket", "team")),
        ("request.context.a == request.context.a", {}, ("a",)),
        ('workload.claims.ref == "main"', {}, ()),
    ],
)
def test_context_keys_missing_are_the_ones_the_expression_names(source, context, missing):
    from broker.policy.engine import context_keys_missing

    assert context_keys_missing(source, context) == missing
