"""The gateway against the session's real Postgres, driven by real clients.

The gateway runs on its own asyncio loop in a thread (as it will in the broker, beside a
LISTEN/NOTIFY listener thread), so tests use blocking clients: psql in a subprocess,
psycopg 3, and a raw socket client (`RawClient`) for what no library sends on purpose.

`TestHooks` is a small stand-in for the broker: a dict of handle id -> (verifier, upstream),
and an `inspect` that refuses any statement containing DROP.
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
import socket
import ssl
import struct
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import scramp

from broker.gateway import pgwire
from broker.gateway.pgproxy import GatewayServer, Login, Refusal, Upstream, Verdict
from broker.gateway.scram import make_verifier

ROLE = "gw_agent"
DATABASE = "gw_target"


def superuser_dsn(stack: Any, dbname: str = "postgres") -> str:
    url: str = stack.postgres.url(dbname)
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@dataclass
class Target:
    """The real database behind the gateway and its real (never shown to clients) login."""

    host: str
    port: int
    dbname: str
    user: str
    password: str
    admin_dsn: str

    def upstream(self, **changes: Any) -> Upstream:
        values: dict[str, Any] = dict(
            host=self.host, port=self.port, dbname=self.dbname, user=self.user, password=self.password
        )
        values.update(changes)
        return Upstream(**values)


@pytest.fixture(scope="session")
def target(stack: Any) -> Target:
    password = secrets.token_urlsafe(18)
    with psycopg.connect(superuser_dsn(stack), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        conn.execute(f"{verb} ROLE {ROLE} LOGIN PASSWORD '{password}'")
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone():
            conn.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
    with psycopg.connect(superuser_dsn(stack, DATABASE), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS items (id int PRIMARY KEY, name text)")
        conn.execute(f"ALTER TABLE items OWNER TO {ROLE}")
    return Target("127.0.0.1", stack.postgres.port, DATABASE, ROLE, password, superuser_dsn(stack, DATABASE))


@dataclass
class Handle:
    id: str
    secret: str
    key: str


@dataclass
class TestHooks:
    """The broker's side, reduced to a dict; records what the gateway told it."""

    target: Target
    handles: dict[str, tuple[Login, Upstream]] = field(default_factory=dict)
    events: list[tuple[str, str | None, dict[str, str]]] = field(default_factory=list)
    closed_calls: list[tuple[str, str]] = field(default_factory=list)
    inspected: list[str] = field(default_factory=list)
    refuse_upstream: Refusal | None = None

    def add(self, key: str | None = None, upstream: Upstream | None = None) -> Handle:
        handle = Handle(f"h_{secrets.token_hex(8)}", secrets.token_urlsafe(24), key or uuid.uuid4().hex)
        login = Login(handle.key, make_verifier(handle.secret))
        self.handles[handle.id] = (login, upstream or self.target.upstream())
        return handle

    async def lookup(self, user: str, database: str) -> Login | None:
        entry = self.handles.get(user)
        return None if entry is None else entry[0]

    async def open_upstream(self, login: Login) -> Upstream:
        if self.refuse_upstream is not None:
            raise self.refuse_upstream
        return next(up for lg, up in self.handles.values() if lg is login)

    def inspect(self, login: Login, sql: str) -> Verdict:
        self.inspected.append(sql)
        if "DROP" in sql.upper():
            return Verdict.refuse("rule no-drop: DROP is not allowed for this task")
        return Verdict.allow()

    async def closed(self, login: Login, reason: str) -> None:
        self.closed_calls.append((login.key, reason))

    def event(self, kind: str, login: Login | None, detail: Mapping[str, str]) -> None:
        self.events.append((kind, None if login is None else login.key, dict(detail)))


class GatewayThread:
    """A GatewayServer on its own loop in a daemon thread."""

    def __init__(self, hooks: TestHooks, **options: Any) -> None:
        self.hooks = hooks
        self.loop = asyncio.new_event_loop()
        # Anything the loop reports (a task that died with an exception) fails the test.
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda loop, context: self.loop_errors.append(context))
        self.server = GatewayServer("127.0.0.1", 0, hooks, **options)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="gateway-loop")
        self._thread.start()
        self.run(self.server.start())

    @property
    def port(self) -> int:
        return self.server.port

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any], timeout: float = 10) -> Any:
        async def wrapper() -> Any:
            return fn()

        return self.run(wrapper(), timeout)

    def live_sessions(self) -> int:
        return int(self.call(lambda: len(self.server.sessions())))

    def stop(self) -> None:
        self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def dsn(self, handle: Handle, *, password: str | None = None, **extra: str) -> str:
        params = {
            "host": "127.0.0.1",
            "port": str(self.port),
            "user": handle.id,
            "password": handle.secret if password is None else password,
            "dbname": DATABASE,
            "sslmode": "disable",
            "connect_timeout": "10",
        }
        params.update(extra)
        return " ".join(f"{k}={v}" for k, v in params.items())

    def connect(self, handle: Handle, **kwargs: Any) -> psycopg.Connection[Any]:
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k in ("sslmode", "password", "application_name")}
        return psycopg.connect(self.dsn(handle, **extra), **kwargs)


@pytest.fixture
def hooks(target: Target) -> TestHooks:
    return TestHooks(target)


@pytest.fixture
def make_gateway(hooks: TestHooks) -> Iterator[Callable[..., GatewayThread]]:
    started: list[GatewayThread] = []

    def make(**options: Any) -> GatewayThread:
        gateway = GatewayThread(hooks, **options)
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        gateway.stop()
    for gateway in started:
        assert gateway.loop_errors == []


@pytest.fixture
def gateway(make_gateway: Callable[..., GatewayThread]) -> GatewayThread:
    return make_gateway()


@pytest.fixture
def handle(hooks: TestHooks) -> Handle:
    return hooks.add()


# ---------------------------------------------------------------------------------------
# TLS material


@dataclass
class Certs:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.cert))
        return context


@pytest.fixture(scope="session")
def certs(workdir: Path) -> Certs:
    """A self-signed certificate for 127.0.0.1 / localhost, made with `cryptography`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = workdir / "gateway-tls"
    folder.mkdir(exist_ok=True)
    cert_path, key_path = folder / "server.crt", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return Certs(cert_path, key_path)


# ---------------------------------------------------------------------------------------
# A raw protocol client, for what libraries never send


class RawClient:
    """A blocking socket speaking the wire protocol by hand (with pgwire's builders)."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buffer = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int) -> bool:
        while len(self._buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self._buffer += chunk
        return True

    def read_byte(self) -> bytes:
        if not self._fill(1):
            return b""
        byte, self._buffer = self._buffer[:1], self._buffer[1:]
        return byte

    def read_message(self) -> tuple[bytes, bytes] | None:
        """(type, body), or None when the gateway closed the connection."""
        if not self._fill(5):
            return None
        kind = self._buffer[:1]
        (length,) = struct.unpack("!i", self._buffer[1:5])
        if not self._fill(1 + length):
            return None
        body = self._buffer[5 : 1 + length]
        self._buffer = self._buffer[1 + length :]
        return kind, body

    def message(self) -> tuple[bytes, bytes]:
        """The next message, which must come (the connection may not close first)."""
        found = self.read_message()
        assert found is not None, "the gateway closed the connection"
        return found

    def closed(self) -> bool:
        """True if the gateway closes the connection (reading only what it still sends)."""
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def messages_until(self, kinds: bytes = b"Z") -> list[tuple[bytes, bytes]]:
        found: list[tuple[bytes, bytes]] = []
        while True:
            item = self.read_message()
            if item is None:
                return found
            found.append(item)
            if item[0] in [bytes([k]) for k in kinds]:
                return found

    def login(self, user: str, secret: str, database: str = DATABASE) -> list[tuple[bytes, bytes]]:
        """StartupMessage and SCRAM; the messages up to the first ReadyForQuery."""
        self.send(pgwire.startup_message({"user": user, "database": database}))
        self._expect(b"R")
        client = scramp.ScramClient(["SCRAM-SHA-256"], "x", secret)
        first = client.get_client_first().replace("n=x,", "n=,")  # what libpq sends
        client.client_first_bare = first[3:]
        self.send(pgwire.sasl_initial_response("SCRAM-SHA-256", first.encode()))
        _, body = self._expect(b"R")
        client.set_server_first(body[4:].decode())
        self.send(pgwire.password_message(client.get_client_final().encode()))
        _, body = self._expect(b"R")
        client.set_server_final(body[4:].decode())
        return self.messages_until(b"ZE")

    def _expect(self, kind: bytes) -> tuple[bytes, bytes]:
        item = self.read_message()
        assert item is not None, "connection closed"
        if item[0] == b"E":
            raise AssertionError(f"error: {pgwire.parse_error_fields(item[1])}")
        assert item[0] == kind, item
        return item


def error_fields(messages: list[tuple[bytes, bytes]]) -> dict[str, str]:
    for kind, body in messages:
        if kind == b"E":
            return pgwire.parse_error_fields(body)
    raise AssertionError(f"no ErrorResponse in {[k for k, _ in messages]}")


# ---------------------------------------------------------------------------------------
# A gateway in a child process


def serve_from_stdin() -> None:
    """Run a gateway for the handles described on stdin (JSON) until stdin closes.

    For clients that block the whole interpreter: psycopg's `conn.cancel()` calls libpq's
    PQcancel holding the GIL, which would freeze a gateway on a thread of the same process.
    """
    import json
    import sys

    spec = json.loads(sys.stdin.readline())
    hooks = TestHooks(Target(**spec["target"]))
    for item in spec["handles"]:
        login = Login(item["key"], make_verifier(item["secret"]))
        hooks.handles[item["id"]] = (login, hooks.target.upstream())
    gateway = GatewayThread(hooks)
    print(gateway.port, flush=True)
    sys.stdin.read()
    gateway.stop()


@dataclass
class GatewayProcess:
    proc: Any
    port: int

    def dsn(self, handle: Handle) -> str:
        return (
            f"host=127.0.0.1 port={self.port} user={handle.id} password={handle.secret} "
            f"dbname={DATABASE} sslmode=disable connect_timeout=10"
        )


@pytest.fixture
def gateway_process(target: Target, hooks: TestHooks) -> Iterator[Callable[[list[Handle]], GatewayProcess]]:
    import json
    import subprocess
    import sys
    from dataclasses import asdict

    procs: list[Any] = []

    def start(handles: list[Handle]) -> GatewayProcess:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.gateway.conftest import serve_from_stdin; serve_from_stdin()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        procs.append(proc)
        spec = {"target": asdict(target), "handles": [asdict(h) for h in handles]}
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(spec) + "\n")
        proc.stdin.flush()
        return GatewayProcess(proc, int(proc.stdout.readline()))

    yield start
    for proc in procs:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
