"""The gateway's Vault API: `vault_token` credentials with `delivery: gateway`.

The workload's Vault client (hvac, the `bao`/`vault` CLI, any SDK) is pointed at the
gateway with a handle as its token. For each `/v1/<path>` request the gateway:
  1. checks the handle (`X-Vault-Token`, or `Authorization: Bearer`) against the ledger's
     `sha256$` verifier, in constant time, and that its task is still active;
  2. refuses what no task may do through it, whatever its Vault policies say (`DENIED`:
     minting or revoking tokens, response wrapping, lease operations), then what the
     task's `requests:` rules refuse;
  3. sends the request to Vault with the real token in `X-Vault-Token`, always replacing
     what the client sent, and only the headers Vault needs;
  4. relays Vault's status and body with `auth`, `wrap_info` and `data.id` removed, and
     refuses to relay any body that still holds the real token.
Every request that names a good handle is a `gateway.request` event; a bad handle is a
`gateway.handle_refused` event. The real token is issued on the handle's first request by
`GatewayService.vault_token` and lives only in this process's memory.

The server is the standard library's threaded HTTP/1.1 server, with bounds: a request
body of at most `MAX_BODY` bytes (no chunked bodies), `MAX_CONNECTIONS` connections at
once, and a socket timeout, so a slow or hostile client ties up one thread for a while
and nothing more.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote

import urllib3

from broker.config import VaultSettings
from broker.gateway.handles import HTTP_PREFIX, sha256_matches, split_vault_token
from broker.gateway.service import CANNOT_CONNECT_NOW, GatewayService, Refusal
from broker.ledger.gateway import HandleView
from broker.vault.http import _pool_manager

if TYPE_CHECKING:
    from broker.gateway.httpproxy import HttpProxy

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024
MAX_CONNECTIONS = 64
SOCKET_TIMEOUT_SECONDS = 30.0
MAX_AUDIT_PATH = 512
METHODS = frozenset({"GET", "LIST", "POST", "PUT", "PATCH", "DELETE"})
# Never relayed, whatever the task's policies and rules say (lower-cased path prefixes):
# - creating tokens would mint a credential the gateway does not hold, handed to the
#   client in the clear; revoking them (revoke-self above all) would end the gateway's own
#   token mid-task, or others' with the right accessor;
# - response wrapping hands out a single-use token that unwraps to the real answer,
#   `auth` and all, with no gateway in between;
# - lease operations (and their old `sys/revoke*`, `sys/renew*` spellings) act on leases
#   the broker accounts for: the task's end revokes them, not the workload.
DENIED = (
    "auth/token/create",
    "auth/token/revoke",
    "sys/wrapping",
    "sys/leases",
    "sys/revoke",
    "sys/renew",
)
DENY_RULE = "gateway-deny-list"
WRAP_RULE = "gateway-no-wrapping"
# The request headers Vault is sent: the client's token, namespace, wrapping or policy
# override headers never pass.
_PASSED_HEADERS = ("content-type", "accept")


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str = "application/json"


def errors(status: int, message: str) -> Answer:
    """Vault's own error shape, so clients raise their usual exceptions."""
    return Answer(status, json.dumps({"errors": [message]}).encode())


def vault_path(target: str) -> tuple[str, str] | None:
    """(decoded Vault path, raw query) of a request target, or None when it is not a clean
    `/v1/` path. Vault routes on the decoded path, so the checks run on that, and what is
    sent is that path re-encoded: `auth/token/cre%61te` can't slip past the deny-list."""
    raw, _, query = target.partition("?")
    if not raw.startswith("/v1/"):
        return None
    try:
        path = unquote(raw[4:], errors="strict")
    except UnicodeDecodeError:
        return None
    if not path or any(ord(ch) < 0x20 or ord(ch) == 0x7F or ch == "\\" for ch in path):
        return None
    segments = path.split("/")
    # An empty last segment is a trailing slash (a LIST's folder); any other empty, `.` or
    # `..` segment is a path Vault or a proxy might clean into another one.
    if any(segment in ("", ".", "..") for segment in segments[:-1]) or segments[-1] in (".", ".."):
        return None
    return path, query


def denied(path: str) -> bool:
    lowered = path.lower()
    return any(lowered == prefix or lowered.startswith(prefix) for prefix in DENIED)


def scrub(body: bytes, real_token: str) -> bytes | None:
    """Vault's answer without what only the gateway may hold; None if the real token is in
    it anyway (then nothing of it is relayed)."""
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        parsed.pop("auth", None)
        parsed.pop("wrap_info", None)
        data = parsed.get("data")
        if isinstance(data, dict):
            data.pop("id", None)  # auth/token/lookup-self answers the token itself here
        body = json.dumps(parsed).encode()
    if real_token and real_token.encode() in body:
        return None
    return body


def presented_token(headers: Mapping[str, str]) -> str | None:
    token = headers.get("x-vault-token")
    if token is None:
        authorization = headers.get("authorization", "")
        scheme, _, value = authorization.partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else None
    return token.strip() if token else None


class VaultAPI:
    """What the HTTP server does with one request; no sockets, so tests can call it too."""

    def __init__(self, service: GatewayService, vault: VaultSettings) -> None:
        self._service = service
        self._vault = vault
        self._base = vault.addr.rstrip("/")
        self._pool = _pool_manager(self._base, vault.verify_tls, MAX_CONNECTIONS, vault.timeout_seconds)

    def close(self) -> None:
        self._pool.clear()

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Answer:
        """`headers` with lower-cased names."""
        view = self._authenticate(headers)
        if isinstance(view, Answer):
            return view
        if not view.usable:
            self._service.forget(view.task_id)
            ended = "the task this handle belongs to has ended"
            return self._refuse(view, method, target, 403, ended, "task")
        parsed = vault_path(target)
        if parsed is None:
            return self._refuse(view, method, target, 400, "the gateway relays only clean /v1/ paths", "path")
        path, query = parsed
        if method == "GET" and parse_qs(query).get("list") == ["true"]:
            method = "LIST"  # what Vault (and so a rule) makes of it
        if method not in METHODS:
            return self._refuse(view, method, path, 405, "method not allowed", "method")
        if "x-vault-wrap-ttl" in headers:
            why = f"permission denied: response wrapping is refused ({WRAP_RULE})"
            return self._refuse(view, method, path, 403, why, WRAP_RULE)
        if denied(path):
            why = f"permission denied: the gateway never relays this path ({DENY_RULE})"
            return self._refuse(view, method, path, 403, why, DENY_RULE)
        verdict = self._service.judge(view, method, path)
        if not verdict.allowed:
            why = f"permission denied: refused by the task's request rule {verdict.rule!r}"
            return self._refuse(view, method, path, 403, why, verdict.rule)
        if not self._service.can_audit():
            return errors(503, "the gateway can't record requests now; nothing was sent")
        try:
            held = self._service.vault_token(view)
        except Refusal as refusal:
            status = 503 if refusal.sqlstate == CANNOT_CONNECT_NOW else 403
            return self._refuse(view, method, path, status, refusal.message, "issue")
        answer = self._forward(method, path, query, headers, body, held.token)
        self._audit(view, method, path, answer.status, allowed=True)
        return answer

    # ---- the parts ---------------------------------------------------------------------

    def _authenticate(self, headers: Mapping[str, str]) -> HandleView | Answer:
        token = presented_token(headers)
        parts = split_vault_token(token) if token else None
        if parts is None:
            # Not even the start of what was sent is recorded: it may be a real Vault token.
            self._service.refused("", None, "no handle" if not token else "not a handle")
            return errors(403, "permission denied: a gateway handle is needed")
        handle_id, secret = parts
        try:
            view = self._service.find(handle_id)
        except Refusal:
            return errors(503, "the gateway can't check handles now; retry shortly")
        if view is None:
            self._service.refused(handle_id, None, "unknown handle")
            return errors(403, "permission denied: a gateway handle is needed")
        if view.kind != "vault_token" or not sha256_matches(view.verifier, secret):
            self._service.refused(handle_id, view, "wrong secret")
            return errors(403, "permission denied: a gateway handle is needed")
        return view

    def _forward(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes, real_token: str
    ) -> Answer:
        sent = {name: headers[name] for name in _PASSED_HEADERS if name in headers}
        # The real token, always: whatever the client put in X-Vault-Token is not sent on.
        sent["X-Vault-Token"] = real_token
        sent["X-Vault-Request"] = "true"
        if self._vault.namespace:
            sent["X-Vault-Namespace"] = self._vault.namespace
        url = f"{self._base}/v1/{quote(path, safe='/')}" + (f"?{query}" if query else "")
        try:
            response = self._pool.request(method, url, body=body or None, headers=sent)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            log.warning("gateway: Vault did not answer a relayed request (%s)", type(error).__name__)
            return errors(502, "the gateway could not reach Vault")
        scrubbed = scrub(response.data, real_token)
        if scrubbed is None:
            log.warning("gateway: a Vault answer held the task's token; not relayed")
            return errors(502, "the gateway withheld Vault's answer")
        content_type = response.headers.get("Content-Type", "application/json")
        return Answer(response.status, scrubbed, content_type)

    def _refuse(
        self, view: HandleView, method: str, path: str, status: int, message: str, rule: str | None
    ) -> Answer:
        self._audit(view, method, path, status, allowed=False, rule=rule)
        return errors(status, message)

    def _audit(
        self, view: HandleView, method: str, path: str, status: int, *, allowed: bool, rule: str | None = None
    ) -> None:
        detail: dict[str, Any] = {
            "method": method[:16],
            "path": path.partition("?")[0][:MAX_AUDIT_PATH],
            "status": status,
            "allowed": allowed,
        }
        if rule is not None:
            detail["rule"] = rule
        self._service.requested(view, detail)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_SECONDS
    server: _Server

    def _relay(self) -> None:
        length_header = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") is not None:
            self._answer(errors(411, "the gateway takes only bodies with a Content-Length"), close=True)
            return
        try:
            length = int(length_header) if length_header is not None else 0
        except ValueError:
            length = -1
        if length < 0:
            self._answer(errors(400, "bad Content-Length"), close=True)
            return
        if length > MAX_BODY:
            self._answer(errors(413, "the request body is too large"), close=True)
            return
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            self.close_connection = True
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        # `/h/<handle>/...` is the HTTP proxy for `lease` credentials; the rest, Vault's API.
        api: VaultAPI | HttpProxy = self.server.api
        if self.path.startswith(HTTP_PREFIX) and self.server.http is not None:
            api = self.server.http
        try:
            answer = api.handle(self.command.upper(), self.path, headers, body)
        except Exception as error:  # one request's failure is not the server's
            log.warning("gateway: a Vault API request failed (%s)", type(error).__name__)
            answer = errors(500, "the gateway failed on this request")
        self._answer(answer)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_LIST = _relay

    def _answer(self, answer: Answer, *, close: bool = False) -> None:
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in getattr(answer, "headers", ()):  # an HTTP proxy answer's upstream headers
            self.send_header(name, value)
        if close:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(answer.body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The standard library's HTML page quotes the client's bytes back; a fixed phrase
        # in Vault's shape instead, and the connection closed (what came next is unknown).
        self.close_connection = True
        with contextlib.suppress(OSError):
            self._answer(errors(code, "the gateway could not read this request"), close=True)

    def log_message(self, format: str, *args: Any) -> None:
        return  # each request is audited; a log line would only repeat its path


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], api: VaultAPI, http: HttpProxy | None = None) -> None:
        self.api = api
        self.http = http
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):  # full: this connection is closed unread
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("gateway: a Vault API connection failed")


class VaultAPIServer:
    """The Vault API's HTTP server on a thread of its own; `start` binds, `stop` closes."""

    def __init__(self, host: str, port: int, service: GatewayService, vault: VaultSettings) -> None:
        self._address = (host, port)
        self.api = VaultAPI(service, vault)
        # Imported here: the proxy builds on this module's Answer and bounds.
        from broker.gateway.httpproxy import HttpProxy

        self.http = HttpProxy(service)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._server = _Server(self._address, self.api, self.http)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="gateway-vault-api", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.api.close()
        self.http.close()


__all__ = ["DENIED", "Answer", "VaultAPI", "VaultAPIServer", "denied", "scrub", "vault_path"]
