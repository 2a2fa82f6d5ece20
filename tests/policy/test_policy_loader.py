"""Loading policy files: every error named by location and line; live reloads fail safe."""

from __future__ import annotations

import logging
import textwrap
import threading
import time
from pathlib import Path

import pytest

from broker.policy import PolicyError, PolicyStore, PolicyUnreadable, load_policy, parse_policy

DEVDATA = Path(__file__).resolve().parents[2] / "broker" / "dev" / "data" / "policy.yaml"

GOOD = textwrap.dedent(
    """\
    tasks:
      analytics-read:
        description: Read the analytics database
        ttl: {default: 300, max: 900}
        workloads:
          - {issuer: spire, subject: "spiffe://example.org/agents/*"}
        owners: ["*@example.com"]
        when:
          - 'request.context.environment in ["staging", "prod"]'
        credentials:
          db: {kind: database, mount: database, role: analytics-ro}
    """
)


def errors_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as raised:
        parse_policy(textwrap.dedent(text))
    return raised.value.errors


def test_good_policy_loads() -> None:
    policy = parse_policy(GOOD)
    task = policy.task("analytics-read")
    assert task.ttl_default == 300
    assert task.ttl_max == 900
    assert set(task.credentials) == {"db"}
    assert task.when[0].source == 'request.context.environment in ["staging", "prod"]'


def test_demo_policy_is_valid_and_complete() -> None:
    policy = load_policy(DEVDATA)
    assert set(policy.tasks) == {"analytics-read", "analytics-gateway", "deploy-prod", "issue-cert"}
    gateway = policy.task("analytics-gateway")
    assert gateway.credentials["db"].delivery == "gateway"  # type: ignore[union-attr]
    assert [rule.name for rule in gateway.statements["db"].rules] == ["read-only", "analytics-only"]
    deploy = policy.task("deploy-prod")
    assert set(deploy.credentials) == {"db", "token"}
    assert deploy.approval is not None
    assert deploy.approval.groups == frozenset({"dba"})
    assert deploy.approval.expires_in == 600
    cert = policy.task("issue-cert").credentials["cert"]
    assert cert.kind == "pki"


# Each case: (policy text, expected error line, reason). Lines count from 1 in the text.
BAD_CASES = [
    (
        GOOD.replace("    owners:", "    tll: 5\n    owners:"),
        "line 7: tasks.analytics-read: unknown key 'tll' (check its spelling)",
        "unknown-task-key",
    ),
    (
        GOOD.replace("mount: database,", "mount: database, rol: x,"),
        "line 11: tasks.analytics-read.credentials.db: unknown key 'rol' (check its spelling)",
        "unknown-credential-key",
    ),
    (
        GOOD.replace("{kind: database,", "{kind: databse,"),
        "line 11: tasks.analytics-read.credentials.db: unknown kind 'databse' "
        "(expected one of 'database', 'vault_token', 'pki', 'lease')",
        "bad-credential-kind",
    ),
    (
        GOOD.replace("{kind: database, mount: database, role: analytics-ro}", "{mount: database}"),
        "line 11: tasks.analytics-read.credentials.db: missing required key 'kind' "
        "(database, vault_token, pki or lease)",
        "missing-credential-kind",
    ),
    (
        GOOD.replace(", mount: database, role: analytics-ro}", "}"),
        "line 11: tasks.analytics-read.credentials.db: missing required key 'role'",
        "missing-credential-field",
    ),
    (
        GOOD.replace("default: 300", "default: 1000"),
        "line 4: tasks.analytics-read.ttl: default (1000) must not exceed max (900)",
        "ttl-default-above-max",
    ),
    (
        GOOD.replace("default: 300", 'default: "300"'),
        "line 4: tasks.analytics-read.ttl.default: Input should be a valid integer",
        "ttl-quoted-number",
    ),
    (
        GOOD.replace("max: 900", "max: 0"),
        "line 4: tasks.analytics-read.ttl.max: Input should be greater than 0",
        "ttl-zero",
    ),
    (
        GOOD.replace("  analytics-read:", "  Analytics Read:"),
        "line 2: tasks: invalid name 'Analytics Read': String should match pattern",
        "bad-task-name",
    ),
    (
        GOOD.replace("      db: {", "      DB: {"),
        "line 11: tasks.analytics-read.credentials: invalid name 'DB'",
        "bad-credential-name",
    ),
    (
        GOOD.replace('owners: ["*@example.com"]', "owners: []"),
        "line 7: tasks.analytics-read.owners: List should have at least 1 item",
        "no-owners",
    ),
    (
        GOOD.replace('subject: "spiffe://example.org/agents/*"}', 'subject: "x", claims: {a: {b: 1}}}'),
        "line 6: tasks.analytics-read.workloads[0].claims: claim 'a' must be a string, number, "
        "boolean or a list of them",
        "nested-claim-value",
    ),
    (
        GOOD + "    approval: {approvers: {groups: []}}\n",
        "line 12: tasks.analytics-read.approval.approvers: name at least one approver group or subject",
        "approval-nobody",
    ),
    (
        GOOD + "    approval: {approvers: {groups: [dba]}, min_approvals: 0}\n",
        "line 12: tasks.analytics-read.approval.min_approvals: Input should be greater than or equal to 1",
        "approval-zero-approvals",
    ),
    (
        "tasks:\n  a: 5\n",
        "line 2: tasks.a: Input should be a valid dictionary or instance of TaskPolicy",
        "task-not-mapping",
    ),
    (
        "- a\n- b\n",
        "line 1: (top level): expected a mapping with 'tasks' at the top level",
        "top-level-list",
    ),
    ("", "line 1: (top level): the file is empty; expected a mapping with 'tasks'", "empty-file"),
    ("version: 2\n", "line 1: (top level): missing required key 'tasks'", "missing-tasks"),
]


@pytest.mark.parametrize(("text", "expected"), [c[:2] for c in BAD_CASES], ids=[c[2] for c in BAD_CASES])
def test_schema_errors_name_location_and_line(text: str, expected: str) -> None:
    errors = errors_of(text)
    assert any(error.startswith(expected) for error in errors), errors


def test_all_schema_errors_reported_at_once_in_line_order() -> None:
    text = GOOD.replace("    owners:", "    tll: 5\n    owners:").replace("max: 900", "max: 0")
    errors = errors_of(text)
    assert len(errors) == 2
    assert errors[0].startswith("line 4:")
    assert errors[1].startswith("line 7:")


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 +", "line 9: tasks.analytics-read.when[0]: CEL syntax error at 1:4: mismatched input"),
        ('request.context.x == "a', "line 9: tasks.analytics-read.when[0]: CEL syntax error"),
        ("requets.context.x", "line 9: tasks.analytics-read.when[0]: unknown variable requets"),
        ("", "line 9: tasks.analytics-read.when[0]: String should have at least 1 character"),
        ("request.ownr == 'x'", "line 9: tasks.analytics-read.when[0]: request has no field 'ownr'"),
        ("workload.subjct == 'x'", "line 9: tasks.analytics-read.when[0]: workload has no field 'subjct'"),
        ("1 + 1", "line 9: tasks.analytics-read.when[0]: evaluates to int, not a boolean"),
        ("request.ttl_seconds", "line 9: tasks.analytics-read.when[0]: evaluates to int, not a boolean"),
        ("null", "line 9: tasks.analytics-read.when[0]: evaluates to null, not a boolean"),
        ("request.owner + 1 == 2", "line 9: tasks.analytics-read.when[0]: CEL type error"),
        (
            "nosuchfn(request.owner)",
            "line 9: tasks.analytics-read.when[0]: CEL error: Undefined variable or function",
        ),
    ],
    ids=[
        "syntax",
        "unterminated-string",
        "misspelt-variable",
        "empty",
        "misspelt-request-field",
        "misspelt-workload-field",
        "int-result",
        "field-result",
        "null-result",
        "type-error",
        "unknown-function",
    ],
)
def test_cel_compile_errors_name_expression_index_and_line(expression: str, expected: str) -> None:
    text = GOOD.replace("""'request.context.environment in ["staging", "prod"]'""", repr(expression)).replace(
        "    credentials:", "    credentials:"
    )
    errors = errors_of(text)
    assert errors[0].startswith(expected), errors
    if expression:
        assert errors[0].endswith(repr(expression)), "the expression's text is quoted"


@pytest.mark.parametrize(
    "expression",
    [
        'request.context.environment == "prod"',  # the key may be there in the next request
        'workload.claims.ref == "refs/heads/main"',
        'has(request.context.env) && request.context.env == "x"',
        "int(request.context.n) > 1",
        'request.context.tags.exists(t, t.request == "x")',  # a field of a bound variable
        'now > timestamp("2025-01-01T00:00:00Z") && request.ttl_seconds <= 600',
        'request.purpose.contains("request.foo")',  # a field name inside a string is text
    ],
)
def test_rules_that_depend_on_the_requests_data_are_accepted(expression: str) -> None:
    text = GOOD.replace("""'request.context.environment in ["staging", "prod"]'""", repr(expression))
    parse_policy(textwrap.dedent(text))  # raises PolicyError on any problem


def test_cel_errors_in_several_places_are_all_reported() -> None:
    text = (
        GOOD.replace(
            """      - 'request.context.environment in ["staging", "prod"]'""",
            "      - 'true'\n      - '1 +'",
        )
        + "    approval: {required_when: 'nope(', approvers: {groups: [dba]}}\n"
    )
    errors = errors_of(text)
    assert [e.split(": ")[1] for e in errors] == [
        "tasks.analytics-read.when[1]",
        "tasks.analytics-read.approval.required_when",
    ]
    assert errors[0].startswith("line 10:")
    assert errors[1].startswith("line 13:")


def test_macro_variables_are_not_reported_as_unknown() -> None:
    text = GOOD.replace(
        """'request.context.environment in ["staging", "prod"]'""",
        """'request.context.tags.all(t, t != "x") && [1].map(n, n + 1).exists(m, m == 2)'""",
    )
    parse_policy(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GOOD.replace("    owners:", "    ttl: {default: 1, max: 2}\n    owners:"),
            "line 7: tasks.analytics-read: duplicate key 'ttl' (first at line 4)",
        ),
        (
            GOOD + "  analytics-read: {}\n",
            "line 12: tasks: duplicate key 'analytics-read' (first at line 2)",
        ),
        (
            GOOD.replace("mount: database,", "mount: database, mount: db2,"),
            "line 11: tasks.analytics-read.credentials.db: duplicate key 'mount' (first at line 11)",
        ),
    ],
    ids=["task-key", "task-name", "flow-mapping"],
)
def test_duplicate_yaml_keys_are_errors(text: str, expected: str) -> None:
    assert errors_of(text) == [expected]


def test_merge_keys_are_not_duplicates() -> None:
    text = textwrap.dedent(
        """\
        tasks:
          a:
            description: base
            ttl: &ttl {default: 300, max: 900}
            workloads: [{issuer: spire, subject: "spiffe://example.org/agents/*"}]
            owners: ["*@example.com"]
            credentials: {db: {kind: database, role: r}}
          b:
            description: b
            ttl: {<<: *ttl, default: 60}
            workloads: [{issuer: spire, subject: "spiffe://example.org/agents/*"}]
            owners: ["*@example.com"]
            credentials: {db: {kind: database, role: r}}
        """
    )
    assert parse_policy(text).task("b").ttl_default == 60


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"tasks: [unclosed\n", "is not valid YAML at line 2"),
        (b"tasks:\n  a: b\n c: d\n", "is not valid YAML at line 3"),
        (b"\xff\xfe tasks", "is not UTF-8 text"),
        (b"tasks: !!python/object:os.system {}\n", "is not valid YAML"),
    ],
    ids=["unclosed-flow", "bad-indent", "not-utf8", "unsafe-tag"],
)
def test_unreadable_or_not_yaml(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(content)
    with pytest.raises(PolicyUnreadable) as raised:
        load_policy(path)
    assert message in raised.value.message


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(PolicyUnreadable, match="cannot read"):
        load_policy(tmp_path / "absent.yaml")


# --- PolicyStore ---------------------------------------------------------------------------


@pytest.fixture
def policy_path(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD, encoding="utf-8")
    return path


def test_store_loads_at_start_with_version_and_digest(policy_path: Path) -> None:
    store = PolicyStore(policy_path)
    assert set(store.current().tasks) == {"analytics-read"}
    assert store.version == 1
    assert len(store.sha256) == 64
    snapshot = store.snapshot()
    assert (snapshot.policy, snapshot.version, snapshot.sha256) == (
        store.current(),
        1,
        store.sha256,
    )


def test_store_refuses_to_start_on_a_bad_file(policy_path: Path) -> None:
    policy_path.write_text("tasks: {x: 1}\n", encoding="utf-8")
    with pytest.raises(PolicyError):
        PolicyStore(policy_path)


def test_reload_swaps_to_a_good_new_file(policy_path: Path) -> None:
    store = PolicyStore(policy_path)
    old_digest = store.sha256
    policy_path.write_text(GOOD.replace("analytics-read:", "reports:"), encoding="utf-8")
    assert store.reload() is True
    assert set(store.current().tasks) == {"reports"}
    assert store.version == 2
    assert store.sha256 != old_digest


def test_reload_of_unchanged_file_is_not_a_new_version(policy_path: Path) -> None:
    store = PolicyStore(policy_path)
    before = store.current()
    assert store.reload() is True
    assert store.current() is before
    assert store.version == 1


@pytest.mark.parametrize(
    "bad_content",
    [b"tasks: [unclosed\n", GOOD.replace("default: 300", "default: 1000").encode(), None],
    ids=["not-yaml", "invalid-policy", "file-removed"],
)
def test_reload_keeps_the_old_policy_on_a_bad_file(
    policy_path: Path, bad_content: bytes | None, caplog: pytest.LogCaptureFixture
) -> None:
    store = PolicyStore(policy_path)
    before = store.snapshot()
    if bad_content is None:
        policy_path.unlink()
    else:
        policy_path.write_bytes(bad_content)
    with caplog.at_level(logging.WARNING, logger="broker.policy.loader"):
        assert store.reload() is False
    assert store.snapshot() == before
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "keeping version 1" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()


def test_concurrent_readers_always_see_a_complete_policy(policy_path: Path) -> None:
    store = PolicyStore(policy_path)
    variants = [GOOD, GOOD.replace("analytics-read:", "reports:")]
    seen: set[frozenset[str]] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(frozenset(store.current().tasks))
            time.sleep(0.0001)  # let the reloading thread run

    readers = [threading.Thread(target=read) for _ in range(4)]
    for reader in readers:
        reader.start()
    for i in range(20):
        policy_path.write_text(variants[i % 2], encoding="utf-8")
        assert store.reload()
    stop.set()
    for reader in readers:
        reader.join()
    assert seen <= {frozenset({"analytics-read"}), frozenset({"reports"})}
    assert store.version == 20
