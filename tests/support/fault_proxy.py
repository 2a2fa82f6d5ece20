"""An HTTP-aware reverse proxy for fault tests: put it between the broker and Vault/OpenBao.

A `TcpProxy` can only take the whole link away; this one sees each request, so a test can
hit an exact window of the broker's protocol ("after the task token exists, while the
first credential is being read") without mocking Vault::

    proxy = HttpFaultProxy("127.0.0.1", 8200)
    rule = proxy.add_rule(r"^/v1/database/creds/", action="lose_response", after=lambda ex: proxy.cut())
    ...                                 # drive the broker at proxy.addr
    rule.wait_fired(1)                  # the window was really hit
    proxy.restore()

Actions for the request a rule fires on (`nth` matching request, `times` in a row, or
every one from `nth` on with `times=None`):

- ``forward``: pass it on and answer (the default; useful with `before`/`after` hooks);
- ``reset``: never forward it; drop the connection without an answer;
- ``lose_response``: forward it (Vault acts on it), then drop the answer;
- ``hang``: never forward it; hold the connection until `release()` or `hang_seconds`,
  then drop it (a Vault that accepts connections but never answers);
- ``delay_seconds`` (any action that forwards): wait that long before forwarding.

`before(exchange)` runs before forwarding, `after(exchange)` once Vault has answered (the
exchange then holds `status` and `response_body`). Hooks run on the proxy's handler
thread while the broker waits for its answer, which is what makes them useful: cut a
Postgres proxy or SIGKILL the requesting process at exactly that point.

`cut()` takes the proxy down (every connection is dropped, new ones are reset) until
`restore()`. Every request is recorded in `exchanges`. `rule.wait_fired(n)` returns once
the rule fired n times (the request may still be in flight, e.g. hung); `rule.wait_done(n)`
also waits until those exchanges are over and their hooks have run.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_ACTIONS = frozenset({"forward", "reset", "lose_response", "hang"})
_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST


@dataclass
class Exchange:
    """One request seen by the proxy (and, once forwarded, Vault's answer)."""

    method: str
    path: str
    client_port: int
    request_body: bytes = field(repr=False, default=b"")
    status: int | None = None
    response_body: bytes = field(repr=False, default=b"")
    outcome: str = "pending"  # answered | reset | lost | hung | upstream_error | refused
    finished: threading.Event = field(default_factory=threading.Event, repr=False)

    def response_json(self) -> dict[str, Any]:
        try:
            body = json.loads(self.response_body or b"{}")
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}


Hook = Callable[[Exchange], None]


@dataclass
class Rule:
    path: re.Pattern[str]
    method: str | None
    action: str
    nth: int
    times: int | None
    delay_seconds: float
    hang_seconds: float
    before: Hook | None
    after: Hook | None
    seen: int = 0
    fired: list[Exchange] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and bool(self.path.search(path))

    def wait_fired(self, count: int = 1, timeout: float = 30.0) -> list[Exchange]:
        """Block until the rule fired `count` times (the fault window was really hit)."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.fired) >= count, timeout):
                raise AssertionError(f"rule {self.path.pattern!r} fired {len(self.fired)}/{count} times")
            return list(self.fired)

    def wait_done(self, count: int = 1, timeout: float = 30.0) -> list[Exchange]:
        """Like `wait_fired`, then also wait until those exchanges are over (hooks ran)."""
        fired = self.wait_fired(count, timeout)[:count]
        for exchange in fired:
            if not exchange.finished.wait(timeout):
                raise AssertionError(f"{exchange.method} {exchange.path} still in progress")
        return fired

    def _fire(self, exchange: Exchange) -> None:
        with self._changed:
            self.fired.append(exchange)
            self._changed.notify_all()


class HttpFaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._down = threading.Event()
        self._released = threading.Event()
        self._connections: set[socket.socket] = set()
        self.exchanges: list[Exchange] = []
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1})
        self._thread.daemon = True
        self._thread.start()

    @classmethod
    def to(cls, addr: str) -> HttpFaultProxy:
        """A proxy in front of `http://host:port`."""
        host, port = addr.removeprefix("http://").rstrip("/").rsplit(":", 1)
        return cls(host, int(port))

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- faults -----------------------------------------------------------------------

    def add_rule(
        self,
        path: str,
        *,
        method: str | None = None,
        action: str = "forward",
        nth: int = 1,
        times: int | None = 1,
        delay_seconds: float = 0.0,
        hang_seconds: float = 60.0,
        before: Hook | None = None,
        after: Hook | None = None,
    ) -> Rule:
        if action not in _ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        rule = Rule(re.compile(path), method, action, nth, times, delay_seconds, hang_seconds, before, after)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def cut(self) -> None:
        """Drop every open connection and reset new ones until `restore()`."""
        self._down.set()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            _abort(conn)

    def restore(self) -> None:
        self._down.clear()

    def release(self) -> None:
        """Let every hung request go (its connection is dropped, nothing is forwarded)."""
        self._released.set()

    def close(self) -> None:
        self._released.set()
        self.cut()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def requests_to(self, pattern: str) -> list[Exchange]:
        regex = re.compile(pattern)
        with self._lock:
            return [ex for ex in self.exchanges if regex.search(ex.path)]

    # -- internals --------------------------------------------------------------------

    def _pick(self, exchange: Exchange) -> Rule | None:
        with self._lock:
            self.exchanges.append(exchange)
            chosen = None
            for rule in self._rules:
                if not rule.matches(exchange.method, exchange.path):
                    continue
                rule.seen += 1
                due = rule.seen >= rule.nth and (rule.times is None or rule.seen < rule.nth + rule.times)
                if due and chosen is None:
                    chosen = rule
            return chosen

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)


def _abort(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type, owner: HttpFaultProxy) -> None:
        self.owner = owner
        super().__init__(address, handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self.owner._down.is_set():
            with contextlib.suppress(OSError):
                request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
            return False
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a dropped connection is the point of this server, not news


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, add=True)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.owner._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._proxy()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_LIST = do_GET

    def _proxy(self) -> None:
        exchange = Exchange(self.command, self.path, int(self.client_address[1]), self._read_body())
        try:
            self._handle(exchange)
        finally:
            exchange.finished.set()

    def _handle(self, exchange: Exchange) -> None:
        owner = self.server.owner
        body = exchange.request_body
        if owner._down.is_set():
            exchange.outcome = "refused"
            self._drop()
            return
        rule = owner._pick(exchange)
        action = rule.action if rule else "forward"
        if rule is not None:
            rule._fire(exchange)
            if rule.before is not None:
                rule.before(exchange)
        if action == "reset":
            exchange.outcome = "reset"
            self._drop()
            return
        if action == "hang":
            exchange.outcome = "hung"
            owner._released.wait(rule.hang_seconds if rule else 60.0)
            self._drop()
            return
        if rule is not None and rule.delay_seconds:
            time.sleep(rule.delay_seconds)
        if owner._down.is_set():
            exchange.outcome = "refused"
            self._drop()
            return
        try:
            status, headers, payload = self._forward(body)
        except OSError:
            exchange.outcome = "upstream_error"
            self._drop()
            return
        exchange.status, exchange.response_body = status, payload
        if rule is not None and rule.after is not None:
            rule.after(exchange)
        if action == "lose_response" or owner._down.is_set():
            exchange.outcome = "lost"
            self._drop()
            return
        exchange.outcome = "answered"
        try:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
        except OSError:
            self.close_connection = True

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        host, port = self.server.owner._target
        upstream = http.client.HTTPConnection(host, port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            return response.status, kept, payload
        except http.client.HTTPException as error:
            raise OSError(str(error)) from None
        finally:
            upstream.close()

    def _drop(self) -> None:
        self.close_connection = True
        _abort(self.connection)
