"""`broker dev`: a complete local stack from nothing but the Python install."""

from __future__ import annotations

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
AGENT = "spiffe://example.org/agents/reporter"


def _issuers(directory: Path) -> tuple[Any, Any]:
    from broker.dev.keys import DemoIssuer

    return DemoIssuer.create(directory, "demo-spire"), DemoIssuer.create(directory, "demo-sso")


def _config(stack: Any, directory: Path, spire: Any, sso: Any) -> dict[str, Any]:
    policy = directory / "policy.yaml"
    shutil.copy(DEMO_POLICY, policy)
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
        ],
        "operators": {"groups": ["sre"]},
        "scheduler": {"sweep_interval_seconds": 1},
    }  # fmt: skip


def _wait_ready(url: str, server: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise click.ClickException("the broker exited during start-up; see the log above")
        try:
            if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise click.ClickException(f"the broker did not become ready at {url}")


def _example(url: str, env_file: Path, port: int, keep: bool) -> str:
    template = (Path(__file__).parent / "data" / "example.txt").read_text()
    cleanup = "" if keep else f" and deletes {env_file.parent}"
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


@click.command()
@click.option("--port", default=8080, show_default=True, help="Port for the broker API.")
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path),
    help="Keep the stack here (default: a temp dir, deleted at exit).",
)
@click.option("--smoke", is_flag=True, help="Run the example end to end, print the result and exit.")
def dev(port: int, directory: Path | None, smoke: bool) -> None:
    """Start a complete local stack: OpenBao dev server, embedded Postgres, demo policy and
    keys, and the broker itself; then print commands that run one task end to end.

    \b
    Example:
      broker dev                 # leave it running, paste the printed commands elsewhere
      broker dev --smoke         # run the example once and exit (what CI checks)
    """
    from broker.dev.stack import start_stack
    from broker.dev.stack.postgres import free_port

    workdir = directory or Path(tempfile.mkdtemp(prefix="broker-dev-"))
    workdir.mkdir(parents=True, exist_ok=True)
    click.echo(f"starting Postgres and OpenBao under {workdir} ...")
    stack = start_stack(workdir / "stack")
    spire, sso = _issuers(workdir)
    config_path = workdir / "broker.yaml"
    config_path.write_text(yaml.safe_dump(_config(stack, workdir, spire, sso), sort_keys=False))
    if smoke:
        port = free_port()
    url = f"http://127.0.0.1:{port}"
    tokens = {
        "AGENT_TOKEN": spire.mint(AGENT),
        "OPERATOR_TOKEN": sso.mint("sre-sam@example.com", groups=["sre"], email="sre-sam@example.com"),
        "APPROVER_TOKEN": sso.mint("dba-dana@example.com", groups=["dba"], email="dba-dana@example.com"),
    }
    env_file = workdir / "env.sh"
    psql = Path(stack.postgres.bin_dir) / "psql"
    exports = {"BROKER_URL": url, "BROKER_CONFIG": str(config_path), "PSQL": str(psql), **tokens}
    exports["BROKER_TOKEN"] = tokens["OPERATOR_TOKEN"]  # what `broker leases|tasks` send
    # A keyed audit chain, as production should run: `audit verify` then also catches a row
    # inserted with a recomputed plain hash. In env.sh too, for verify from the user's shell.
    exports["BROKER_AUDIT_KEY"] = secrets.token_hex(32)
    env_file.write_text("".join(f"export {key}='{value}'\n" for key, value in exports.items()))
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` tears the stack down like Ctrl-C
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
        ],
        env={
            **os.environ,
            "BROKER_CONFIG": str(config_path),
            "BROKER_AUDIT_KEY": exports["BROKER_AUDIT_KEY"],
        },
    )
    try:
        _wait_ready(url, server)
        if smoke:
            _smoke(url, tokens, stack.postgres.port)
            return
        click.echo(_example(url, env_file, stack.postgres.port, keep=directory is not None))
        click.echo(json.dumps({"config": str(config_path), "env": str(env_file)}))
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        stack.stop()
        if directory is None:
            shutil.rmtree(workdir, ignore_errors=True)
