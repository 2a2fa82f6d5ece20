"""Failures map to VaultUnavailable / VaultRejected quickly and without secrets."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from broker.config import VaultAuth, VaultSettings
from broker.credentials import DatabaseCredential
from broker.dev.stack.openbao import free_port, start_openbao
from broker.vault import RevokeHandle, TaskToken, VaultGateway, VaultRejected, VaultUnavailable
from broker.vault.http import VaultHTTP, safe_reason

RO = DatabaseCredential(kind="database", role="analytics-ro")


def gateway_for(addr: str, token: str = "dev-nothing", timeout: float = 2) -> VaultGateway:
    return VaultGateway(
        VaultSettings(addr=addr, auth=VaultAuth(method="token", token=token), timeout_seconds=timeout)
    )


def every_call(gw: VaultGateway) -> list[Callable[[], object]]:
    token = TaskToken("s.fake", "acc", datetime.now(UTC) + timedelta(minutes=1))
    return [
        gw.health,
        lambda: gw.sync_task_policy("unavailable-test", {"db": RO}),
        lambda: gw.create_task_token(task_id="t", task="x", policies=["p"], ttl_seconds=60, meta={}),
        lambda: gw.issue(token, RO, ttl_seconds=60, task_id="t", workload="w"),
        lambda: gw.revoke(RevokeHandle("lease", "database/creds/analytics-ro/x")),
        lambda: gw.revoke(RevokeHandle("token", "acc")),
        lambda: gw.token_alive("acc"),
        gw.renew_self,
    ]


def test_closed_port_is_unavailable_at_once():
    gw = gateway_for(f"http://127.0.0.1:{free_port()}")
    try:
        for call in every_call(gw):
            started = time.monotonic()
            with pytest.raises(VaultUnavailable) as caught:
                call()
            assert time.monotonic() - started < 1.0
            assert "cannot connect" in str(caught.value)
    finally:
        gw.close()


def test_a_server_that_never_answers_times_out():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        gw = gateway_for(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.3)
        try:
            started = time.monotonic()
            with pytest.raises(VaultUnavailable, match="timed out"):
                gw.health()
            assert time.monotonic() - started < 1.5
        finally:
            gw.close()


def test_kubernetes_login_without_a_service_account_token(tmp_path):
    auth = VaultAuth(method="kubernetes", role="broker", jwt_path=str(tmp_path / "missing"))
    gw = VaultGateway(VaultSettings(addr=f"http://127.0.0.1:{free_port()}", auth=auth))
    try:
        with pytest.raises(VaultUnavailable, match="service-account token"):
            gw.token_alive("x")
    finally:
        gw.close()


@pytest.mark.slow
def test_sealed_then_stopped_server_is_unavailable(tmp_path):
    handle = start_openbao(tmp_path / "bao2")
    gw = gateway_for(handle.addr, handle.root_token)
    try:
        gw.health()
        root = VaultHTTP(handle.addr, timeout=5)
        root.call("PUT", "sys/seal", operation="seal", token=handle.root_token)
        root.close()
        with pytest.raises(VaultUnavailable) as caught:
            gw.health()
        assert caught.value.status == 503
        with pytest.raises(VaultUnavailable):
            gw.token_alive("x")

        handle.stop()
        handle.stop()  # idempotent
        for call in every_call(gw):
            started = time.monotonic()
            with pytest.raises(VaultUnavailable):
                call()
            assert time.monotonic() - started < 1.0
    finally:
        gw.close()
        handle.stop()


def test_unknown_role_is_rejected(gateway, start_task):
    spec = DatabaseCredential(kind="database", role="no-such-role")
    task = start_task({"db": spec}, task="vault-test-unknown")
    with pytest.raises(VaultRejected) as caught:
        gateway.issue(task.token, spec, ttl_seconds=60, task_id=task.task_id, workload="w")
    assert task.token.token not in str(caught.value)
    assert str(caught.value).startswith("vault issue database/creds/no-such-role:")


def test_a_denied_broker_token_is_rejected_not_unavailable(vault_setup):
    gw = gateway_for(vault_setup.addr, "s.not-a-real-token")
    try:
        with pytest.raises(VaultRejected) as caught:
            gw.create_task_token(task_id="t", task="x", policies=["p"], ttl_seconds=60, meta={})
        assert caught.value.status == 403
        assert "s.not-a-real-token" not in str(caught.value)
        # Vault itself is up, but a broker whose token is refused can issue nothing.
        with pytest.raises(VaultUnavailable, match="health"):
            gw.health()
    finally:
        gw.close()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (400, {"errors": ["1 error occurred:\n\t* invalid lease\n\n"]}, "invalid lease"),
        (403, {"errors": ["permission denied"]}, "permission denied"),
        (500, {"errors": ['failed to execute query: ERROR near "pw-SECRET"']}, "backend error"),
        (400, {"errors": ["password 'hunter2' is weird"]}, "invalid request"),
        (503, {"errors": ["Vault is sealed"]}, "sealed"),
        (502, "not json", "bad gateway"),
        (418, {}, "unexpected answer"),
    ],
)
def test_reasons_come_from_fixed_strings_only(status, body, expected):
    reason = safe_reason(status, body)
    assert reason == expected
    assert "SECRET" not in reason and "hunter2" not in reason


def test_ttl_must_be_positive(gateway, start_task):
    task = start_task({"db": RO})
    with pytest.raises(ValueError, match="ttl_seconds"):
        gateway.issue(task.token, RO, ttl_seconds=0, task_id=task.task_id, workload="w")
