"""Handles: what a workload gets for a gateway credential instead of the credential.

A handle has a public half, its id (the Postgres user name it connects as: not a database
role), and a secret half of 192 random bits that only the start's answer ever carries.
The ledger keeps a SCRAM-SHA-256 verifier of the secret in Postgres's own spelling
(`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`): enough for the gateway to
check a client's proof, and nothing that gives the secret back or lets anyone log in.

A Vault handle (a `vault_token` credential with `delivery: gateway`) is one string a Vault
client takes as its token: `<id>.<secret>`. It crosses the wire in every request (there is
no challenge in Vault's API), so the ledger keeps `sha256$<hex>` of the secret: 192 random
bits need no salt or stretching, and the digest gives neither the secret nor a login back.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
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
    # The Vault API's port (`gateway.http_bind`), None when this gateway serves none.
    http_port: int | None = None


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


# ---- Vault handles ---------------------------------------------------------------------

SHA256_PREFIX = "sha256$"
# The longest handle token the gateway reads: an id (28) + "." + a secret (32), with room.
MAX_TOKEN_CHARS = 128


def new_vault_handle() -> NewHandle:
    handle_id = HANDLE_PREFIX + secrets.token_hex(12)
    secret = secrets.token_urlsafe(24)  # 192 bits; url-safe base64 never has a "."
    return NewHandle(handle_id, secret, sha256_verifier(secret))


def sha256_verifier(secret: str) -> str:
    return SHA256_PREFIX + hashlib.sha256(secret.encode()).hexdigest()


def vault_token_string(handle: NewHandle) -> str:
    return f"{handle.id}.{handle.secret}"


def split_vault_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a handle token, or None for anything that is not shaped like one."""
    if len(token) > MAX_TOKEN_CHARS or not token.startswith(HANDLE_PREFIX):
        return None
    handle_id, dot, secret = token.partition(".")
    if not dot or not secret or not handle_id[len(HANDLE_PREFIX) :].isalnum():
        return None
    return handle_id, secret


def sha256_matches(verifier: str, secret: str) -> bool:
    """Whether `secret` is the one `verifier` was made of; constant time in the digest."""
    if not verifier.startswith(SHA256_PREFIX):
        return False  # a database handle's SCRAM verifier never matches here
    return hmac.compare_digest(verifier.encode(), sha256_verifier(secret).encode())


def vault_handle(handle: NewHandle, address: GatewayAddress) -> dict[str, Any]:
    """What hvac, the `bao`/`vault` CLI or any Vault client takes: an address and a token."""
    assert address.http_port is not None  # the issuer refuses the start without one
    return {"addr": f"http://{address.host}:{address.http_port}", "token": vault_token_string(handle)}


# ---- HTTP handles ----------------------------------------------------------------------

# The request header an HTTP handle's secret travels in; the gateway never sends it on.
HTTP_HANDLE_HEADER = "X-Broker-Handle"
HTTP_PREFIX = "/h/"


def http_handle(handle: NewHandle, address: GatewayAddress) -> dict[str, Any]:
    """What any HTTP client uses as it is: a base URL to call, and a header to send. The
    URL names the handle's id (not a secret); the secret goes in `header` (docs/gateway.md,
    "HTTP"). Same `sha256$` verifier as a Vault handle."""
    assert address.http_port is not None  # the issuer refuses the start without one
    return {
        "url": f"http://{address.host}:{address.http_port}{HTTP_PREFIX}{handle.id}/",
        "header": HTTP_HANDLE_HEADER,
        "token": handle.secret,
    }
