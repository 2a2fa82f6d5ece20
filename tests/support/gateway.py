"""A policy and a config with the gateway, for the gateway's tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from sqlalchemy import create_engine, text

from broker.config import Settings, settings_from_mapping
from broker.dev.stack import TARGET_DB, Stack
from broker.dev.stack.postgres import free_port

if TYPE_CHECKING:
    from broker.gateway.runner import GatewayProcess
    from tests.support.tokens import TestIssuer

GATEWAY_TASK = "analytics-gateway"
READ_ONLY = 'statement.command in ["SELECT", "SHOW", "BEGIN", "COMMIT", "ROLLBACK"]'
ANALYTICS_ONLY = 'statement.tables.all(t, t.startsWith("analytics."))'


def gateway_policy(stack: Stack, path: Path, *, ttl: int = 300) -> Path:
    """The demo's gateway task type, pointed at the test stack's Postgres."""
    task: dict[str, Any] = {
        "description": "Read the analytics database through the gateway",
        "ttl": {"default": ttl, "max": 900},
        "workloads": [
            {"issuer": "spire", "subject": "spiffe://example.org/agents/*"},
        ],
        "owners": ["*@example.com"],
        "credentials": {
            "db": {
                "kind": "database",
                "role": "analytics-ro",
                "delivery": "gateway",
                "upstream": {"host": "127.0.0.1", "port": stack.postgres.port, "dbname": TARGET_DB},
                "statements": [
                    {"name": "read-only", "when": READ_ONLY},
                    {"name": "analytics-only", "when": ANALYTICS_ONLY},
                ],
            }
        },
    }
    path.write_text(yaml.safe_dump({"tasks": {GATEWAY_TASK: task}}))
    return path


def gateway_section(port: int, **extra: Any) -> dict[str, Any]:
    return {"postgres_bind": f"127.0.0.1:{port}", "advertise_host": "127.0.0.1", **extra}


@contextlib.contextmanager
def api_and_gateway(
    stack: Stack, issuers: dict[str, TestIssuer], policy: Path, **section: Any
) -> Iterator[tuple[Any, Any, GatewayProcess]]:
    """The API (a Flask test client on its own services) and a gateway beside it, on one
    config: `section` adds to the gateway's (ports are free ones; http_bind=True for one)."""
    from broker.app import create_app
    from broker.services import build_services
    from tests.conftest import broker_config

    if section.pop("http_bind", False):
        section["http_bind"] = f"127.0.0.1:{free_port()}"
    gateway = gateway_section(free_port(), audit_flush_seconds=0.1, **section)
    settings = settings_from_mapping(broker_config(stack, issuers, policy, gateway=gateway), env={})
    services = build_services(settings)
    try:
        with running_gateway(settings) as process:
            yield create_app(services=services).test_client(), services, process
    finally:
        services.close()


def ledger_rows(stack: Stack, sql: str, **params: Any) -> list[Any]:
    """Rows of the broker's own database, read as the test's superuser."""
    engine = create_engine(stack.database_url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(text(sql), params).all())
    finally:
        engine.dispose()


@contextlib.contextmanager
def running_gateway(settings: Settings) -> Iterator[GatewayProcess]:
    """A gateway process's parts, served on a loop in a thread of this process."""
    from broker.gateway.runner import GatewayProcess

    process = GatewayProcess(settings)
    ready = threading.Event()
    thread = threading.Thread(target=lambda: asyncio.run(process.serve(ready)), daemon=True)
    thread.start()
    if not ready.wait(20):
        raise AssertionError("the gateway did not start")
    try:
        yield process
    finally:
        process.stop()
        thread.join(timeout=20)


VAULT_TASK = "reports-through-the-gateway"
REPORTS_ONLY = 'request.path.startsWith("secret/data/reports/") || request.path == "auth/token/lookup-self"'


def vault_gateway_policy(path: Path, *, ttl: int = 300) -> Path:
    """A task type whose `vault_token` credential goes through the gateway's Vault API."""
    task: dict[str, Any] = {
        "description": "Read reports from Vault through the gateway",
        "ttl": {"default": ttl, "max": 900},
        "workloads": [{"issuer": "spire", "subject": "spiffe://example.org/agents/*"}],
        "owners": ["*@example.com"],
        "credentials": {
            "token": {
                "kind": "vault_token",
                "policies": ["reports-read"],
                "delivery": "gateway",
                "requests": [{"name": "reports-only", "when": REPORTS_ONLY}],
            }
        },
    }
    path.write_text(yaml.safe_dump({"tasks": {VAULT_TASK: task}}))
    return path


HTTP_TASK = "api-through-the-gateway"
# The lease's own fields, both: the header is the whole credential.
HTTP_HEADER = "Authorization: Bearer {data.username}.{data.password}"


def http_gateway_policy(path: Path, upstream: str, *, ttl: int = 300) -> Path:
    """A task type whose `lease` credential (the stack's database role, for a real lease
    with real `data`) goes through the gateway's HTTP proxy to `upstream`."""
    task: dict[str, Any] = {
        "description": "Call an API through the gateway",
        "ttl": {"default": ttl, "max": 900},
        "workloads": [{"issuer": "spire", "subject": "spiffe://example.org/agents/*"}],
        "owners": ["*@example.com"],
        "credentials": {
            "api": {
                "kind": "lease",
                "path": "database/creds/analytics-ro",
                "delivery": "gateway",
                "gateway": {"upstream": upstream, "header": HTTP_HEADER},
                "requests": [
                    {"name": "no-delete", "when": 'request.method != "DELETE"'},
                    {"name": "no-admin", "when": '!request.path.startsWith("admin")'},
                ],
            }
        },
    }
    path.write_text(yaml.safe_dump({"tasks": {HTTP_TASK: task}}))
    return path


def send_raw(port: int, payload: bytes) -> None:
    """Send `payload` as a client would and read until the server closes (it may close on
    us mid-way: that is its right)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        try:
            connection.sendall(payload)
            connection.shutdown(socket.SHUT_WR)
            connection.settimeout(2)
            while connection.recv(65536):
                pass
        except OSError:
            pass
