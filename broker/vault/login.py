"""The broker's own Vault token: a static token, or one from an AppRole/Kubernetes login.

Login is lazy (the first call that needs a token does it) so a process can start and
answer /healthz while Vault is still coming up. Tokens from a login method are
re-obtained shortly before they expire; a renewable one is also renewed by the
scheduler through `renew()`. The broker's token should be periodic or outlive every
task TTL: per-task tokens are orphans, so the broker token expiring revokes nothing
the tasks hold, but while it is gone nothing can be issued or revoked (V10).

These calls go through hvac (`broker.vault.hvac_client`), not the measured keep-alive
`VaultHTTP` of the per-task path: a login, lookup-self or renew-self happens once per
token lifetime or scheduler round, off the hot path, so hvac's typed calls cost nothing
that matters. Each opens a fresh session: minutes apart, a kept connection would only
sit idle until the server closed it.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from broker.clock import Clock
from broker.config import VaultSettings
from broker.vault.errors import VaultRejected, VaultUnavailable
from broker.vault.hvac_client import HvacVault

# Re-login when this share of a login token's TTL is left (and at most this long before).
_REFRESH_SHARE = 1 / 3
_REFRESH_MAX = timedelta(minutes=5)


class BrokerLogin:
    """Hands out the broker's current token; thread-safe."""

    def __init__(self, settings: VaultSettings, clock: Clock) -> None:
        self._settings = settings
        self._auth = settings.auth
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = self._auth.token if self._auth.method == "token" else None
        self._refresh_at: datetime | None = None
        self._renewable: bool | None = None

    @property
    def uses_login(self) -> bool:
        return self._auth.method != "token"

    def token(self) -> str:
        token = self._token
        if token is not None and not self._due():
            return token
        with self._lock:
            if self._token is None or self._due():
                self._login()
            assert self._token is not None
            return self._token

    def forget(self, token: str) -> bool:
        """After a 403 with `token`: drop it so the next call logs in again.

        Returns True when a retry can help, i.e. the token came from a login method
        (a static token that is denied stays denied).
        """
        if not self.uses_login:
            return False
        with self._lock:
            if self._token == token:
                self._token = None
        return True

    def renew(self) -> None:
        """Extend the broker's token if it can be; re-login if a login token can't."""
        with self._lock:
            if self._token is None:
                if self.uses_login:
                    self._login()
                return
            if self._renewable is None:
                self._renewable = self._lookup_renewable(self._token)
            if self._renewable:
                self._renew_self(self._token)
            elif self.uses_login:
                self._login()

    def _due(self) -> bool:
        return self._refresh_at is not None and self._clock.now() >= self._refresh_at

    def _vault(self, token: str = "") -> HvacVault:
        s = self._settings
        return HvacVault(
            s.addr, timeout=s.timeout_seconds, verify_tls=s.verify_tls, namespace=s.namespace, token=token
        )

    def _login(self) -> None:
        mount = self._auth.mount or self._auth.method
        operation = f"login {mount}"
        jwt = self._service_account_token() if self._auth.method == "kubernetes" else ""
        with self._vault() as vault, vault.calling(operation) as client:
            if self._auth.method == "approle":
                reply = client.auth.approle.login(
                    role_id=self._auth.role_id or "",
                    secret_id=self._auth.secret_id or "",
                    use_token=False,
                    mount_point=mount,
                )
            else:
                reply = client.auth.kubernetes.login(
                    role=self._auth.role or "", jwt=jwt, use_token=False, mount_point=mount
                )
        auth = _auth_block(reply, operation)
        self._token = str(auth["client_token"])
        self._renewable = bool(auth.get("renewable"))
        self._schedule_refresh(int(auth.get("lease_duration") or 0))

    def _service_account_token(self) -> str:
        try:
            return Path(self._auth.jwt_path).read_text(encoding="utf-8").strip()
        except OSError as error:
            # A missing projected token is a deployment fault, not a Vault answer.
            reason = f"cannot read the service-account token: {error.strerror}"
            raise VaultUnavailable("login kubernetes", reason) from None

    def _schedule_refresh(self, ttl_seconds: int) -> None:
        if ttl_seconds <= 0 or not self.uses_login:
            self._refresh_at = None
            return
        ttl = timedelta(seconds=ttl_seconds)
        self._refresh_at = self._clock.now() + ttl - min(ttl * _REFRESH_SHARE, _REFRESH_MAX)

    def _lookup_renewable(self, token: str) -> bool:
        with self._vault(token) as vault, vault.calling("lookup-self") as client:
            reply = client.auth.token.lookup_self()
        data = reply.get("data") if isinstance(reply, dict) else None
        return bool((data or {}).get("renewable"))

    def _renew_self(self, token: str) -> None:
        try:
            with self._vault(token) as vault, vault.calling("renew-self") as client:
                reply = client.auth.token.renew_self()
        except VaultRejected:
            if not self.uses_login:
                raise
            self._login()
            return
        auth = _auth_block(reply, "renew-self")
        self._schedule_refresh(int(auth.get("lease_duration") or 0))


def _auth_block(reply: Any, operation: str) -> dict[str, Any]:
    # hvac hands back the decoded body for a 200 and the bare response for any other success.
    auth = reply.get("auth") if isinstance(reply, dict) else None
    if not isinstance(auth, dict) or not auth.get("client_token"):
        raise VaultUnavailable(operation, "answer without a token")
    return auth
