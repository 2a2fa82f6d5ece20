"""A thin, pooled HTTP client for the Vault/OpenBao API.

hvac is convenient but costs a few object layers per call and its exceptions carry
response bodies; `requests` adds ~0.5 ms of per-call bookkeeping (hooks, cookies, env
lookups) on top of urllib3, and urllib3 ~0.3 ms on top of `http.client`. The broker's hot
path makes Vault calls on every start, finish and revocation, benchmarked against an agent
talking to Vault directly, so we speak `/v1/...` over keep-alive connections straight to
the address (`broker.vault.transport`), through urllib3 only behind a proxy or after a
standby's redirect, and map every failure to `VaultUnavailable` or `VaultRejected` with a
message that never quotes a body. hvac is used only off that path, where a call is rare:
the broker's logins (`broker.vault.login`) and the dev/test setup, through
`broker.vault.hvac_client`, which borrows the CA and the error reasons from here.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.request
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import urllib3
from urllib3.exceptions import (
    HTTPError,
    InsecureRequestWarning,
    MaxRetryError,
    NewConnectionError,
)
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.response import BaseHTTPResponse

from broker import tracing
from broker.vault.errors import VaultRejected, VaultUnavailable
from broker.vault.transport import ConnectFailed, DirectTransport, tls_context

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


# A standby answers with one of these and the active node's address (Vault's
# `api_addr`), unless it forwards the request itself; urllib3 follows the same ones.
_REDIRECTS = frozenset(BaseHTTPResponse.REDIRECT_STATUSES)


def is_unavailable(status: int) -> bool:
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
        self._verify = verify_tls
        self._static_headers = {"X-Vault-Request": "true"}
        if namespace:
            self._static_headers["X-Vault-Namespace"] = namespace
        proxied = _proxy_for(self.addr) is not None
        self._pool = _pool_manager(self.addr, verify_tls, pool_size, timeout)
        self._direct = None if proxied else _direct_transport(self.addr, verify_tls, pool_size, timeout)

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
        self._pool.clear()

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
        headers = dict(self._static_headers)
        if token is not None:
            headers["X-Vault-Token"] = token
        body = None
        if json is not None:
            body = _dumps(json)
            headers["Content-Type"] = "application/json"
        target = path + ("?" + urlencode(params, doseq=True) if params else "")
        try:
            with tracing.span("vault", **{"vault.operation": operation}):
                status, data = self._exchange(method, target, body, headers)
        except ConnectFailed as error:
            raise VaultUnavailable(operation, error.reason, sent=False) from None
        except TimeoutError:
            raise VaultUnavailable(operation, "timed out") from None
        except MaxRetryError as error:
            raise _unavailable(operation, error.reason) from None
        except HTTPError as error:
            raise _unavailable(operation, error) from None
        except (OSError, http.client.HTTPException):
            # Sent, then the connection broke: Vault may have applied it; the caller decides.
            raise VaultUnavailable(operation, "request failed") from None
        return _reply(status, data, operation)

    def _exchange(
        self, method: str, target: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        url = self._base + target
        if self._direct is None:
            response = self._through_urllib3(method, url, body, headers)
            return response.status, response.data
        raw = self._direct.request(method, "/v1/" + target, body, headers)
        if raw.status in _REDIRECTS and raw.location:
            response = self._through_urllib3(method, urljoin(url, raw.location), body, headers)
            return response.status, response.data
        return raw.status, raw.data

    def _through_urllib3(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> Any:
        if self._verify:
            return self._pool.request(method, url, body=body, headers=headers)
        with warnings.catch_warnings():  # verify_tls: false is the operator's explicit choice
            warnings.simplefilter("ignore", InsecureRequestWarning)
            return self._pool.request(method, url, body=body, headers=headers)


def _dumps(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _unavailable(operation: str, cause: object) -> VaultUnavailable:
    if isinstance(cause, NewConnectionError):  # a subclass of the timeout error, so first
        return VaultUnavailable(operation, "cannot connect", sent=False)
    if isinstance(cause, Urllib3Timeout):
        return VaultUnavailable(operation, "timed out")
    return VaultUnavailable(operation, "request failed")


def _reply(status: int, raw: bytes, operation: str) -> Reply:
    body = _json_body(raw)
    if status < 400:
        return Reply(status, body)
    reason = safe_reason(status, body)
    if is_unavailable(status):
        raise VaultUnavailable(operation, reason, status=status)
    raise VaultRejected(operation, reason, status=status)


def _json_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _pool_manager(addr: str, verify_tls: bool, pool_size: int, timeout: float) -> urllib3.PoolManager:
    options: dict[str, Any] = {
        "maxsize": pool_size,
        "timeout": urllib3.Timeout(connect=timeout, read=timeout),
        # No retries (a POST that timed out may have been applied: the caller decides),
        # but follow a standby's redirect to the active node.
        "retries": urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=3),
    }
    if verify_tls:
        options["cert_reqs"] = "CERT_REQUIRED"
        options["ca_certs"] = ca_bundle()
    else:
        options["cert_reqs"] = "CERT_NONE"
    proxy = _proxy_for(addr)
    if proxy:
        return urllib3.ProxyManager(proxy, **options)
    return urllib3.PoolManager(**options)


def _direct_transport(addr: str, verify_tls: bool, pool_size: int, timeout: float) -> DirectTransport:
    https = urlsplit(addr).scheme == "https"
    tls = tls_context(verify_tls, ca_bundle()) if https else None
    return DirectTransport(addr, timeout=timeout, tls=tls, size=pool_size)


def _proxy_for(addr: str) -> str | None:
    """The proxy the standard environment variables name for `addr`, honouring NO_PROXY."""
    parts = urlsplit(addr)
    if urllib.request.proxy_bypass(parts.netloc):
        return None
    return urllib.request.getproxies_environment().get(parts.scheme)


def ca_bundle() -> str | None:
    """A private CA the operator pointed Vault clients at, else certifi's bundle."""
    for var in ("BAO_CACERT", "VAULT_CACERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = os.environ.get(var)
        if value:
            return value
    try:
        import certifi
    except ImportError:
        return None  # urllib3 then loads the system store
    return str(certifi.where())
