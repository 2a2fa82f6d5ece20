"""hvac, for the Vault calls off the per-task path: the broker's logins and the dev setup.

A login happens once per token lifetime and the setup once per `broker dev` or test run,
so hvac's typed calls (`auth.approle.login`, `secrets.database.create_role`, ...) are worth
its object layers there; the per-task calls stay on `broker.vault.http.VaultHTTP`.
`HvacVault` is configured as VaultHTTP is (the same CA, `verify_tls`, namespace and
timeout), and every failure leaves it as `VaultUnavailable` or `VaultRejected` built from
the operation, the status and a fixed reason (`safe_reason`). hvac's own exceptions keep
the response body (and their `str()` the URL) and lose the status (a 412 or a 405 becomes
`UnexpectedError`), so a response hook turns an error answer into a body-free one before
hvac sees it, and no hvac or requests exception is ever chained.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import hvac
import hvac.exceptions as hvac_errors
import requests
from urllib3.exceptions import InsecureRequestWarning, NewConnectionError

from broker.vault.errors import VaultError, VaultRejected, VaultUnavailable
from broker.vault.http import ca_bundle, is_unavailable, safe_reason

# The status behind each hvac exception, for one raised without an answer reaching our
# hook (none is expected; a fallback, so that no hvac exception escapes unmapped).
_HVAC_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (hvac_errors.InvalidRequest, 400),
    (hvac_errors.Unauthorized, 401),
    (hvac_errors.Forbidden, 403),
    (hvac_errors.InvalidPath, 404),
    (hvac_errors.UnsupportedOperation, 405),
    (hvac_errors.PreconditionFailed, 412),
    (hvac_errors.RateLimitExceeded, 429),
    (hvac_errors.InternalServerError, 500),
    (hvac_errors.VaultNotInitialized, 501),
    (hvac_errors.BadGateway, 502),
    (hvac_errors.VaultDown, 503),
)


class _Answered(Exception):
    """An error answer reduced to what may be shown: its status and a fixed reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


def _raise_on_error(response: requests.Response, *_: Any, **__: Any) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    raise _Answered(response.status_code, safe_reason(response.status_code, body))


class HvacVault:
    """An hvac client set up like VaultHTTP; use its `client` inside `calling()`."""

    def __init__(
        self,
        addr: str,
        *,
        timeout: float,
        verify_tls: bool = True,
        namespace: str | None = None,
        token: str = "",
    ) -> None:
        # The CA is read now, as VaultHTTP reads it when built. requests would otherwise
        # use certifi, or REQUESTS_CA_BUNDLE only, and miss BAO_CACERT / VAULT_CACERT.
        self._verify: bool | str = (ca_bundle() or True) if verify_tls else False
        # `token=""`, not None: hvac would fall back to VAULT_TOKEN or ~/.vault-token.
        self.client: Any = hvac.Client(
            url=addr.rstrip("/"), token=token, verify=self._verify, timeout=timeout, namespace=namespace
        )
        self.client.session.hooks["response"].append(_raise_on_error)

    def close(self) -> None:
        self.client.adapter.close()

    def __enter__(self) -> HvacVault:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @contextlib.contextmanager
    def calling(self, operation: str) -> Iterator[Any]:
        """Yields the hvac client; any failure inside leaves as a VaultError naming `operation`."""
        try:
            with warnings.catch_warnings():
                if self._verify is False:  # verify_tls: false is the operator's explicit choice
                    warnings.simplefilter("ignore", InsecureRequestWarning)
                yield self.client
        except VaultError:
            raise
        except _Answered as answer:
            kind = VaultUnavailable if is_unavailable(answer.status) else VaultRejected
            raise kind(operation, answer.reason, status=answer.status) from None
        except hvac_errors.VaultError as error:
            raise _from_hvac(operation, error) from None
        except requests.RequestException as error:
            raise _from_requests(operation, error) from None


def _from_hvac(operation: str, error: hvac_errors.VaultError) -> VaultError:
    for kind, status in _HVAC_STATUS:
        if isinstance(error, kind):
            reason = safe_reason(status, None)
            if is_unavailable(status):
                return VaultUnavailable(operation, reason, status=status)
            return VaultRejected(operation, reason, status=status)
    if isinstance(error, hvac_errors.ParamValidationError):  # raised before sending
        return VaultRejected(operation, "invalid request")
    return VaultUnavailable(operation, "unexpected answer")


def _from_requests(operation: str, error: requests.RequestException) -> VaultUnavailable:
    # SSLError and ConnectTimeout are ConnectionErrors too, so they come first.
    if isinstance(error, requests.exceptions.SSLError):
        return VaultUnavailable(operation, "TLS handshake failed", sent=False)
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return VaultUnavailable(operation, "timed out", sent=False)
    if isinstance(error, requests.Timeout):
        return VaultUnavailable(operation, "timed out")
    if isinstance(error, requests.exceptions.ProxyError) or (
        isinstance(error, requests.ConnectionError) and _no_connection(error)
    ):
        return VaultUnavailable(operation, "cannot connect", sent=False)
    # Sent, then the connection broke: Vault may have applied it; the caller decides.
    return VaultUnavailable(operation, "request failed")


def _no_connection(error: requests.ConnectionError) -> bool:
    """requests wraps urllib3's MaxRetryError, whose `reason` says whether a connection was made."""
    cause = error.args[0] if error.args else None
    return isinstance(getattr(cause, "reason", None), NewConnectionError)
