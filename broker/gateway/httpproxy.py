"""The gateway's HTTP proxy: `lease` credentials with `delivery: gateway` (docs/gateway.md,
"HTTP").

The workload calls `http://<gateway>/h/<handle id>/<path>` with the handle's secret in
`X-Broker-Handle`. For each request the gateway:
  1. checks the secret against the ledger's `sha256$` verifier, in constant time, and that
     the handle's task is still active;
  2. checks the path: percent-decoded, no empty, `.` or `..` segment, no control character
     or backslash, so nothing climbs out of the upstream's base path; then the task's
     `requests:` rules (CEL over `request.method` and that path);
  3. sends the request to the credential's `gateway.upstream` and nowhere else: its scheme,
     host, port and base path come from the policy, the client's path is appended under
     it re-encoded, the Host header is the upstream's. The real header (filled from the
     lease's data) replaces the client's copy of it; `X-Broker-Handle`, hop-by-hop and
     `Proxy-*` headers are dropped;
  4. never follows a redirect: a 3xx is relayed as it is, so the credential is never sent
     to a `Location`; and withholds (502) any answer whose body or headers carry a value
     the credential was filled from.
Every request with a good handle is a `gateway.request` event with `detail.kind = "http"`;
a bad handle is a `gateway.handle_refused` event.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import urllib3

from broker.gateway.handles import HANDLE_PREFIX, HTTP_PREFIX, sha256_matches
from broker.gateway.service import CANNOT_CONNECT_NOW, GatewayService, HeldHeader, Refusal
from broker.gateway.vaultapi import MAX_AUDIT_PATH, MAX_BODY, MAX_CONNECTIONS, Answer
from broker.ledger.gateway import HandleView

log = logging.getLogger(__name__)

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
# The largest answer relayed: it is read whole, to be checked for the credential first.
MAX_ANSWER = 8 * MAX_BODY
UPSTREAM_TIMEOUT_SECONDS = 30.0
# Never sent on (RFC 9110 §7.6.1 hop-by-hop, plus what the gateway sets itself). A header
# the client names in `Connection` is hop-by-hop too.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host",
     "content-length", "x-broker-handle", "accept-encoding", "expect"}
)  # fmt: skip
# Never relayed back: the gateway frames its own answer (and sends decoded bodies), and
# sends its own `Date` and `Server`.
_ANSWER_DROPPED = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "content-length",
     "content-encoding", "content-type", "cache-control", "date", "server"}
)  # fmt: skip
# Never in a decoded path: control characters (header injection upstream) and backslashes
# (some servers read them as `/`). The raw query, passed as it is, has no space or `#` too.
_PATH_FORBIDDEN = frozenset("\\") | {chr(n) for n in range(0x20)} | {"\x7f"}
_QUERY_FORBIDDEN = _PATH_FORBIDDEN | frozenset(" #")
# Kept as they are when the checked path is encoded again (RFC 3986 pchar, less `%`).
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


@dataclass(frozen=True)
class ProxyAnswer(Answer):
    """An answer with the upstream's headers to relay beside the gateway's own."""

    headers: tuple[tuple[str, str], ...] = field(default=())


def http_error(status: int, message: str) -> Answer:
    return Answer(status, (message + "\n").encode(), "text/plain; charset=utf-8")


def split_target(target: str) -> tuple[str, str, str] | None:
    """(handle id, decoded path under the handle, raw query) of `/h/<id>/<path>?<query>`,
    or None when it is not a clean one. The path is what the rules see and what is sent,
    re-encoded: `%2e%2e` is `..` here, and refused."""
    if not target.startswith(HTTP_PREFIX):
        return None
    raw, _, query = target.partition("?")
    handle_id, slash, rest = raw[len(HTTP_PREFIX) :].partition("/")
    if not slash or not handle_id.startswith(HANDLE_PREFIX) or not handle_id[len(HANDLE_PREFIX) :].isalnum():
        return None
    try:
        path = unquote(rest, errors="strict")
    except UnicodeDecodeError:
        return None
    if any(ch in _PATH_FORBIDDEN for ch in path) or any(ch in _QUERY_FORBIDDEN for ch in query):
        return None
    if path:
        segments = path.split("/")
        # A trailing slash is an empty last segment; any other empty, `.` or `..` segment is
        # a path the upstream (or a proxy before it) might clean into another one.
        if any(segment in ("", ".", "..") for segment in segments[:-1]) or segments[-1] in (".", ".."):
            return None
    return handle_id, path, query


def upstream_url(upstream: str, path: str, query: str) -> str:
    """The one URL a request may go to: the policy's scheme, host, port and base path, with
    the checked path under it. Never a URL the client wrote."""
    base = urlsplit(upstream)
    base_path = base.path.rstrip("/")
    url = f"{base.scheme}://{base.netloc}{base_path}/{quote(path, safe=_PATH_SAFE)}"
    return url + (f"?{query}" if query else "")


def forwarded_headers(headers: Mapping[str, str], held: HeldHeader) -> dict[str, str]:
    """The client's headers less what must not pass, and the real header, always replacing
    the client's copy of it. `headers` with lower-cased names."""
    named = {token.strip().lower() for token in headers.get("connection", "").split(",") if token.strip()}
    sent = {
        name: value
        for name, value in headers.items()
        if name not in _HOP_BY_HOP
        and name not in named
        and not name.startswith("proxy-")
        and name != held.name.lower()
    }
    sent[held.name] = held.value
    # Identity bodies only: a compressed answer would hide the credential from the check.
    sent["Accept-Encoding"] = "identity"
    return sent


def leaks(held: HeldHeader, body: bytes, headers: tuple[tuple[str, str], ...]) -> bool:
    """Whether an answer carries back any value the credential was filled from."""
    for secret in held.secrets:
        if secret.encode() in body or any(secret in value or secret in name for name, value in headers):
            return True
    return False


class HttpProxy:
    """What the HTTP server does with one `/h/` request; no sockets of its own but the
    upstream's, so tests can call it too."""

    def __init__(self, service: GatewayService) -> None:
        self._service = service
        # No retries and no redirects, ever: a 3xx is the client's to see, and a retry could
        # send a non-idempotent request twice. Certificates checked against the system's CAs.
        self._pool = urllib3.PoolManager(
            num_pools=MAX_CONNECTIONS,
            maxsize=4,
            retries=False,
            timeout=urllib3.Timeout(connect=10.0, read=UPSTREAM_TIMEOUT_SECONDS),
            cert_reqs="CERT_REQUIRED",
        )

    def close(self) -> None:
        self._pool.clear()

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Answer:
        """`headers` with lower-cased names."""
        parsed = split_target(target)
        if parsed is None:
            # The handle can't be told apart from the path: refused before anything else.
            self._service.refused("", None, "not a handle path")
            return http_error(400, "the gateway relays only clean /h/<handle>/<path> requests")
        handle_id, path, query = parsed
        view = self._authenticate(handle_id, headers)
        if isinstance(view, Answer):
            return view
        if not view.usable:
            self._service.forget(view.task_id)
            return self._refuse(view, method, path, 403, "the task this handle belongs to has ended", "task")
        if method not in METHODS:
            return self._refuse(view, method, path, 405, "method not allowed", "method")
        verdict = self._service.judge(view, method, path)
        if not verdict.allowed:
            why = f"refused by the task's request rule {verdict.rule!r}"
            return self._refuse(view, method, path, 403, why, verdict.rule)
        if not self._service.can_audit():
            return http_error(503, "the gateway can't record requests now; nothing was sent")
        try:
            held = self._service.http_header(view)
        except Refusal as refusal:
            status = 503 if refusal.sqlstate == CANNOT_CONNECT_NOW else 403
            return self._refuse(view, method, path, status, refusal.message, "issue")
        answer = self._forward(method, path, query, headers, body, held)
        self._audit(view, method, path, answer.status, allowed=True)
        return answer

    # ---- the parts ---------------------------------------------------------------------

    def _authenticate(self, handle_id: str, headers: Mapping[str, str]) -> HandleView | Answer:
        secret = headers.get("x-broker-handle", "").strip()
        refused = http_error(403, "a gateway handle is needed")
        try:
            view = self._service.find(handle_id)
        except Refusal:
            return http_error(503, "the gateway can't check handles now; retry shortly")
        if view is None:
            self._service.refused(handle_id, None, "unknown handle")
            return refused
        if view.kind != "lease" or not secret or not sha256_matches(view.verifier, secret):
            self._service.refused(handle_id, view, "wrong secret" if secret else "no handle")
            return refused
        return view

    def _forward(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes, held: HeldHeader
    ) -> Answer:
        url = upstream_url(held.upstream, path, query)
        try:
            response = self._pool.request(
                method, url, body=body or None, headers=forwarded_headers(headers, held),
                redirect=False, retries=False, preload_content=False, decode_content=True,
            )  # fmt: skip
            try:
                data = response.read(MAX_ANSWER + 1)
            finally:
                response.release_conn()
        except (urllib3.exceptions.HTTPError, OSError) as error:
            log.warning("gateway: the upstream did not answer a relayed request (%s)", type(error).__name__)
            return http_error(502, "the gateway could not reach the upstream")
        if len(data) > MAX_ANSWER:
            return http_error(502, "the upstream's answer is too large to relay")
        relayed = tuple(
            (name, value)
            for name, value in response.headers.iteritems()
            if name.lower() not in _ANSWER_DROPPED and not name.lower().startswith("proxy-")
        )
        if leaks(held, data, relayed):
            log.warning("gateway: an upstream answer held the task's credential; not relayed")
            return http_error(502, "the gateway withheld the upstream's answer")
        content_type = response.headers.get("Content-Type", "application/octet-stream")
        if leaks(held, content_type.encode(), ()):
            return http_error(502, "the gateway withheld the upstream's answer")
        return ProxyAnswer(response.status, data, content_type, relayed)

    def _refuse(
        self, view: HandleView, method: str, path: str, status: int, message: str, rule: str | None
    ) -> Answer:
        self._audit(view, method, path, status, allowed=False, rule=rule)
        return http_error(status, message)

    def _audit(
        self, view: HandleView, method: str, path: str, status: int, *, allowed: bool, rule: str | None = None
    ) -> None:
        detail: dict[str, Any] = {
            "kind": "http",
            "method": method[:16],
            "path": path[:MAX_AUDIT_PATH],
            "status": status,
            "allowed": allowed,
        }
        if rule is not None:
            detail["rule"] = rule
        self._service.requested(view, detail)


__all__ = ["HttpProxy", "ProxyAnswer", "forwarded_headers", "leaks", "split_target", "upstream_url"]
