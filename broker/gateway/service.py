"""What the gateway asks of the broker: is this handle good, with what does its session
log in upstream, may this statement run, and which of the tasks it serves have ended.

Blocking (the ledger, Vault): the wire protocol's event loop calls it in worker threads.

A gateway credential is issued here, by the replica its handle first connects to, with a
token of the replica's own for that task (docs/gateway.md, "Who issues"):
  1. a token through the task token role, with the task type's policies and the task's
     remaining lifetime; recorded at once as a lease of the task (by accessor), so the
     task's end revokes it, and with it anything it created;
  2. the database credential read with that token; recorded as a lease too, before any
     session uses it;
  3. both held in this process's memory only, until the task ends: never in the ledger,
     the audit or a log (a credential value, or a wrapped token or ciphertext of one).
A task that ended between the handle's check and 1 or 2 finds its lease refused (the
ledger records no lease on an ended task) and what was issued is revoked at once. A
replica that did not issue a credential for a task issues its own when that task's
handle first connects to it: each replica's is its own lease, revoked with the task.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from broker.audit import record
from broker.clock import Clock
from broker.credentials import DatabaseCredential, LeaseCredential, VaultTokenCredential
from broker.db import DatabaseUnavailable, unit_of_work
from broker.errors import UnknownTask
from broker.gateway.events import AuditBatch
from broker.ledger.gateway import HandleView, ended_tasks, find_handle, hold_active, insert_gateway_lease
from broker.models import Lease
from broker.policy import PolicyStore
from broker.policy.requests import RequestRules, RequestVerdict
from broker.policy.requests import refuse_all as _refuse_all_requests
from broker.policy.statements import StatementRules, check, compile_statement_rules
from broker.vault import IssuedSecret, TaskToken, VaultError, VaultGateway, task_token_policies

log = logging.getLogger(__name__)


class Refusal(Exception):
    """A session the gateway will not serve: `sqlstate` and `message` go to the client as
    they are (fixed phrases; never an exception's text or a value)."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


# SQLSTATEs a client can act on: retry later, or start a new task.
CANNOT_CONNECT_NOW = "57P03"
INVALID_AUTHORIZATION = "28000"
INSUFFICIENT_PRIVILEGE = "42501"


@dataclass(frozen=True)
class UpstreamLogin:
    host: str
    port: int
    dbname: str
    user: str
    password: str = field(repr=False)
    sslmode: str
    expires_at: datetime


@dataclass(frozen=True)
class HeldToken:
    """The real Vault token behind a task's Vault handle, on this replica: memory only."""

    token: str = field(repr=False)
    expires_at: datetime


@dataclass(frozen=True)
class HeldHeader:
    """The header an HTTP handle's requests are sent with, filled from the lease's data, on
    this replica: memory only. `secrets` are the values filled in, each one that an
    answer must not carry back."""

    upstream: str
    name: str
    value: str = field(repr=False)
    secrets: tuple[str, ...] = field(repr=False)
    expires_at: datetime


# What a replica holds for a credential it issued: each has the moment it must be given up.
Held = TypeVar("Held", UpstreamLogin, HeldToken, HeldHeader)


@dataclass(frozen=True)
class StatementVerdict:
    allowed: bool
    rule: str | None
    message: str


def replica_id() -> str:
    """This gateway process, as its leases name it: a restart is a new replica."""
    return f"gw-{secrets.token_hex(4)}"


class GatewayService:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        vault: VaultGateway,
        policies: PolicyStore,
        clock: Clock,
        audit: AuditBatch,
        replica: str | None = None,
    ) -> None:
        self._sessions = sessions
        self._vault = vault
        self._policies = policies
        self._clock = clock
        self._audit = audit
        self.replica = replica or replica_id()
        self._logins: dict[tuple[uuid.UUID, str], UpstreamLogin] = {}
        self._issuing: dict[tuple[uuid.UUID, str], threading.Lock] = {}
        self._lock = threading.Lock()
        self._vault_tokens: dict[tuple[uuid.UUID, str], HeldToken] = {}
        self._http_headers: dict[tuple[uuid.UUID, str], HeldHeader] = {}

    # ---- the handle --------------------------------------------------------------------

    def find(self, handle_id: str) -> HandleView | None:
        """The handle and its task; Refusal when the ledger can't say (fail closed)."""
        try:
            with unit_of_work(self._sessions) as session:
                return find_handle(session, handle_id)
        except DatabaseUnavailable:
            raise Refusal(CANNOT_CONNECT_NOW, "the gateway can't check handles now; retry shortly") from None

    def refused(self, handle_id: str, view: HandleView | None, why: str) -> None:
        """A connection whose handle was wrong, unknown or spent: audited, by handle id."""
        self._audit.queue_event(
            "gateway.handle_refused",
            view.workload if view is not None else "unknown",
            task_id=view.task_id if view is not None else None,
            owner=view.owner if view is not None else None,
            purpose=view.purpose if view is not None else None,
            detail={"handle": handle_id[:64], "why": why},
        )

    # ---- the upstream login ------------------------------------------------------------

    def login(self, view: HandleView) -> UpstreamLogin:
        """The credential this replica's sessions of `view`'s task log in with; issued on
        first use (the module docstring). Refusal for an ended task or a failed issue."""
        return self._held(view, self._logins, self._issue)

    def _held(
        self, view: HandleView, held: dict[tuple[uuid.UUID, str], Held], issue: Callable[[HandleView], Held]
    ) -> Held:
        """What `held` keeps for `view`'s credential, issued once (`issue`) on first use, even
        when two first connections or requests come at once."""
        if not view.usable:
            raise Refusal(INVALID_AUTHORIZATION, "the task this handle belongs to has ended")
        key = (view.task_id, view.name)
        with self._lock:
            issuing = self._issuing.setdefault(key, threading.Lock())
        with issuing:
            known = held.get(key)
            if known is not None and known.expires_at > self._clock.now():
                return known
            made = issue(view)
            with self._lock:
                held[key] = made
            return made

    def forget(self, task_id: uuid.UUID) -> None:
        """The task ended: drop what this process held for it (revoked by the task's end)."""
        with self._lock:
            for key in [key for key in self._logins if key[0] == task_id]:
                del self._logins[key]
                self._issuing.pop(key, None)
            for key in [key for key in self._vault_tokens if key[0] == task_id]:
                del self._vault_tokens[key]
                self._issuing.pop(key, None)
            for key in [key for key in self._http_headers if key[0] == task_id]:
                del self._http_headers[key]
                self._issuing.pop(key, None)

    def _issue(self, view: HandleView) -> UpstreamLogin:
        spec = self._spec(view)
        assert spec.upstream is not None
        secret, expires_at = self._issue_recorded(view, spec, "database credential")
        upstream = spec.upstream
        return UpstreamLogin(
            host=upstream.host,
            port=upstream.port,
            dbname=upstream.dbname,
            user=str(secret.data["username"]),
            password=str(secret.data["password"]),
            sslmode=upstream.sslmode,
            expires_at=expires_at,
        )

    def _issue_recorded(
        self, view: HandleView, spec: DatabaseCredential | VaultTokenCredential | LeaseCredential, what: str
    ) -> tuple[IssuedSecret, datetime]:
        """Steps 1 and 2 of the module docstring: a task token of this replica's own, then
        the credential, each recorded as a lease before it is used; the credential and when
        it must be given up."""
        compiled_credentials = self._policies.current().task(view.task).credentials
        ttl = max(1, int((view.expires_at - view.now).total_seconds())) if view.expires_at else 1
        try:
            policy = self._vault.sync_task_policy(view.task, compiled_credentials)
            token = self._vault.create_task_token(
                task_id=str(view.task_id), task=view.task, ttl_seconds=ttl,
                policies=task_token_policies(policy, compiled_credentials),
                meta={"gateway": self.replica, "credential": view.name, "issued_by": "credential-broker"},
            )  # fmt: skip
        except VaultError:
            self._issue_failed(view, "task token")
            raise Refusal(
                CANNOT_CONNECT_NOW, f"the gateway could not get this task's {what}; retry"
            ) from None
        # Each issuance's leases are named apart: a credential that expires before its task
        # (a role's max_ttl, or the second lost to rounding) is issued again under new names.
        issuance = f"{view.name}@{self.replica}.{secrets.token_hex(2)}"
        self._record(view, self._token_lease(view, issuance, token))
        try:
            secret = self._vault.issue(
                token, spec, ttl_seconds=ttl, task_id=str(view.task_id), workload=view.workload
            )
        except VaultError:
            self._revoke_token(token)
            self._issue_failed(view, what)
            raise Refusal(
                CANNOT_CONNECT_NOW, f"the gateway could not get this task's {what}; retry"
            ) from None
        credential = self._credential_lease(view, issuance, secret)
        expires_at = self._record(view, credential, token=token, secret=secret)
        return secret, expires_at

    def _spec(self, view: HandleView) -> DatabaseCredential:
        try:
            spec = self._policies.current().task(view.task).credentials.get(view.name)
        except UnknownTask:
            spec = None
        if not isinstance(spec, DatabaseCredential) or not spec.via_gateway:
            raise Refusal(INVALID_AUTHORIZATION, "the policy no longer gives this task a gateway credential")
        return spec

    def _record(
        self,
        view: HandleView,
        lease: Lease,
        *,
        token: TaskToken | None = None,
        secret: IssuedSecret | None = None,
    ) -> datetime:
        """Record `lease` before anything uses it; if the task ended meanwhile, revoke."""
        try:
            with unit_of_work(self._sessions) as session:
                recorded = hold_active(session, lease.task_id)
                if recorded:
                    detail = {"name": lease.name, "kind": lease.kind, "vault_lease_id": lease.vault_lease_id}
                    record(
                        session, self._clock, "lease.issued", view.workload, lease=lease,
                        detail={**detail, "via": "gateway", "replica": self.replica},
                    )  # fmt: skip
                    insert_gateway_lease(session, lease)
        except DatabaseUnavailable:
            recorded = False
        if not recorded:
            if secret is not None:
                self._revoke_quietly(secret)
            if token is not None or lease.revoke_kind == "token":
                self._revoke_token_by_accessor(token.accessor if token is not None else lease.revoke_ref)
            raise Refusal(INVALID_AUTHORIZATION, "the task this handle belongs to has ended")
        return lease.expires_at

    def _token_lease(self, view: HandleView, issuance: str, token: TaskToken) -> Lease:
        # Named after the credential's lease so it sorts after it: the task's end revokes the
        # credential (synchronously) before the token that created it.
        return self._lease(view, f"{issuance}:token", "gateway_token", "token", token.accessor, None)

    def _credential_lease(self, view: HandleView, issuance: str, secret: IssuedSecret) -> Lease:
        lease = self._lease(
            view, issuance, view.kind, secret.handle.kind, secret.handle.ref, secret.vault_lease_id
        )
        lease.expires_at = min(secret.expires_at, lease.expires_at)
        return lease

    def _lease(
        self, view: HandleView, name: str, kind: str, revoke_kind: str, ref: str, vault_lease_id: str | None
    ) -> Lease:
        assert view.expires_at is not None
        return Lease(
            id=uuid.uuid4(), task_id=view.task_id, task=view.task, name=name, kind=kind,
            workload=view.workload, owner=view.owner, purpose=view.purpose, state="active",
            issued_at=self._clock.now(), expires_at=view.expires_at, revoke_attempts=0,
            revoke_kind=revoke_kind, revoke_ref=ref, vault_lease_id=vault_lease_id,
        )  # fmt: skip

    def _issue_failed(self, view: HandleView, what: str) -> None:
        self._audit.queue_event(
            "gateway.issue_failed", view.workload, task_id=view.task_id, owner=view.owner,
            purpose=view.purpose, detail={"name": view.name, "what": what, "replica": self.replica},
        )  # fmt: skip

    def _revoke_quietly(self, secret: IssuedSecret) -> None:
        try:
            self._vault.revoke(secret.handle)
        except VaultError:
            log.warning("gateway: a credential of a task that ended could not be revoked; its token goes")

    def _revoke_token(self, token: TaskToken) -> None:
        self._revoke_token_by_accessor(token.accessor)

    def _revoke_token_by_accessor(self, accessor: str) -> None:
        try:
            self._vault.revoke_task_token(accessor)
        except VaultError:
            log.warning("gateway: a task token could not be revoked; it is on record and goes with its task")

    # ---- the Vault API (docs/gateway.md, "Vault API") -----------------------------------
    # The real token behind a Vault handle, issued on its first request as `_issue` issues a
    # database credential (a task token of this replica's own, recorded, then the child
    # token, recorded), held in memory only; and the task's request rules.

    def vault_token(self, view: HandleView) -> HeldToken:
        """The token this replica relays `view`'s requests with; issued on first use.
        Refusal for an ended task or a failed issue."""
        return self._held(view, self._vault_tokens, self._issue_vault_token)

    def request_rules(self, view: HandleView) -> RequestRules:
        """The rules as the current policy compiled them at load; none means refuse all."""
        try:
            rules = self._policies.current().task(view.task).requests.get(view.name)
        except UnknownTask:
            rules = None
        return rules if rules is not None else _refuse_all_requests()

    def judge(self, view: HandleView, method: str, path: str) -> RequestVerdict:
        return self.request_rules(view).evaluate(method, path)

    def vault_token_tasks(self) -> dict[uuid.UUID, datetime]:
        """The tasks this replica holds Vault tokens for, each with its earliest expiry."""
        with self._lock:
            held: dict[uuid.UUID, datetime] = {}
            for (task_id, _), token in self._vault_tokens.items():
                held[task_id] = min(token.expires_at, held.get(task_id, token.expires_at))
            return held

    def can_audit(self) -> bool:
        return self._audit.has_room()

    def requested(self, view: HandleView, detail: Mapping[str, Any]) -> None:
        """One request through the Vault API, relayed or not (`gateway.request`)."""
        self._audit.queue_event(
            "gateway.request", view.workload, task_id=view.task_id, owner=view.owner,
            purpose=view.purpose, detail={**detail, "replica": self.replica},
        )  # fmt: skip

    def _vault_spec(self, view: HandleView) -> VaultTokenCredential:
        try:
            spec = self._policies.current().task(view.task).credentials.get(view.name)
        except UnknownTask:
            spec = None
        if not isinstance(spec, VaultTokenCredential) or not spec.via_gateway:
            raise Refusal(INVALID_AUTHORIZATION, "the policy no longer gives this task a gateway credential")
        return spec

    def _issue_vault_token(self, view: HandleView) -> HeldToken:
        secret, expires_at = self._issue_recorded(view, self._vault_spec(view), "vault token")
        return HeldToken(token=str(secret.data["token"]), expires_at=expires_at)

    # ---- HTTP (docs/gateway.md, "HTTP") -------------------------------------------------
    # A `lease` credential behind an HTTP handle: issued on the handle's first request as a
    # Vault token is, and held as the one header its requests are sent with.

    def http_header(self, view: HandleView) -> HeldHeader:
        """The upstream and header this replica sends `view`'s requests with; issued on
        first use. Refusal for an ended task, a failed issue or a lease without the fields
        the template names."""
        return self._held(view, self._http_headers, self._issue_http_header)

    def http_tasks(self) -> dict[uuid.UUID, datetime]:
        """The tasks this replica holds HTTP headers for, each with its earliest expiry."""
        with self._lock:
            held: dict[uuid.UUID, datetime] = {}
            for (task_id, _), header in self._http_headers.items():
                held[task_id] = min(header.expires_at, held.get(task_id, header.expires_at))
            return held

    def _http_spec(self, view: HandleView) -> LeaseCredential:
        try:
            spec = self._policies.current().task(view.task).credentials.get(view.name)
        except UnknownTask:
            spec = None
        if not isinstance(spec, LeaseCredential) or not spec.via_gateway or spec.gateway is None:
            raise Refusal(INVALID_AUTHORIZATION, "the policy no longer gives this task a gateway credential")
        return spec

    def _issue_http_header(self, view: HandleView) -> HeldHeader:
        spec = self._http_spec(view)
        assert spec.gateway is not None
        name, template, fields = spec.gateway.template()
        secret, expires_at = self._issue_recorded(view, spec, "credential")
        filled: dict[str, str] = {}
        for field_name in fields:
            value = secret.data.get(field_name)
            # A header can't carry a line break (request smuggling) or a non-string value.
            if not isinstance(value, str | int) or any(ord(ch) < 0x20 for ch in str(value)):
                self._issue_failed(view, "header field")
                raise Refusal(INVALID_AUTHORIZATION, "the credential lacks a field its header names")
            filled[field_name] = str(value)
        value = template
        for field_name, field_value in filled.items():
            value = value.replace("{data." + field_name + "}", field_value)
        secrets_ = tuple(sorted({v for v in filled.values() if v} | {value}, key=len, reverse=True))
        return HeldHeader(spec.gateway.upstream, name, value, secrets_, expires_at)

    # ---- statements --------------------------------------------------------------------

    def inspect(self, view: HandleView, sql: str) -> StatementVerdict:
        """Whether `sql` may run; every statement in it is audited, allowed or not."""
        decision = check(sql, self._rules_for(view))
        for item in decision.statements:
            detail: dict[str, Any] = {
                "command": item.command,
                "tables": list(item.tables),
                "statement": item.normalised,
                "allowed": item.allowed,
            }
            if item.rule is not None:
                detail["rule"] = item.rule
            if not self._audit.queue_event(
                "gateway.statement", view.workload, task_id=view.task_id, owner=view.owner,
                purpose=view.purpose, detail=detail,
            ):  # fmt: skip
                return StatementVerdict(
                    False, "audit", "the gateway can't record statements now; nothing ran"
                )
        if decision.allowed:
            return StatementVerdict(True, None, "")
        return StatementVerdict(
            False, decision.rule, f"refused by the task's statement rule {decision.rule!r}"
        )

    def _rules_for(self, view: HandleView) -> StatementRules:
        """The rules as the current policy compiled them at load; none means refuse all."""
        try:
            rules = self._policies.current().task(view.task).statements.get(view.name)
        except UnknownTask:
            rules = None
        return rules if rules is not None else _refuse_all()

    # ---- sessions ----------------------------------------------------------------------

    def connected(self, view: HandleView, detail: Mapping[str, Any]) -> None:
        self._audit.queue_event(
            "gateway.connect", view.workload, task_id=view.task_id, owner=view.owner,
            purpose=view.purpose, detail={**detail, "replica": self.replica},
        )  # fmt: skip

    def disconnected(self, view: HandleView, reason: str) -> None:
        self._audit.queue_event(
            "gateway.disconnect", view.workload, task_id=view.task_id, owner=view.owner,
            purpose=view.purpose, detail={"reason": reason, "replica": self.replica},
        )  # fmt: skip

    def ended(self, task_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
        """Of the tasks this replica serves, the ended ones; raises when the ledger is away."""
        with unit_of_work(self._sessions) as session:
            return ended_tasks(session, list(task_ids))


@functools.cache
def _refuse_all() -> StatementRules:
    """For a credential the policy no longer delivers through the gateway: nothing passes."""
    return compile_statement_rules([{"name": "no-longer-in-the-policy", "when": "false"}])
