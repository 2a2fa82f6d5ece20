"""psycopg 3 through the gateway: simple and extended protocol, pipelines, COPY, cursors,
and refused statements that leave the connection usable."""

from __future__ import annotations

import io

import psycopg
import pytest
from psycopg import sql as psql

REFUSED = "rule no-drop: DROP is not allowed for this task"


def test_simple_and_extended_protocol(gateway, handle, target):
    with gateway.connect(handle, autocommit=True) as conn:
        # The client sees the real server's settings, and our own cancel key, not the server's.
        assert conn.info.parameter_status("standard_conforming_strings") == "on"
        assert conn.info.parameter_status("client_encoding") == "UTF8"
        assert conn.execute("SELECT current_user").fetchone() == (target.user,)
        assert conn.execute("SELECT current_database()").fetchone() == (target.dbname,)
        assert conn.execute("SELECT %s::int + %s", (40, 2)).fetchone() == (42,)
        assert conn.execute("SELECT %s", ("ünïcödé ✓",)).fetchone() == ("ünïcödé ✓",)
        assert conn.execute("SELECT %b::bytea", (b"\x00\xff",)).fetchone() == (b"\x00\xff",)
        conn.execute("SELECT 1; SELECT 2", prepare=False)
        cur = conn.cursor()
        cur.execute("SELECT 1 AS one", prepare=True)
        cur.execute("SELECT 1 AS one", prepare=True)
        assert cur.fetchall() == [(1,)]


def test_a_refused_statement_leaves_the_connection_usable(gateway, handle):
    with gateway.connect(handle, autocommit=True) as conn:
        for statement in ("DROP TABLE items", "select 1; drop table items"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as caught:
                conn.execute(statement, prepare=False)
            assert caught.value.diag.message_primary == REFUSED
            assert "broker_refused" not in str(caught.value)
            assert conn.execute("SELECT 1").fetchone() == (1,)
        # The extended protocol (a Parse) is refused the same way.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP TABLE IF EXISTS items", prepare=True)
        assert conn.execute("SELECT %s::int", (1,)).fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM items").fetchone() is not None


def test_a_refusal_inside_a_transaction_block_fails_it_as_postgres_would(gateway, handle):
    with gateway.connect(handle) as conn:
        conn.execute("DELETE FROM items")
        conn.commit()
        conn.execute("INSERT INTO items VALUES (1, 'kept?')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP TABLE items")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (0,)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.commit()


def test_pipeline_with_a_refused_statement(gateway, handle):
    with gateway.connect(handle, autocommit=True) as conn:
        conn.execute("DELETE FROM items")
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.pipeline():
            conn.execute("INSERT INTO items VALUES (%s, %s)", (1, "a"))
            conn.execute("DROP TABLE items")
            conn.execute("INSERT INTO items VALUES (%s, %s)", (2, "b"))
        # One implicit transaction up to the Sync: the refused statement failed it all.
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (0,)
        with conn.pipeline():
            cursors = [conn.execute("SELECT %s::int", (i,)) for i in range(50)]
        assert [c.fetchone()[0] for c in cursors] == list(range(50))


def test_copy_in_and_out(gateway, handle):
    with gateway.connect(handle, autocommit=True) as conn:
        conn.execute("DELETE FROM items")
        with conn.cursor().copy("COPY items (id, name) FROM STDIN") as copy:
            for i in range(5000):
                copy.write_row((i, f"row {i} " + "x" * 50))
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (5000,)
        out = io.BytesIO()
        with conn.cursor().copy("COPY items TO STDOUT") as copy:
            for chunk in copy:
                out.write(chunk)
        assert out.getvalue().count(b"\n") == 5000
        # A COPY that fails half-way (CopyFail from the client) leaves the connection usable.
        with pytest.raises(RuntimeError), conn.cursor().copy("COPY items FROM STDIN") as copy:
            copy.write_row((10_000, "x"))
            raise RuntimeError("abandon the copy")
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_server_side_cursor_and_large_results(gateway, handle):
    with gateway.connect(handle) as conn:
        with conn.cursor(name="big") as cur:
            cur.itersize = 1000
            cur.execute("SELECT g, repeat('y', 100) FROM generate_series(1, 20000) g")
            assert sum(1 for _ in cur) == 20000
        row = conn.execute("SELECT repeat('z', 20 * 1024 * 1024)").fetchone()
        assert len(row[0]) == 20 * 1024 * 1024
        conn.commit()


def test_notices_and_notifications_pass_through(gateway, handle):
    with gateway.connect(handle, autocommit=True) as conn:
        notices = []
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary))
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hello from the server'; END $$")
        assert notices == ["hello from the server"]
        conn.execute("LISTEN gw_channel")
        conn.execute(psql.SQL("NOTIFY gw_channel, {}").format("payload"))
        notification = next(conn.notifies(timeout=5, stop_after=1))
        assert notification.payload == "payload"
