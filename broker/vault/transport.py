"""Keep-alive connections straight to one Vault address, for the calls on the task path.

Every start and finish makes Vault calls, and so does every revocation in an expiry storm.
Through urllib3 a call cost ~0.6 ms of CPU on the benchmark box; the same call on a bare
`http.client` connection ~0.3 ms (bench/PROFILE.md, item 8): urllib3's pool manager,
retry and response objects wrap the same `http.client` underneath. So a direct address
(no proxy) is spoken to here, over a small LIFO stack of idle connections shared by the
threads; `broker.vault.http` keeps urllib3 for what is rare and subtle (proxies, and the
redirect a standby answers with).
"""

from __future__ import annotations

import http.client
import select
import ssl
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit


class ConnectFailed(OSError):
    """No connection could be made; `reason` is a fixed phrase, safe to show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RawReply:
    status: int
    data: bytes
    location: str | None


class DirectTransport:
    """Thread-safe; idle connections beyond `size` are closed rather than kept."""

    def __init__(self, addr: str, *, timeout: float, tls: ssl.SSLContext | None, size: int) -> None:
        parts = urlsplit(addr)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._prefix = parts.path.rstrip("/")
        self._timeout = timeout
        self._tls = tls if parts.scheme == "https" else None
        self._size = size
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> RawReply:
        """Send one request and read the whole answer; raises OSError subclasses (a
        `socket.timeout` for a read that timed out, `ConnectFailed` for no connection)."""
        connection = self._take()
        try:
            if connection.sock is None:
                self._connect(connection)
            connection.request(method, self._prefix + path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except BaseException:
            connection.close()
            raise
        reply = RawReply(response.status, data, response.getheader("Location"))
        if response.will_close:
            connection.close()
        else:
            self._give_back(connection)
        return reply

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _take(self) -> http.client.HTTPConnection:
        while True:
            with self._lock:
                connection = self._idle.pop() if self._idle else None
            if connection is None:
                return self._new()
            if not _dropped(connection):
                return connection
            connection.close()

    def _give_back(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self._size:
                self._idle.append(connection)
                return
        connection.close()

    def _new(self) -> http.client.HTTPConnection:
        if self._tls is not None:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout, context=self._tls
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)

    @staticmethod
    def _connect(connection: http.client.HTTPConnection) -> None:
        # Told apart from a failure mid-request: nothing was sent, so nothing was applied.
        try:
            connection.connect()
        except TimeoutError:
            connection.close()
            raise ConnectFailed("timed out") from None
        except ssl.SSLError:  # before OSError, its base: the operator's fix differs
            connection.close()
            raise ConnectFailed("TLS handshake failed") from None
        except OSError:
            connection.close()
            raise ConnectFailed("cannot connect") from None


def _dropped(connection: http.client.HTTPConnection) -> bool:
    """An idle connection the server closed (or wrote to unasked) must not carry a request:
    the request would be lost on a dead socket after it may have been read."""
    sock = connection.sock
    if sock is None:
        return False
    # poll, not select: select refuses descriptors above 1024, which a busy worker has.
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLPRI)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True


def tls_context(verify: bool, ca_bundle: str | None) -> ssl.SSLContext:
    if not verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=ca_bundle)
