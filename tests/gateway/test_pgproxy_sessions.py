"""Session control: cancel through our own key, close_key at task end, many idle clients."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import psycopg
import pytest

from broker.gateway import pgwire
from tests.gateway.conftest import RawClient


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def backend_pids(target, application_name):
    with psycopg.connect(target.admin_dsn, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application_name,)
        ).fetchall()
    return [row[0] for row in rows]


def check_cancel(conn, cancel):
    real_pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    # The client holds the gateway's key, never the server's.
    assert conn.info.backend_pid != real_pid
    timer = threading.Timer(0.5, cancel)
    timer.start()
    started = time.monotonic()
    with pytest.raises(psycopg.errors.QueryCanceled):
        conn.execute("SELECT pg_sleep(10)")
    assert time.monotonic() - started < 5
    timer.join()
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_cancel_a_running_query(gateway_process, handle):
    # `conn.cancel()` is libpq's PQcancel, which holds the GIL: the gateway runs elsewhere.
    gateway = gateway_process([handle])
    with psycopg.connect(gateway.dsn(handle), autocommit=True) as conn:
        check_cancel(conn, conn.cancel)


def test_cancel_safe_a_running_query(gateway, handle):
    with gateway.connect(handle, autocommit=True) as conn:
        check_cancel(conn, conn.cancel_safe)


def test_cancel_over_tls(make_gateway, handle, certs):
    gateway = make_gateway(tls=certs.server_context(), require_tls=True)
    with gateway.connect(handle, autocommit=True, sslmode="require") as conn:
        check_cancel(conn, conn.cancel_safe)  # libpq 17+ sends this cancel over TLS too


def test_psql_interrupted_cancels(gateway, handle):
    env = {"PATH": "/usr/bin:/bin", "PGPASSWORD": handle.secret}
    dsn = f"host=127.0.0.1 port={gateway.port} user={handle.id} dbname=gw_target sslmode=disable"
    proc = subprocess.Popen(
        ["/usr/bin/psql", "-X", "-At", dsn, "-c", "SELECT 'connected'", "-c", "SELECT pg_sleep(10)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "connected"
    time.sleep(0.5)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)  # psql's handler sends a CancelRequest (PQcancel)
    _, stderr = proc.communicate(timeout=10)
    assert time.monotonic() - started < 5
    assert "canceling statement due to user request" in stderr


def test_a_cancel_with_a_wrong_key_does_nothing(gateway, handle):
    with gateway.connect(handle, autocommit=True) as conn:
        pid = conn.info.backend_pid
        for secret in (b"\0\0\0\0", b"\xff" * 4):
            with RawClient(gateway.port) as raw:
                raw.send(pgwire.cancel_request(pid, secret))
                assert raw.closed()
        started = time.monotonic()
        conn.execute("SELECT pg_sleep(0.5)")
        assert time.monotonic() - started >= 0.5


def test_a_cancel_for_an_idle_session_is_dropped(gateway, handle, hooks):
    with gateway.connect(handle, autocommit=True) as conn:
        conn.cancel_safe()
        assert wait_for(lambda: any(e[0] == "cancel" for e in hooks.events))
        assert [e[2] for e in hooks.events if e[0] == "cancel"] == [{"forwarded": "false"}]
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_close_key_ends_every_session_of_the_task(gateway, hooks, target):
    first = hooks.add(key="task-1")
    second = hooks.add(key="task-1")
    other = hooks.add(key="task-2")
    conns = [gateway.connect(h, autocommit=True, application_name="gw-close-key") for h in (first, second)]
    survivor = gateway.connect(other, autocommit=True)
    busy_conn = conns[1]
    errors = []

    def sleeper():
        try:
            busy_conn.execute("SELECT pg_sleep(30)")
        except psycopg.Error as error:
            errors.append(error)

    thread = threading.Thread(target=sleeper)
    thread.start()
    assert wait_for(lambda: len(backend_pids(target, "gw-close-key")) == 2)
    time.sleep(0.2)
    started = time.monotonic()
    gateway.server.close_key_threadsafe("task-1")  # as the LISTEN/NOTIFY thread will
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 1
    assert errors and "the task ended" in str(errors[0])
    with pytest.raises(psycopg.OperationalError, match="the task ended"):
        conns[0].execute("SELECT 1")
    # Both sockets are shut and the running query was cancelled: the backends go away.
    assert wait_for(lambda: backend_pids(target, "gw-close-key") == [], timeout=5)
    assert survivor.execute("SELECT 1").fetchone() == (1,)
    assert wait_for(lambda: sorted(r for k, r in hooks.closed_calls if k == "task-1") == ["task ended"] * 2)
    for conn in [*conns, survivor]:
        conn.close()


def test_two_hundred_idle_connections(gateway, hooks, target):
    handle = hooks.add()
    conns = []
    try:
        for _ in range(200):
            conns.append(gateway.connect(handle, autocommit=True))
        assert gateway.live_sessions() == 200
        assert all(c.execute("SELECT 1").fetchone() == (1,) for c in conns[::20])
        assert gateway.call(lambda: gateway.server.close_key(handle.key)) == 200
        assert wait_for(lambda: gateway.live_sessions() == 0)
    finally:
        for conn in conns:
            conn.close()


def test_stop_closes_everything(make_gateway, handle):
    gateway = make_gateway()
    conn = gateway.connect(handle, autocommit=True)
    gateway.run(gateway.server.stop())
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
