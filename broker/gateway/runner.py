"""`broker gateway`: the Postgres wire protocol for gateway credentials, as one process.

One asyncio loop serves every session (`broker.gateway.pgproxy`); what blocks (the
ledger, Vault) runs in worker threads through `GatewayService`. Besides the sessions, the
process runs:
- the LISTEN thread (`listener.TaskEndListener`), which closes a task's sessions as soon
  as the ledger records the task's end, on whichever replica it was ended;
- a recheck every `gateway.recheck_seconds`, which closes the sessions of tasks that
  ended unheard (a notification missed while reconnecting) and of tasks past their
  deadline, by the process's own clock, even with the ledger away;
- the audit writer (`events.AuditBatch`);
- with `gateway.http_bind`, the Vault API for `vault_token` gateway credentials
  (`vaultapi.VaultAPIServer`, threads of its own).
SIGTERM closes every session (57P01), writes the queued audit events and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import threading
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime

from sqlalchemy.engine import make_url

from broker.clock import Clock, SystemClock
from broker.config import Settings
from broker.db import make_engine, make_session_factory
from broker.gateway import pgproxy
from broker.gateway.events import AuditBatch
from broker.gateway.listener import TaskEndListener
from broker.gateway.pgproxy import GatewayServer, Login, Refusal, Upstream, Verdict
from broker.gateway.scram import Verifier
from broker.gateway.service import GatewayService, UpstreamLogin
from broker.gateway.service import Refusal as ServiceRefusal
from broker.gateway.vaultapi import VaultAPIServer
from broker.ledger.gateway import HandleView

log = logging.getLogger(__name__)


class BrokerHooks:
    """The wire protocol's hooks (`pgproxy.Hooks`) over the broker's `GatewayService`."""

    def __init__(self, service: GatewayService, clock: Clock) -> None:
        self._service = service
        self._clock = clock
        # Task id -> its deadline, for the sessions this process serves.
        self.deadlines: dict[str, datetime] = {}

    async def lookup(self, user: str, database: str) -> Login | None:
        with _as_protocol_refusal():
            view = await asyncio.to_thread(self._service.find, user)
        if view is None or view.kind != "database":  # a Vault handle is no Postgres login
            return None
        return Login(key=str(view.task_id), verifier=Verifier.from_string(view.verifier), context=view)

    async def open_upstream(self, login: Login) -> Upstream:
        view: HandleView = login.context
        with _as_protocol_refusal():
            made = await asyncio.to_thread(self._service.login, view)
        if view.expires_at is not None:
            self.deadlines[login.key] = view.expires_at
        self._service.connected(view, {"handle": view.id})
        return _upstream(made)

    def inspect(self, login: Login, sql: str) -> Verdict:
        verdict = self._service.inspect(login.context, sql)
        return Verdict.allow() if verdict.allowed else Verdict.refuse(verdict.message)

    async def closed(self, login: Login, reason: str) -> None:
        self._service.disconnected(login.context, reason)

    def event(self, kind: str, login: Login | None, detail: Mapping[str, str]) -> None:
        if kind == "auth_failed":
            handle = detail.get("user", "")
            why = "wrong secret" if detail.get("known") == "true" else "unknown handle"
            view = login.context if login is not None else None
            self._service.refused(handle, view, why)


@contextlib.contextmanager
def _as_protocol_refusal() -> Iterator[None]:
    """The service's refusals, as the wire protocol sends them (its SQLSTATE and phrase)."""
    try:
        yield
    except ServiceRefusal as refusal:
        raise Refusal(refusal.sqlstate, refusal.message) from None


def _upstream(made: UpstreamLogin) -> Upstream:
    context: ssl.SSLContext | None = None
    if made.sslmode == "verify-full":
        context = ssl.create_default_context()
    elif made.sslmode == "require":
        # Encrypted, the server's certificate not checked: libpq's own `require`.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return Upstream(made.host, made.port, made.dbname, made.user, made.password, ssl=context)


def _tls(settings: Settings) -> ssl.SSLContext | None:
    gateway = settings.gateway
    assert gateway is not None
    if gateway.tls_cert_file is None or gateway.tls_key_file is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(gateway.tls_cert_file), str(gateway.tls_key_file))
    return context


def libpq_dsn(database_url: str) -> str:
    """The SQLAlchemy URL as psycopg's own connect takes it (for the LISTEN connection)."""
    url = make_url(database_url)
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class GatewayProcess:
    """The gateway's parts, started and stopped together (tests run one in a thread)."""

    def __init__(self, settings: Settings, *, clock: Clock | None = None) -> None:
        from broker.audit import AuditRecorder
        from broker.policy import PolicyStore
        from broker.vault import VaultGateway

        assert settings.gateway is not None
        self.settings = settings
        self.clock = clock or SystemClock()
        self.engine = make_engine(settings.sqlalchemy_url, pool_size=8)
        sessions = make_session_factory(self.engine)
        AuditRecorder(settings.audit.key_bytes).install(sessions)
        self.policies = PolicyStore(settings.policy_file)
        self.vault = VaultGateway(settings.vault, clock=self.clock)
        self.audit = AuditBatch(sessions, self.clock, settings.gateway.audit_flush_seconds)
        self.service = GatewayService(sessions, self.vault, self.policies, self.clock, self.audit)
        self.hooks = BrokerHooks(self.service, self.clock)
        self.server = GatewayServer(
            settings.gateway.postgres_host,
            settings.gateway.postgres_port,
            self.hooks,
            tls=_tls(settings),
            require_tls=settings.gateway.require_tls,
        )
        self.vault_api = vault_api_server(settings, self.service)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self.listener = TaskEndListener(libpq_dsn(settings.database_url), self._heard, self._recheck_soon)
        self._recheck_now: asyncio.Event | None = None

    # ---- running -----------------------------------------------------------------------

    async def serve(self, ready: threading.Event | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._recheck_now = asyncio.Event()
        self.audit.start()
        await self.server.start()
        if self.vault_api is not None:
            self.vault_api.start()
        self.listener.start()
        log.info("gateway %s: Postgres wire protocol on %s", self.service.replica, self.settings.gateway)
        if ready is not None:
            ready.set()
        recheck = asyncio.create_task(self._recheck_forever())
        try:
            await self._stopping.wait()
        finally:
            recheck.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recheck
            await self.server.stop()
            if self.vault_api is not None:
                await asyncio.to_thread(self.vault_api.stop)
            self.listener.stop()
            self.audit.close()
            self.vault.close()
            self.engine.dispose()

    def stop(self) -> None:
        """From any thread."""
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    # ---- ends of tasks -----------------------------------------------------------------

    def _heard(self, task_id: uuid.UUID) -> None:
        """A notification, on the listener's thread."""
        self.service.forget(task_id)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._close, str(task_id), "task ended")

    def _recheck_soon(self) -> None:
        if self._loop is not None and self._recheck_now is not None:
            self._loop.call_soon_threadsafe(self._recheck_now.set)

    def _close(self, key: str, reason: str) -> None:
        closed = self.server.close_key(key, reason)
        self.hooks.deadlines.pop(key, None)
        if closed:
            log.info("gateway: closed %d session(s) of task %s (%s)", closed, key, reason)

    async def _recheck_forever(self) -> None:
        assert self._recheck_now is not None and self.settings.gateway is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.gateway.recheck_seconds):
                    await self._recheck_now.wait()
            self._recheck_now.clear()
            await self._recheck()
            await self._recheck_vault_tokens()

    async def _recheck_vault_tokens(self) -> None:
        """Forget the Vault tokens of tasks that ended unheard, or are past their deadline by
        this process's clock; a request would be refused anyway, but the value goes."""
        held = self.service.vault_token_tasks()
        for task_id, expires_at in self.service.http_tasks().items():  # HTTP headers too
            held[task_id] = min(expires_at, held.get(task_id, expires_at))
        if not held:
            return
        now = self.clock.now()
        for task_id, expires_at in held.items():
            if expires_at <= now:
                self.service.forget(task_id)
        live = [task_id for task_id, expires_at in held.items() if expires_at > now]
        if not live:
            return
        try:
            ended = await asyncio.to_thread(self.service.ended, live)
        except Exception as error:
            log.warning("gateway: could not recheck its Vault tokens (%s)", type(error).__name__)
            return
        for task_id in ended:
            self.service.forget(task_id)

    async def _recheck(self) -> None:
        keys = {session.key for session in self.server.sessions() if session.key is not None}
        now = self.clock.now()
        for key in keys:
            deadline = self.hooks.deadlines.get(key)
            if deadline is not None and deadline <= now:  # no database needed for this one
                self.service.forget(uuid.UUID(key))
                self._close(key, "task deadline")
        live = [uuid.UUID(key) for key in keys if key in self.hooks.deadlines]
        if not live:
            return
        try:
            ended = await asyncio.to_thread(self.service.ended, live)
        except Exception as error:
            log.warning(
                "gateway: could not recheck its tasks (%s); deadlines still apply", type(error).__name__
            )
            return
        for task_id in ended:
            self.service.forget(task_id)
            self._close(str(task_id), "task ended")


def vault_api_server(settings: Settings, service: GatewayService) -> VaultAPIServer | None:
    """The Vault API, when `gateway.http_bind` asks for one."""
    gateway = settings.gateway
    assert gateway is not None
    if gateway.http_host is None or gateway.http_port is None:
        return None
    return VaultAPIServer(gateway.http_host, gateway.http_port, service, settings.vault)


def run_gateway(settings: Settings, hup_seen: threading.Event | None = None) -> None:
    """`broker gateway`: serve until SIGTERM or SIGINT; SIGHUP reloads the policy."""
    process = GatewayProcess(settings)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, process.stop)
        loop.add_signal_handler(signal.SIGHUP, process.policies.reload)
        if hup_seen is not None and hup_seen.is_set():
            process.policies.reload()
        await process.serve()

    asyncio.run(main())
    log.info("gateway stopped")


__all__ = ["BrokerHooks", "GatewayProcess", "Refusal", "libpq_dsn", "pgproxy", "run_gateway"]
