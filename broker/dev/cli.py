"""`broker dev`: a complete local stack from nothing but the Python install."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import requests
import yaml

DEMO_POLICY = Path(__file__).parent / "data" / "policy.yaml"
# The demo gateway task's upstream port, as the file spells it (`_config` puts the stack's in).
DEMO_UPSTREAM = "port: 5432,"
AGENT = "spiffe://example.org/agents/reporter"
SECOND_AGENT = "spiffe://example.org/agents/etl"
# A CI job of acme/app on main, as GitHub Actions would sign it: the classic `sub`, the
# repository and its id, the ref and the actor (the person who pushed).
CI_SUBJECT = "repo:acme/app:ref:refs/heads/main"
CI_CLAIMS = {"repository": "acme/app", "repository_id": "4242", "ref": "refs/heads/main", "actor": "alice"}
# The issuer names of the dev config, and the demo key files that sign for each.
KEY_NAMES = {"spire": "demo-spire", "corp-sso": "demo-sso", "ci": "demo-ci"}


def _issuers(directory: Path) -> tuple[Any, Any, Any]:
    from broker.dev.keys import DemoIssuer

    return tuple(DemoIssuer.create(directory, name) for name in KEY_NAMES.values())  # type: ignore[return-value]


def _config(
    stack: Any, directory: Path, spire: Any, sso: Any, ci: Any, gateway_port: int, vault_api_port: int
) -> dict[str, Any]:
    policy = directory / "policy.yaml"
    # The demo's gateway task names the stack's own Postgres port, which changes per run.
    policy.write_text(DEMO_POLICY.read_text().replace(DEMO_UPSTREAM, f"port: {stack.postgres.port},"))
    return {
        "database_url": stack.database_url,
        "vault": {"addr": stack.vault.addr, "auth": {"method": "token", "token": stack.vault.broker_token}},
        "policy_file": str(policy),
        "issuers": [
            {
                "name": "spire", "issuer": spire.issuer, "jwks_file": str(spire.jwks_path),
                "audiences": ["credential-broker"], "kind": "spiffe",
                "trust_domain": "example.org", "use": "workload",
            },
            {
                "name": "corp-sso", "issuer": sso.issuer, "jwks_file": str(sso.jwks_path),
                "audiences": ["credential-broker"], "kind": "oidc", "groups_claim": "groups",
                "use": ["approver", "operator"],
            },
            {
                "name": "ci", "issuer": ci.issuer, "jwks_file": str(ci.jwks_path),
                "audiences": ["credential-broker"], "kind": "oidc", "use": "workload",
            },
        ],
        "operators": {"groups": ["sre"]},
        "scheduler": {"sweep_interval_seconds": 1},
        "gateway": {
            "postgres_bind": f"127.0.0.1:{gateway_port}",
            "http_bind": f"127.0.0.1:{vault_api_port}",
            "advertise_host": "127.0.0.1",
        },
    }  # fmt: skip


def _wait_ready(url: str, server: subprocess.Popen[bytes], pid_file: Path, timeout: float = 60) -> None:
    """Until *our* child answers /readyz. Another process on the port may answer it too,
    so the answer counts only once the child wrote its pid file, which `broker serve`
    does after it has bound the port."""
    port = url.rsplit(":", 1)[1]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise click.ClickException(
                f"the broker exited during start-up (status {server.returncode}); see its log above"
                f" (if port {port} was taken meanwhile, pick another with --port)"
            )
        if _pid_in(pid_file) == server.pid:
            try:
                if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
        time.sleep(0.2)
    raise click.ClickException(f"the broker did not become ready at {url}")


def _pid_in(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _choose_port(asked: int | None, smoke: bool) -> int:
    from broker.dev.stack.postgres import free_port
    from broker.server import port_in_use

    if asked is not None:
        if port_in_use(f"127.0.0.1:{asked}"):
            raise click.BadParameter(
                f"port {asked} is in use by another process; pick another (make dev PORT=...)",
                param_hint="'--port'",
            )
        return asked
    if smoke or port_in_use(f"127.0.0.1:{DEFAULT_PORT}"):
        port = free_port()
        if not smoke:
            click.echo(f"port {DEFAULT_PORT} is in use by another process; using port {port}")
        return port
    return DEFAULT_PORT


def _lock(workdir: Path) -> Any:
    """Hold `workdir` for this process, or stop: two stacks must not share one env.sh."""
    import fcntl

    handle = (workdir / ".lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise click.ClickException(
            f"another broker dev (pid {holder}) is using {workdir}; stop it, or pass --dir for a second stack"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _example(url: str, env_file: Path, port: int, keep: bool) -> str:
    template = (Path(__file__).parent / "data" / "example.txt").read_text()
    cleanup = "" if keep else f", and removes what it wrote to {env_file.parent}"
    broker = Path(sys.executable).parent / "broker"
    return template.format(url=url, env_file=env_file, port=port, cleanup=cleanup, broker=broker)


def _smoke(url: str, tokens: dict[str, str], port: int) -> None:
    """Run the printed example once, so `broker dev --smoke` proves the stack works."""
    import psycopg

    agent = {"Authorization": f"Bearer {tokens['AGENT_TOKEN']}"}
    body = {
        "task": "analytics-read", "owner": "alice@example.com",
        "purpose": "weekly revenue report", "context": {"environment": "staging"},
    }  # fmt: skip
    started = requests.post(f"{url}/task/start", json=body, headers=agent, timeout=30)
    started.raise_for_status()
    task = started.json()
    creds = task["credentials"]["db"]["data"]
    dsn = f"postgresql://{creds['username']}:{creds['password']}@127.0.0.1:{port}/analytics"
    with psycopg.connect(dsn) as conn:
        count = conn.execute("SELECT count(*) FROM analytics.events").fetchone()
    rows = count[0] if count else 0
    click.echo(f"smoke: task {task['task_id']} active; its database user read {rows} rows")
    finished = requests.post(
        f"{url}/task/finish", json={"task_id": task["task_id"]}, headers=agent, timeout=30
    )
    finished.raise_for_status()
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
    except psycopg.OperationalError:
        click.echo("smoke: after /task/finish the credentials are refused, as promised")
        return
    raise click.ClickException("smoke: the credentials still work after finish")


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


# Relative to where `broker dev` runs: `make dev` runs it in the checkout.
DEFAULT_DIR = Path(".broker-dev")
DEFAULT_PORT = 8080


@click.group(invoke_without_command=True)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help=f"Port for the broker API [default: {DEFAULT_PORT}, or a free one if {DEFAULT_PORT} is taken].",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Keep env.sh, the config, keys and the stack here, after exit too "
    f"[default: ./{DEFAULT_DIR}, emptied at exit].",
)
@click.option("--smoke", is_flag=True, help="Run the example end to end, print the result and exit.")
@click.pass_context
def dev(ctx: click.Context, port: int | None, directory: Path | None, smoke: bool) -> None:
    """Start a complete local stack: OpenBao dev server, embedded Postgres, demo policy and
    keys, and the broker itself; then print commands that run one task end to end.

    The commands read ./.broker-dev/env.sh (or DIR/env.sh). Exits 2 if --port is taken,
    1 if the stack can't start or another `broker dev` uses the same directory; Ctrl-C
    or SIGTERM stops everything and exits 0.

    \b
    Example:
      broker dev                 # leave it running; in another shell: source .broker-dev/env.sh
      broker dev --port 8081 --dir /tmp/second-stack   # a second stack beside the first
      broker dev --smoke         # run the example once and exit (what CI checks)
    """
    if ctx.invoked_subcommand is not None:
        return
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` tears the stack down like Ctrl-C
    workdir = (directory or DEFAULT_DIR).resolve()
    port = _choose_port(port, smoke)
    workdir.mkdir(parents=True, exist_ok=True)
    lock = _lock(workdir)
    # The stack lives in a short temporary path unless kept: Postgres's socket path must
    # stay under about 100 bytes, and a checkout can be deep.
    stack_dir = workdir / "stack" if directory else Path(tempfile.mkdtemp(prefix="broker-dev-"))
    env_file = workdir / "env.sh"
    env_file.unlink(missing_ok=True)  # a stale one from a killed run must not be sourced
    try:
        _run(workdir, stack_dir, env_file, port, smoke, keep=directory is not None)
    finally:
        if directory is None:
            shutil.rmtree(stack_dir, ignore_errors=True)
            # Only what this run wrote: the directory itself may be the user's.
            for name in ("env.sh", "broker.yaml", "policy.yaml", "serve.pid"):
                (workdir / name).unlink(missing_ok=True)
            for key in workdir.glob("demo-*"):
                key.unlink(missing_ok=True)
            (workdir / ".lock").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                workdir.rmdir()  # if nothing else is in it
        lock.close()


@dev.command("token")
@click.option(
    "--issuer", type=click.Choice(sorted(KEY_NAMES)), required=True, help="Which dev issuer signs it."
)
@click.option("--subject", required=True, help="The token's `sub`.")
@click.option("--claim", "claims", multiple=True, metavar="KEY=VALUE", help="An extra claim (JSON or text).")
@click.option("--group", "groups", multiple=True, help="A group (the `groups` claim); repeat for more.")
@click.option("--lifetime", type=click.IntRange(60, 86_400), default=3600, show_default=True)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DIR,
    show_default=True,
    help="The running `broker dev`'s directory (its demo keys are there).",
)
def token(
    issuer: str,
    subject: str,
    claims: tuple[str, ...],
    groups: tuple[str, ...],
    lifetime: int,
    directory: Path,
) -> None:
    """Mint a token the running dev stack trusts: another agent, a CI job, a person.

    \b
    Examples:
      broker dev token --issuer spire --subject spiffe://example.org/agents/etl
      broker dev token --issuer ci --subject repo:acme/app:ref:refs/heads/main \\
          --claim repository=acme/app --claim ref=refs/heads/main --claim actor=alice
      broker dev token --issuer corp-sso --subject dba-dave@example.com --group dba \\
          --claim email=dba-dave@example.com
    """
    from broker.dev.keys import DemoIssuer

    extra: dict[str, Any] = {}
    for item in claims:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--claim")
        try:
            extra[key] = json.loads(value)
        except ValueError:
            extra[key] = value
    if groups:
        extra["groups"] = list(groups)
    try:
        signer = DemoIssuer.load(directory, KEY_NAMES[issuer])
    except (FileNotFoundError, KeyError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(signer.mint(subject, lifetime=lifetime, **extra))


def _run(workdir: Path, stack_dir: Path, env_file: Path, port: int, smoke: bool, keep: bool) -> None:
    from broker.dev.stack import start_stack

    click.echo(f"starting Postgres and OpenBao under {stack_dir} ...")
    stack = start_stack(stack_dir)
    try:
        _serve(workdir, stack, env_file, port, smoke, keep)
    finally:
        stack.stop()


def _serve(workdir: Path, stack: Any, env_file: Path, port: int, smoke: bool, keep: bool) -> None:
    spire, sso, ci = _issuers(workdir)
    config_path = workdir / "broker.yaml"
    from broker.dev.stack.postgres import free_port

    gateway_port, vault_api_port = free_port(), free_port()
    config = _config(stack, workdir, spire, sso, ci, gateway_port, vault_api_port)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    url = f"http://127.0.0.1:{port}"
    tokens = {
        "AGENT_TOKEN": spire.mint(AGENT),
        "OPERATOR_TOKEN": sso.mint("sre-sam@example.com", groups=["sre"], email="sre-sam@example.com"),
        "APPROVER_TOKEN": sso.mint("dba-dana@example.com", groups=["dba"], email="dba-dana@example.com"),
        "SECOND_AGENT_TOKEN": spire.mint(SECOND_AGENT),
        "CI_TOKEN": ci.mint(CI_SUBJECT, **CI_CLAIMS),
    }
    psql = Path(stack.postgres.bin_dir) / "psql"
    exports = {"BROKER_URL": url, "BROKER_CONFIG": str(config_path), "PSQL": str(psql), **tokens}
    exports["BROKER_TOKEN"] = tokens["OPERATOR_TOKEN"]  # what `broker leases|tasks` send
    exports["BROKER_WORKLOAD_TOKEN"] = tokens["AGENT_TOKEN"]  # what `broker exec|mcp` send
    # Where the demo credentials log in; psql reads these (and PGUSER/PGPASSWORD) itself.
    exports["PGHOST"] = "127.0.0.1"
    exports["PGPORT"] = str(stack.postgres.port)
    # A keyed audit chain, as production should run: `audit verify` then also catches a row
    # inserted with a recomputed plain hash. In env.sh too, for verify from the user's shell.
    exports["BROKER_AUDIT_KEY"] = secrets.token_hex(32)
    pid_file = workdir / "serve.pid"
    pid_file.unlink(missing_ok=True)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "broker",
            "serve",
            "--config",
            str(config_path),
            "--bind",
            f"127.0.0.1:{port}",
            "--pid-file",
            str(pid_file),
        ],
        env={
            **os.environ,
            "BROKER_CONFIG": str(config_path),
            "BROKER_AUDIT_KEY": exports["BROKER_AUDIT_KEY"],
        },
    )
    try:
        _wait_ready(url, server, pid_file)
        # Written only now: a stack that never became ready leaves nothing to source.
        env_file.write_text("".join(f"export {key}='{value}'\n" for key, value in exports.items()))
        if smoke:
            _smoke(url, tokens, stack.postgres.port)
            return
        click.echo(_example(url, env_file, stack.postgres.port, keep=keep))
        click.echo(json.dumps({"config": str(config_path), "env": str(env_file)}))
        status = server.wait()
        raise click.ClickException(f"the broker exited on its own (status {status}); see its log above")
    except KeyboardInterrupt:
        pass
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
