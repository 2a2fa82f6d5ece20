"""The dev/test stack: OpenBao start-up, configure_vault, setup.sh, other login methods."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import jwt
import pytest

from broker.config import VaultAuth
from broker.credentials import DatabaseCredential
from broker.dev.stack.openbao import OpenBaoError, find_bao_binary, start_openbao
from broker.dev.stack.vault_setup import (
    PostgresTarget,
    configure_vault,
    database_connection_config,
    jwks_to_pem,
    prepare_database,
)
from broker.vault import VaultGateway, task_token_policies

ROOT = Path(__file__).resolve().parents[2]
RO = DatabaseCredential(kind="database", role="analytics-ro")


def run_one_task(gw: VaultGateway, pg, task: str = "stack-test") -> None:
    """Sync, token, issue, log in, revoke: the whole gateway cycle."""
    policy = gw.sync_task_policy(task, {"db": RO})
    token = gw.create_task_token(
        task_id=str(uuid.uuid4()), task=task, policies=task_token_policies(policy, {"db": RO}),
        ttl_seconds=60, meta={},
    )  # fmt: skip
    secret = gw.issue(token, RO, ttl_seconds=60, task_id="t", workload="w")
    assert pg.can_login(secret.data["username"], secret.data["password"])
    gw.revoke(secret.handle)
    gw.revoke_task_token(token.accessor)
    assert not pg.can_login(secret.data["username"], secret.data["password"])


def test_configure_vault_is_idempotent(bao, pg_target, vault_setup, pg):
    again = configure_vault(bao.addr, bao.root_token, postgres=pg_target)
    assert again.broker_token != vault_setup.broker_token  # a fresh token each run
    gw = VaultGateway(again.vault_settings())
    try:
        run_one_task(gw, pg)
    finally:
        gw.close()


def test_database_connection_over_tcp(vault_pg, root):
    target = PostgresTarget(host="127.0.0.1", port=vault_pg.port, superuser="postgres")
    body = database_connection_config(target, ["analytics-ro"])
    assert body["connection_url"].startswith("postgresql://postgres@127.0.0.1:")
    root.call("POST", "database/config/analytics-tcp", body)  # verify_connection: it connects
    root.call("DELETE", "database/config/analytics-tcp")


def test_connection_url_keeps_the_password_out(pg_target):
    target = PostgresTarget(host="/run/pg", port=5432, superuser="vault", password="pw-SECRET")
    body = database_connection_config(target, ["analytics-ro"])
    assert "pw-SECRET" not in body["connection_url"]
    assert (
        body["connection_url"] == "postgresql://{{username}}:{{password}}@/analytics?host=/run/pg&port=5432"
    )
    assert "pw-SECRET" not in repr(target)


def test_agents_can_log_in_with_their_own_jwt(vault_setup, jwt_keypair, root):
    key, _ = jwt_keypair
    now = int(time.time())
    claims = {"iss": "https://agents.test", "aud": "openbao", "sub": "spiffe://example.org/agents/a1",
              "iat": now, "exp": now + 300}  # fmt: skip
    assertion = jwt.encode(claims, key, algorithm="ES256")
    login = root.call(
        "POST", f"auth/{vault_setup.jwt_mount}/login", {"role": vault_setup.jwt_role, "jwt": assertion}
    )
    token = login["auth"]["client_token"]
    creds = root.call("GET", "database/creds/analytics-ro", token=token)
    assert creds["data"]["username"]
    root.call("PUT", "sys/leases/revoke", {"lease_id": creds["lease_id"], "sync": True})


def test_jwks_to_pem(jwt_keypair):
    from jwt.algorithms import ECAlgorithm

    key, pem = jwt_keypair
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    assert jwks_to_pem({"keys": [jwk]}) == [pem]


def test_approle_login(bao, vault_setup, root, pg):
    # The broker logging in with AppRole instead of a static token.
    if "approle/" not in root.call("GET", "sys/auth")["data"]:
        root.call("POST", "sys/auth/approle", {"type": "approle"})
    root.call("POST", "auth/approle/role/broker-test", {
        "token_policies": ["broker"], "token_no_default_policy": True, "token_ttl": "1h",
        "token_max_ttl": "2h",
    })  # fmt: skip
    role_id = root.call("GET", "auth/approle/role/broker-test/role-id")["data"]["role_id"]
    secret_id = root.call("POST", "auth/approle/role/broker-test/secret-id")["data"]["secret_id"]
    settings = vault_setup.vault_settings(
        auth=VaultAuth(method="approle", role_id=role_id, secret_id=secret_id)
    )
    gw = VaultGateway(settings)
    try:
        run_one_task(gw, pg, task="stack-test-approle")
        gw.renew_self()
        # Its login token revoked behind its back: the next call logs in again.
        for accessor in root.call("LIST", "auth/token/accessors")["data"]["keys"]:
            info = root.call("POST", "auth/token/lookup-accessor", {"accessor": accessor})["data"]
            if (info.get("meta") or {}).get("role_name") == "broker-test":
                root.call("POST", "auth/token/revoke-accessor", {"accessor": accessor})
        run_one_task(gw, pg, task="stack-test-approle")
    finally:
        gw.close()


def test_external_server_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BROKER_TEST_VAULT_ADDR", "http://127.0.0.1:1/")
    monkeypatch.setenv("BROKER_TEST_VAULT_TOKEN", "tok")
    handle = start_openbao(tmp_path)
    assert handle.external and handle.addr == "http://127.0.0.1:1"
    handle.stop()  # a no-op for a server we did not start
    assert "tok" not in repr(handle)
    monkeypatch.delenv("BROKER_TEST_VAULT_TOKEN")
    with pytest.raises(OpenBaoError, match="BROKER_TEST_VAULT_TOKEN"):
        start_openbao(tmp_path)


def test_dev_server_log_is_private_and_stop_is_idempotent(bao):
    assert bao.log_path is not None
    assert bao.log_path.stat().st_mode & 0o077 == 0  # the dev server prints its root token
    assert not (bao.log_path.parent / ".vault-token").exists()


@pytest.mark.slow
def test_setup_sh_configures_a_fresh_server(tmp_path, vault_pg, pg, jwt_keypair):
    binary = find_bao_binary()
    if binary is None:
        pytest.skip("no bao binary")
    prepare_database(PostgresTarget(host="127.0.0.1", port=vault_pg.port, superuser="postgres"))
    fresh = start_openbao(tmp_path / "bao")
    try:
        (tmp_path / "jwt.pem").write_text(jwt_keypair[1])
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))},
            "VAULT_BIN": binary, "BAO_ADDR": fresh.addr, "BAO_TOKEN": fresh.root_token,
            "HOME": str(tmp_path), "PG_HOST": "127.0.0.1", "PG_PORT": str(vault_pg.port),
            "PG_ADMIN_USER": "postgres", "PG_SSLMODE": "disable", "BROKER_AUTH": "token",
            "JWT_PUBKEY_FILE": str(tmp_path / "jwt.pem"), "JWT_ISSUER": "https://agents.test",
        }  # fmt: skip
        for _ in range(2):  # idempotent: a second run changes nothing and doesn't fail
            done = subprocess.run(
                ["bash", str(ROOT / "vault-config" / "setup.sh")], env=env, capture_output=True,
                text=True, timeout=120, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr[-2000:]
        lines = done.stdout.splitlines()
        broker_token = lines[lines.index("broker token:") + 1]
        from broker.config import VaultSettings

        gw = VaultGateway(VaultSettings(addr=fresh.addr, auth=VaultAuth(method="token", token=broker_token)))
        try:
            run_one_task(gw, pg, task="setup-sh")
        finally:
            gw.close()
    finally:
        fresh.stop()
