"""The gateway's HTTP proxy, end to end: a real lease from the stack's OpenBao, real HTTP
upstreams on loopback (docs/gateway.md, "HTTP").

The upstream gets the real header and the client never sees it (answer, handle, ledger,
audit); the client's own Authorization is replaced; paths that try to climb out of the
upstream's base path are refused; a redirect is relayed, never followed, and its target
never sees the credential; an answer carrying the credential is withheld; the rules refuse
by name; a finish refuses the handle; junk HTTP leaves the server serving.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.config import settings_from_mapping
from broker.dev.stack.postgres import free_port
from broker.services import build_services
from tests.conftest import broker_config
from tests.factories import AGENT, start_task
from tests.support.gateway import (
    HTTP_TASK,
    api_and_gateway,
    gateway_section,
    http_gateway_policy,
    ledger_rows,
    send_raw,
)
from tests.support.waiting import wait_for


class Recorder(ThreadingHTTPServer):
    """A loopback HTTP server that records what it was sent; `redirect_to` makes
    `/api/redirect` answer 302 there, `/api/echo` answers the request's headers back."""

    daemon_threads = True

    def __init__(self, redirect_to: str = "") -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.redirect_to = redirect_to
        super().__init__(("127.0.0.1", 0), _Recording)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Recording(BaseHTTPRequestHandler):
    server: Recorder
    protocol_version = "HTTP/1.1"

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        if self.path.startswith("/api/redirect") and self.server.redirect_to:
            self.send_response(302)
            self.send_header("Location", self.server.redirect_to + "/stolen")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/api/echo"):
            body = json.dumps(dict(self.headers.items())).encode()
        else:
            body = json.dumps({"ok": True, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Upstream", "yes")
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def upstreams() -> Iterator[tuple[Recorder, Recorder]]:
    elsewhere = Recorder()
    upstream = Recorder(redirect_to=elsewhere.url)
    yield upstream, elsewhere
    for server in (upstream, elsewhere):
        server.shutdown()
        server.server_close()


@pytest.fixture
def broker(stack, issuers, tmp_path, clean_db, upstreams):
    """The API in this process and a gateway beside it."""
    upstream, _ = upstreams
    policy = http_gateway_policy(tmp_path / "policy.yaml", upstream.url + "/api", ttl=60)
    with api_and_gateway(stack, issuers, policy, http_bind=True) as parts:
        yield parts


def started(client: Any, issuers: Any) -> tuple[str, dict[str, Any]]:
    response = start_task(client, issuers, HTTP_TASK)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    return body["task_id"], body["credentials"]["api"]


def call(handle: dict[str, Any], method: str, path: str, **headers: str) -> requests.Response:
    return requests.request(
        method, handle["url"] + path, headers={handle["header"]: handle["token"], **headers},
        allow_redirects=False, timeout=10,
    )  # fmt: skip


def real_header(gateway: Any) -> str:
    [held] = gateway.service._http_headers.values()
    return str(held.value)


def audited(stack: Any) -> list[dict[str, Any]]:
    return [
        row.detail
        for row in ledger_rows(
            stack, "SELECT detail FROM audit_events WHERE event = 'gateway.request' ORDER BY seq"
        )
    ]


def test_the_start_answers_a_url_and_a_header(broker, issuers, stack):
    client, services, _ = broker
    task_id, credential = started(client, issuers)
    assert credential["kind"] == "lease" and credential["delivery"] == "gateway"
    handle = credential["data"]
    assert set(handle) == {"url", "header", "token"} and handle["header"] == "X-Broker-Handle"
    port = services.settings.gateway.http_port
    assert handle["url"].startswith(f"http://127.0.0.1:{port}/h/brk_") and handle["url"].endswith("/")
    handle_id = handle["url"].rstrip("/").rsplit("/", 1)[1]
    [row] = ledger_rows(stack, "SELECT kind, verifier FROM gateway_handles WHERE id = :id", id=handle_id)
    assert row.kind == "lease" and row.verifier.startswith("sha256$") and handle["token"] not in row.verifier
    assert ledger_rows(stack, "SELECT id FROM leases WHERE task_id = :t", t=task_id) == []


def test_the_upstream_gets_the_real_header_and_the_client_never_sees_it(broker, issuers, stack, upstreams):
    client, _, gateway = broker
    upstream, _ = upstreams
    task_id, credential = started(client, issuers)
    handle = credential["data"]
    answer = call(handle, "GET", "reports/q3?x=1", Authorization="Bearer the-clients-own")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"ok": True, "path": "/api/reports/q3?x=1"}
    assert answer.headers["X-Upstream"] == "yes"
    assert answer.headers["Date"].count(",") == 1  # one Date (the gateway's), not two joined
    real = real_header(gateway)
    assert real.startswith("Bearer v-") and "." in real
    [(method, path, headers)] = upstream.seen
    assert (method, path) == ("GET", "/api/reports/q3?x=1")
    assert headers["authorization"] == real  # the client's own replaced, not forwarded beside it
    assert "the-clients-own" not in json.dumps(headers)
    assert "x-broker-handle" not in headers and headers["host"] == urlsplit(upstream.url).netloc
    secret = real.removeprefix("Bearer ")
    assert secret not in answer.text and secret not in json.dumps(dict(answer.headers))
    assert secret not in json.dumps(credential)
    dump = ledger_rows(stack, "SELECT string_agg(a::text, '') AS dump FROM audit_events a")[0].dump
    password = secret.split(".", 1)[1]
    assert password not in dump and handle["token"] not in dump
    for table in ("gateway_handles", "leases", "tasks"):
        assert password not in ledger_rows(stack, f"SELECT string_agg(t::text, '') AS d FROM {table} t")[0].d
    names = {r.name for r in ledger_rows(stack, "SELECT name FROM leases WHERE task_id = :t", t=task_id)}
    replica = gateway.service.replica
    [issuance] = [name for name in names if not name.endswith(":token")]
    assert re.fullmatch(rf"api@{replica}\.[0-9a-f]{{4}}", issuance)
    assert names == {issuance, f"{issuance}:token"}
    wait_for(lambda: any(d.get("kind") == "http" and d["status"] == 200 for d in audited(stack)), timeout=5)


def test_an_answer_carrying_the_credential_is_withheld(broker, issuers, upstreams):
    client, _, gateway = broker
    upstream, _ = upstreams
    _, credential = started(client, issuers)
    answer = call(credential["data"], "GET", "echo")
    assert answer.status_code == 502
    assert len(upstream.seen) == 1  # it did reach the upstream, whose echo was not relayed
    assert real_header(gateway).removeprefix("Bearer ") not in answer.text


def test_a_redirect_is_relayed_and_never_followed(broker, issuers, upstreams):
    client, _, _ = broker
    upstream, elsewhere = upstreams
    _, credential = started(client, issuers)
    answer = call(credential["data"], "GET", "redirect")
    assert answer.status_code == 302
    assert answer.headers["Location"] == elsewhere.url + "/stolen"
    assert len(upstream.seen) == 1 and elsewhere.seen == []


@pytest.mark.parametrize(
    "path",
    [
        "../../x", "..%2f..%2fx", "%2e%2e/%2e%2e/x", "%2E%2E", "a/../../x", "a/./b", "/evil", "//evil",
        "a//b", "a\\..\\x", "%5c..%5cx", "a%00b", "%ff",
    ],
)  # fmt: skip
def test_paths_that_climb_out_are_refused(broker, issuers, upstreams, path):
    client, _, _ = broker
    upstream, _ = upstreams
    _, credential = started(client, issuers)
    handle = credential["data"]
    parts = urlsplit(handle["url"])
    # Sent raw, so no client library cleans the path first.
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    connection.request("GET", parts.path + path, headers={handle["header"]: handle["token"]})
    status = connection.getresponse().status
    connection.close()
    assert status == 400, path
    assert all(seen_path.startswith("/api/") for _, seen_path, _ in upstream.seen)
    assert upstream.seen == []


def test_absolute_url_forms_never_reach_another_host(broker, issuers, upstreams):
    client, _, _ = broker
    _, elsewhere = upstreams
    _, credential = started(client, issuers)
    handle = credential["data"]
    parts = urlsplit(handle["url"])
    for target in (
        elsewhere.url + "/x",
        elsewhere.url + parts.path + "x",
        "http://" + urlsplit(elsewhere.url).netloc,
    ):
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
        connection.request("GET", target, headers={handle["header"]: handle["token"]})
        assert connection.getresponse().status in (400, 403), target
        connection.close()
    # A path that names a URL stays a path under the upstream's base.
    answer = call(handle, "GET", "http:/" + urlsplit(elsewhere.url).netloc + "/x")
    assert answer.status_code == 200 and answer.json()["path"].startswith("/api/http:/")
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    connection.request("CONNECT", urlsplit(elsewhere.url).netloc)
    assert connection.getresponse().status >= 400
    connection.close()
    assert elsewhere.seen == []


def test_the_rules_refuse_by_name(broker, issuers, stack, upstreams):
    client, _, _ = broker
    upstream, _ = upstreams
    _, credential = started(client, issuers)
    handle = credential["data"]
    deleted = call(handle, "DELETE", "reports/q3")
    assert deleted.status_code == 403 and "no-delete" in deleted.text
    admin = call(handle, "POST", "admin/users")
    assert admin.status_code == 403 and "no-admin" in admin.text
    assert upstream.seen == []
    wait_for(lambda: {d.get("rule") for d in audited(stack)} >= {"no-delete", "no-admin"}, timeout=5)


def test_wrong_and_unknown_handles_are_refused_and_audited(broker, issuers, stack, upstreams):
    client, _, _ = broker
    upstream, _ = upstreams
    _, credential = started(client, issuers)
    handle = credential["data"]
    base = handle["url"]
    other = base.rsplit("/h/", 1)[0] + "/h/brk_000000000000000000000000/"
    for url, token in ((base, "wrong"), (base, ""), (other, handle["token"])):
        answer = requests.get(url + "x", headers={"X-Broker-Handle": token} if token else {}, timeout=10)
        assert answer.status_code == 403
    # The secret as a Vault token does nothing either.
    assert requests.get(base + "x", headers={"X-Vault-Token": handle["token"]}, timeout=10).status_code == 403
    assert upstream.seen == []
    wait_for(
        lambda: (
            len(ledger_rows(stack, "SELECT 1 FROM audit_events WHERE event = 'gateway.handle_refused'")) >= 3
        ),
        timeout=5,
    )


def test_after_finish_the_handle_is_refused(broker, issuers, stack, upstreams):
    client, _, gateway = broker
    upstream, _ = upstreams
    task_id, credential = started(client, issuers)
    handle = credential["data"]
    assert call(handle, "GET", "x").status_code == 200
    finished = client.post("/task/finish", json={"task_id": task_id}, headers=issuers["spire"].bearer(AGENT))
    assert finished.status_code == 200, finished.get_json()
    assert call(handle, "GET", "x").status_code == 403
    assert len(upstream.seen) == 1
    wait_for(lambda: gateway.service._http_headers == {}, timeout=5)
    states = {r.state for r in ledger_rows(stack, "SELECT state FROM leases WHERE task_id = :t", t=task_id)}
    assert states == {"revoked"}


def test_a_gateway_without_http_bind_refuses_the_start(stack, issuers, tmp_path, clean_db):
    policy = http_gateway_policy(tmp_path / "policy.yaml", "http://127.0.0.1:9/api")
    config = broker_config(stack, issuers, policy, gateway=gateway_section(free_port()))
    services = build_services(settings_from_mapping(config, env={}))
    from broker.app import create_app

    client = create_app(services=services).test_client()
    try:
        response = start_task(client, issuers, HTTP_TASK)
        assert response.status_code == 502, response.get_json()
        assert "serves no HTTP" in response.get_json()["detail"]
        assert ledger_rows(stack, "SELECT id FROM gateway_handles") == []
        assert ledger_rows(stack, "SELECT id FROM leases") == []
    finally:
        services.close()


_JUNK = st.one_of(
    st.binary(min_size=1, max_size=2048),
    st.builds(
        lambda p: b"GET /h/" + p.encode("utf-8", "replace") + b" HTTP/1.1\r\nX-Broker-Handle: x\r\n\r\n",
        st.text(min_size=0, max_size=80),
    ),
    st.builds(
        lambda m: m.encode() + b" /h/brk_1/x HTTP/1.1\r\nHost: x\r\n\r\n",
        st.text("ABCXYZ_-", min_size=1, max_size=20),
    ),
    st.just(b"CONNECT evil:443 HTTP/1.1\r\n\r\n"),
    st.just(b"GET http://evil/ HTTP/1.1\r\n\r\n"),
)


def test_junk_http_leaves_the_server_serving(broker, issuers, upstreams):
    client, _, _ = broker
    _, elsewhere = upstreams
    _, credential = started(client, issuers)
    handle = credential["data"]
    port = urlsplit(handle["url"]).port
    assert port is not None

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(payload=_JUNK)
    def junk(payload: bytes) -> None:
        send_raw(port, payload)

    junk()
    assert call(handle, "GET", "still").status_code == 200
    assert elsewhere.seen == []
