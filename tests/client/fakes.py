"""A tiny HTTP server in a thread that answers from a script, recording every request.

Stands in for GitHub's OIDC endpoint, or for a broker that fails in ways the real one
can't be made to on demand (503 twice, then an answer; an answer that never comes).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


Responder = Callable[[Seen], Reply]


@contextmanager
def fake_server(respond: Responder) -> Iterator[tuple[str, list[Seen]]]:
    """`(base_url, requests_seen)` of a server calling `respond` for each request."""
    seen: list[Seen] = []

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            request = Seen(
                self.command,
                parts.path,
                parse_qs(parts.query),
                {k.lower(): v for k, v in self.headers.items()},
                json.loads(raw) if raw else None,
            )
            seen.append(request)
            reply = respond(request)
            if reply.delay:
                time.sleep(reply.delay)
            payload = b"" if reply.body is None else json.dumps(reply.body).encode()
            self.send_response(reply.status)
            content_type = "application/problem+json" if reply.status >= 400 else "application/json"
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _handle

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def github_oidc(token_for: Callable[[str], str]) -> Responder:
    """GitHub's `ACTIONS_ID_TOKEN_REQUEST_URL`: `{"value": jwt}` for the asked audience."""

    def respond(request: Seen) -> Reply:
        if request.headers.get("authorization") != "Bearer runner-request-token":
            return Reply(401, {"message": "bad request token"})
        [audience] = request.query.get("audience", [""])
        return Reply(200, {"count": 1, "value": token_for(audience)})

    return respond
