"""A real OpenBao dev server and a real Postgres for the Vault gateway tests.

These fixtures start their own servers (not the shared `stack`) because some tests stop
a server or need root to inspect what the broker did. The gateway always runs with the
least-privilege broker token from `configure_vault`, never with root.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from broker.credentials import CredentialSpec
from broker.dev.stack.openbao import OpenBaoHandle, start_openbao
from broker.dev.stack.postgres import PostgresHandle, start_postgres
from broker.dev.stack.vault_setup import PostgresTarget, VaultSetup, configure_vault
from broker.vault import TaskToken, VaultGateway, task_token_policies
from broker.vault.http import VaultHTTP
from tests.support.waiting import wait_until as _wait_until


@pytest.fixture(scope="session")
def vault_workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="broker-vault-tests-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def vault_pg(vault_workdir: Path) -> Iterator[PostgresHandle]:
    handle = start_postgres(vault_workdir / "pg")
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def pg_target(vault_pg: PostgresHandle) -> PostgresTarget:
    if vault_pg.external_url is not None:
        info = psycopg.conninfo.conninfo_to_dict(vault_pg.url().replace("+psycopg", ""))
        return PostgresTarget(
            host=str(info.get("host", "127.0.0.1")),
            port=int(str(info.get("port", 5432))),
            superuser=str(info.get("user", "postgres")),
            password=str(info["password"]) if info.get("password") else None,
        )
    # The Unix-socket form of the connection URL, as the dev stack uses it.
    return PostgresTarget(host=str(vault_pg.socket_dir), port=vault_pg.port, superuser="postgres")


@pytest.fixture(scope="session")
def bao(vault_workdir: Path) -> Iterator[OpenBaoHandle]:
    handle = start_openbao(vault_workdir / "bao")
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def jwt_keypair() -> tuple[Any, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, pem.decode()


@pytest.fixture(scope="session")
def vault_setup(bao: OpenBaoHandle, pg_target: PostgresTarget, jwt_keypair: tuple[Any, str]) -> VaultSetup:
    return configure_vault(
        bao.addr,
        bao.root_token,
        postgres=pg_target,
        jwt_jwks_pem_keys=[jwt_keypair[1]],
        jwt_bound_issuer="https://agents.test",
    )


@pytest.fixture(scope="session")
def gateway(vault_setup: VaultSetup) -> Iterator[VaultGateway]:
    gw = VaultGateway(vault_setup.vault_settings(timeout_seconds=5))
    yield gw
    gw.close()


class Root:
    """Root-token calls, only for inspecting what the broker did."""

    def __init__(self, addr: str, token: str) -> None:
        self.http = VaultHTTP(addr, timeout=10)
        self.token = token

    def call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, *, token: str | None = None
    ) -> Any:
        return self.http.call(method, path, operation="test", token=token or self.token, json=body).body

    def lease_exists(self, lease_id: str) -> bool:
        from broker.vault import VaultRejected

        try:
            self.call("PUT", "sys/leases/lookup", {"lease_id": lease_id})
        except VaultRejected:
            return False
        return True


@pytest.fixture(scope="session")
def root(bao: OpenBaoHandle) -> Iterator[Root]:
    r = Root(bao.addr, bao.root_token)
    yield r
    r.http.close()


@dataclass
class Task:
    task_id: str
    name: str
    token: TaskToken
    policies: list[str]


@pytest.fixture
def start_task(gateway: VaultGateway) -> Iterator[Callable[..., Task]]:
    """Sync the policy and mint a task token, as /task/start does; revoke it afterwards."""
    started: list[Task] = []

    def start(credentials: Mapping[str, CredentialSpec], *, task: str = "vault-test", ttl: int = 120) -> Task:
        policy = gateway.sync_task_policy(task, credentials)
        policies = task_token_policies(policy, credentials)
        task_id = str(uuid.uuid4())
        token = gateway.create_task_token(
            task_id=task_id, task=task, policies=policies, ttl_seconds=ttl, meta={"workload": "test"}
        )
        made = Task(task_id, task, token, policies)
        started.append(made)
        return made

    yield start
    for made in started:
        gateway.revoke_task_token(made.token.accessor)


class PgProbe:
    """Log in to the target database as an issued user, or check roles as superuser."""

    def __init__(self, target: PostgresTarget) -> None:
        self.target = target

    def connect(self, username: str, password: str) -> psycopg.Connection[Any]:
        t = self.target
        return psycopg.connect(
            host=t.host, port=t.port, user=username, password=password, dbname=t.dbname,
            connect_timeout=5, autocommit=True,
        )  # fmt: skip

    def can_login(self, username: str, password: str) -> bool:
        try:
            with self.connect(username, password) as conn:
                conn.execute("SELECT count(*) FROM analytics.events").fetchone()
        except psycopg.OperationalError:
            return False
        return True

    def role_exists(self, username: str) -> bool:
        t = self.target
        with psycopg.connect(
            host=t.host, port=t.port, user=t.superuser, password=t.password, dbname="postgres"
        ) as conn:
            return (
                conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (username,)).fetchone() is not None
            )


@pytest.fixture(scope="session")
def pg(pg_target: PostgresTarget) -> PgProbe:
    return PgProbe(pg_target)


@pytest.fixture
def wait_until() -> Callable[..., float]:
    """`wait_until(condition, timeout)`: seconds until it held; fails the test on timeout."""
    return _wait_until
