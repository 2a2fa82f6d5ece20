"""`broker policy check` and `broker policy explain`, through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from broker.cli.policy import policy

DEVDATA = Path(__file__).resolve().parents[2] / "broker" / "dev" / "data" / "policy.yaml"
AGENT_CLAIMS = {"sub": "spiffe://example.org/agents/reporter", "exp": 4102444800}
CI_CLAIMS = {"sub": "repo:acme/app:ref:refs/heads/main", "ref": "refs/heads/main"}


def run(*args: str) -> Result:
    return CliRunner().invoke(policy, list(args))


@pytest.fixture
def agent_claims(tmp_path: Path) -> Path:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(AGENT_CLAIMS), encoding="utf-8")
    return path


@pytest.fixture
def ci_claims(tmp_path: Path) -> Path:
    path = tmp_path / "ci.json"
    path.write_text(json.dumps(CI_CLAIMS), encoding="utf-8")
    return path


# --- check ---------------------------------------------------------------------------------


def test_check_ok() -> None:
    result = run("check", str(DEVDATA))
    assert result.exit_code == 0, result.output
    assert result.stdout == "ok: 4 task types (analytics-gateway, analytics-read, deploy-prod, issue-cert)\n"


def test_check_prints_file_line_location_message(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        DEVDATA.read_text(encoding="utf-8").replace("    owners:", "    ownrs: [x]\n    owners:", 1)
    )
    result = run("check", str(path))
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{path}:")
    _file, line, location, message = lines[0].split(":", 3)
    assert int(line) > 0
    assert location.strip() == "tasks.analytics-read"
    assert message.strip() == "unknown key 'ownrs' (check its spelling)"
    assert "1 error(s)" in result.stderr


def test_check_reports_cel_error_with_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    text = DEVDATA.read_text(encoding="utf-8")
    path.write_text(text.replace('in ["dev", "staging", "prod"]', 'in ["dev"', 1), encoding="utf-8")
    result = run("check", str(path))
    assert result.exit_code == 1
    assert ": tasks.analytics-read.when[0]: CEL syntax error" in result.stdout
    expected_line = next(
        number for number, line in enumerate(text.splitlines(), 1) if "request.context.environment in" in line
    )
    assert result.stdout.startswith(f"{path}:{expected_line}: ")


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read"), ("tasks: [oops\n", "not valid YAML")],
    ids=["missing-file", "not-yaml"],
)
def test_check_unreadable_exits_2(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "p.yaml"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    result = run("check", str(path))
    assert result.exit_code == 2
    assert message in result.stderr


# --- explain -------------------------------------------------------------------------------


def explain(claims: Path, *extra: str, task: str = "analytics-read", issuer: str = "spire") -> Result:
    return run(
        "explain",
        str(DEVDATA),
        "--task",
        task,
        "--claims",
        str(claims),
        "--issuer",
        issuer,
        "--owner",
        "alice@example.com",
        *extra,
    )


def test_explain_allowed_prints_every_rule(agent_claims: Path) -> None:
    result = explain(agent_claims, "--context", '{"environment": "prod"}')
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "decision: ALLOWED" in out
    assert "workload: spiffe://example.org/agents/reporter (issuer spire)" in out
    for name in ("workloads", "ttl", "owners", "when[0]", "limits.max_active_per_workload"):
        assert f"PASS  {name}" in out
    assert 'request.context.environment in ["dev", "staging", "prod"]' in out, "shows the expression"
    assert "approval: not required" in out


@pytest.mark.parametrize(
    ("extra", "code", "expected"),
    [
        (("--context", '{"environment": "qa"}'), 3, "FAIL  when[0]"),
        ((), 3, "error: no such key 'environment'"),
        (("--context", '{"environment": "dev"}', "--active", "5"), 3, "retry:    after 30s"),
        (
            ("--context", '{"environment": "dev"}', "--starts", "30"),
            3,
            "FAIL  limits.max_starts_per_minute",
        ),
        (("--context", '{"environment": "dev"}', "--ttl", "900"), 0, "ttl:      900s"),
        (("--context", '{"environment": "dev"}', "--ttl", "901"), 3, "ttl_exceeds_max"),
    ],
    ids=[
        "when-false",
        "missing-context-key",
        "active-limit",
        "starts-limit",
        "ttl-max",
        "ttl-exceeded",
    ],
)
def test_explain_exit_codes_and_details(
    agent_claims: Path, extra: tuple[str, ...], code: int, expected: str
) -> None:
    result = explain(agent_claims, *extra)
    assert result.exit_code == code, result.output
    assert expected in result.stdout


def test_explain_denied_names_first_failed_rule(agent_claims: Path) -> None:
    result = explain(agent_claims, "--issuer", "ci", "--context", '{"environment": "qa"}')
    assert result.exit_code == 3
    assert "decision: DENIED (rule workloads failed:" in result.stdout
    assert "FAIL  when[0]" in result.stdout, "later rules are still shown"


def test_explain_json_with_approval(ci_claims: Path) -> None:
    result = explain(
        ci_claims, "--context", '{"environment": "prod"}', "--json", task="deploy-prod", issuer="ci"
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["allowed"] is True
    assert body["approval_required"] is True
    assert body["workload"] == "ci:repo:acme/app:ref:refs/heads/main"
    assert [r["rule"] for r in body["rules"]][:3] == ["workloads", "ttl", "owners"]
    assert body["failed_rule"] is None


def test_explain_json_ttl_exceeded(agent_claims: Path) -> None:
    result = explain(agent_claims, "--ttl", "5000", "--json")
    assert result.exit_code == 3
    body = json.loads(result.stdout)
    assert body["code"] == "ttl_exceeds_max"
    assert body["allowed"] is False


def test_explain_subject_override_and_now(agent_claims: Path) -> None:
    result = explain(
        agent_claims,
        "--subject",
        "spiffe://example.org/agents/team/x",
        "--context",
        '{"environment": "dev"}',
        "--now",
        "2025-01-31T09:00:00Z",
    )
    assert result.exit_code == 3
    assert "use `**`" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--task", "nope"),
            "unknown task type 'nope' (known: analytics-gateway, analytics-read, deploy-prod, issue-cert)",
        ),
        (("--context", "[1]"), "--context must be a JSON object"),
        (("--context", "{bad"), "--context is not JSON"),
        (("--now", "yesterday"), "is not an RFC 3339 time"),
    ],
    ids=["unknown-task", "context-not-object", "context-not-json", "bad-now"],
)
def test_explain_bad_input_exits_2(agent_claims: Path, args: tuple[str, ...], message: str) -> None:
    base = [
        "explain",
        str(DEVDATA),
        "--claims",
        str(agent_claims),
        "--issuer",
        "spire",
        "--owner",
        "a@example.com",
    ]
    if "--task" not in args:
        base += ["--task", "analytics-read"]
    result = run(*base, *args)
    assert result.exit_code == 2
    assert message in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give exactly one of --claims or --token"),
        (("--claims", "CLAIMS", "--token", "x.y.z"), "give exactly one of --claims or --token"),
        (("--claims", "CLAIMS"), "--claims needs --issuer"),
        (("--token", "x.y.z"), "--token needs --config"),
    ],
    ids=["neither", "both", "claims-without-issuer", "token-without-config"],
)
def test_explain_identity_source_errors(
    agent_claims: Path, args: tuple[str, ...], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BROKER_CONFIG", raising=False)
    args = tuple(str(agent_claims) if a == "CLAIMS" else a for a in args)
    result = run("explain", str(DEVDATA), "--task", "analytics-read", "--owner", "a@example.com", *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_explain_claims_without_subject(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"ref": "x"}', encoding="utf-8")
    result = explain(path)
    assert result.exit_code == 2
    assert "no subject" in result.stderr


def test_explain_invalid_policy_exits_1(tmp_path: Path, agent_claims: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("tasks: {a: 1}\n", encoding="utf-8")
    result = run(
        "explain",
        str(path),
        "--task",
        "a",
        "--claims",
        str(agent_claims),
        "--issuer",
        "s",
        "--owner",
        "o",
    )
    assert result.exit_code == 1
    assert "broker policy check" in result.stderr


def test_help_documents_exit_codes_and_examples() -> None:
    result = run("explain", "--help")
    assert result.exit_code == 0
    for text in (
        "Exit codes:",
        "3  denied",
        "broker policy explain policy.yaml --task analytics-read",
    ):
        assert text in result.stdout
    check_help = run("check", "--help").stdout
    assert "FILE:LINE: location: message" in check_help


# --- explain --token (uses the identity module; skipped until it is importable) -----------


@pytest.fixture
def token_setup(tmp_path: Path) -> tuple[Path, object]:
    pytest.importorskip("broker.identity.verifier")
    tokens = pytest.importorskip("tests.support.tokens")
    spire = tokens.TestIssuer.create(tmp_path, name="spire", kind="spiffe", single_use=True)
    config = {
        "database_url": "postgresql://broker@127.0.0.1:5432/broker",
        "vault": {"addr": "http://127.0.0.1:8200", "auth": {"method": "token", "token": "t"}},
        "policy_file": str(DEVDATA),
        "issuers": [spire.settings_dict()],
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path, spire


def test_explain_with_verified_token(token_setup: tuple[Path, object]) -> None:
    config, spire = token_setup
    token = spire.mint(spire.spiffe_id("agents/reporter"))  # type: ignore[attr-defined]
    args = [
        "explain",
        str(DEVDATA),
        "--task",
        "analytics-read",
        "--token",
        token,
        "--config",
        str(config),
    ]
    args += ["--owner", "alice@example.com", "--context", '{"environment": "dev"}']
    first = run(*args)
    assert first.exit_code == 0, first.output
    assert "workload: spiffe://example.org/agents/reporter (issuer spire)" in first.stdout
    # A dry run must not spend a single-use token: the same token explains twice.
    assert run(*args).exit_code == 0


def test_explain_with_rejected_token(token_setup: tuple[Path, object]) -> None:
    config, spire = token_setup
    token = spire.mint(spire.spiffe_id("agents/reporter"), exp_in=-3600)  # type: ignore[attr-defined]
    result = run("explain", str(DEVDATA), "--task", "analytics-read", "--token", token,
                 "--config", str(config), "--owner", "alice@example.com")  # fmt: skip
    assert result.exit_code == 2
    assert "token rejected" in result.stderr
