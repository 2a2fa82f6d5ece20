"""The SDK's backoff is bounded whatever the broker's `Retry-After` says.

A real HTTP server answers 503 or 429 with a hostile `Retry-After`; the client's sleeps are
recorded (injected `sleep`), so every pause and the number of requests can be checked without
waiting. The bounds: no pause over `MAX_RETRY_AFTER` (a longer ask ends the call at once),
no pause over the 8 s exponential cap when the header is unusable, and at most `retries + 1`
requests per call.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.client.errors import LimitExceeded, Unavailable
from broker.client.transport import MAX_RETRY_AFTER, ClientBase

_BACKOFF_CAP = 8.0 * 1.2  # `_backoff`'s cap with its largest jitter


class _Server:
    def __init__(self) -> None:
        self.status = 503
        self.retry_after: str | None = None
        self.requests = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with lock:
                    outer.requests += 1
                code = "vault_unavailable" if outer.status == 503 else "limit_exceeded"
                body = f'{{"code": "{code}", "detail": "later"}}'.encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/problem+json")
                self.send_header("Content-Length", str(len(body)))
                if outer.retry_after is not None:
                    self.send_header("Retry-After", outer.retry_after)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:  # quiet test output
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    running = _Server()
    thread = threading.Thread(target=running.httpd.serve_forever, daemon=True)
    thread.start()
    yield running
    running.httpd.shutdown()
    running.httpd.server_close()


def _call(server: _Server, status: int, retry_after: str | None, retries: int = 3) -> list[float]:
    server.status, server.retry_after, server.requests = status, retry_after, 0
    sleeps: list[float] = []
    client = ClientBase(server.url, "t.o.k", timeout=5, retries=retries, sleep=sleeps.append)
    with pytest.raises(Unavailable if status == 503 else LimitExceeded):
        client._call("GET", "/task/x", None, retry="safe")
    return sleeps


HOSTILE = [
    "1000000000",
    "1e9",
    "inf",
    "-5",
    "-inf",
    "nan",
    "soon",
    "",
    "Wed, 21 Oct 2015 07:28:00 GMT",
    "Fri, 31 Dec 9999 23:59:59 GMT",
    "61",
    "0x10",
]


@pytest.mark.parametrize("status", [503, 429])
@pytest.mark.parametrize("retry_after", HOSTILE)
def test_a_hostile_retry_after_leads_to_bounded_sleeps_and_bounded_requests(
    server: _Server, status: int, retry_after: str
) -> None:
    sleeps = _call(server, status, retry_after)
    assert server.requests <= 4 and len(sleeps) == server.requests - 1
    assert all(0 <= pause <= max(MAX_RETRY_AFTER, _BACKOFF_CAP) for pause in sleeps)


def test_a_retry_after_over_the_cap_ends_the_call_without_sleeping(server: _Server) -> None:
    assert _call(server, 503, "1000000000") == []
    assert server.requests == 1
    assert _call(server, 429, str(MAX_RETRY_AFTER + 1)) == []


def test_a_retry_after_within_the_cap_is_honoured_and_retries_are_counted(server: _Server) -> None:
    assert _call(server, 503, "2", retries=3) == [2.0, 2.0, 2.0]
    assert server.requests == 4
    assert _call(server, 429, str(MAX_RETRY_AFTER), retries=1) == [MAX_RETRY_AFTER]


def test_unusable_retry_after_falls_back_to_the_capped_exponential_backoff(server: _Server) -> None:
    sleeps = _call(server, 503, "Wed, 21 Oct 2015 07:28:00 GMT", retries=8)
    assert len(sleeps) == 8 and server.requests == 9
    assert all(pause <= _BACKOFF_CAP for pause in sleeps)


def test_the_cap_is_one_minute() -> None:
    # docs/clients.md promises "up to 60 s"; a change to the cap must change the docs.
    assert MAX_RETRY_AFTER == 60.0


@settings(max_examples=60, deadline=None)
@given(retry_after=st.text(max_size=40) | st.floats(allow_nan=True).map(repr) | st.integers().map(str))
def test_any_retry_after_leads_to_bounded_sleeps(server: _Server, retry_after: str) -> None:
    # Header values must be latin-1 without line breaks to be sent at all.
    value = "".join(ch for ch in retry_after if " " <= ch <= "~")
    sleeps = _call(server, 503, value, retries=2)
    assert server.requests <= 3
    assert all(0 <= pause <= max(MAX_RETRY_AFTER, _BACKOFF_CAP) for pause in sleeps)
