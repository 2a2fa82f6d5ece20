"""Everything the broker asks of Vault/OpenBao, as a handful of synchronous calls.

The lifecycle of one task (the caller owns the database side):

1. `sync_task_policy` makes sure the task type's ACL policy exists (cached by content).
2. `create_task_token` mints an orphan, non-renewable token through the task token
   role, with a TTL equal to the task's. The caller records its accessor *before* step 3.
3. `issue` reads each credential *with that token*, so Vault ties every lease to it.
4. On finish, `revoke` revokes each lease synchronously and checks it is gone, then
   `revoke_task_token` revokes the token by accessor, which also makes Vault revoke any
   lease the broker never got to record (a crash between Vault and the database).

If the broker dies and nobody calls step 4, the task token's own TTL still bounds every
lease (a lease never outlives the token that created it), as does each role's max_ttl.

Which of the three transports a new call uses:
- a call made per task (start, finish, expiry, revocation, the token pool's mints):
  `self._http`/`_as_task`/`_as_broker`, which speak over `broker.vault.transport`'s
  keep-alive connections to a direct address (~0.3 ms of CPU a call, half of urllib3's);
- the same calls behind a proxy, or after a standby's redirect, go through urllib3 in
  `broker.vault.http` by themselves: a call needs nothing of its own for that;
- a call made once per token lifetime or per setup (the broker's logins, `broker dev`,
  test fixtures): hvac, through `broker.vault.hvac_client`, for its typed API.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.clock import Clock, SystemClock
from broker.config import VaultSettings
from broker.credentials import (
    CredentialSpec,
    DatabaseCredential,
    LeaseCredential,
    PkiCredential,
    VaultTokenCredential,
)
from broker.vault.errors import VaultRejected, VaultUnavailable
from broker.vault.http import Reply, VaultHTTP
from broker.vault.login import BrokerLogin
from broker.vault.policies import policy_name, render_task_policy, render_template
from broker.vault.types import IssuedSecret, RevokeHandle, TaskToken

log = logging.getLogger(__name__)

# If Vault ever answers a revoke with 202 (queued), how long to wait for the lease to go.
_QUEUED_REVOKE_WAIT = 1.0
_QUEUED_REVOKE_POLL = 0.05


# The health probe after a timed-out call: long enough for a busy Vault, short enough that
# a finish against a hung one still answers soon.
PROBE_TIMEOUT_SECONDS = 1.0
# How long leases keep their role's TTL after Vault refused to renew one.
RENEW_REFUSED_PAUSE_SECONDS = 300.0


class VaultGateway:
    """Thread-safe; one per process, sharing one pooled HTTP session."""

    def __init__(self, settings: VaultSettings, *, clock: Clock | None = None, pool_size: int = 32) -> None:
        self._settings = settings
        self._clock: Clock = clock or SystemClock()
        self._http = VaultHTTP(
            settings.addr,
            timeout=settings.timeout_seconds,
            verify_tls=settings.verify_tls,
            namespace=settings.namespace,
            pool_size=pool_size,
        )
        self._probe = VaultHTTP(
            settings.addr,
            timeout=min(PROBE_TIMEOUT_SECONDS, settings.timeout_seconds),
            verify_tls=settings.verify_tls,
            namespace=settings.namespace,
            pool_size=2,
        )
        self._login = BrokerLogin(settings, self._clock)
        # Until when no renew is tried, after Vault refused `sys/leases/renew` to the broker
        # (a policy that predates it; a while, not for good: a stale token gives 403 too).
        self._no_renew_until = 0.0
        self._policy_digests: dict[str, str] = {}
        self._policy_lock = threading.Lock()

    def close(self) -> None:
        self._http.close()
        self._probe.close()

    # -- health and the broker's own token -------------------------------------------

    def health(self) -> None:
        """Raise VaultUnavailable unless Vault answers, unsealed, and still accepts our token.

        A broker whose own token expired or was revoked can issue nothing, so it is not
        ready even though Vault itself is healthy.
        """
        params = {"standbyok": "true", "perfstandbyok": "true"}
        try:
            self._http.call("GET", "sys/health", operation="health", params=params)
            self._as_broker("GET", "auth/token/lookup-self", operation="lookup own token")
        except VaultRejected as error:
            # 472/473 (DR or perf standby not accepted), 403 (our token is gone): not ready.
            raise VaultUnavailable("health", error.reason, status=error.status) from None

    def answers(self) -> bool:
        """Whether Vault answers at all, asked with a timeout of at most a second: after a
        call timed out, this tells a Vault that is down or hung from one that is slow."""
        try:
            self._probe.call("GET", "sys/health", operation="health", params={"standbyok": "true"})
        except VaultUnavailable as error:
            return error.status is not None  # sealed or 5xx is an answer; silence is not
        except VaultRejected:
            return True
        return True

    def renew_self(self) -> None:
        """Renew the broker's token if renewable (re-login for AppRole/Kubernetes)."""
        self._login.renew()

    # -- per task --------------------------------------------------------------------

    def sync_task_policy(self, task: str, credentials: Mapping[str, CredentialSpec]) -> str:
        """Write `{policy_prefix}{task}` unless this process already wrote the same text."""
        name = policy_name(self._settings.policy_prefix, task)
        text = render_task_policy(task, credentials)
        digest = hashlib.sha256(text.encode()).hexdigest()
        if self._policy_digests.get(name) == digest:
            return name
        self._as_broker(
            "PUT",
            f"sys/policies/acl/{name}",
            operation=f"write policy {name}",
            json={"policy": text},
        )
        with self._policy_lock:
            self._policy_digests[name] = digest
        log.info("vault policy %s written", name)
        return name

    def create_task_token(
        self,
        *,
        task_id: str,
        task: str,
        policies: Sequence[str],
        ttl_seconds: int,
        meta: Mapping[str, str],
    ) -> TaskToken:
        """An orphan, non-renewable token via the task token role, living `ttl_seconds`."""
        _positive(ttl_seconds)
        role = self._settings.task_token_role
        ttl = f"{ttl_seconds}s"
        body = {
            "policies": list(policies),
            "ttl": ttl,
            "explicit_max_ttl": ttl,
            "renewable": False,
            "display_name": f"task-{task}",
            "meta": {**meta, "task_id": task_id, "task": task},
        }
        started = self._clock.now()
        reply = self._as_broker(
            "POST",
            f"auth/token/create/{role}",
            operation=f"create task token via {role}",
            json=body,
        )
        auth = _auth(reply, "create task token")
        return TaskToken(
            token=str(auth["client_token"]),
            accessor=str(auth["accessor"]),
            expires_at=started + timedelta(seconds=int(auth.get("lease_duration") or ttl_seconds)),
        )

    def issue(
        self,
        token: TaskToken,
        spec: CredentialSpec,
        *,
        ttl_seconds: int,
        task_id: str,
        workload: str,
    ) -> IssuedSecret:
        """One credential, requested with the task token so its lease belongs to it.

        On any error (a timeout included: Vault may have issued before the answer was
        lost) revoke the task token: that revokes whatever this call may have created.
        """
        _positive(ttl_seconds)
        started = self._clock.now()
        if isinstance(spec, DatabaseCredential):
            # Database roles take no per-request TTL: the lease gets the role's default,
            # which `_fit_to_task` moves to the task's.
            path = f"{spec.mount}/creds/{spec.role}"
            reply = self._as_task(token, "GET", path, operation=f"issue {path}")
            return self._fit_to_task(
                reply, _leased(reply, started, token, f"issue {path}"), ttl_seconds, token
            )
        if isinstance(spec, PkiCredential):
            return self._issue_pki(
                token,
                spec,
                ttl_seconds=ttl_seconds,
                task_id=task_id,
                workload=workload,
                started=started,
            )
        if isinstance(spec, VaultTokenCredential):
            return self._issue_child_token(token, spec, ttl_seconds, task_id, started)
        return self._issue_lease(token, spec, ttl_seconds, task_id, workload, started)

    def _issue_pki(
        self,
        token: TaskToken,
        spec: PkiCredential,
        *,
        ttl_seconds: int,
        task_id: str,
        workload: str,
        started: datetime,
    ) -> IssuedSecret:
        path = f"{spec.mount}/issue/{spec.role}"
        body: dict[str, Any] = {
            "common_name": render_template(spec.common_name, task_id=task_id, workload=workload),
            "ttl": f"{ttl_seconds}s",
        }
        if spec.alt_names:
            names = (render_template(n, task_id=task_id, workload=workload) for n in spec.alt_names)
            body["alt_names"] = ",".join(names)
        reply = self._as_task(token, "POST", path, operation=f"issue {path}", json=body)
        issued = _leased(reply, started, token, f"issue {path}")
        if issued.handle.kind == "none":
            # Role without generate_lease: nothing to revoke, the certificate simply
            # lives until its notAfter (which ttl_seconds bounded).
            log.warning("pki role %s issues certificates without a lease", path)
            not_after = issued.data.get("expiration")
            if isinstance(not_after, int):
                issued = IssuedSecret(
                    issued.data, datetime.fromtimestamp(not_after, UTC), issued.handle, None
                )
        return issued

    def _issue_child_token(
        self,
        token: TaskToken,
        spec: VaultTokenCredential,
        ttl_seconds: int,
        task_id: str,
        started: datetime,
    ) -> IssuedSecret:
        # A (non-orphan) child of the task token: revoking or expiry of the task token
        # revokes it too. Its policies must be a subset of the task token's.
        ttl = f"{ttl_seconds}s"
        body = {
            "policies": list(spec.policies),
            "ttl": ttl,
            "explicit_max_ttl": ttl,
            "renewable": False,
            "display_name": f"task-{task_id}",
            "meta": {"task_id": task_id},
        }
        reply = self._as_task(token, "POST", "auth/token/create", operation="issue child token", json=body)
        auth = _auth(reply, "issue child token")
        accessor = str(auth["accessor"])
        lifetime = timedelta(seconds=int(auth.get("lease_duration") or ttl_seconds))
        return IssuedSecret(
            data={
                "token": str(auth["client_token"]),
                "accessor": accessor,
                "policies": list(auth.get("policies") or spec.policies),
            },
            expires_at=min(started + lifetime, token.expires_at),
            handle=RevokeHandle("token", accessor),
            vault_lease_id=None,
        )

    def _issue_lease(
        self,
        token: TaskToken,
        spec: LeaseCredential,
        ttl_seconds: int,
        task_id: str,
        workload: str,
        started: datetime,
    ) -> IssuedSecret:
        path = render_template(spec.path, task_id=task_id, workload=workload)
        operation = f"issue {spec.path}"
        if spec.method == "read":
            reply = self._as_task(token, "GET", path, operation=operation, params=spec.params or None)
        else:
            reply = self._as_task(token, "POST", path, operation=operation, json=spec.params)
        return self._fit_to_task(reply, _leased(reply, started, token, operation), ttl_seconds, token)

    def _fit_to_task(
        self, reply: Reply, issued: IssuedSecret, ttl_seconds: int, token: TaskToken
    ) -> IssuedSecret:
        """Give a lease the task's TTL instead of its role's default (docs/contract.md §6.4).

        A role's default is blind to the task: longer than a short task's maximum (the
        backstop would be the task token's expiry alone), shorter than a long task (the
        credential would die mid-task). One renew with `increment` sets the lease's TTL,
        down as well as up, within the role's max_ttl; for a database user Vault moves its
        `VALID UNTIL` too. Only when the two differ, so a task of the role's default TTL
        costs no extra call.
        """
        lease_id = issued.vault_lease_id
        if lease_id is None or not reply.body.get("renewable") or time.monotonic() < self._no_renew_until:
            return issued
        if int(reply.body.get("lease_duration") or 0) == ttl_seconds:
            return issued
        body = {"lease_id": lease_id, "increment": ttl_seconds}
        renewed_at = self._clock.now()
        try:
            # The broker's token as it is: a 403 here is the policy, not a stale token, and
            # must not cost a fresh login per credential (`_as_broker` would).
            renewed = self._http.call(
                "PUT", "sys/leases/renew", operation="fit lease to task", token=self._login.token(), json=body
            )
        except VaultRejected as error:
            if error.status == 403:
                # The broker's policy predates `sys/leases/renew`: leases keep their role's
                # TTL, bounded by the task token's expiry. Said once, not per credential.
                self._no_renew_until = time.monotonic() + RENEW_REFUSED_PAUSE_SECONDS
                log.warning("Vault refused sys/leases/renew: leases keep their role's TTL (grant it)")
            else:
                log.warning("lease %s keeps its role's TTL: %s", lease_id, error)
            return issued
        except VaultUnavailable as error:
            # The lease exists and the caller holds it: fitting it is not worth failing the
            # start for; if Vault is really gone, the next call fails and revokes it.
            log.warning("lease %s keeps its role's TTL: %s", lease_id, error)
            return issued
        duration = int(renewed.body.get("lease_duration") or 0)
        if duration <= 0:
            return issued
        expires_at = min(renewed_at + timedelta(seconds=duration), token.expires_at)
        return IssuedSecret(issued.data, expires_at, issued.handle, lease_id)

    # -- revocation ------------------------------------------------------------------

    def revoke(self, handle: RevokeHandle) -> None:
        """Revoke one credential synchronously; already gone counts as success.

        VaultUnavailable: not revoked now, retry with backoff (Vault down or sealed, the
        engine's backend down, the lease still present afterwards). VaultRejected: the
        broker token may not revoke (a configuration fault: alert, and retry anyway).
        """
        if handle.kind == "lease":
            self._revoke_lease(handle.ref)
        elif handle.kind == "token":
            self.revoke_task_token(handle.ref)

    def _revoke_lease(self, lease_id: str) -> None:
        # hvac's revoke_lease can't send `sync`. OpenBao's API docs and CLI give it as
        # false, which only queues the revocation (202); the 2.x server in fact defaults
        # it to true. Sent explicitly, so neither a server nor a proxy decides: with
        # sync=true Vault runs the engine's revocation (e.g. DROP ROLE) before answering
        # and fails if it fails (checked on the wire by tests/tasks/test_revoked_before_the_answer.py).
        try:
            reply = self._as_broker(
                "PUT",
                "sys/leases/revoke",
                operation="revoke lease",
                json={"lease_id": lease_id, "sync": True},
            )
        except VaultRejected as error:
            if error.status != 400:
                raise
            # A sync revocation the engine could not carry out (its database is down,
            # V03) comes back as 400: nothing was revoked, it is worth retrying.
            raise VaultUnavailable("revoke lease", error.reason, status=400) from None
        # With sync=true a 204 means the engine's revocation ran (V01). A 204 also answers
        # for an unknown lease id (V02), but ids come only from leases Vault gave us, so
        # for them "unknown" means "already gone". A 202 means it was only queued: then
        # "gone" is believed once a lookup no longer finds the lease.
        if reply.status == 204:
            return
        waited = 0.0
        while self._lease_exists(lease_id):
            if reply.status != 202 or waited >= _QUEUED_REVOKE_WAIT:
                raise VaultUnavailable("revoke lease", "lease still present after revoke")
            time.sleep(_QUEUED_REVOKE_POLL)
            waited += _QUEUED_REVOKE_POLL

    def _lease_exists(self, lease_id: str) -> bool:
        try:
            self._as_broker("PUT", "sys/leases/lookup", operation="lookup lease", json={"lease_id": lease_id})
        except VaultRejected as error:
            if error.status == 400:  # "invalid lease": revoked, expired or never existed
                return False
            raise
        return True

    def revoke_task_token(self, accessor: str) -> None:
        """Revoke a token (and its children) by accessor; an unknown accessor is success.

        The token tree goes at once. Leases the token created are then revoked by Vault
        in the background (within moments, not before this returns): revoke the leases
        you know with `revoke` first when you need them gone synchronously.
        """
        try:
            self._as_broker(
                "POST",
                "auth/token/revoke-accessor",
                operation="revoke token",
                json={"accessor": accessor},
            )
        except VaultRejected as error:
            # Vault answers 400 "invalid accessor"/"token not found" for a token already
            # revoked or expired (V09); OpenBao answers 200 with a warning instead.
            if error.status != 400:
                raise

    def token_alive(self, accessor: str) -> bool:
        try:
            self._as_broker(
                "POST",
                "auth/token/lookup-accessor",
                operation="lookup token",
                json={"accessor": accessor},
            )
        except VaultRejected as error:
            if error.status == 400:
                return False
            raise
        return True

    # -- plumbing --------------------------------------------------------------------

    def _as_broker(
        self,
        method: str,
        path: str,
        *,
        operation: str,
        json: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Reply:
        """A call with the broker's own token; after a 403 a login token is renewed once."""
        token = self._login.token()
        try:
            return self._http.call(method, path, operation=operation, token=token, json=json, params=params)
        except VaultRejected as error:
            if error.status != 403 or not self._login.forget(token):
                raise
        return self._http.call(
            method, path, operation=operation, token=self._login.token(), json=json, params=params
        )

    def _as_task(
        self,
        token: TaskToken,
        method: str,
        path: str,
        *,
        operation: str,
        json: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Reply:
        return self._http.call(method, path, operation=operation, token=token.token, json=json, params=params)


def _positive(ttl_seconds: int) -> None:
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be positive")


def _auth(reply: Reply, operation: str) -> dict[str, Any]:
    auth = reply.body.get("auth")
    if not isinstance(auth, dict) or not auth.get("client_token") or not auth.get("accessor"):
        raise VaultUnavailable(operation, "answer without a token")
    return auth


def _leased(reply: Reply, started: datetime, token: TaskToken, operation: str) -> IssuedSecret:
    """An engine answer with (usually) a lease; expiry is the earlier of lease and token."""
    data = reply.body.get("data")
    if not isinstance(data, dict):
        raise VaultRejected(operation, "answer without data")
    lease_id = str(reply.body.get("lease_id") or "") or None
    # Vault reports the role's TTL even when the token will die first (and take the
    # lease with it), so the token's expiry caps what we promise.
    duration = int(reply.body.get("lease_duration") or 0)
    expires_at = token.expires_at
    if lease_id is not None and duration > 0:
        expires_at = min(started + timedelta(seconds=duration), token.expires_at)
    handle = RevokeHandle("lease", lease_id) if lease_id else RevokeHandle("none", "")
    return IssuedSecret(data=dict(data), expires_at=expires_at, handle=handle, vault_lease_id=lease_id)
