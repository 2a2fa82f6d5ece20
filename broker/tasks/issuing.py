"""Issuing a task's credentials, all or nothing: shared by a start and by the claim of an
approved task.

The order is the broker's central promise (docs/security.md, "All or nothing" and
"Record before release"):
  1. the task is recorded (`issuing`) with its own Vault token's accessor, in the
     caller's transaction, before anything is issued with that token;
  2. every credential is issued with that token; if one fails, the ones issued are
     revoked (and the token with them) before the error is returned;
  3. the leases are committed, and only then are the secrets handed out.
A crash anywhere after 1 leaves an accessor the reconciler revokes, and with the token
Vault revokes every lease it issued, recorded or not.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.attributes import set_committed_value

from broker import lifecycle, metrics
from broker.audit import record
from broker.clock import Clock, rfc3339
from broker.credentials import CredentialSpec, DatabaseCredential, LeaseCredential, VaultTokenCredential
from broker.db import DatabaseUnavailable, unit_of_work
from broker.errors import Conflict, IssuanceFailed
from broker.gateway.handles import (
    GatewayAddress,
    NewHandle,
    database_handle,
    http_handle,
    new_handle,
    new_vault_handle,
    vault_handle,
)
from broker.identity import Identity
from broker.ledger import activate_with_leases, load_task
from broker.models import GatewayHandle, Lease, Task
from broker.policy import CompiledTask, TaskRequest
from broker.tasks.token_pool import TaskTokenPool
from broker.vault import IssuedSecret, TaskToken, VaultError, VaultGateway, VaultUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IssuedCredential:
    name: str
    kind: str
    data: Mapping[str, Any]
    expires_at: datetime
    # `gateway`: `data` is a handle for the broker's gateway, not the credential itself.
    delivery: Literal["direct", "gateway"] = "direct"


def deadline(now: datetime, ttl_seconds: int) -> datetime:
    """When a task that becomes active at `now` expires."""
    return now + timedelta(seconds=ttl_seconds)


def earliest(secret_expires_at: datetime, task_expires_at: datetime | None) -> datetime:
    """A credential is good until the earlier of its secret's and its task's expiry."""
    return min(secret_expires_at, task_expires_at) if task_expires_at else secret_expires_at


class TokenHold:
    """The task token a start or a claim holds while its transaction records it.

    `Issuer.compensating` revokes it if that transaction fails; a start that ends up
    issuing nothing gives it back to the pool. At most one token: a start takes it before
    the workload's lock when the first look says it will issue, or under the lock when
    the decision there disagrees (a policy reload in between)."""

    __slots__ = ("_token",)

    def __init__(self) -> None:
        self._token: TaskToken | None = None

    @property
    def token(self) -> TaskToken | None:
        return self._token

    def keep(self, token: TaskToken) -> TaskToken:
        if self._token is not None:
            raise RuntimeError("a start holds one task token")
        self._token = token
        return token


class Issuer:
    """Creates task tokens and issues credentials with them; see the module docstring."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        vault: VaultGateway,
        clock: Clock,
        tokens: TaskTokenPool,
        gateway: GatewayAddress | None = None,
    ) -> None:
        self._sessions = sessions
        self._vault = vault
        self._clock = clock
        self._tokens = tokens
        self._gateway = gateway

    def issue(
        self, task: Task, token: TaskToken, workload: str, compiled: CompiledTask, *, actor: str
    ) -> tuple[Task, dict[str, IssuedCredential]]:
        specs = compiled.credentials
        handles = self._handles(task, specs, actor)
        issued: dict[str, IssuedSecret] = {}
        try:
            for name, spec in specs.items():
                if name in handles:  # the gateway issues it when its handle first connects
                    continue
                issued[name] = self._vault.issue(
                    token, spec, ttl_seconds=task.ttl_seconds, task_id=str(task.id), workload=workload
                )
        except VaultError as error:
            self._abandon(task, token.accessor, issued, error, actor)
            if isinstance(error, VaultUnavailable):
                raise
            raise IssuanceFailed("Vault refused one of the task's credentials; nothing was issued") from None
        active = self._commit_leases(task, specs, issued, token, actor, handles)
        assert active.expires_at is not None
        self._tokens.lend(
            active.id,
            token,
            task=compiled.name,
            specs=specs,
            ttl_max=compiled.ttl_max,
            until=active.expires_at,
        )
        credentials = {
            name: IssuedCredential(
                name=name,
                kind=specs[name].kind,
                data=secret.data,
                expires_at=earliest(secret.expires_at, task.expires_at),
            )
            for name, secret in issued.items()
        }
        for name, handle in handles.items():
            spec = specs[name]
            assert self._gateway is not None
            if isinstance(spec, VaultTokenCredential):
                data = vault_handle(handle, self._gateway)
            elif isinstance(spec, LeaseCredential):
                data = http_handle(handle, self._gateway)
            else:
                assert isinstance(spec, DatabaseCredential)
                data = database_handle(handle, spec, self._gateway)
            credentials[name] = IssuedCredential(
                name=name,
                kind=spec.kind,
                data=data,
                expires_at=active.expires_at,
                delivery="gateway",
            )
        return active, {name: credentials[name] for name in specs}

    def _handles(self, task: Task, specs: Mapping[str, CredentialSpec], actor: str) -> dict[str, NewHandle]:
        """A handle for each gateway credential; refused before anything is issued when this
        broker has no gateway to serve them."""
        wanted = [
            name for name, spec in specs.items() if isinstance(spec, DatabaseCredential) and spec.via_gateway
        ]
        if wanted and self._gateway is None:
            self._mark_failed(task, "a gateway credential, and no gateway configured", actor)
            raise IssuanceFailed(
                "the task has a gateway credential and this broker has no gateway configured"
            )
        vault = [
            name
            for name, spec in specs.items()
            if isinstance(spec, VaultTokenCredential) and spec.via_gateway
        ]
        if vault and (self._gateway is None or self._gateway.http_port is None):
            self._mark_failed(task, "a Vault gateway credential, and no gateway.http_bind", actor)
            raise IssuanceFailed(
                "the task has a Vault gateway credential and this broker's gateway serves no Vault API"
            )
        http = [
            name for name, spec in specs.items() if isinstance(spec, LeaseCredential) and spec.via_gateway
        ]
        if http and (self._gateway is None or self._gateway.http_port is None):
            self._mark_failed(task, "an HTTP gateway credential, and no gateway.http_bind", actor)
            raise IssuanceFailed(
                "the task has an HTTP gateway credential and this broker's gateway serves no HTTP"
            )
        # An HTTP handle is checked as a Vault handle is (sha256$, constant time).
        return (
            {name: new_handle() for name in wanted}
            | {name: new_vault_handle() for name in vault}
            | {name: new_vault_handle() for name in http}
        )

    def take_token(
        self, identity: Identity, request: TaskRequest, compiled: CompiledTask, ttl: int
    ) -> TaskToken:
        ready = self._tokens.take_ready(
            task=compiled.name, specs=compiled.credentials, ttl_max=compiled.ttl_max, ttl_needed=ttl
        )
        if ready is not None:
            return ready
        # Nothing ready: Vault will be asked. Make sure the ledger answers first, so that a
        # start without its database never reaches Vault at all (docs/security.md, "Fail closed").
        self._ping_database()
        try:
            return self.token_for(compiled, ttl)
        except (VaultUnavailable, IssuanceFailed) as error:
            reason = error.detail if isinstance(error, IssuanceFailed) else str(error)
            self._record_start_failure(identity, request, f"task token: {reason}")
            raise

    def _ping_database(self) -> None:
        with self._uow() as session:
            session.execute(text("SELECT 1"))

    def token_for(self, compiled: CompiledTask, ttl: int) -> TaskToken:
        try:
            return self._tokens.take(
                task=compiled.name, specs=compiled.credentials, ttl_max=compiled.ttl_max, ttl_needed=ttl
            )
        except VaultError as error:
            # Refused to create a task token means our own token is gone or misconfigured:
            # to the caller that is the same as Vault being unavailable.
            if isinstance(error, VaultUnavailable):
                raise
            if error.status == 403:
                raise VaultUnavailable("create task token", "the broker's own token was refused") from None
            raise IssuanceFailed("Vault refused to create the task's token") from None

    def _record_start_failure(self, identity: Identity, request: TaskRequest, reason: str) -> None:
        try:
            with self._uow() as session:
                record(
                    session, self._clock, "task.start_failed", identity.id, owner=request.owner,
                    purpose=request.purpose, detail={"task": request.task, "reason": reason[:500]},
                )  # fmt: skip
        except DatabaseUnavailable:
            log.warning("could not record a failed start of %s", request.task)

    @contextmanager
    def compensating(self, hold: TokenHold) -> Iterator[None]:
        """If the transaction that records the held token's accessor fails, revoke the token
        (and drop its pool row, or, if Vault would not revoke it, leave that to the scheduler)."""
        try:
            yield
        except BaseException:
            if hold.token is not None:
                failed = self._revoke_quietly(hold.token.accessor, {})
                self._tokens.revoked(hold.token, ok=not failed)
            raise

    def _commit_leases(
        self,
        task: Task,
        specs: Mapping[str, CredentialSpec],
        issued: Mapping[str, IssuedSecret],
        token: TaskToken,
        actor: str,
        handles: Mapping[str, NewHandle],
    ) -> Task:
        try:
            with self._uow() as session:
                now = self._clock.now()
                leases = [
                    _lease_row(task, name, specs[name].kind, secret, now) for name, secret in issued.items()
                ]
                for lease, secret in zip(leases, issued.values(), strict=True):
                    record(
                        session,
                        self._clock,
                        "lease.issued",
                        actor,
                        lease=lease,
                        detail={
                            "name": lease.name,
                            "kind": lease.kind,
                            "vault_lease_id": secret.vault_lease_id,
                        },
                    )
                    metrics.LEASES_ISSUED.labels(lease.kind).inc()
                for name, handle in handles.items():
                    record(
                        session,
                        self._clock,
                        "gateway.handle_issued",
                        actor,
                        task=task,
                        detail={"name": name, "kind": specs[name].kind, "handle": handle.id},
                    )
                record(
                    session,
                    self._clock,
                    "task.started",
                    actor,
                    task=task,
                    detail={"credentials": sorted(specs), "expires_at": rfc3339(task.expires_at)},
                )
                # No load and lock of the task: the move to active is guarded by its state,
                # so if a finish or the kill switch ended it meanwhile, nothing is written.
                rows = [_handle_row(task, name, specs[name].kind, handle) for name, handle in handles.items()]
                if not activate_with_leases(session, task.id, leases, rows):
                    raise Conflict("the task ended while its credentials were being issued")
                lifecycle.activate(task)
            # The task object is detached now; give it its leases without a load.
            set_committed_value(task, "leases", sorted(leases, key=lambda lease: lease.name))
            return task
        except (DatabaseUnavailable, Conflict):
            # Record before release: without committed leases, nothing leaves the broker.
            self._revoke_quietly(token.accessor, issued)
            raise
        except Exception:
            self._revoke_quietly(token.accessor, issued)
            raise

    def _abandon(
        self, task: Task, accessor: str, issued: Mapping[str, IssuedSecret], error: VaultError, actor: str
    ) -> None:
        """All or nothing (docs/contract.md §6.1): revoke what was issued before the error is returned."""
        leftovers = self._revoke_quietly(accessor, issued)
        self._mark_failed(task, f"issuing failed: {error}", actor, token_revoked=not leftovers)

    def _revoke_quietly(self, accessor: str, issued: Mapping[str, IssuedSecret]) -> list[str]:
        """Best effort; what stays alive is left to the reconciler (the accessor is on record)."""
        failed = []
        for name, secret in issued.items():
            try:
                self._vault.revoke(secret.handle)
            except VaultError:
                failed.append(name)
        try:
            self._vault.revoke_task_token(accessor)
        except VaultError:
            failed.append("(task token)")
        if failed:
            log.warning("compensating revoke incomplete: %s", ", ".join(failed))
        return failed

    def _mark_failed(self, task: Task, reason: str, actor: str, *, token_revoked: bool = False) -> None:
        try:
            with self._uow() as session:
                row = load_task(session, task.id, lock=True)
                now = self._clock.now()
                if row is None or not lifecycle.fail(row, at=now, reason=reason):
                    return
                if token_revoked and row.token_accessor:
                    row.token_revoked_at = now
                record(session, self._clock, "task.failed", actor, task=row, detail={"reason": reason[:500]})
            lifecycle.fail(task, at=now, reason=reason)  # the caller's copy says so too
        except DatabaseUnavailable:
            log.warning("could not record failure of task %s; the reconciler will", task.id)
        metrics.TASKS_FINISHED.labels("failed").inc()

    def _uow(self) -> AbstractContextManager[Session]:
        return unit_of_work(self._sessions)


def _handle_row(task: Task, name: str, kind: str, handle: NewHandle) -> GatewayHandle:
    return GatewayHandle(id=handle.id, task_id=task.id, name=name, kind=kind, verifier=handle.verifier)


def _lease_row(task: Task, name: str, kind: str, secret: IssuedSecret, now: datetime) -> Lease:
    return Lease(
        id=uuid.uuid4(),
        task_id=task.id,
        task=task.task,
        name=name,
        kind=kind,
        workload=task.workload,
        owner=task.owner,
        purpose=task.purpose,
        state="active",
        issued_at=now,
        expires_at=earliest(secret.expires_at, task.expires_at),
        revoke_attempts=0,
        revoke_kind=secret.handle.kind,
        revoke_ref=secret.handle.ref,
        vault_lease_id=secret.vault_lease_id,
    )
