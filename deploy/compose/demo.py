"""Demo identities for the compose stack: keys, JWKS, an audit key, tokens, one task.

Runs inside the broker image (it needs the `broker` package and its dependencies):

    python demo.py init DIR          # once, at setup: EC keys + JWKS of two demo issuers
                                     # and an audit key, into DIR (kept if already there)
    python demo.py token agent|operator|approver   # print a fresh demo token
    python demo.py run URL           # start a task, use its database credentials, finish
                                     # it, and check that the credentials are dead

The signing keys are made with the broker's own demo issuer (`broker dev` uses the same).
For this local demo only: a real deployment trusts SPIRE, Kubernetes or a CI provider.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

try:
    from broker.dev.keys import DemoIssuer
except ImportError:  # the module's name before broker/dev/ existed
    from broker.devkeys import DemoIssuer  # type: ignore[no-redef]

DATA = Path(os.environ.get("DEMO_DATA", "/demo-data"))
AGENT = "spiffe://example.org/agents/reporter"
ISSUERS = ("demo-spire", "demo-sso")
# Who each token speaks for: the agent of the demo policy, an SRE operator, a DBA approver.
IDENTITIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "agent": ("demo-spire", AGENT, {}),
    "operator": ("demo-sso", "sre-sam@example.com", {"groups": ["sre"], "email": "sre-sam@example.com"}),
    "approver": ("demo-sso", "dba-dana@example.com", {"groups": ["dba"], "email": "dba-dana@example.com"}),
}


def init(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in ISSUERS:
        if not (directory / f"{name}-jwks.json").exists():
            DemoIssuer.create(directory, name)
    audit_key = directory / "audit-key"
    if not audit_key.exists():
        audit_key.write_text(secrets.token_hex(32))
    print(f"demo keys, JWKS and audit key in {directory}")


def issuer(name: str, directory: Path = DATA) -> DemoIssuer:
    jwks_path = directory / f"{name}-jwks.json"
    [key] = json.loads(jwks_path.read_text())["keys"]
    # The issuer URL DemoIssuer.create gives a name (deploy/compose/broker.yaml trusts it).
    return DemoIssuer(
        name, f"https://{name}.broker.local", key["kid"], directory / f"{name}-key.pem", jwks_path
    )


def token(who: str) -> str:
    name, sub, claims = IDENTITIES[who]
    return issuer(name).mint(sub, lifetime=3600, **claims)


def run(url: str) -> None:
    import psycopg
    import requests

    agent = {"Authorization": f"Bearer {token('agent')}"}
    body = {
        "task": "analytics-read",
        "owner": "alice@example.com",
        "purpose": "weekly revenue report",
        "context": {"environment": "staging"},
    }
    started = requests.post(f"{url}/task/start", json=body, headers=agent, timeout=30)
    started.raise_for_status()
    task = started.json()
    creds = task["credentials"]["db"]["data"]
    host = os.environ.get("DEMO_PG_HOST", "postgres")
    dsn = f"postgresql://{creds['username']}:{creds['password']}@{host}:5432/analytics"
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM analytics.events").fetchone()
    print(f"task {task['task_id']} active; its database user read {row[0] if row else 0} rows")
    finished = requests.post(
        f"{url}/task/finish", json={"task_id": task["task_id"]}, headers=agent, timeout=30
    )
    finished.raise_for_status()
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
    except psycopg.OperationalError:
        print("after /task/finish the credentials are refused, as promised")
        return
    sys.exit("the credentials still work after finish")


def main(argv: list[str]) -> None:
    match argv:
        case ["init", directory]:
            init(Path(directory))
        case ["token", who] if who in IDENTITIES:
            print(token(who))
        case ["run", url]:
            run(url.rstrip("/"))
        case _:
            sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
