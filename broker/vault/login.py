"""The broker's own Vault token: a static token, or one from an AppRole/Kubernetes login.

Login is lazy (the first call that needs a token does it) so a process can start and
answer /healthz while Vault is still coming up. Tokens from a login method are
re-obtained shortly before they expire; a renewable one is also renewed by the
scheduler through `renew()`. The broker's token should be periodic or outlive every
task TTL: per-task tokens are orphans, so the broker token expiring revokes nothing
the tasks hold, but while it is gone nothing can be issued or revoked (V10).
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from broker.clock import Clock
from broker.config import VaultAuth
from broker.vault.errors import VaultRejected, VaultUnavailable
from broker.vault.http import VaultHTTP

# Re-login when this share of a login token's TTL is left (and at most this long before).
_REFRESH_SHARE = 1 / 3
_REFRESH_MAX = timedelta(minutes=5)


class BrokerLogin:
    """Hands out the broker's current token; thread-safe."""

    def __init__(self, auth: VaultAuth, http: VaultHTTP, clock: Clock) -> None:
        self._auth = auth
        self._http = http
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = auth.token if auth.method == "token" else None
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

    def _login(self) -> None:
        mount = self._auth.mount or self._auth.method
        reply = self._http.call(
            "POST", f"auth/{mount}/login", operation=f"login {mount}", json=self._login_body()
        )
        auth = _auth_block(reply.body, f"login {mount}")
        self._token = str(auth["client_token"])
        self._renewable = bool(auth.get("renewable"))
        self._schedule_refresh(int(auth.get("lease_duration") or 0))

    def _login_body(self) -> dict[str, str]:
        if self._auth.method == "approle":
            return {"role_id": self._auth.role_id or "", "secret_id": self._auth.secret_id or ""}
        try:
            jwt = Path(self._auth.jwt_path).read_text(encoding="utf-8").strip()
        except OSError as error:
            # A missing projected token is a deployment fault, not a Vault answer.
            reason = f"cannot read the service-account token: {error.strerror}"
            raise VaultUnavailable("login kubernetes", reason) from None
        return {"role": self._auth.role or "", "jwt": jwt}

    def _schedule_refresh(self, ttl_seconds: int) -> None:
        if ttl_seconds <= 0 or not self.uses_login:
            self._refresh_at = None
            return
        ttl = timedelta(seconds=ttl_seconds)
        self._refresh_at = self._clock.now() + ttl - min(ttl * _REFRESH_SHARE, _REFRESH_MAX)

    def _lookup_renewable(self, token: str) -> bool:
        reply = self._http.call("GET", "auth/token/lookup-self", operation="lookup-self", token=token)
        data = reply.body.get("data") or {}
        return bool(data.get("renewable"))

    def _renew_self(self, token: str) -> None:
        try:
            reply = self._http.call(
                "POST", "auth/token/renew-self", operation="renew-self", token=token, json={}
            )
        except VaultRejected:
            if not self.uses_login:
                raise
            self._login()
            return
        auth = _auth_block(reply.body, "renew-self")
        self._schedule_refresh(int(auth.get("lease_duration") or 0))


def _auth_block(body: dict[str, Any], operation: str) -> dict[str, Any]:
    auth = body.get("auth")
    if not isinstance(auth, dict) or not auth.get("client_token"):
        raise VaultUnavailable(operation, "answer without a token")
    return auth
