"""The broker's long-lived collaborators, built once per process from Settings.

Nothing here runs at import time; `build_services` is called by the app factory, the
scheduler and the CLI, each after any fork, so no connection pool crosses a fork.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from broker import tracing
from broker.approvals.notify import Notifier
from broker.approvals.service import ApprovalService
from broker.audit import AuditRecorder
from broker.clock import Clock, SystemClock
from broker.config import Settings
from broker.db import make_engine, make_session_factory
from broker.gateway.handles import GatewayAddress
from broker.identity import Verifier
from broker.identity.replay import PostgresJtiStore
from broker.leases.revoker import Backoff, Revoker
from broker.operator.service import OperatorService
from broker.policy import PolicyStore
from broker.tasks.service import TaskService
from broker.tasks.token_pool import TaskTokenPool
from broker.vault import VaultGateway

# Set by `broker serve` for its workers and scheduler: where the last policy that loaded is kept.
LAST_GOOD_POLICY_ENV = "BROKER_POLICY_LAST_GOOD"


@dataclass
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    verifier: Verifier
    policies: PolicyStore
    vault: VaultGateway
    clock: Clock
    revoker: Revoker
    tasks: TaskService
    approvals: ApprovalService
    operator: OperatorService
    audit_key: bytes | None
    notifier: Notifier
    token_pool: TaskTokenPool

    def close(self) -> None:
        self.token_pool.close()
        self.verifier.close()
        self.vault.close()
        self.engine.dispose()


def gateway_address(settings: Settings) -> GatewayAddress | None:
    """What this broker's handles name, or None: without a gateway it issues none."""
    gateway = settings.gateway
    if gateway is None:
        return None
    return GatewayAddress(
        gateway.advertise_host,
        gateway.advertise_port or gateway.postgres_port,
        gateway.require_tls,
        http_port=gateway.advertise_http_port or gateway.http_port,
    )


def build_services(settings: Settings, *, clock: Clock | None = None, pool_size: int = 10) -> Services:
    clock = clock or SystemClock()
    tracing.configure(settings.tracing)
    engine = make_engine(settings.sqlalchemy_url, pool_size=pool_size)
    sessions = make_session_factory(engine)
    audit_key = settings.audit.key_bytes
    AuditRecorder(audit_key).install(sessions)
    verifier = Verifier(
        settings.issuers,
        clock_skew_seconds=settings.limits.clock_skew_seconds,
        max_token_bytes=settings.limits.max_token_bytes,
        jti_store=PostgresJtiStore(engine),
        operator_groups=settings.operators.groups,
    )
    last_good = os.environ.get(LAST_GOOD_POLICY_ENV)
    policies = PolicyStore(settings.policy_file, last_good=Path(last_good) if last_good else None)
    vault = VaultGateway(settings.vault, clock=clock)
    backoff = Backoff(settings.scheduler.retry_base_seconds, settings.scheduler.retry_max_seconds)
    revoker = Revoker(vault, clock, backoff)
    notifier = Notifier(settings.notify)
    token_pool = TaskTokenPool(
        vault,
        clock,
        sessions=sessions,
        depth=settings.vault.task_token_pool,
        reuse=settings.vault.task_token_reuse,
        lease_seconds=settings.vault.task_token_lease_seconds,
    )
    return Services(
        settings=settings,
        engine=engine,
        sessions=sessions,
        verifier=verifier,
        policies=policies,
        vault=vault,
        clock=clock,
        revoker=revoker,
        tasks=TaskService(
            sessions, policies, vault, clock, revoker, notifier, token_pool, gateway_address(settings)
        ),
        approvals=ApprovalService(sessions, policies, clock, notifier),
        operator=OperatorService(sessions, revoker, clock),
        audit_key=audit_key,
        notifier=notifier,
        token_pool=token_pool,
    )
