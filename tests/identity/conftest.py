"""Fixtures for the identity tests: a fake clock, issuers, a local JWKS server, a jti store."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from broker.config import IssuerSettings
from broker.identity import InvalidToken, Verifier
from tests.support.tokens import FakeClock, SigningKey, TestIssuer


class MemoryJtiStore:
    """The `JtiStore` contract in memory: atomic first-use check, per issuer."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], datetime] = {}
        self.calls = 0
        self._lock = threading.Lock()

    def claim(self, issuer_name: str, jti: str, expires_at: datetime) -> bool:
        with self._lock:
            self.calls += 1
            if (issuer_name, jti) in self.seen:
                return False
            self.seen[(issuer_name, jti)] = expires_at
            return True


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before the status line
    drip: float = 0.0  # seconds between body bytes
    content_length: bool = True


class JwksServer:
    """A tiny HTTP server on 127.0.0.1 serving canned routes and logging every request."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[str] = []
        self.release = threading.Event()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._http.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def serve(self, path: str, body: bytes, **options: Any) -> str:
        self.routes[path] = Route(body=body, **options)
        return self.url(path)

    def count(self, path: str) -> int:
        return self.requests.count(path)

    def close(self) -> None:
        self.release.set()
        self._http.shutdown()
        self._http.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                if route.delay and server.release.wait(route.delay):
                    return
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                if route.content_length:
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                self._write(route)

            def _write(self, route: Route) -> None:
                if not route.drip:
                    self.wfile.write(route.body)
                    return
                for byte in route.body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    if server.release.wait(route.drip):
                        return

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def jti_store() -> MemoryJtiStore:
    return MemoryJtiStore()


@pytest.fixture
def spire(tmp_path: Any, clock: FakeClock) -> TestIssuer:
    return TestIssuer.create(
        tmp_path,
        name="spire",
        issuer="https://spire.test",
        kind="spiffe",
        trust_domain="example.org",
        use=["workload"],
        clock=clock,
    )


@pytest.fixture(scope="session")
def sso_key() -> SigningKey:
    return SigningKey.generate("RS256")


@pytest.fixture
def sso(tmp_path: Any, clock: FakeClock, sso_key: SigningKey) -> TestIssuer:
    return TestIssuer.create(
        tmp_path,
        name="corp-sso",
        issuer="https://sso.example.com",
        kind="oidc",
        use=["approver", "operator"],
        key=sso_key,
        clock=clock,
    )


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


MakeVerifier = Callable[..., Verifier]


@pytest.fixture
def make_verifier(clock: FakeClock, jti_store: MemoryJtiStore) -> Iterator[MakeVerifier]:
    """`make_verifier(issuer_or_settings, ..., skew=30, operator_groups=("sre",), ...)`."""
    built: list[Verifier] = []

    def build(
        *issuers: TestIssuer | IssuerSettings,
        skew: int = 30,
        max_token_bytes: int = 8192,
        operator_groups: tuple[str, ...] = ("sre",),
        store: Any = jti_store,
    ) -> Verifier:
        settings = [i.settings() if isinstance(i, TestIssuer) else i for i in issuers]
        verifier = Verifier(
            settings,
            clock_skew_seconds=skew,
            max_token_bytes=max_token_bytes,
            jti_store=store,
            operator_groups=operator_groups,
            clock=clock,
        )
        built.append(verifier)
        return verifier

    yield build
    for verifier in built:
        verifier.close()


def _refused(verifier: Verifier, token: Any, detail: str | None = None) -> InvalidToken:
    with pytest.raises(InvalidToken) as caught:
        verifier.verify(token)
    if detail is not None:
        assert caught.value.detail == detail
    return caught.value


@pytest.fixture
def refused() -> Callable[..., InvalidToken]:
    """`refused(verifier, token, detail=None)`: assert an `InvalidToken` (with that detail)."""
    return _refused
