"""The Postgres gateway: one session per client connection, and the server that runs them.

An agent connects with a handle: the startup `user` is the handle id, the password its
secret. The gateway checks the secret by SCRAM-SHA-256 against the handle's verifier
(`Hooks.lookup`), logs in upstream with the real credential (`Hooks.open_upstream`), then
relays both directions, showing every Query and Parse to `Hooks.inspect` first.

Refusing a statement without breaking the protocol: the refused message is not forwarded.
In its place goes a poison statement, `SELECT broker_refused_<nonce>()`, that the server
rejects at parse analysis with an error naming the fresh random nonce (as a Query for a
Query or a FunctionCall, as a Parse with the same statement name for a Parse). The server
then answers with a real ErrorResponse at exactly the right point in the stream, fails the
transaction and skips to Sync as it would for any error, so pipelines, implicit
transactions and transaction blocks stay in step with the client. On the way back, only
an ErrorResponse that names a pending nonce is rewritten into the gateway's own error.

Startup parameters: `user`, `database` (default: the user) go to `Hooks.lookup`;
`application_name`, `datestyle`, `timezone`, `extra_float_digits` and `intervalstyle` are
forwarded; `client_encoding` must be UTF8 (or SQL_ASCII, which libpq sends in a C locale
and which treats bytes as opaque); `replication` and `options` are refused; `_pq_.*`
options are declined with NegotiateProtocolVersion; any other parameter is ignored.

Threading: everything here runs on one asyncio loop. `GatewayServer.close_key` and
`close_all` are plain functions that must run on that loop: from another thread call
`close_key_threadsafe` (or `loop.call_soon_threadsafe(server.close_key, key, reason)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import scramp

from broker.gateway import pgwire
from broker.gateway.pgwire import ProtocolError
from broker.gateway.scram import MECHANISM, ScramError, ScramExchange, Verifier, fake_verifier

log = logging.getLogger(__name__)

_READ_LIMIT = 256 * 1024  # per-connection read buffer before we stop reading the socket
_MAX_AUTH_MESSAGE = 10_000
_MAX_UPSTREAM_STARTUP_MESSAGE = 1024 * 1024
_POISON_PREFIX = b"broker_refused_"
_NONCE_HEX = 32

FORWARDED_PARAMS = ("application_name", "datestyle", "timezone", "extra_float_digits", "intervalstyle")
_UTF8_NAMES = frozenset({"UTF8", "UNICODE", "SQLASCII"})
# The statement rules assume the server lexes SQL as they do (pglast: scs=on, UTF-8).
_PINNED = {"standard_conforming_strings": "on", "client_encoding": "UTF8"}


# ---------------------------------------------------------------------------------------
# What the broker plugs in


class Refusal(Exception):
    """Refuse the connection or the statement: `message` goes to the client as is."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


@dataclass(frozen=True)
class Login:
    """A handle the hooks recognised.

    `key` groups its sessions (e.g. the task id: `close_key(key)` closes them all);
    `context` is anything the hooks want handed back to them.
    """

    key: str
    verifier: Verifier
    context: Any = None


@dataclass(frozen=True)
class Upstream:
    """Where and as whom the gateway logs in for a Login. `ssl` set: TLS or nothing."""

    host: str
    port: int
    dbname: str
    user: str
    password: str = field(repr=False)
    ssl: ssl.SSLContext | None = None
    server_hostname: str | None = None  # for certificate checks; default: `host`


@dataclass(frozen=True)
class Verdict:
    """`inspect`'s answer. A refusal's `sqlstate` and `message` go to the client."""

    allowed: bool
    sqlstate: str = "42501"
    message: str = "statement refused by the gateway"

    @classmethod
    def allow(cls) -> Verdict:
        return cls(True)

    @classmethod
    def refuse(cls, message: str, sqlstate: str = "42501") -> Verdict:
        return cls(False, sqlstate, message)


class Hooks(Protocol):
    """The broker's side of the gateway.

    - `lookup(user, database)`: the Login for a handle id, or None if there is none (the
      client then fails SCRAM exactly as with a wrong secret). Runs within the startup
      timeout.
    - `open_upstream(login)`: the real credential, called once the client has proved the
      handle. May raise `Refusal(sqlstate, message)` (sent to the client, then close).
    - `inspect(login, sql)`: called on the loop for every Query (the whole text, maybe
      several statements) and every Parse (one statement); keep it fast. An exception
      counts as a refusal.
    - `closed(login, reason)`: once per session that passed `lookup` and SCRAM.
    - `event(kind, login, detail)`: audit facts (`auth_failed`, `session_started`,
      `refused`, `protocol_error`, `upstream_failed`, `cancel`); never holds secrets.
    """

    async def lookup(self, user: str, database: str) -> Login | None: ...

    async def open_upstream(self, login: Login) -> Upstream: ...

    def inspect(self, login: Login, sql: str) -> Verdict: ...

    async def closed(self, login: Login, reason: str) -> None: ...

    def event(self, kind: str, login: Login | None, detail: Mapping[str, str]) -> None: ...


# ---------------------------------------------------------------------------------------
# A connection with its own buffer (so the front door can see what is buffered)


class Channel(asyncio.Protocol):
    """One socket: a read buffer with backpressure, writes with drain, TLS upgrade."""

    def __init__(self, on_made: Callable[[Channel], None] | None = None) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._eof = False
        self._lost = False
        self._reading_paused = False
        self._writing_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._on_made = on_made
        # Relay mode (see `relay_to`): data goes straight to a callback, no task hop.
        self._consumer: Callable[[bytes], None] | None = None
        self._on_end: Callable[[], None] | None = None
        self._peer: Channel | None = None  # reading from it pauses while we can't write
        self.reading_held = False  # the session holds reading paused, whatever the peer does

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if self._on_made is not None:
            self._on_made(self)

    def data_received(self, data: bytes) -> None:
        if self._consumer is not None:
            self._consumer(data)
            return
        self._buffer += data
        if len(self._buffer) > _READ_LIMIT and not self._reading_paused and self._transport:
            self._reading_paused = True
            self._transport.pause_reading()
        _wake(self._read_waiter)

    def eof_received(self) -> bool | None:
        self._eof = True
        _wake(self._read_waiter)
        if self._on_end is not None:
            self._on_end()
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._lost = True
        _wake(self._read_waiter)
        _wake(self._drain_waiter)
        if self._on_end is not None:
            self._on_end()

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._peer is not None:
            self._peer.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        _wake(self._drain_waiter)
        if self._peer is not None:
            self._peer.resume_reading()

    # -- relay mode

    def relay_to(self, consumer: Callable[[bytes], None], on_end: Callable[[], None], sink: Channel) -> None:
        """From now on hand every chunk read to `consumer` as it arrives (what is already
        buffered first), call `on_end` at end of stream, and stop reading while `sink`
        can't take more writes (backpressure without a task per direction)."""
        self._consumer, self._on_end = consumer, on_end
        sink._peer = self
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            self._maybe_resume()
            consumer(data)
        if self._eof:
            on_end()

    def pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None and not self._transport.is_closing():
            self._reading_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if (
            self._reading_paused
            and not self.reading_held
            and self._transport is not None
            and not self._transport.is_closing()
        ):
            self._reading_paused = False
            self._transport.resume_reading()

    # -- reading

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if self._eof:
                raise EOFError("connection closed")
            await self._wait_data()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        self._maybe_resume()
        return data

    async def read_some(self) -> bytes:
        """What is buffered (waiting for at least one byte); b"" at end of stream."""
        while not self._buffer:
            if self._eof:
                return b""
            await self._wait_data()
        data = bytes(self._buffer)
        self._buffer.clear()
        self._maybe_resume()
        return data

    async def peek(self) -> int | None:
        """The next byte without consuming it; None at end of stream."""
        while not self._buffer:
            if self._eof:
                return None
            await self._wait_data()
        return self._buffer[0]

    async def _wait_data(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._read_waiter = waiter
        try:
            await waiter
        finally:
            self._read_waiter = None

    def _maybe_resume(self) -> None:
        if self._reading_paused and len(self._buffer) <= _READ_LIMIT and self._transport:
            self._reading_paused = False
            self._transport.resume_reading()

    # -- writing

    def write(self, data: bytes) -> None:
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    async def drain(self) -> None:
        while self._writing_paused and not self._lost:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiter = waiter
            try:
                await waiter
            finally:
                self._drain_waiter = None
        if self._lost:
            raise ConnectionResetError("connection lost")

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    @property
    def closed(self) -> bool:
        return self._lost

    @property
    def write_paused(self) -> bool:
        return self._writing_paused

    def get_extra_info(self, name: str) -> Any:
        return None if self._transport is None else self._transport.get_extra_info(name)

    async def start_tls(self, context: ssl.SSLContext, *, server_side: bool, hostname: str | None) -> None:
        # The caller has checked that nothing is buffered: bytes that arrive from now on go
        # to the TLS layer (loop.start_tls swaps the protocol before any await), so
        # plaintext injected before the handshake only breaks the handshake.
        assert self._transport is not None
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(
            self._transport, self, context, server_side=server_side, server_hostname=hostname
        )
        assert transport is not None
        self._transport = transport


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


async def _connect(host: str, port: int) -> Channel:
    _, channel = await asyncio.get_running_loop().create_connection(Channel, host, port)
    return channel


# ---------------------------------------------------------------------------------------
# Front door: startup packets, TLS, startup parameters


@dataclass(frozen=True)
class _Startup:
    user: str
    database: str
    forwarded: dict[str, str]
    negotiate: bytes | None  # a NegotiateProtocolVersion to send first, if any


async def _front_door(
    channel: Channel, tls: ssl.SSLContext | None
) -> tuple[pgwire.StartupMessage | pgwire.CancelRequest, bool] | None:
    """Answer SSLRequest/GSSENCRequest (each at most once) until a startup or cancel."""
    if await channel.peek() == pgwire.TLS_HANDSHAKE_BYTE:
        return None  # direct TLS (sslnegotiation=direct) is not offered
    seen: set[type] = set()
    encrypted = False
    while True:
        packet = pgwire.parse_startup_packet(await pgwire.read_startup_packet(channel))
        if isinstance(packet, pgwire.StartupMessage | pgwire.CancelRequest):
            return packet, encrypted
        if type(packet) in seen or encrypted:
            raise ProtocolError("unexpected negotiation request")
        seen.add(type(packet))
        if channel.buffered:  # CVE-2021-23214: plaintext queued behind the request
            raise ProtocolError("received unencrypted data after SSL request")
        if isinstance(packet, pgwire.SSLRequest) and tls is not None:
            channel.write(b"S")
            await channel.start_tls(tls, server_side=True, hostname=None)
            encrypted = True
        else:
            channel.write(b"N")


def _check_startup(message: pgwire.StartupMessage, encrypted: bool, require_tls: bool) -> _Startup:
    if require_tls and not encrypted:
        raise Refusal("28000", "the gateway requires TLS: connect with sslmode=require")
    given = message.params
    user = given.get("user", "")
    if not user:
        raise Refusal("28000", "no user name specified in the startup packet")
    if "replication" in given:
        raise Refusal("42501", "replication connections are not accepted by the gateway")
    if "options" in given:
        raise Refusal("0A000", "the gateway does not accept the options startup parameter")
    # The other names are settings, which Postgres matches without regard to case.
    params = {name.lower(): value for name, value in given.items() if name not in ("user", "database")}
    encoding = params.get("client_encoding")
    if encoding is not None and encoding.upper().replace("-", "").replace("_", "") not in _UTF8_NAMES:
        raise Refusal("22023", "the gateway speaks UTF8 only: set client_encoding=UTF8")
    forwarded = {name: params[name] for name in FORWARDED_PARAMS if name in params}
    unrecognised = [name for name in message.params if name.startswith("_pq_.")]
    negotiate = None
    if message.minor > 0 or unrecognised:
        negotiate = pgwire.negotiate_protocol_version(0, unrecognised)
    return _Startup(user, given.get("database") or user, forwarded, negotiate)


def _fatal(code: str, text: str) -> bytes:
    return pgwire.error_response(code, text, severity="FATAL")


# ---------------------------------------------------------------------------------------
# Upstream login


class _UpstreamFailed(Exception):
    """The upstream login failed; `sqlstate`/`text` are already safe for the client."""

    def __init__(self, sqlstate: str, text: str, detail: str) -> None:
        super().__init__(detail)
        self.sqlstate = sqlstate
        self.text = text
        self.detail = detail  # for the audit event: never a server message or a secret


_GENERIC_UPSTREAM = "the gateway could not log in to the database"


def _upstream_error(fields: Mapping[str, str]) -> _UpstreamFailed:
    code = fields.get("C", "08006")
    # A bad value of a parameter the client sent (22xxx) is the client's to see; anything
    # else may name the real role or database, so the client gets a generic message.
    if code.startswith("22"):
        return _UpstreamFailed(code, fields.get("M", _GENERIC_UPSTREAM), code)
    if code.startswith(("53", "57")):
        return _UpstreamFailed(code, _GENERIC_UPSTREAM, code)
    return _UpstreamFailed("08006", _GENERIC_UPSTREAM, code)


def _failed(detail: str) -> _UpstreamFailed:
    return _UpstreamFailed("08006", _GENERIC_UPSTREAM, detail)


@dataclass
class _Link:
    """A logged-in upstream connection and what it told us at login."""

    channel: Channel
    upstream: Upstream
    pid: int = 0
    secret: bytes = b""
    status: bytes = b"I"
    params: list[tuple[str, str]] = field(default_factory=list)
    notices: list[bytes] = field(default_factory=list)


async def _open_upstream(upstream: Upstream) -> Channel:
    try:
        channel = await _connect(upstream.host, upstream.port)
    except OSError as error:
        raise _failed("connect: " + type(error).__name__) from None
    if upstream.ssl is None:
        return channel
    channel.write(pgwire.ssl_request())
    try:
        answer = await channel.read_exactly(1)
    except EOFError:
        channel.close()
        raise _failed("tls: closed") from None
    if answer != b"S" or channel.buffered:  # no plaintext fallback; CVE-2021-23222
        channel.close()
        raise _failed("tls: refused" if answer != b"S" else "tls: data after S")
    try:
        await channel.start_tls(
            upstream.ssl, server_side=False, hostname=upstream.server_hostname or upstream.host
        )
    except (OSError, ssl.SSLError) as error:
        channel.abort()
        raise _failed("tls: " + type(error).__name__) from None
    return channel


async def login_upstream(upstream: Upstream, forwarded: Mapping[str, str]) -> _Link:
    """Connect, authenticate as the real user, and read up to the first ReadyForQuery."""
    channel = await _open_upstream(upstream)
    try:
        params = {"user": upstream.user, "database": upstream.dbname, **forwarded, "client_encoding": "UTF8"}
        channel.write(pgwire.startup_message(params))
        await _UpstreamAuth(channel, upstream).run()
        link = _Link(channel, upstream)
        await _read_until_ready(link)
        return link
    except BaseException:
        channel.abort()
        raise


async def _read(channel: Channel) -> tuple[bytes, bytes]:
    try:
        return await pgwire.read_message(channel, max_size=_MAX_UPSTREAM_STARTUP_MESSAGE)
    except EOFError:
        raise _failed("closed during login") from None
    except ProtocolError:
        raise _failed("malformed message during login") from None


class _UpstreamAuth:
    """Answers the server's authentication requests with the real credential."""

    def __init__(self, channel: Channel, upstream: Upstream) -> None:
        self.channel = channel
        self.upstream = upstream
        self.scram: scramp.ScramClient | None = None
        self.scram_done = False

    async def run(self) -> None:
        while True:
            kind, body = await _read(self.channel)
            if kind == b"E":
                raise _upstream_error(pgwire.parse_error_fields(body))
            if kind != b"R":
                raise _failed("unexpected message during login")
            code, data = pgwire.parse_auth_request(body)
            if code == pgwire.AUTH_OK:
                # After a SCRAM start, only a verified server signature lets the login end.
                if self.scram is not None and not self.scram_done:
                    raise _failed("sasl incomplete")
                return
            try:
                self.answer(code, data)
            except (scramp.ScramException, UnicodeDecodeError, ValueError):
                raise _failed("sasl") from None

    def answer(self, code: int, data: bytes) -> None:
        up, scram = self.upstream, self.scram
        if code == pgwire.AUTH_CLEARTEXT:
            self.channel.write(pgwire.password_message(pgwire.cstr(up.password)))
        elif code == pgwire.AUTH_MD5:
            self.channel.write(pgwire.password_message(pgwire.cstr(_md5_password(up, data[:4]))))
        elif code == pgwire.AUTH_SASL and scram is None:
            self.scram = _scram_client(self.channel, up, pgwire.parse_sasl_mechanisms(data))
            first = self.scram.get_client_first().encode()
            self.channel.write(pgwire.sasl_initial_response(self.scram.mechanism_name, first))
        elif code == pgwire.AUTH_SASL_CONTINUE and scram is not None:
            scram.set_server_first(data.decode())
            self.channel.write(pgwire.password_message(scram.get_client_final().encode()))
        elif code == pgwire.AUTH_SASL_FINAL and scram is not None:
            scram.set_server_final(data.decode())  # checks the server's signature
            self.scram_done = True
        else:
            raise _failed(f"auth method {code}")


def _md5_password(upstream: Upstream, salt: bytes) -> str:
    inner = hashlib.md5((upstream.password + upstream.user).encode(), usedforsecurity=False).hexdigest()
    return "md5" + hashlib.md5(inner.encode() + salt, usedforsecurity=False).hexdigest()


def _scram_client(channel: Channel, upstream: Upstream, offered: list[str]) -> scramp.ScramClient:
    ssl_object = channel.get_extra_info("ssl_object")
    if ssl_object is not None and "SCRAM-SHA-256-PLUS" in offered:
        binding = ("tls-server-end-point", ssl_object)
        return scramp.ScramClient(["SCRAM-SHA-256-PLUS"], upstream.user, upstream.password, binding)
    if MECHANISM not in offered:
        raise _failed("no SCRAM-SHA-256")
    return scramp.ScramClient([MECHANISM], upstream.user, upstream.password)


async def _read_until_ready(link: _Link) -> None:
    while True:
        kind, body = await _read(link.channel)
        if kind == b"S":
            name, value = pgwire.parse_parameter_status(body)
            if not _pinned_ok(name, value):
                raise _failed("parameter " + name)
            link.params.append((name, value))
        elif kind == b"K":
            link.pid, link.secret = pgwire.parse_backend_key_data(body)
        elif kind == b"N":
            link.notices.append(pgwire.message(b"N", body))
        elif kind == b"E":
            raise _upstream_error(pgwire.parse_error_fields(body))
        elif kind == b"Z":
            link.status = body[:1] or b"I"
            break
        else:
            raise _failed("unexpected message after login")
    reported = dict(link.params)
    if any(reported.get(name) != value for name, value in _PINNED.items()):
        raise _failed("pinned parameters not reported")


def _pinned_ok(name: str, value: str) -> bool:
    wanted = _PINNED.get(name.lower())
    return wanted is None or value.upper() == wanted.upper()


async def send_upstream_cancel(upstream: Upstream, pid: int, secret: bytes, timeout: float = 5.0) -> None:
    """Cancel on a new connection with the upstream's own key; wait for the server to hang up."""
    channel: Channel | None = None
    try:
        async with asyncio.timeout(timeout):
            channel = await _open_upstream(upstream)
            channel.write(pgwire.cancel_request(pid, secret))
            while await channel.read_some():
                pass
    except (TimeoutError, OSError, _UpstreamFailed):
        log.info("gateway: upstream cancel did not complete")
    finally:
        if channel is not None:
            channel.close()


# ---------------------------------------------------------------------------------------
# A session


class _Stop:
    """Why a pump stopped, when it isn't a protocol error."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


_TERMINATED = _Stop("client terminated")
_NO_VERDICT = Verdict.refuse("the gateway could not check the statement")
_NOT_UTF8 = Verdict.refuse("the statement is not valid UTF-8", "22021")
_FUNCTION_CALL = Verdict.refuse("the gateway refuses fast-path function calls")
_MID_BATCH = Verdict.refuse(
    "the gateway refuses SQL text with backslashes or non-ASCII characters after an Execute "
    "in the same batch: send a Sync first, or pass the values as parameters"
)


def _lexes_alike(sql: bytes) -> bool:
    """True if the server lexes this text the same whatever client_encoding and
    standard_conforming_strings it has: ASCII (every client encoding Postgres allows
    keeps ASCII bytes as themselves outside multibyte characters) without a backslash
    (the only thing standard_conforming_strings changes)."""
    return sql.isascii() and b"\\" not in sql


class Session:
    """One client connection, from its first byte to its close."""

    def __init__(self, server: GatewayServer, client: Channel) -> None:
        self._server = server
        self._hooks = server.hooks
        self.client = client
        self.login: Login | None = None
        self.link: _Link | None = None
        self.cancel_pid = 0
        self.cancel_secret = b""
        self.reason = "unknown"
        self.task: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()
        self._relaying = False
        self._release = False  # held client messages may go on (set on a ReadyForQuery)
        # Where each refused statement's error is expected: nonce -> (sync point, verdict).
        self._pending: dict[bytes, tuple[int, Verdict]] = {}
        self._sync_sent = 0  # Query, Sync and FunctionCall messages forwarded: one ReadyForQuery each
        self._ready_seen = 0
        self._executing = False  # an Execute forwarded since the last Sync
        self._batch_executes = 0
        self._last_execute_end = -1
        self._copy_sync = False  # the last Sync came right after its batch's only Execute
        self._c2s = pgwire.Framer(
            b"QPFXSE", self._on_client, max_length=pgwire.MAX_CLIENT_MESSAGE, allowed=b"BCDEHScdf"
        )
        self._s2c = pgwire.Framer(b"ESZG", self._on_server, max_length=pgwire.MAX_SERVER_MESSAGE)

    @property
    def key(self) -> str | None:
        return None if self.login is None else self.login.key

    @property
    def busy(self) -> bool:
        """A query may be running upstream (something sent that no ReadyForQuery answered)."""
        return self._sync_sent > self._ready_seen or self._executing

    # -- the whole life

    async def run(self) -> None:
        try:
            if await self._start() and self.link is not None:
                await self._relay()
        except asyncio.CancelledError:
            self.finish(self.reason if self._finished.is_set() else "gateway stopped")
        except (EOFError, ConnectionError):
            self.finish("client closed")
        except Exception as error:
            self._internal_error(error)
        finally:
            self.finish(self.reason)
            await self._server.forget(self)

    async def _start(self) -> bool:
        try:
            async with asyncio.timeout(self._server.auth_timeout):
                startup = await self._accept()
                if startup is None:
                    return False
            async with asyncio.timeout(self._server.upstream_timeout):
                return await self._connect_upstream(startup)
        except TimeoutError:
            self.finish("startup timeout", _fatal("08006", "the connection was not set up in time"))
        except ProtocolError as error:
            self.event("protocol_error", {"stage": "startup"})
            self.finish("protocol error", _fatal("08P01", str(error)))
        except Refusal as refusal:
            self.finish("refused", _fatal(refusal.sqlstate, refusal.message))
        return False

    async def _accept(self) -> _Startup | None:
        """Front door and SCRAM; None when the connection ends here (cancel, direct TLS)."""
        front = await _front_door(self.client, self._server.tls)
        if front is None:
            self.finish("direct TLS")
            return None
        packet, encrypted = front
        if isinstance(packet, pgwire.CancelRequest):
            await self._server.cancel(packet)
            self.finish("cancel request")
            return None
        startup = _check_startup(packet, encrypted, self._server.require_tls)
        if startup.negotiate is not None:
            self.client.write(startup.negotiate)
        if not self._server.admit():
            raise Refusal("53300", "too many connections to the gateway")
        await self._authenticate(startup)
        return startup

    async def _authenticate(self, startup: _Startup) -> None:
        login = await self._hooks.lookup(startup.user, startup.database)
        verifier = login.verifier if login else fake_verifier(startup.user, self._server.fake_salt_key)
        exchange = ScramExchange(verifier, valid=login is not None)
        try:
            self.client.write(pgwire.auth_sasl([MECHANISM]))
            initial = pgwire.parse_sasl_initial(await self._read_auth())
            if initial.mechanism != MECHANISM or initial.data is None:
                raise ScramError("mechanism")
            self.client.write(pgwire.auth_sasl_continue(exchange.client_first(initial.data)))
            final = exchange.client_final(await self._read_auth())
        except ScramError:
            self.event("auth_failed", {"user": startup.user, "known": str(login is not None).lower()})
            raise Refusal("28P01", f'password authentication failed for user "{startup.user[:63]}"') from None
        assert login is not None  # a fake verifier never passes
        self.client.write(pgwire.auth_sasl_final(final))
        self.login = login
        self._server.register(self)

    async def _read_auth(self) -> bytes:
        kind, body = await pgwire.read_message(self.client, max_size=_MAX_AUTH_MESSAGE)
        if kind != b"p":
            raise ProtocolError("expected SASL response, got message type " + repr(kind.decode("latin-1")))
        return body

    async def _connect_upstream(self, startup: _Startup) -> bool:
        assert self.login is not None
        try:
            upstream = await self._hooks.open_upstream(self.login)
            self.link = await login_upstream(upstream, startup.forwarded)
        except _UpstreamFailed as failed:
            self.event("upstream_failed", {"detail": failed.detail})
            self.finish("upstream login failed", _fatal(failed.sqlstate, failed.text))
            return False
        except (Refusal, TimeoutError, asyncio.CancelledError):
            raise
        except Exception as error:
            self.event("upstream_failed", {"detail": type(error).__name__})
            self.finish("upstream login failed", _fatal("08006", _GENERIC_UPSTREAM))
            return False
        if self._finished.is_set():  # closed (close_key) while logging in
            self.link.channel.abort()
            return False
        self._welcome(self.link)
        return True

    def _welcome(self, link: _Link) -> None:
        parts = [pgwire.auth_ok()]
        parts += [pgwire.parameter_status(name, value) for name, value in link.params]
        parts.append(pgwire.backend_key_data(self.cancel_pid, self.cancel_secret))
        parts += link.notices
        parts.append(pgwire.ready_for_query(link.status))
        self.client.write(b"".join(parts))
        self.event("session_started", {})

    async def _relay(self) -> None:
        assert self.link is not None
        upstream = self.link.channel
        self._relaying = True
        # Both directions run in the channels' callbacks: each chunk read is framed and
        # written on at once, without waking a task (it halves the added latency).
        self.client.relay_to(self._from_client, lambda: self.finish("client closed"), upstream)
        upstream.relay_to(self._from_server, lambda: self.finish("server closed"), self.client)
        await self._finished.wait()

    def _from_client(self, data: bytes) -> None:
        assert self.link is not None
        if self._finished.is_set():
            return
        try:
            if self._c2s.holding and not data:
                self.link.channel.write(self._c2s.release())
                self._resume_client()
            else:
                self.link.channel.write(self._c2s.feed(data))
        except Exception as error:  # a bug must not leave the session half-relayed
            self._internal_error(error)
            return
        stopped = self._c2s.stopped
        if stopped is None:
            return
        if isinstance(stopped, _Stop):
            self.finish(stopped.reason)
            return
        self.event("protocol_error", {"stage": "relay"})
        self.finish("protocol error", _fatal("08P01", str(stopped)))

    def _from_server(self, data: bytes) -> None:
        if self._finished.is_set():
            return
        try:
            self.client.write(self._s2c.feed(data))
        except Exception as error:
            self._internal_error(error)
            return
        if self._s2c.stopped is not None:
            text = "the database changed client_encoding or standard_conforming_strings"
            self.finish("pinned parameter changed", _fatal("08P01", text))
        elif self._release:
            self._release = False
            self._from_client(b"")

    def _resume_client(self) -> None:
        assert self.link is not None
        if not self._c2s.holding:
            self.client.reading_held = False
            if not self.link.channel.write_paused:
                self.client.resume_reading()

    def _internal_error(self, error: Exception) -> None:
        log.error("gateway: relay failed with %s", type(error).__name__)
        self.finish("internal error", _fatal("XX000", "internal error in the gateway"))

    def _on_client(self, kind: int, body: bytes) -> bytes | None:
        try:
            if kind == 0x51:  # Q
                return self._on_query(body)
            if kind == 0x50:  # P
                return self._on_parse(body)
            if kind == 0x53:  # Sync
                self._on_sync()
            elif kind == 0x45:  # Execute
                self._executing = True
                self._batch_executes += 1
                self._last_execute_end = self._c2s.message_end
                self._copy_sync = False
            elif kind == 0x46:  # F: refused, whatever the function
                self._copy_sync = False
                self._sync_sent += 1
                return self._poison_query(_FUNCTION_CALL, self._sync_sent)
            elif kind == 0x58:  # X: forwarded, then both sides close
                self._c2s.stop(_TERMINATED)
            return None
        except ProtocolError as error:
            self._c2s.stop(error)
            return b""

    def _on_sync(self) -> None:
        self._sync_sent += 1
        # If that Execute starts a COPY FROM STDIN, the server reads this Sync in copy-in
        # mode and ignores it (libpq sends one there); see _on_copy_in.
        self._copy_sync = self._batch_executes == 1 and self._c2s.message_start == self._last_execute_end
        self._batch_executes = 0
        self._executing = False

    def _on_copy_in(self) -> None:
        """CopyInResponse: undo the count of a Sync the server will ignore.

        Only when certain: the Sync came right after its batch's only Execute, nothing that
        can start a statement came after it, and it is the only sync point unanswered (so
        this COPY is that Execute's). Otherwise the count stays high, which can only make
        `_must_wait` wait longer, never release early.
        """
        if self._copy_sync and self._sync_sent - self._ready_seen == 1:
            self._sync_sent -= 1
        self._copy_sync = False

    def _on_query(self, body: bytes) -> bytes | None:
        sql = pgwire.parse_query(body)
        if self._must_wait(sql):
            return None
        self._copy_sync = False
        self._sync_sent += 1
        verdict = _MID_BATCH if self._executing and not _lexes_alike(sql) else self._inspect(sql)
        return None if verdict.allowed else self._poison_query(verdict, self._sync_sent)

    def _on_parse(self, body: bytes) -> bytes | None:
        parsed = pgwire.parse_parse(body)
        if self._must_wait(parsed.query):
            return None
        self._copy_sync = False
        mid_batch = self._executing and not _lexes_alike(parsed.query)
        verdict = _MID_BATCH if mid_batch else self._inspect(parsed.query)
        if verdict.allowed:
            return None
        # Its error comes before the ReadyForQuery that answers the next Sync.
        return pgwire.parse(parsed.name, self._poison(verdict, self._sync_sent + 1))

    def _must_wait(self, sql: bytes) -> bool:
        """Hold SQL that could lex differently until earlier statements are answered.

        A statement pipelined behind `SET client_encoding = 'SJIS'` (or scs = off, or a
        function that calls set_config) would reach the server after the change but
        before its ParameterStatus reaches us: the server would then lex it differently
        from the rules. So such text waits for every earlier ReadyForQuery (the change
        would have closed the session by then). Inside an unsynced batch after an Execute
        there is nothing to wait for without a Sync: that case is refused (_MID_BATCH).
        """
        if _lexes_alike(sql) or self._executing or self._sync_sent == self._ready_seen:
            return False
        self._c2s.hold()
        self.client.pause_reading()  # what is already read waits in the framer
        self.client.reading_held = True
        return True

    def _inspect(self, raw: bytes) -> Verdict:
        assert self.login is not None
        try:
            sql = raw.decode("utf-8")
        except UnicodeDecodeError:
            return _NOT_UTF8
        try:
            verdict = self._hooks.inspect(self.login, sql)
        except Exception as error:
            log.warning("gateway: inspect raised %s; statement refused", type(error).__name__)
            return _NO_VERDICT
        if not verdict.allowed:
            self.event("refused", {"sqlstate": verdict.sqlstate, "message": verdict.message})
        return verdict

    def _poison_query(self, verdict: Verdict, sync_point: int) -> bytes:
        return pgwire.query(self._poison(verdict, sync_point))

    def _poison(self, verdict: Verdict, sync_point: int) -> str:
        nonce = secrets.token_hex(_NONCE_HEX // 2)
        self._pending[nonce.encode()] = (sync_point, verdict)
        return f"SELECT {_POISON_PREFIX.decode()}{nonce}()"

    def _on_server(self, kind: int, body: bytes) -> bytes | None:
        if kind == 0x45:  # ErrorResponse
            return self._rewrite_error(body)
        if kind == 0x47:  # CopyInResponse
            self._on_copy_in()
            return None
        if kind == 0x53:  # ParameterStatus
            try:
                name, value = pgwire.parse_parameter_status(body)
            except ProtocolError:
                name, value = "client_encoding", "malformed"  # fail closed
            if not _pinned_ok(name, value):
                self._s2c.stop(_Stop("pinned parameter changed"))
                return b""
            return None
        self._ready_seen += 1  # ReadyForQuery
        if self._c2s.holding and self._sync_sent == self._ready_seen:
            self._release = True
        while self._pending:
            nonce, (sync_point, _) = next(iter(self._pending.items()))
            if sync_point > self._ready_seen:
                break
            del self._pending[nonce]
        return None

    def _rewrite_error(self, body: bytes) -> bytes | None:
        at = body.find(_POISON_PREFIX)
        if at < 0 or not self._pending:
            return None
        start = at + len(_POISON_PREFIX)
        entry = self._pending.pop(body[start : start + _NONCE_HEX], None)
        if entry is None:
            return None
        verdict = entry[1]
        return pgwire.error_response(verdict.sqlstate, verdict.message)

    # -- ending

    def finish(self, reason: str, error: bytes | None = None, *, cancel_query: bool = False) -> None:
        """Close both sides now (idempotent, synchronous: safe from any callback on the loop).

        `error` (a FATAL ErrorResponse) reaches the client only if the bytes relayed so
        far end at a message boundary; otherwise it would land inside a server message.
        """
        if self._finished.is_set():
            return
        self.reason = reason
        self._finished.set()
        if error is not None and self._s2c.at_boundary:
            self.client.write(error)
        self.client.close()
        if self.link is not None:
            if cancel_query and self.busy:
                self._server.spawn(send_upstream_cancel(self.link.upstream, self.link.pid, self.link.secret))
            if self._c2s.at_boundary and self._c2s.stopped is not _TERMINATED:
                self.link.channel.write(pgwire.terminate())
            self.link.channel.close()
        if not self._relaying and self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()  # still starting: stop the startup where it is

    async def cancel_upstream(self) -> None:
        if self.link is not None and self.busy:
            await send_upstream_cancel(self.link.upstream, self.link.pid, self.link.secret)

    def event(self, kind: str, detail: Mapping[str, str]) -> None:
        try:
            self._hooks.event(kind, self.login, detail)
        except Exception as error:
            log.warning("gateway: event hook raised %s", type(error).__name__)


# ---------------------------------------------------------------------------------------
# The server


class GatewayServer:
    """Accepts agents' connections and runs a Session for each.

    `tls`: a server-side SSLContext; with it an SSLRequest is answered `S`, without it `N`.
    `require_tls`: refuse a StartupMessage that didn't come over TLS (cancel requests are
    still accepted in plaintext: libpq before 17 always sends them so).
    `fake_salt_key`: the key for unknown handles' salts; give all replicas the same one.
    """

    def __init__(
        self,
        bind_host: str,
        bind_port: int,
        hooks: Hooks,
        tls: ssl.SSLContext | None = None,
        require_tls: bool = False,
        *,
        auth_timeout: float = 5.0,
        upstream_timeout: float = 10.0,
        max_connections: int = 10_000,
        fake_salt_key: bytes | None = None,
    ) -> None:
        self.bind_host = bind_host
        self.bind_port = bind_port
        self.hooks = hooks
        self.tls = tls
        self.require_tls = require_tls
        self.auth_timeout = auth_timeout
        self.upstream_timeout = upstream_timeout
        self.max_connections = max_connections
        self.fake_salt_key = fake_salt_key or secrets.token_bytes(32)
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sessions: set[Session] = set()
        self._by_key: dict[str, set[Session]] = {}
        self._by_pid: dict[int, Session] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            lambda: Channel(self._accepted), self.bind_host, self.bind_port, reuse_address=True
        )

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.close_all("gateway stopped")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- sessions

    def _accepted(self, channel: Channel) -> None:
        session = Session(self, channel)
        self._sessions.add(session)
        session.task = self.spawn(session.run())

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def admit(self) -> bool:
        return len(self._sessions) <= self.max_connections

    def register(self, session: Session) -> None:
        """A session whose client proved its handle: reachable by key and cancel key."""
        assert session.key is not None
        while True:
            pid = secrets.randbits(31) or 1  # sign bit clear (pg_basebackup and others)
            if pid not in self._by_pid:
                break
        session.cancel_pid, session.cancel_secret = pid, secrets.token_bytes(4)
        self._by_pid[pid] = session
        self._by_key.setdefault(session.key, set()).add(session)

    async def forget(self, session: Session) -> None:
        self._sessions.discard(session)
        self._by_pid.pop(session.cancel_pid, None)
        key = session.key
        if key is None:
            return
        group = self._by_key.get(key)
        if group is not None:
            group.discard(session)
            if not group:
                del self._by_key[key]
        assert session.login is not None
        try:
            await self.hooks.closed(session.login, session.reason)
        except Exception as error:
            log.warning("gateway: closed hook raised %s", type(error).__name__)

    def sessions(self, key: str | None = None) -> list[Session]:
        """Live sessions (all, or those of one key) - for tests and the broker's status."""
        if key is None:
            return list(self._sessions)
        return list(self._by_key.get(key, ()))

    def close_key(self, key: str, reason: str = "task ended") -> int:
        """Close every live session of `key`: FATAL 57P01 to the client, both sockets shut,
        a running query cancelled upstream. Run on the loop (see the module docstring).
        Returns how many sessions were closed."""
        sessions = list(self._by_key.get(key, ()))
        error = _fatal("57P01", "terminating connection: the task ended")
        for session in sessions:
            session.finish(reason, error, cancel_query=True)
        return len(sessions)

    def close_key_threadsafe(self, key: str, reason: str = "task ended") -> None:
        """`close_key` from any thread (e.g. a LISTEN/NOTIFY listener)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.close_key, key, reason)

    def close_all(self, reason: str = "gateway stopped") -> int:
        sessions = list(self._sessions)
        error = _fatal("57P01", "terminating connection: the gateway is shutting down")
        for session in sessions:
            session.finish(reason, error, cancel_query=True)
        return len(sessions)

    async def cancel(self, request: pgwire.CancelRequest) -> None:
        """A CancelRequest: forward it upstream only for a live, busy session of ours."""
        session = self._by_pid.get(request.pid)
        matched = session is not None and hmac.compare_digest(session.cancel_secret, request.secret)
        if session is None or not matched:
            return
        session.event("cancel", {"forwarded": str(session.busy).lower()})
        await session.cancel_upstream()
