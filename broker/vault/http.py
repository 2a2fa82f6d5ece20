"""A thin, pooled HTTP client for the Vault/OpenBao API.

hvac is convenient but costs a few object layers and an extra dict copy per call, and
its exceptions carry response bodies. The broker's hot path (token create, creds read,
lease revoke) is a handful of calls per task, so we talk to `/v1/...` directly over one
`requests.Session` (keep-alive, pooled, safe to share between threads as long as no one
mutates it after construction) and map every failure to `VaultUnavailable` or
`VaultRejected` with a message that never quotes a body.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from broker.vault.errors import VaultRejected, VaultUnavailable

# Phrases Vault/OpenBao put in `errors`, mapped to the short reason we expose. Only
# these fixed strings ever reach a message: an error text can quote SQL or templates.
_KNOWN_REASONS: tuple[tuple[str, str], ...] = (
    ("permission denied", "permission denied"),
    ("invalid lease", "invalid lease"),
    ("lease not found", "invalid lease"),
    ("invalid accessor", "invalid accessor"),
    ("token not found", "token not found"),
    ("bad token", "token not found"),
    ("missing client token", "missing client token"),
    ("unknown role", "unknown role"),
    ("role not found", "unknown role"),
    ("no handler for route", "no such path (is the engine mounted?)"),
    ("unsupported path", "unsupported path"),
    ("unsupported operation", "unsupported operation"),
    ("must be subset", "policies not allowed"),
    ("not allowed by this role", "name not allowed by role"),
    ("not allowed", "not allowed by role"),
    ("not renewable", "not renewable"),
    ("is sealed", "sealed"),
    ("rate limit", "rate limited"),
    ("quota", "quota exceeded"),
    ("connection refused", "backend unreachable"),
    ("timeout", "backend timeout"),
    ("failed to", "backend error"),
)
_STATUS_REASONS: Mapping[int, str] = {
    400: "invalid request",
    401: "unauthenticated",
    403: "permission denied",
    404: "not found",
    405: "unsupported operation",
    412: "not yet replicated",
    429: "rate limited or standby",
    500: "internal error",
    502: "bad gateway",
    503: "unavailable or sealed",
    504: "gateway timeout",
}


def safe_reason(status: int, body: Any) -> str:
    """A short reason for an error answer, chosen from fixed strings only."""
    errors = body.get("errors") if isinstance(body, dict) else None
    text = " ".join(str(e) for e in errors).lower() if isinstance(errors, list) else ""
    for needle, reason in _KNOWN_REASONS:
        if needle in text:
            return reason
    return _STATUS_REASONS.get(status, "unexpected answer")


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any] = field(repr=False)


def _is_unavailable(status: int) -> bool:
    # 412: a performance standby has not caught up yet; 429: rate limit / lease quota.
    return status >= 500 or status in (412, 429)


class VaultHTTP:
    """`call()` one Vault endpoint; raises VaultUnavailable / VaultRejected on failure."""

    def __init__(
        self,
        addr: str,
        *,
        timeout: float,
        verify_tls: bool = True,
        namespace: str | None = None,
        pool_size: int = 32,
    ) -> None:
        self.addr = addr.rstrip("/")
        self._base = f"{self.addr}/v1/"
        self._timeout = timeout
        self._namespace = namespace
        self._session = self._new_session(verify_tls, pool_size)

    def _new_session(self, verify_tls: bool, pool_size: int) -> requests.Session:
        session = requests.Session()
        # Resolve proxy and CA-bundle environment once here, not on every request:
        # with trust_env requests re-reads them (and ~/.netrc) per call.
        session.proxies.update(requests.utils.get_environ_proxies(self._base))
        session.trust_env = False
        session.verify = _ca_bundle() if verify_tls else False
        adapter = HTTPAdapter(pool_connections=2, pool_maxsize=pool_size, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    def close(self) -> None:
        self._session.close()

    def call(
        self,
        method: str,
        path: str,
        *,
        operation: str,
        token: str | None = None,
        json: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Reply:
        headers = {}
        if token is not None:
            headers["X-Vault-Token"] = token
        if self._namespace:
            headers["X-Vault-Namespace"] = self._namespace
        try:
            response = self._session.request(
                method,
                self._base + path,
                headers=headers,
                json=json,
                params=params,
                timeout=self._timeout,
            )
        except requests.Timeout:
            raise VaultUnavailable(operation, "timed out") from None
        except requests.ConnectionError:
            raise VaultUnavailable(operation, "cannot connect") from None
        except requests.RequestException:
            raise VaultUnavailable(operation, "request failed") from None
        return self._reply(response, operation)

    @staticmethod
    def _reply(response: requests.Response, operation: str) -> Reply:
        status = response.status_code
        body = _json_body(response)
        if status < 400:
            return Reply(status, body)
        reason = safe_reason(status, body)
        if _is_unavailable(status):
            raise VaultUnavailable(operation, reason, status=status)
        raise VaultRejected(operation, reason, status=status)


def _json_body(response: requests.Response) -> dict[str, Any]:
    if not response.content:
        return {}
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _ca_bundle() -> str | bool:
    """A private CA the operator pointed Vault clients at, else the system/certifi default."""
    for var in ("BAO_CACERT", "VAULT_CACERT", "REQUESTS_CA_BUNDLE"):
        value = os.environ.get(var)
        if value:
            return value
    return True
