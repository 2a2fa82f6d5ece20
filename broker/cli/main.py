"""The `broker` command."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import click

from broker.cli.approvals import approvals
from broker.cli.audit import audit_export, audit_tail
from broker.cli.common import CONFIG_HELP, settings_or_exit
from broker.cli.ops import leases, locks, tasks
from broker.cli.policy import policy
from broker.client.cli import exec_command
from broker.config import Settings
from broker.dev.cli import dev
from broker.mcp.cli import mcp_command


def _host_port(value: str | None) -> str | None:
    if value is not None:
        port = value.rpartition(":")[2]
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise click.BadParameter("expected HOST:PORT or :PORT, e.g. 0.0.0.0:9102")
    return value


def _logging(settings: Settings) -> None:
    from broker import logs

    logs.configure(settings.log_level, settings.log_format)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="""\b
Examples:
  broker dev                         # a whole local stack, with a worked example
  broker migrate --config broker.yaml
  broker serve --config broker.yaml --bind 0.0.0.0:8080 --workers 4
  broker policy check policy.yaml
  broker audit verify --config broker.yaml
  broker reload --config broker.yaml --port 8080
""",
)
@click.version_option(package_name="credential-broker")
def main() -> None:
    """Credential Broker: task-scoped, short-lived Vault/OpenBao credentials for attested workloads.

    Configuration comes from one YAML file (--config or $BROKER_CONFIG); the environment
    variables BROKER_DATABASE_URL, BROKER_VAULT_ADDR, BROKER_VAULT_TOKEN and
    BROKER_POLICY_FILE override single keys.
    """


PID_FILE_HELP = (
    "File for the master's pid, read by `broker reload` "
    "[default: $XDG_RUNTIME_DIR/credential-broker/serve-PORT.pid, else under the temp dir]."
)


@main.command()
@click.option("--config", "config", envvar="BROKER_CONFIG", help=CONFIG_HELP)
@click.option("--bind", default="127.0.0.1:8080", show_default=True, help="HOST:PORT to listen on.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64), help="Worker processes.")
@click.option(
    "--threads", default=4, show_default=True, type=click.IntRange(1, 64), help="Threads per worker."
)
@click.option(
    "--no-scheduler",
    is_flag=True,
    help="Don't run the revocation scheduler here (run `broker scheduler` elsewhere).",
)
@click.option(
    "--no-gateway",
    is_flag=True,
    help="Don't run the gateway here even when `gateway:` is configured (run `broker gateway` elsewhere).",
)
@click.option(
    "--pid-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="BROKER_PID_FILE",
    help=PID_FILE_HELP,
)
def serve(
    config: str | None,
    bind: str,
    workers: int,
    threads: int,
    no_scheduler: bool,
    no_gateway: bool,
    pid_file: Path | None,
) -> None:
    """Run the API under gunicorn, with the revocation scheduler beside it (and the gateway,
    when `gateway:` is configured).

    Run any number of replicas against one database: the scheduler claims work with
    row locks, so no lease is revoked twice or missed. SIGHUP reloads the policy
    (`broker reload` sends it). Exits 2 if the config or policy is bad or the port is taken.

    \b
    Example:
      broker migrate --config /etc/broker/broker.yaml
      broker serve --config /etc/broker/broker.yaml --bind 0.0.0.0:8080 --workers 4
    """
    settings = settings_or_exit(config)
    _logging(settings)
    _check_policy(settings)
    from broker.server import default_pid_file, port_in_use
    from broker.server import serve as run

    if port_in_use(bind):
        click.echo(f"serve: {bind} is already in use by another process; choose another --bind", err=True)
        sys.exit(2)
    run(
        settings,
        config,
        bind=bind,
        workers=workers,
        threads=threads,
        with_scheduler=not no_scheduler,
        with_gateway=not no_gateway,
        pid_file=pid_file or default_pid_file(bind),
    )


@main.command()
@click.option(
    "--config",
    "config",
    envvar="BROKER_CONFIG",
    help=CONFIG_HELP + " Its policy file is checked first; a bad one is not sent.",
)
@click.option(
    "--port",
    default=8080,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="The port `broker serve` listens on.",
)
@click.option(
    "--pid-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="BROKER_PID_FILE",
    help="The pid file `broker serve` wrote [default: the one for --port].",
)
def reload(config: str | None, port: int, pid_file: Path | None) -> None:
    """Reload the policy of a running `broker serve`: check it, then SIGHUP its master.

    The master forwards the signal to its workers and its scheduler; each keeps the old
    policy if the new one fails to load. Exits 2 if the policy is bad (nothing is sent),
    1 if no running `broker serve` is found.

    \b
    Example:
      broker reload --config /etc/broker/broker.yaml --port 8080
      broker reload --pid-file /run/broker/serve.pid
    """
    import os
    import signal as signals

    from broker.server import default_pid_file, master_pid

    if config is not None:
        _check_policy(settings_or_exit(config))
    path = pid_file or default_pid_file(f":{port}")
    pid = master_pid(path)
    if pid is None:
        click.echo(f"reload: no running broker serve found through {path}", err=True)
        sys.exit(1)
    os.kill(pid, signals.SIGHUP)
    click.echo(f"sent SIGHUP to broker serve (pid {pid}); its log says 'policy reloaded' or why not")


@main.command()
@click.option("--config", "config", envvar="BROKER_CONFIG", help=CONFIG_HELP)
@click.option(
    "--metrics-bind",
    callback=lambda _ctx, _param, value: _host_port(value),
    help="HOST:PORT to serve Prometheus metrics on (standalone scheduler).",
)
def scheduler(config: str | None, metrics_bind: str | None) -> None:
    """Run the revocation scheduler alone (deadlines, retries, lapsed approvals, orphans).

    Run as many as you like against one database: each claims rows with
    FOR UPDATE SKIP LOCKED, so no lease is revoked twice. `broker serve` runs one itself
    unless --no-scheduler.

    \b
    Example:
      broker serve --config broker.yaml --no-scheduler    # on each API replica
      broker scheduler --config broker.yaml --metrics-bind 0.0.0.0:9102
    """
    # First of all: a SIGHUP's default action ends the process, and `broker serve` forwards
    # one on every policy reload, also while this process is still loading. Remembered, it
    # is honoured once the scheduler runs.
    hup_seen = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: hup_seen.set())
    settings = settings_or_exit(config)
    _logging(settings)
    _check_policy(settings)
    if metrics_bind:
        from prometheus_client import start_http_server

        host, _, port = metrics_bind.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0")  # noqa: S104 (operator's choice)
    from broker.scheduler.runner import SchedulerRunner
    from broker.services import build_services

    services = build_services(settings, pool_size=settings.scheduler.revoke_workers + 4)
    SchedulerRunner(services).run_forever(hup_seen)


@main.command()
@click.option("--config", "config", envvar="BROKER_CONFIG", help=CONFIG_HELP)
def gateway(config: str | None) -> None:
    """Run the gateway alone: the Postgres wire protocol for `delivery: gateway` credentials.

    Workloads connect with the handle their start answered; the gateway logs in to the
    database with the real credential, checks every statement against the task's rules and
    audits it, and closes the task's sessions when it ends. Run any number of replicas
    behind one address (`gateway.advertise_host`). `broker serve` runs one itself when
    `gateway:` is configured, unless --no-gateway. Exits 2 on a config error.

    \b
    Example:
      broker serve --config broker.yaml --no-gateway      # on each API replica
      broker gateway --config broker.yaml                 # on each gateway replica
    """
    hup_seen = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: hup_seen.set())
    settings = settings_or_exit(config)
    _logging(settings)
    _check_policy(settings)
    if settings.gateway is None:
        click.echo("gateway: the config has no `gateway:` section (docs/gateway.md)", err=True)
        sys.exit(2)
    from broker.gateway.runner import run_gateway

    run_gateway(settings, hup_seen)


@main.command()
@click.option("--config", "config", envvar="BROKER_CONFIG", help=CONFIG_HELP)
def migrate(config: str | None) -> None:
    """Bring the database schema to head (safe to run from several replicas at once).

    Exits 1 if the migration fails, 2 on a config error.

    \b
    Example:
      broker migrate --config /etc/broker/broker.yaml
    """
    settings = settings_or_exit(config)
    from broker.migrate import current_revision, upgrade_to_head

    try:
        upgrade_to_head(settings.sqlalchemy_url)
    except Exception as error:
        click.echo(f"migrate: failed: {type(error).__name__}: {str(error).splitlines()[0]}", err=True)
        sys.exit(1)
    click.echo(f"database at revision {current_revision(settings.sqlalchemy_url)}")


def _check_policy(settings: Settings) -> None:
    """Fail at start, in the master, naming what is wrong: not in every worker's boot."""
    from broker.identity import JwksError, Verifier
    from broker.policy import PolicyError, load_policy

    try:
        load_policy(settings.policy_file)
    except PolicyError as error:
        click.echo(f"policy_file: {error}", err=True)
        sys.exit(2)

    class _NoReplayCheck:
        def claim(self, issuer_name: str, jti: str, expires_at: object) -> bool:
            return True

    try:
        Verifier.from_settings(settings, jti_store=_NoReplayCheck()).close()
    except (JwksError, ValueError) as error:
        click.echo(f"issuers: {error}", err=True)
        sys.exit(2)


@main.group()
def audit() -> None:
    """The tamper-evident audit log: verify it, follow it, export it.

    \b
    Examples:
      broker audit verify --config broker.yaml
      broker audit tail --config broker.yaml --follow
      broker audit export --config broker.yaml --since 2026-12-01T00:00:00Z > audit.jsonl
    """


audit.add_command(audit_tail)
audit.add_command(audit_export)


@audit.command("verify")
@click.option("--config", "config", envvar="BROKER_CONFIG", help=CONFIG_HELP)
@click.option(
    "--anchor",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File kept outside the database: checked against, then moved to the current head.",
)
def audit_verify(config: str | None, anchor: Path | None) -> None:
    """Walk the audit hash chain; exit 1 if any row was changed, inserted or deleted.

    Exit 2 on a config error, 3 if the database could not be reached, 4 if the audit key
    is missing or is not the one the chain is under (then no row is checked).

    With an audit key ($BROKER_AUDIT_KEY by default) the chain is HMAC-keyed; run verify
    with the same key in the environment. Deleting the newest rows *and* rewinding the
    head is only visible against a copy of a later head kept elsewhere: pass --anchor
    (e.g. from a cron job that keeps the file off the database host).

    \b
    Example:
      broker audit verify --config broker.yaml --anchor /var/lib/broker/audit-anchor.json
    """
    settings = settings_or_exit(config)
    from broker.audit.chain import Anchor, AuditKeyMismatch, head_anchor, verify_chain
    from broker.db import DatabaseUnavailable, make_engine, make_session_factory, unit_of_work

    key = settings.audit.key.get_secret_value() if settings.audit.key else None
    previous = Anchor.loads(anchor.read_text()) if anchor is not None and anchor.exists() else None
    engine = make_engine(settings.sqlalchemy_url, pool_size=1)
    try:
        with unit_of_work(make_session_factory(engine)) as session:
            report = verify_chain(session, key, previous)
            head = head_anchor(session)
    except DatabaseUnavailable as error:
        # Not 1: a cron job alerting on the exit code must tell "tampered" from "could not look".
        click.echo(f"audit verify: the database could not be reached: {_connection_failure(error)}", err=True)
        sys.exit(3)
    except AuditKeyMismatch as error:
        # Under another key every MAC fails: one line that says so, not a row-by-row alarm.
        mismatch = _KEY_MISMATCH[error.reason].format(env=settings.audit.key_env)
        click.echo(f"audit verify: {mismatch}", err=True)
        sys.exit(4)
    finally:
        engine.dispose()
    for problem in report.problems:
        click.echo(f"seq {problem.seq}: {problem.problem}")
    if report.unsealed:
        click.echo(f"{report.unsealed} newest event(s) not sealed yet (the scheduler seals every sweep)")
    if report.ok:
        if anchor is not None and head is not None:
            anchor.write_text(head.dumps())
        click.echo(f"ok: {report.checked} sealed audit events, chain intact")
        return
    click.echo(f"TAMPERED: {len(report.problems)} problem(s) in {report.checked} events", err=True)
    sys.exit(1)


_KEY_MISMATCH = {
    "missing": "no audit key: set ${env} to the key the broker writes the audit chain with",
    "wrong": "${env} is not the key the audit chain was written with",
    "unexpected": "the audit chain was written without a key, but ${env} is set",
}


def _connection_failure(error: Exception) -> str:
    """The driver's first line (refused, timed out, authentication failed): it names the
    host and port, never the password of the URL."""
    driver_error = getattr(error.__cause__, "orig", error.__cause__) or error
    lines = str(driver_error).splitlines()
    return lines[0] if lines else type(driver_error).__name__


for command in (policy, dev, leases, locks, tasks, approvals, exec_command, mcp_command):
    main.add_command(command)
