"""The Vault API's guards, without the stack: the path check, the deny-list, the scrub, the
handle check, the request rules at policy load, and what is sent upstream (docs/gateway.md,
"Vault API").

`VaultAPI.handle` runs against a stand-in service and a stand-in Vault that records what
it was sent, so each guard is shown to hold on its own, not only behind Vault's own ACLs.
"""

from __future__ import annotations

import json
import textwrap
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.config import VaultSettings
from broker.credentials import VaultTokenCredential, hashed_form
from broker.gateway.handles import new_vault_handle, sha256_matches, split_vault_token, vault_token_string
from broker.gateway.service import CANNOT_CONNECT_NOW, HeldToken, Refusal
from broker.gateway.vaultapi import DENY_RULE, WRAP_RULE, VaultAPI, denied, scrub, vault_path
from broker.ledger.gateway import HandleView
from broker.policy import PolicyError, parse_policy
from broker.policy.requests import compile_request_rules

REAL = "s.the-real-token-only-the-gateway-holds"


# ---- pure parts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/v1/auth/token/create",
        "/v1/auth/token/create-orphan",
        "/v1/auth/token/create/some-role",
        "/v1/auth/token/cre%61te",
        "/v1/Auth/Token/Create",
        "/v1/auth/token/revoke-self",
        "/v1/auth/token/revoke-accessor",
        "/v1/sys/wrapping/unwrap",
        "/v1/sys/wrapping",
        "/v1/sys/leases/revoke-prefix/database",
        "/v1/sys/revoke-force/x",
        "/v1/sys/renew/x",
    ],
)
def test_the_deny_list_holds_on_the_decoded_path(target: str) -> None:
    parsed = vault_path(target)
    assert parsed is not None
    assert denied(parsed[0])


@pytest.mark.parametrize(
    "path", ["secret/data/reports/q3", "auth/token/lookup-self", "sys/mounts", "secret/metadata/"]
)
def test_ordinary_paths_are_not_denied(path: str) -> None:
    assert vault_path("/v1/" + path) == (path, "")
    assert not denied(path)


@pytest.mark.parametrize(
    "target",
    [
        "/v2/secret",
        "/secret",
        "/v1/",
        "/v1/a//b",
        "/v1/a/./b",
        "/v1/a/../auth/token/create",
        "/v1/..",
        "/v1/a/%2e%2e/b",
        "/v1/a%00b",
        "/v1/a\\b",
        "/v1/%ff",
    ],
)
def test_unclean_paths_are_refused(target: str) -> None:
    assert vault_path(target) is None


def test_the_scrub_removes_auth_wrap_info_and_data_id() -> None:
    body = json.dumps(
        {
            "data": {"id": "hvs.x", "policies": ["p"], "accessor": "a"},
            "auth": {"client_token": "hvs.y"},
            "wrap_info": {"token": "hvs.z"},
        }
    ).encode()
    scrubbed = scrub(body, REAL)
    assert scrubbed is not None
    assert json.loads(scrubbed) == {"data": {"policies": ["p"], "accessor": "a"}}


def test_a_body_holding_the_real_token_is_never_relayed() -> None:
    assert scrub(f"token={REAL}".encode(), REAL) is None
    assert scrub(json.dumps({"data": {"nested": {"t": REAL}}}).encode(), REAL) is None
    assert scrub(b"plain text", REAL) == b"plain text"


def test_a_handle_token_splits_and_its_verifier_matches_only_its_secret() -> None:
    handle = new_vault_handle()
    token = vault_token_string(handle)
    assert split_vault_token(token) == (handle.id, handle.secret)
    assert handle.verifier == "sha256$" + __import__("hashlib").sha256(handle.secret.encode()).hexdigest()
    assert sha256_matches(handle.verifier, handle.secret)
    assert not sha256_matches(handle.verifier, handle.secret + "x")
    assert not sha256_matches("SCRAM-SHA-256$4096:abc$def:ghi", handle.secret)
    assert handle.secret not in repr(handle)


@given(st.text(max_size=300))
def test_anything_else_is_not_a_handle_token_or_splits_safely(token: str) -> None:
    parts = split_vault_token(token)
    if parts is not None:
        assert token == f"{parts[0]}.{parts[1]}" and parts[0].startswith("brk_")


# ---- the policy ------------------------------------------------------------------------

POLICY = textwrap.dedent(
    """\
    tasks:
      reports:
        description: Reports
        ttl: {default: 300, max: 900}
        workloads:
          - {issuer: spire, subject: "spiffe://example.org/agents/*"}
        owners: ["*@example.com"]
        credentials:
          token:
            kind: vault_token
            policies: [reports-read]
            delivery: gateway
            requests:
              - request.method in ["GET", "LIST"]
              - {name: reports-only, when: 'request.path.startsWith("secret/data/reports/")'}
    """
)


def test_request_rules_compile_at_load_and_judge_requests() -> None:
    rules = parse_policy(POLICY).task("reports").requests["token"]
    assert [rule.name for rule in rules.rules] == ["requests[0]", "reports-only"]
    assert rules.evaluate("GET", "secret/data/reports/q3").allowed
    refused = rules.evaluate("POST", "secret/data/reports/q3")
    assert (refused.allowed, refused.rule) == (False, "requests[0]")
    assert rules.evaluate("GET", "secret/data/payroll").rule == "reports-only"


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ("request.paht == 'x'", "paht"),
        ("statement.command == 'SELECT'", "unknown variable"),
        ("request.path ==", ""),
    ],
)
def test_a_bad_request_rule_is_a_load_error(rule: str, problem: str) -> None:
    text = POLICY.replace('request.method in ["GET", "LIST"]', json.dumps(rule))
    with pytest.raises(PolicyError) as raised:
        parse_policy(text)
    assert any("credentials.token.requests" in error and problem in error for error in raised.value.errors)


def test_requests_without_the_gateway_is_a_load_error() -> None:
    with pytest.raises(PolicyError) as raised:
        parse_policy(POLICY.replace("delivery: gateway", "delivery: direct"))
    assert any("requests" in error for error in raised.value.errors)


def test_the_approval_hash_of_a_direct_vault_token_is_unchanged() -> None:
    spec = VaultTokenCredential(kind="vault_token", policies=["reports-read"])
    assert hashed_form(spec) == {"kind": "vault_token", "policies": ["reports-read"]}
    gateway = VaultTokenCredential(kind="vault_token", policies=["p"], delivery="gateway", requests=["true"])
    assert hashed_form(gateway)["delivery"] == "gateway" and hashed_form(gateway)["requests"] == ["true"]


def test_compile_names_duplicates() -> None:
    with pytest.raises(PolicyError):
        compile_request_rules([{"name": "a", "when": "true"}, {"name": "a", "when": "true"}])


# ---- the relay, against a stand-in Vault --------------------------------------------------


@dataclass
class Seen:
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    answer: dict[str, Any] = field(default_factory=lambda: {"data": {"id": REAL, "policies": ["p"]}})


@pytest.fixture
def upstream() -> Iterator[tuple[str, Seen]]:
    seen = Seen()

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            seen.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            body = json.dumps(seen.answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_LIST = _any

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


class StandIn:
    """What `VaultAPI` asks of `GatewayService`, with one good handle."""

    def __init__(
        self, verifier: str, *, ended: bool = False, issue: Refusal | None = None, audit: bool = True
    ) -> None:
        self.issue, self.audit = issue, audit
        now = datetime.now(UTC)
        self.view = HandleView(
            id="brk_" + "0" * 24, name="token", kind="vault_token", verifier=verifier, task_id=uuid.uuid4(),
            task="reports", state="ended" if ended else "active", workload="agent", owner="a@example.com",
            purpose="p", expires_at=now + timedelta(minutes=5), now=now,
        )  # fmt: skip
        self.rules = parse_policy(POLICY).task("reports").requests["token"]
        self.refusals: list[str] = []
        self.refused_handles: list[str] = []
        self.audited: list[dict[str, Any]] = []
        self.issued = 0

    def find(self, handle_id: str) -> HandleView | None:
        return self.view if handle_id == self.view.id else None

    def refused(self, handle_id: str, view: HandleView | None, why: str) -> None:
        self.refusals.append(why)
        self.refused_handles.append(handle_id)

    def forget(self, task_id: uuid.UUID) -> None:
        return

    def judge(self, view: HandleView, method: str, path: str) -> Any:
        return self.rules.evaluate(method, path)

    def can_audit(self) -> bool:
        return self.audit

    def vault_token(self, view: HandleView) -> HeldToken:
        if self.issue is not None:
            raise self.issue
        self.issued += 1
        return HeldToken(token=REAL, expires_at=view.expires_at or view.now)

    def requested(self, view: HandleView, detail: dict[str, Any]) -> None:
        self.audited.append(dict(detail))


def relay(addr: str, secret: str = "s3cret", **stand_in: Any) -> tuple[VaultAPI, StandIn]:
    from broker.gateway.handles import sha256_verifier

    service = StandIn(sha256_verifier(secret), **stand_in)
    settings = VaultSettings.model_validate({"addr": addr, "auth": {"method": "token", "token": "t"}})
    return VaultAPI(cast(Any, service), settings), service


def token_for(service: StandIn, secret: str = "s3cret") -> str:
    return f"{service.view.id}.{secret}"


def test_the_real_token_replaces_the_clients_and_only_needed_headers_pass(upstream) -> None:
    addr, seen = upstream
    api, service = relay(addr)
    headers = {
        "x-vault-token": token_for(service),
        "authorization": "Bearer hvs.root",
        "x-vault-namespace": "elsewhere",
        "x-vault-policy-override": "true",
        "content-type": "application/json",
    }
    answer = api.handle("GET", "/v1/secret/data/reports/q3?version=2", headers, b"")
    assert answer.status == 200
    [(method, path, sent)] = seen.requests
    assert (method, path) == ("GET", "/v1/secret/data/reports/q3?version=2")
    assert sent["x-vault-token"] == REAL
    assert "authorization" not in sent and "x-vault-namespace" not in sent
    assert "x-vault-policy-override" not in sent
    # lookup-self style answer: data.id scrubbed, the token nowhere in what is relayed.
    assert REAL not in answer.body.decode() and json.loads(answer.body) == {"data": {"policies": ["p"]}}
    assert service.audited == [
        {"method": "GET", "path": "secret/data/reports/q3", "status": 200, "allowed": True}
    ]


def test_a_bearer_handle_works_too(upstream) -> None:
    addr, seen = upstream
    api, service = relay(addr)
    answer = api.handle(
        "GET", "/v1/secret/data/reports/q3", {"authorization": f"Bearer {token_for(service)}"}, b""
    )
    assert answer.status == 200 and seen.requests[0][2]["x-vault-token"] == REAL


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({}, "no handle"),
        ({"x-vault-token": "hvs.a-real-vault-token-sent-by-mistake"}, "not a handle"),
        ({"x-vault-token": "brk_" + "1" * 24 + ".s3cret"}, "unknown handle"),
        ({"x-vault-token": "brk_" + "0" * 24 + ".wrong"}, "wrong secret"),
    ],
)
def test_a_bad_handle_gets_403_and_nothing_is_sent(upstream, headers: dict[str, str], why: str) -> None:
    addr, seen = upstream
    api, service = relay(addr)
    answer = api.handle("GET", "/v1/secret/data/reports/q3", headers, b"")
    assert answer.status == 403 and json.loads(answer.body)["errors"]
    assert service.refusals == [why]
    assert "hvs" not in "".join(service.refused_handles)  # what was sent may be a real token
    assert seen.requests == [] and service.issued == 0


def test_an_ended_task_gets_403_and_nothing_is_sent(upstream) -> None:
    addr, seen = upstream
    api, service = relay(addr, ended=True)
    answer = api.handle("GET", "/v1/secret/data/reports/q3", {"x-vault-token": token_for(service)}, b"")
    assert answer.status == 403 and "ended" in answer.body.decode()
    assert seen.requests == [] and service.issued == 0


@pytest.mark.parametrize(
    ("method", "target", "extra", "rule"),
    [
        ("POST", "/v1/auth/token/create", {}, DENY_RULE),
        ("POST", "/v1/auth/token/cre%61te", {}, DENY_RULE),
        ("PUT", "/v1/sys/wrapping/wrap", {}, DENY_RULE),
        ("GET", "/v1/secret/data/reports/q3", {"x-vault-wrap-ttl": "1m"}, WRAP_RULE),
        ("GET", "/v1/secret/data/payroll", {}, "reports-only"),
        ("POST", "/v1/secret/data/reports/q3", {}, "requests[0]"),
    ],
)
def test_refused_requests_name_their_rule_and_never_reach_vault(
    upstream, method: str, target: str, extra: dict[str, str], rule: str
) -> None:
    addr, seen = upstream
    api, service = relay(addr)
    answer = api.handle(method, target, {"x-vault-token": token_for(service), **extra}, b"{}")
    assert answer.status == 403
    assert rule in json.loads(answer.body)["errors"][0]
    assert seen.requests == []
    assert service.audited[-1]["rule"] == rule and service.audited[-1]["allowed"] is False


def test_a_get_with_list_true_is_a_list_to_the_rules(upstream) -> None:
    addr, seen = upstream
    api, service = relay(addr)
    answer = api.handle(
        "GET", "/v1/secret/data/reports/?list=true", {"x-vault-token": token_for(service)}, b""
    )
    assert answer.status == 200
    assert service.audited[-1]["method"] == "LIST"
    assert seen.requests[0][1] == "/v1/secret/data/reports/?list=true"  # sent as the client sent it


def test_the_gateway_settings_take_an_http_bind() -> None:
    from pydantic import ValidationError

    from broker.config import GatewaySettings

    plain = GatewaySettings()
    assert (plain.http_bind, plain.http_host, plain.http_port) == (None, None, None)
    served = GatewaySettings(http_bind="0.0.0.0:8201", advertise_http_port=443)
    assert (served.http_host, served.http_port, served.advertise_http_port) == ("0.0.0.0", 8201, 443)
    with pytest.raises(ValidationError):
        GatewaySettings(postgres_bind="127.0.0.1:6432", http_bind="127.0.0.1:6432")
    with pytest.raises(ValidationError):
        GatewaySettings(http_bind="no-port")


def test_no_vault_token_is_503_and_nothing_is_sent(upstream) -> None:
    addr, seen = upstream
    api, service = relay(addr, issue=Refusal(CANNOT_CONNECT_NOW, "retry"))
    answer = api.handle("GET", "/v1/secret/data/reports/q3", {"x-vault-token": token_for(service)}, b"")
    assert answer.status == 503 and seen.requests == []
    assert service.audited[-1] == {
        "method": "GET", "path": "secret/data/reports/q3", "status": 503, "allowed": False, "rule": "issue"
    }  # fmt: skip


def test_without_room_in_the_audit_nothing_is_sent(upstream) -> None:
    addr, seen = upstream
    api, service = relay(addr, audit=False)
    answer = api.handle("GET", "/v1/secret/data/reports/q3", {"x-vault-token": token_for(service)}, b"")
    assert answer.status == 503 and seen.requests == [] and service.issued == 0
