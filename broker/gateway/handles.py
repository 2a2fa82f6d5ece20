"""Handles: what a workload gets for a gateway credential instead of the credential.

A handle has a public half, its id (the Postgres user name it connects as: not a database
role), and a secret half of 192 random bits that only the start's answer ever carries.
The ledger keeps a SCRAM-SHA-256 verifier of the secret in Postgres's own spelling
(`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`): enough for the gateway to
check a client's proof, and nothing that gives the secret back or lets anyone log in.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from typing import Any

from scramp import ScramMechanism

from broker.credentials import DatabaseCredential

HANDLE_PREFIX = "brk_"
# Postgres's own default: what libpq clients expect, and what scramp will make.
SCRAM_ITERATIONS = 4096
_MECHANISM = ScramMechanism("SCRAM-SHA-256")


@dataclass(frozen=True)
class GatewayAddress:
    """Where handles send workloads: the gateway (or the Service in front of its replicas)."""

    host: str
    port: int
    require_tls: bool


@dataclass(frozen=True)
class NewHandle:
    id: str
    secret: str
    verifier: str

    def __repr__(self) -> str:  # the secret never reaches a log through a repr
        return f"NewHandle(id={self.id!r})"


def new_handle() -> NewHandle:
    handle_id = HANDLE_PREFIX + secrets.token_hex(12)
    secret = secrets.token_urlsafe(24)
    return NewHandle(handle_id, secret, scram_verifier(secret))


def scram_verifier(secret: str, iterations: int = SCRAM_ITERATIONS) -> str:
    salt, stored_key, server_key, count = _MECHANISM.make_auth_info(secret, iteration_count=iterations)

    def b64(value: bytes) -> str:
        return base64.b64encode(value).decode()

    return f"SCRAM-SHA-256${count}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def database_handle(handle: NewHandle, spec: DatabaseCredential, address: GatewayAddress) -> dict[str, Any]:
    """The fields any libpq client takes as they are (docs/gateway.md, "The handle")."""
    assert spec.upstream is not None  # the policy refuses a gateway credential without one
    return {
        "host": address.host,
        "port": address.port,
        "username": handle.id,
        "password": handle.secret,
        "dbname": spec.upstream.dbname,
        "sslmode": "require" if address.require_tls else "prefer",
    }
