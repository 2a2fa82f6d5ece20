"""`broker policy check|explain`: validate a policy file and dry-run decisions against it.

Nothing here talks to Vault or the database: `explain` evaluates the same `Policy.evaluate`
the API uses, with usage counts taken from the command line.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import click

from broker.errors import TtlExceedsMax, UnknownTask
from broker.identity.types import Identity
from broker.policy.engine import (
    CompiledTask,
    Decision,
    Policy,
    TaskRequest,
    Usage,
    when_rule_name,
)
from broker.policy.loader import load_policy
from broker.policy.schema import PolicyError, PolicyUnreadable

EXIT_OK = 0
EXIT_POLICY_INVALID = 1
EXIT_CANNOT_EVALUATE = 2
EXIT_DENIED = 3

_FILE = click.Path(dir_okay=False, path_type=Path)


def _fail(message: str, code: int = EXIT_CANNOT_EVALUATE) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(code)


@click.group(name="policy")
def policy() -> None:
    """Check policy files and explain decisions without issuing anything.

    \b
    Example:
      broker policy check /etc/broker/policy.yaml
    """


# --- check ---------------------------------------------------------------------------------

CHECK_EPILOG = """\b
Exit codes:
  0  the policy is valid
  1  the policy has errors (each printed as FILE:LINE: location: message)
  2  the file can't be read or is not YAML

\b
Examples:
  broker policy check /etc/broker/policy.yaml
  broker policy check broker/dev/data/policy.yaml && kill -HUP "$(pidof broker)"
"""


@policy.command("check", epilog=CHECK_EPILOG)
@click.argument("file", type=_FILE)
def check(file: Path) -> None:
    """Validate FILE: schema, names, globs and every CEL expression.

    Reports all problems at once, with the YAML line where it is known.
    """
    try:
        loaded = load_policy(file)
    except PolicyUnreadable as error:
        _fail(error.message, EXIT_CANNOT_EVALUATE)
    except PolicyError as error:
        for issue in error.issues:
            line = f"{issue.line}:" if issue.line is not None else ""
            click.echo(f"{file}:{line} {issue.location}: {issue.message}")
        click.echo(f"{file}: {len(error.issues)} error(s)", err=True)
        raise click.exceptions.Exit(EXIT_POLICY_INVALID) from None
    names = ", ".join(sorted(loaded.tasks))
    click.echo(f"ok: {len(loaded.tasks)} task types ({names})")


# --- explain -------------------------------------------------------------------------------

EXPLAIN_EPILOG = """\b
The workload comes either from a claims JSON file (no signature check; --issuer names the
configured issuer, --subject overrides the file's "sub"; an id starting with spiffe:// is
treated as a SPIFFE ID) or from a real token verified with the issuers of a broker config.
Usage counts for the limits rules are simulated with --active and --starts.

\b
Exit codes:
  0  allowed (the output says whether approval would also be needed)
  1  the policy file has errors (run `broker policy check FILE`)
  2  could not evaluate: unreadable input, unknown task, rejected token, bad option
  3  denied (a rule failed, or --ttl exceeds the task type's maximum)

\b
Examples:
  echo '{"sub": "spiffe://example.org/agents/reporter"}' > claims.json
  broker policy explain policy.yaml --task analytics-read --claims claims.json \\
      --issuer spire --owner alice@example.com --context '{"environment": "prod"}'
\b
  echo '{"sub": "repo:acme/app:ref:refs/heads/main", "ref": "refs/heads/main"}' > ci.json
  broker policy explain policy.yaml --task deploy-prod --claims ci.json --issuer ci \\
      --owner alice@example.com --context '{"environment": "prod"}' --json
\b
  broker policy explain policy.yaml --task analytics-read --token "$JWT" \\
      --config /etc/broker/config.yaml --owner alice@example.com --active 5
"""


@policy.command("explain", epilog=EXPLAIN_EPILOG)
@click.argument("file", type=_FILE)
@click.option("--task", "task_name", required=True, help="Task type to evaluate.")
@click.option("--claims", "claims_file", type=_FILE, help="JSON file of token claims.")
@click.option("--token", help="A real JWT, verified with the issuers of --config.")
@click.option("--config", "config_file", type=_FILE, envvar="BROKER_CONFIG", help="Broker config (--token).")
@click.option("--issuer", help="Configured issuer name (required with --claims).")
@click.option("--subject", help="Subject / SPIFFE ID (with --claims; default: the 'sub' claim).")
@click.option("--owner", required=True, help="Declared owner.")
@click.option(
    "--purpose",
    default="dry run: broker policy explain",
    show_default=True,
    help="Declared purpose.",
)
@click.option("--context", "context_json", default="{}", help="Request context as a JSON object.")
@click.option("--ttl", type=click.IntRange(min=1), help="Requested ttl_seconds [default: the task's].")
@click.option("--active", type=click.IntRange(min=0), default=0, help="Simulated active tasks.")
@click.option("--starts", type=click.IntRange(min=0), default=0, help="Simulated starts last minute.")
@click.option("--now", "now_text", help="Evaluation time, RFC 3339 (default: the current time).")
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
def explain(
    *,
    file: Path,
    task_name: str,
    claims_file: Path | None,
    token: str | None,
    config_file: Path | None,
    issuer: str | None,
    subject: str | None,
    owner: str,
    purpose: str,
    context_json: str,
    ttl: int | None,
    active: int,
    starts: int,
    now_text: str | None,
    as_json: bool,
) -> None:
    """Show how FILE decides one task start: every rule with PASS/FAIL and why.

    Issues nothing and needs neither Vault nor the database.
    """
    loaded = _load_for_explain(file)
    task = _known_task(loaded, task_name)
    now = _parse_now(now_text)
    identity = _identity_for_explain(
        claims_file=claims_file,
        token=token,
        config_file=config_file,
        issuer=issuer,
        subject=subject,
        now=now,
    )
    request = TaskRequest(task_name, owner, purpose, ttl, _parse_context(context_json))
    usage = Usage(active_for_workload=active, starts_last_minute=starts)
    try:
        decision = loaded.evaluate(identity, request, usage, now)
    except TtlExceedsMax as error:
        _print_ttl_exceeded(task, identity, error, as_json)
        raise click.exceptions.Exit(EXIT_DENIED) from None
    if as_json:
        click.echo(json.dumps(_decision_json(decision, identity), indent=2))
    else:
        _print_decision(task, identity, decision)
    raise click.exceptions.Exit(EXIT_OK if decision.allowed else EXIT_DENIED)


def _load_for_explain(file: Path) -> Policy:
    try:
        return load_policy(file)
    except PolicyUnreadable as error:
        _fail(error.message)
    except PolicyError as error:
        _fail(f"{error.message}; run `broker policy check {file}`", EXIT_POLICY_INVALID)


def _known_task(loaded: Policy, name: str) -> CompiledTask:
    try:
        return loaded.task(name)
    except UnknownTask:
        _fail(f"unknown task type {name!r} (known: {', '.join(sorted(loaded.tasks)) or 'none'})")


def _parse_now(text: str | None) -> dt.datetime:
    if text is None:
        return dt.datetime.now(dt.UTC)
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        _fail(f"--now {text!r} is not an RFC 3339 time (e.g. 2025-01-31T09:00:00Z)")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _parse_context(text: str) -> dict[str, Any]:
    try:
        context = json.loads(text)
    except json.JSONDecodeError as error:
        _fail(f"--context is not JSON: {error}")
    if not isinstance(context, dict):
        _fail("--context must be a JSON object")
    return context


def _identity_for_explain(
    *,
    claims_file: Path | None,
    token: str | None,
    config_file: Path | None,
    issuer: str | None,
    subject: str | None,
    now: dt.datetime,
) -> Identity:
    if (claims_file is None) == (token is None):
        _fail("give exactly one of --claims or --token")
    if claims_file is not None:
        if issuer is None:
            _fail("--claims needs --issuer (the issuer name from the broker config)")
        return identity_from_claims(_read_claims(claims_file), issuer, subject, now)
    assert token is not None  # for mypy: checked above
    if subject is not None:
        _fail("--subject can't override a verified token's subject")
    identity = _verify_token(token, config_file)
    if issuer is not None and issuer != identity.issuer_name:
        _fail(f"the token is from issuer {identity.issuer_name!r}, not {issuer!r}")
    return identity


def _read_claims(path: Path) -> dict[str, Any]:
    try:
        claims = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        _fail(f"cannot read {path}: {error.strerror or error}")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        _fail(f"{path} is not JSON: {error}")
    if not isinstance(claims, dict):
        _fail(f"{path} must hold a JSON object of claims")
    return claims


def identity_from_claims(
    claims: Mapping[str, Any], issuer: str, subject: str | None, now: dt.datetime
) -> Identity:
    """The identity a verified token with these claims would give (for dry runs only)."""
    sub = subject if subject is not None else claims.get("sub")
    if not isinstance(sub, str) or not sub:
        _fail('no subject: pass --subject or put a "sub" string in the claims')
    is_spiffe = sub.startswith("spiffe://")
    exp = claims.get("exp")
    return Identity(
        id=sub if is_spiffe else f"{issuer}:{sub}",
        issuer_name=issuer,
        issuer=str(claims.get("iss", "")),
        subject=sub,
        kind="spiffe" if is_spiffe else "oidc",
        uses=frozenset({"workload"}),
        groups=_string_set(claims.get("groups")),
        claims=dict(claims),
        expires_at=dt.datetime.fromtimestamp(exp, dt.UTC) if isinstance(exp, int) else now,
        jti=claims.get("jti") if isinstance(claims.get("jti"), str) else None,
    )


def _string_set(value: Any) -> frozenset[str]:
    return frozenset(v for v in value if isinstance(v, str)) if isinstance(value, list) else frozenset()


class _DryRunJtiStore:
    """Accepts every jti without recording it: a dry run must not spend a single-use token."""

    def claim(self, issuer_name: str, jti: str, expires_at: dt.datetime) -> bool:
        return True


def _verify_token(token: str, config_file: Path | None) -> Identity:
    if config_file is None:
        _fail("--token needs --config (or BROKER_CONFIG) to know the issuers")
    # Imported here so `check` and `--claims` work without the identity stack's
    # dependencies (JWKS files, HTTP) and its tests stay independent of this module.
    from broker.config import ConfigError, load_settings
    from broker.identity.verifier import Verifier

    try:
        settings = load_settings(config_file)
    except ConfigError as error:
        _fail(str(error))
    try:
        verifier = Verifier.from_settings(settings, jti_store=_DryRunJtiStore())
    except Exception as error:  # bad JWKS file or issuer setup: report it, don't trace back
        _fail(f"cannot set up token verification: {error}")
    try:
        return verifier.verify(token)
    except Exception as error:  # InvalidToken and friends: the reason is the useful part
        _fail(f"token rejected: {error}")
    finally:
        verifier.close()


# --- output --------------------------------------------------------------------------------


def _decision_json(decision: Decision, identity: Identity) -> dict[str, Any]:
    return {"workload": identity.id, **dataclasses.asdict(decision)}


def _print_decision(task: CompiledTask, identity: Identity, decision: Decision) -> None:
    verdict = "ALLOWED"
    if not decision.allowed:
        verdict = f"DENIED (rule {decision.failed_rule} failed: {decision.detail})"
    click.echo(f"task:     {task.name}")
    click.echo(f"workload: {identity.id} (issuer {identity.issuer_name})")
    click.echo(f"decision: {verdict}")
    approval = "required" if decision.approval_required else "not required"
    click.echo(f"approval: {approval} ({decision.approval_detail})")
    click.echo(f"ttl:      {decision.ttl_seconds}s")
    if decision.retry_after_seconds is not None:
        click.echo(f"retry:    after {decision.retry_after_seconds}s (limit exceeded, HTTP 429)")
    click.echo("rules:")
    width = max(len(rule.rule) for rule in decision.rules)
    expressions = {when_rule_name(i): rule.source for i, rule in enumerate(task.when)}
    for rule in decision.rules:
        mark = "PASS" if rule.passed else "FAIL"
        click.echo(f"  {mark}  {rule.rule:<{width}}  {rule.detail}")
        if rule.rule in expressions:
            click.echo(f"        {'':<{width}}  {expressions[rule.rule]}")


def _print_ttl_exceeded(task: CompiledTask, identity: Identity, error: TtlExceedsMax, as_json: bool) -> None:
    if as_json:
        body = {
            "workload": identity.id,
            "task": task.name,
            "allowed": False,
            "failed_rule": "ttl",
            "code": "ttl_exceeds_max",
            "detail": str(error),
        }
        click.echo(json.dumps(body, indent=2))
        return
    click.echo(f"task:     {task.name}")
    click.echo(f"workload: {identity.id} (issuer {identity.issuer_name})")
    click.echo(f"decision: DENIED (ttl_exceeds_max: {error})")
