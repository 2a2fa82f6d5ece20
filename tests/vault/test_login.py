"""The broker's own logins through hvac: AppRole against the real OpenBao, Kubernetes
against a local server answering like Vault, renew-self, a 403's re-login, and failures
that never carry a response body."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import hvac
import pytest

from broker.config import VaultAuth, VaultSettings
from broker.credentials import DatabaseCredential
from broker.dev.stack.openbao import free_port
from broker.dev.stack.vault_setup import VaultSetup
from broker.vault import VaultGateway, VaultRejected, VaultUnavailable, task_token_policies
from broker.vault.login import BrokerLogin

RO = DatabaseCredential(kind="database", role="analytics-ro")
APPROLE_MOUNT = "approle-hvac"


class MovableClock:
    def __init__(self) -> None:
        self.offset = timedelta()

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


# -- AppRole against the real OpenBao --------------------------------------------------


@pytest.fixture(scope="module")
def admin(bao) -> Iterator[hvac.Client]:
    client = hvac.Client(url=bao.addr, token=bao.root_token)
    if f"{APPROLE_MOUNT}/" not in client.sys.list_auth_methods()["data"]:
        client.sys.enable_auth_method("approle", path=APPROLE_MOUNT)
    yield client
    client.adapter.close()


def approle(admin: hvac.Client, vault_setup, name: str, **token: Any) -> VaultAuth:
    """An AppRole with the broker's policy; its credentials as the broker's settings."""
    options = {"token_ttl": "1h", "token_max_ttl": "2h", **token}
    admin.auth.approle.create_or_update_approle(
        name, token_policies=[vault_setup.broker_policy], token_no_default_policy=True,
        mount_point=APPROLE_MOUNT, **options,
    )  # fmt: skip
    role_id = admin.auth.approle.read_role_id(name, mount_point=APPROLE_MOUNT)["data"]["role_id"]
    secret_id = admin.auth.approle.generate_secret_id(name, mount_point=APPROLE_MOUNT)["data"]["secret_id"]
    return VaultAuth(method="approle", role_id=role_id, secret_id=secret_id, mount=APPROLE_MOUNT)


def lookup(admin: hvac.Client, token: str) -> dict[str, Any]:
    data: dict[str, Any] = admin.auth.token.lookup(token)["data"]  # hvac is untyped
    return data


def settings_for(vault_setup: VaultSetup, auth: VaultAuth) -> VaultSettings:
    return vault_setup.vault_settings(auth=auth, timeout_seconds=5)


def test_approle_login_issues_a_task(admin, vault_setup, pg):
    gw = VaultGateway(settings_for(vault_setup, approle(admin, vault_setup, "broker-hvac")))
    try:
        policy = gw.sync_task_policy("login-test", {"db": RO})
        token = gw.create_task_token(
            task_id=str(uuid.uuid4()), task="login-test", policies=task_token_policies(policy, {"db": RO}),
            ttl_seconds=60, meta={},
        )  # fmt: skip
        secret = gw.issue(token, RO, ttl_seconds=60, task_id="t", workload="w")
        assert pg.can_login(secret.data["username"], secret.data["password"])
        gw.revoke(secret.handle)
        gw.revoke_task_token(token.accessor)
        assert not pg.can_login(secret.data["username"], secret.data["password"])
    finally:
        gw.close()


def test_renew_self_extends_a_renewable_login_token(admin, vault_setup):
    auth = approle(admin, vault_setup, "broker-hvac-renew", token_ttl=60, token_max_ttl=3600)
    login = BrokerLogin(settings_for(vault_setup, auth), MovableClock())
    token = login.token()
    before = lookup(admin, token)
    assert before["renewable"] and "last_renewal_time" not in before
    login.renew()
    after = lookup(admin, token)
    assert login.token() == token  # renewed, not replaced
    assert after["last_renewal_time"]


def test_a_login_token_that_cannot_renew_is_replaced_by_a_new_login(admin, vault_setup):
    # Batch tokens are never renewable: renew() logs in again instead.
    auth = approle(admin, vault_setup, "broker-hvac-batch", token_type="batch")
    login = BrokerLogin(settings_for(vault_setup, auth), MovableClock())
    first = login.token()
    login.renew()
    assert login.token() != first


def test_a_renewal_refused_after_revocation_logs_in_again(admin, vault_setup):
    login = BrokerLogin(settings_for(vault_setup, approle(admin, vault_setup, "broker-hvac")), MovableClock())
    first = login.token()
    login.renew()  # learns that the token is renewable
    admin.auth.token.revoke(first)
    login.renew()  # renew-self: 403, so a fresh login
    second = login.token()
    assert second != first
    assert lookup(admin, second)["policies"] == [vault_setup.broker_policy]


def test_a_403_forgets_the_login_token_and_the_next_call_logs_in_again(admin, vault_setup):
    gw = VaultGateway(settings_for(vault_setup, approle(admin, vault_setup, "broker-hvac")))
    try:
        first = gw._login.token()
        admin.auth.token.revoke(first)
        gw.health()  # lookup-self: 403, forget, log in, retry
        assert gw._login.token() != first
    finally:
        gw.close()


def test_a_refused_secret_id_is_rejected_without_the_secret(admin, vault_setup):
    good = approle(admin, vault_setup, "broker-hvac")
    auth = good.model_copy(update={"secret_id": "not-the-SECRET-id"})
    login = BrokerLogin(settings_for(vault_setup, auth), MovableClock())
    with pytest.raises(VaultRejected) as caught:
        login.token()
    assert str(caught.value).startswith(f"vault login {APPROLE_MOUNT}:")
    assert caught.value.status == 400
    assert "SECRET" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_static_token_is_not_forgotten(vault_setup):
    login = BrokerLogin(vault_setup.vault_settings(), MovableClock())
    assert not login.forget(vault_setup.broker_token)
    assert login.token() == vault_setup.broker_token


# -- a local server answering like Vault -------------------------------------------------


class _FakeVault(ThreadingHTTPServer):
    """Answers every request with `answer` (status, body) and records what it was sent."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FakeHandler)
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.answer: tuple[int, Any] = (200, {})
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _FakeHandler(BaseHTTPRequestHandler):
    server: _FakeVault

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.server.requests.append((self.command, self.path, dict(self.headers), body))
        status, reply = self.server.answer
        data = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def fake_vault() -> Iterator[_FakeVault]:
    server = _FakeVault()
    yield server
    server.shutdown()
    server.server_close()


def _kubernetes(addr: str, jwt_path: str, **settings: Any) -> VaultSettings:
    auth = VaultAuth(method="kubernetes", role="broker", mount="k8s-prod", jwt_path=jwt_path)
    return VaultSettings(addr=addr, auth=auth, timeout_seconds=2, **settings)


def _granted(token: str, ttl: int) -> dict[str, Any]:
    return {"auth": {"client_token": token, "accessor": "acc", "lease_duration": ttl, "renewable": True}}


def test_kubernetes_login_sends_the_role_and_the_service_account_token(fake_vault, tmp_path):
    jwt_file = tmp_path / "token"
    jwt_file.write_text("eyJ.service-account.jwt\n")
    fake_vault.answer = (200, _granted("s.k8s-one", 3600))
    clock = MovableClock()
    login = BrokerLogin(_kubernetes(fake_vault.addr, str(jwt_file), namespace="team-a"), clock)
    assert fake_vault.requests == []  # lazy: nothing until a token is needed
    assert login.token() == "s.k8s-one"
    method, path, headers, body = fake_vault.requests[0]
    assert (method, path) == ("POST", "/v1/auth/k8s-prod/login")
    assert body == {"role": "broker", "jwt": "eyJ.service-account.jwt"}
    assert headers["X-Vault-Request"] == "true"
    assert headers["X-Vault-Namespace"] == "team-a"
    assert "X-Vault-Token" not in headers

    # An hour's token is kept until 5 minutes (the cap on a third of its TTL) are left.
    fake_vault.answer = (200, _granted("s.k8s-two", 3600))
    clock.offset = timedelta(minutes=54)
    assert login.token() == "s.k8s-one"
    clock.offset = timedelta(minutes=55, seconds=1)
    assert login.token() == "s.k8s-two"
    assert len(fake_vault.requests) == 2


def test_a_short_login_token_is_refreshed_with_a_third_of_its_ttl_left(fake_vault, tmp_path):
    jwt_file = tmp_path / "token"
    jwt_file.write_text("jwt")
    fake_vault.answer = (200, _granted("s.short", 90))
    clock = MovableClock()
    login = BrokerLogin(_kubernetes(fake_vault.addr, str(jwt_file)), clock)
    login.token()
    clock.offset = timedelta(seconds=59)
    login.token()
    assert len(fake_vault.requests) == 1
    clock.offset = timedelta(seconds=61)
    login.token()
    assert len(fake_vault.requests) == 2


def test_a_missing_service_account_token_names_the_problem_not_the_path(fake_vault, tmp_path):
    login = BrokerLogin(_kubernetes(fake_vault.addr, str(tmp_path / "no-such-token")), MovableClock())
    with pytest.raises(VaultUnavailable, match="cannot read the service-account token") as caught:
        login.token()
    assert "no-such-token" not in str(caught.value)
    assert fake_vault.requests == []


@pytest.mark.parametrize(
    ("status", "kind", "reason"),
    [
        (503, VaultUnavailable, "sealed"),
        (500, VaultUnavailable, "backend error"),
        (502, VaultUnavailable, "bad gateway"),
        (429, VaultUnavailable, "rate limited or standby"),
        (412, VaultUnavailable, "not yet replicated"),
        (400, VaultRejected, "invalid request"),
        (403, VaultRejected, "permission denied"),
        (405, VaultRejected, "unsupported operation"),
    ],
)
def test_error_answers_map_to_a_kind_and_a_fixed_reason(fake_vault, tmp_path, status, kind, reason):
    jwt_file = tmp_path / "token"
    jwt_file.write_text("jwt")
    # Bodies a real Vault could send: an error quoting SQL or a secret, a sealed notice.
    errors = {
        503: ["Vault is sealed; pw-SECRET"],
        500: ['failed to execute query: ERROR near "pw-SECRET"'],
        403: ["permission denied for pw-SECRET"],
    }.get(status, ["pw-SECRET in a message no one should see"])
    fake_vault.answer = (status, {"errors": errors})
    login = BrokerLogin(_kubernetes(fake_vault.addr, str(jwt_file)), MovableClock())
    with pytest.raises(kind) as caught:
        login.token()
    error = caught.value
    assert type(error) is kind
    assert str(error) == f"vault login k8s-prod: {reason} (HTTP {status})"
    assert error.status == status
    assert error.__cause__ is None and error.__suppress_context__


def test_an_answer_that_is_not_json_is_still_body_free(fake_vault, tmp_path):
    jwt_file = tmp_path / "token"
    jwt_file.write_text("jwt")
    fake_vault.answer = (502, "<html>upstream pw-SECRET</html>")
    login = BrokerLogin(_kubernetes(fake_vault.addr, str(jwt_file)), MovableClock())
    with pytest.raises(VaultUnavailable, match=r"^vault login k8s-prod: bad gateway \(HTTP 502\)$"):
        login.token()


def test_a_success_without_a_token_is_unavailable(fake_vault, tmp_path):
    jwt_file = tmp_path / "token"
    jwt_file.write_text("jwt")
    fake_vault.answer = (200, {"data": {}})
    login = BrokerLogin(_kubernetes(fake_vault.addr, str(jwt_file)), MovableClock())
    with pytest.raises(VaultUnavailable, match="answer without a token"):
        login.token()


def test_vault_down_is_unavailable_and_nothing_was_sent(tmp_path):
    jwt_file = tmp_path / "token"
    jwt_file.write_text("jwt")
    login = BrokerLogin(_kubernetes(f"http://127.0.0.1:{free_port()}", str(jwt_file)), MovableClock())
    with pytest.raises(VaultUnavailable) as caught:
        login.token()
    assert str(caught.value) == "vault login k8s-prod: cannot connect"
    assert caught.value.sent is False
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
