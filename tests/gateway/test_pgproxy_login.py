"""Logging in through the gateway: psql with and without TLS, SCRAM failures that look
alike, startup parameters, the upstream's pinned settings, and the hooks' refusals."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time

import psycopg
import pytest

from broker.gateway.pgproxy import Refusal

PSQL = "/usr/bin/psql"


def run_psql(gateway, handle, sql, *, sslmode="disable", password=None, extra_env=None):
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PGPASSWORD": handle.secret if password is None else password,
        "PGCONNECT_TIMEOUT": "10",
        **(extra_env or {}),
    }
    dsn = f"host=127.0.0.1 port={gateway.port} user={handle.id} dbname=gw_target sslmode={sslmode}"
    return subprocess.run(
        [PSQL, "-X", "-At", "-v", "ON_ERROR_STOP=1", dsn, "-c", sql],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def test_psql_without_tls(gateway, handle, target):
    result = run_psql(gateway, handle, "SELECT current_user, 1 + 1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{target.user}|2"


def test_psql_with_tls(make_gateway, handle, certs, target):
    gateway = make_gateway(tls=certs.server_context(), require_tls=True)
    result = run_psql(gateway, handle, "SELECT current_user", sslmode="require")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == target.user
    # verify-full against our CA also passes; a plaintext client is refused with a clear error.
    with psycopg.connect(gateway.dsn(handle, sslmode="verify-full", sslrootcert=str(certs.cert))) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    refused = run_psql(gateway, handle, "SELECT 1", sslmode="disable")
    assert refused.returncode != 0
    assert "the gateway requires TLS" in refused.stderr


def test_psql_refusal_keeps_the_session(gateway, handle):
    result = run_psql(gateway, handle, "DROP TABLE items")
    assert result.returncode != 0
    assert "rule no-drop" in result.stderr
    assert "broker_refused" not in result.stderr


def test_wrong_secret_and_unknown_handle_fail_alike(gateway, handle, hooks):
    errors = []
    for user, password in ((handle.id, "not-the-secret"), ("h_0000000000000000", handle.secret)):
        with pytest.raises(psycopg.OperationalError) as caught:
            psycopg.connect(gateway.dsn(handle, password=password).replace(handle.id, user))
        errors.append(str(caught.value).replace(user, "USER"))
    assert errors[0] == errors[1]
    assert 'password authentication failed for user "USER"' in errors[0]
    failures = [e for e in hooks.events if e[0] == "auth_failed"]
    assert [f[2]["known"] for f in failures] == ["true", "false"]
    # No session was opened, so `closed` was never called.
    assert hooks.closed_calls == []


def test_an_unknown_handle_shows_a_stable_salt(gateway):
    from broker.gateway import pgwire
    from tests.gateway.conftest import RawClient

    salts = []
    for _ in range(2):
        with RawClient(gateway.port) as raw:
            raw.send(pgwire.startup_message({"user": "h_unknown", "database": "x"}))
            assert raw.message()[0] == b"R"
            raw.send(pgwire.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abcdefghijklmnop"))
            kind, body = raw.message()
            assert kind == b"R"
            salts.append(body[4:].decode().split(",")[1])
    assert salts[0] == salts[1]


def test_psql_prompting_for_a_password_is_no_error(gateway, handle):
    # psql without a password connects, sees the SASL request, hangs up and gives up.
    result = run_psql(gateway, handle, "SELECT 1", password="", extra_env={"PGPASSWORD": ""})
    assert result.returncode != 0
    time.sleep(0.2)
    assert gateway.live_sessions() == 0


@contextlib.contextmanager
def environment(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_startup_parameters(gateway, handle):
    with pytest.raises(psycopg.OperationalError, match="options startup parameter"):
        psycopg.connect(gateway.dsn(handle) + " options='-c search_path=evil'")
    with pytest.raises(psycopg.OperationalError, match="UTF8 only"):
        psycopg.connect(gateway.dsn(handle) + " client_encoding=LATIN1")
    with pytest.raises(psycopg.OperationalError, match="replication connections are not accepted"):
        psycopg.connect(gateway.dsn(handle) + " replication=database")
    with psycopg.connect(gateway.dsn(handle, application_name="gw-test")) as conn:
        assert conn.execute("SHOW application_name").fetchone() == ("gw-test",)
    with (
        environment(PGTZ="Europe/Paris", PGDATESTYLE="SQL, DMY"),
        psycopg.connect(gateway.dsn(handle)) as conn,
    ):
        assert conn.execute("SHOW timezone").fetchone() == ("Europe/Paris",)
        assert conn.execute("SHOW datestyle").fetchone() == ("SQL, DMY",)


def test_a_bad_parameter_value_is_the_clients_error(gateway, handle):
    with environment(PGDATESTYLE="nonsense"), pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(gateway.dsn(handle))
    assert 'invalid value for parameter "DateStyle"' in str(caught.value)


def test_the_database_changing_pinned_settings_closes_the_session(gateway, handle):
    for statement in ("SET standard_conforming_strings = off", "SET client_encoding = 'LATIN1'"):
        with gateway.connect(handle, autocommit=True) as conn:
            with pytest.raises(psycopg.OperationalError) as caught:
                conn.execute(statement)
            assert "client_encoding or standard_conforming_strings" in str(caught.value)
            assert conn.closed or conn.broken


def test_a_role_with_scs_off_cannot_log_in(gateway, hooks, target, stack):
    from tests.gateway.conftest import superuser_dsn

    with psycopg.connect(superuser_dsn(stack), autocommit=True) as admin:
        admin.execute("DROP ROLE IF EXISTS gw_scs_off")
        admin.execute("CREATE ROLE gw_scs_off LOGIN PASSWORD 'pw-scs-off'")
        admin.execute("ALTER ROLE gw_scs_off SET standard_conforming_strings = off")
    try:
        handle = hooks.add(upstream=target.upstream(user="gw_scs_off", password="pw-scs-off"))
        with pytest.raises(psycopg.OperationalError, match="could not log in to the database"):
            gateway.connect(handle)
        assert (
            "upstream_failed",
            handle.key,
            {"detail": "parameter standard_conforming_strings"},
        ) in hooks.events
    finally:
        with psycopg.connect(superuser_dsn(stack), autocommit=True) as admin:
            admin.execute("DROP ROLE IF EXISTS gw_scs_off")


def test_upstream_failures_are_generic(gateway, hooks, target):
    bad_password = hooks.add(upstream=target.upstream(password="wrong"))
    with pytest.raises(psycopg.OperationalError) as caught:
        gateway.connect(bad_password)
    message = str(caught.value)
    assert "could not log in to the database" in message
    assert target.user not in message  # the real role's name stays behind the gateway
    nowhere = hooks.add(upstream=target.upstream(port=1))
    with pytest.raises(psycopg.OperationalError, match="could not log in to the database"):
        gateway.connect(nowhere)
    hooks.refuse_upstream = Refusal("42501", "the task's credential was revoked")
    with pytest.raises(psycopg.OperationalError, match="the task's credential was revoked"):
        gateway.connect(hooks.add())


def test_closed_hook_and_events(gateway, handle, hooks):
    with gateway.connect(handle, autocommit=True) as conn:
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP TABLE items")
    deadline = time.monotonic() + 5
    while not hooks.closed_calls and time.monotonic() < deadline:
        time.sleep(0.02)
    assert hooks.closed_calls == [(handle.key, "client terminated")]
    kinds = [kind for kind, key, _ in hooks.events if key == handle.key]
    assert kinds == ["session_started", "refused"]
