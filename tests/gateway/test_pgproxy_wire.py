"""The gateway's wire handling with a hand-made client: what no library sends on purpose
(fast-path calls, plaintext behind an SSLRequest, oversized or unknown messages, junk)."""

from __future__ import annotations

import socket
import ssl
import struct
import time

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.gateway import pgwire
from tests.gateway.conftest import RawClient, error_fields

SUPPRESS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


def kinds(messages):
    return b"".join(kind for kind, _ in messages)


def logged_in(gateway, handle):
    raw = RawClient(gateway.port)
    messages = raw.login(handle.id, handle.secret)
    assert kinds(messages).endswith(b"Z"), messages
    return raw


def assert_good_client_works(gateway, handle):
    with gateway.connect(handle, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# ---------------------------------------------------------------------------------------
# After login


def test_welcome_carries_our_key_and_every_parameter(gateway, handle):
    with RawClient(gateway.port) as raw:
        messages = raw.login(handle.id, handle.secret)
        assert kinds(messages)[:1] == b"R"  # AuthenticationOk first
        params = dict(pgwire.parse_parameter_status(body) for kind, body in messages if kind == b"S")
        assert {
            "server_version",
            "client_encoding",
            "standard_conforming_strings",
            "integer_datetimes",
        } <= set(params)
        (key,) = [body for kind, body in messages if kind == b"K"]
        pid, secret = pgwire.parse_backend_key_data(key)
        assert 0 < pid < 2**31 and len(secret) == 4
        assert messages[-1] == (b"Z", b"I")


def test_function_call_is_refused_and_the_session_goes_on(gateway, handle):
    with logged_in(gateway, handle) as raw:
        # FunctionCall: oid of pg_backend_pid (2026), no args, text result.
        raw.send(pgwire.message(b"F", struct.pack("!Ihhh", 2026, 0, 0, 0)))
        answer = raw.messages_until()
        assert kinds(answer) == b"EZ"
        assert error_fields(answer)["C"] == "42501"
        assert "fast-path" in error_fields(answer)["M"]
        raw.send(pgwire.query("SELECT 1"))
        assert kinds(raw.messages_until()) == b"TDCZ"


def test_pipelined_queries_get_answers_in_order(gateway, handle):
    with logged_in(gateway, handle) as raw:
        raw.send(
            pgwire.query("DROP TABLE items")
            + pgwire.query("SELECT 1")
            + pgwire.query("drop table items")
            + pgwire.query("SELECT 2")
        )
        answers = [raw.messages_until() for _ in range(4)]
        assert [kinds(a) for a in answers] == [b"EZ", b"TDCZ", b"EZ", b"TDCZ"]
        assert error_fields(answers[0])["C"] == error_fields(answers[2])["C"] == "42501"


def test_a_client_cannot_fake_a_refusal(gateway, handle):
    with logged_in(gateway, handle) as raw:
        raw.send(pgwire.query("SELECT broker_refused_" + "0" * 32 + "()"))
        answer = raw.messages_until()
        assert error_fields(answer)["C"] == "42883"  # the server's own error, untouched


def test_extended_protocol_refusal_skips_to_sync(gateway, handle):
    with logged_in(gateway, handle) as raw:
        raw.send(
            pgwire.parse(b"s1", "SELECT 1")
            + pgwire.message(b"B", b"\0s1\0" + struct.pack("!hhh", 0, 0, 0))
            + pgwire.message(b"E", b"\0" + struct.pack("!i", 0))
            + pgwire.parse(b"s2", "DROP TABLE items")
            + pgwire.message(b"B", b"\0s2\0" + struct.pack("!hhh", 0, 0, 0))
            + pgwire.message(b"E", b"\0" + struct.pack("!i", 0))
            + pgwire.message(b"S")
        )
        answer = raw.messages_until()
        assert kinds(answer) == b"12DCEZ"
        assert error_fields(answer)["C"] == "42501"
        assert answer[-1] == (b"Z", b"I")
        # s2 was never prepared: the server saw only the poison under its name.
        raw.send(pgwire.message(b"D", b"Ss2\0") + pgwire.message(b"S"))
        assert error_fields(raw.messages_until())["C"] == "26000"


def test_invalid_utf8_is_refused(gateway, handle):
    with logged_in(gateway, handle) as raw:
        raw.send(pgwire.message(b"Q", b"SELECT '\xff\xfe'\0"))
        answer = raw.messages_until()
        assert error_fields(answer)["C"] == "22021"
        raw.send(pgwire.query("SELECT 1"))
        assert kinds(raw.messages_until()) == b"TDCZ"


@pytest.mark.parametrize(
    "bad",
    [
        pgwire.message(b"Q", b"SELECT 1\0; DROP TABLE items\0"),  # a NUL inside the text
        pgwire.message(b"Q", b"SELECT 1"),  # no terminator
        pgwire.message(b"P", b"\0SELECT 1\0\0\x05"),  # param count runs past the end
        b"Q" + struct.pack("!i", pgwire.MAX_CLIENT_MESSAGE + 1),  # over the cap, before buffering
        b"Q" + struct.pack("!i", 2),  # a length shorter than itself
        pgwire.message(b"?", b"junk"),  # unknown type
        pgwire.message(b"p", b"password"),  # a password message after login
    ],
)
def test_a_broken_message_closes_that_connection_only(gateway, handle, bad):
    with gateway.connect(handle, autocommit=True) as bystander, logged_in(gateway, handle) as raw:
        raw.send(bad)
        answer = raw.messages_until(b"")
        assert error_fields(answer)["C"] == "08P01"
        assert raw.closed()
        assert bystander.execute("SELECT 1").fetchone() == (1,)


def test_terminate_closes_both_sides(gateway, handle, target):
    with logged_in(gateway, handle) as raw:
        raw.send(pgwire.query("SELECT pg_backend_pid()"))
        answer = raw.messages_until()
        pid = int(next(body for kind, body in answer if kind == b"D")[6:])
        raw.send(pgwire.terminate())
        assert raw.closed()
    with psycopg.connect(target.admin_dsn, autocommit=True) as admin:
        deadline = time.monotonic() + 5
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            assert time.monotonic() < deadline
            time.sleep(0.02)


# Statements the server would lex differently after a pipelined settings change.
# Under SJIS, "ゃ" (e3 82 83) followed by a backslash reads as two characters, the second
# of them 83 5c, so the backslash no longer escapes the quote; under scs=off, 'a\\'
# escapes it. Either way the server sees an INSERT that the rules (UTF-8, scs=on) can't.
HIDDEN = [
    ("SET client_encoding = 'SJIS'", "SELECT E'ゃ\\'; INSERT INTO items SELECT 666, current_user; --'", 666),
    (
        "SET standard_conforming_strings = off",
        "SELECT 'a\\', 'b; INSERT INTO items SELECT 667, current_user; --'",
        667,
    ),
]


def item_exists(target, item_id):
    with psycopg.connect(target.admin_dsn, autocommit=True) as admin:
        return admin.execute("SELECT 1 FROM items WHERE id = %s", (item_id,)).fetchone() is not None


@pytest.mark.parametrize(("setting", "hidden", "item_id"), HIDDEN)
def test_the_threat_is_real_without_the_gateway(target, setting, hidden, item_id):
    with psycopg.connect(target.admin_dsn, autocommit=True) as admin:
        admin.execute("DELETE FROM items WHERE id = %s", (item_id,))
    with RawClient(target.port) as raw:  # the superuser, straight to Postgres
        raw.send(pgwire.startup_message({"user": "postgres", "database": target.dbname}))
        raw.messages_until()
        raw.send(pgwire.query(setting) + pgwire.query(hidden))
        raw.messages_until()
        raw.messages_until()
    assert item_exists(target, item_id)
    with psycopg.connect(target.admin_dsn, autocommit=True) as admin:
        admin.execute("DELETE FROM items WHERE id = %s", (item_id,))


@pytest.mark.parametrize(("setting", "hidden", "item_id"), HIDDEN)
def test_a_pipelined_settings_change_closes_before_ambiguous_sql_runs(
    gateway, handle, target, setting, hidden, item_id
):
    with logged_in(gateway, handle) as raw:
        raw.send(pgwire.query(setting) + pgwire.query(hidden))
        answer = raw.messages_until(b"")
        assert kinds(answer) == b"CE"
        assert error_fields(answer)["C"] == "08P01"
    assert not item_exists(target, item_id)


def test_ambiguous_sql_waits_for_earlier_answers_then_runs(gateway, handle):
    with logged_in(gateway, handle) as raw:
        raw.send(
            pgwire.query("SELECT pg_sleep(0.2)") + pgwire.query("SELECT 'é\\'") + pgwire.query("SELECT 3")
        )
        answers = [raw.messages_until() for _ in range(3)]
        assert [kinds(a) for a in answers] == [b"TDCZ"] * 3
        assert answers[1][1][1].endswith("é\\".encode())


def test_ambiguous_sql_after_an_execute_in_the_same_batch_is_refused(gateway, handle):
    execute = pgwire.message(b"B", b"\0\0" + struct.pack("!hhh", 0, 0, 0)) + pgwire.message(
        b"E", b"\0" + struct.pack("!i", 0)
    )
    with logged_in(gateway, handle) as raw:
        raw.send(
            pgwire.parse(b"", "SELECT 1")
            + execute
            + pgwire.parse(b"", "SELECT 'é'")
            + execute
            + pgwire.message(b"S")
        )
        answer = raw.messages_until()
        assert kinds(answer) == b"12DCEZ"
        assert "send a Sync first" in error_fields(answer)["M"]
        # Behind a Sync, the same text is fine.
        raw.send(pgwire.parse(b"", "SELECT 'é'") + execute + pgwire.message(b"S"))
        assert kinds(raw.messages_until()) == b"12DCZ"


UNNAMED_EXECUTE = pgwire.message(b"B", b"\0\0" + struct.pack("!hhh", 0, 0, 0)) + pgwire.message(
    b"E", b"\0" + struct.pack("!i", 0)
)


def test_extended_copy_in_keeps_the_count_of_answers(gateway, handle):
    # The server ignores the Sync that libpq sends right after a COPY's Execute.
    with logged_in(gateway, handle) as raw:
        raw.send(
            pgwire.parse(b"", "COPY items (id, name) FROM STDIN") + UNNAMED_EXECUTE + pgwire.message(b"S")
        )
        assert kinds(raw.messages_until(b"G")) == b"12G"
        raw.send(pgwire.message(b"d", b"424242\tcopied\n") + pgwire.message(b"c") + pgwire.message(b"S"))
        assert kinds(raw.messages_until()) == b"CZ"
        raw.send(pgwire.query("SELECT 'é'"))  # would wait for an answer that never comes
        assert kinds(raw.messages_until()) == b"TDCZ"
        raw.send(pgwire.query("DELETE FROM items WHERE id = 424242"))
        assert kinds(raw.messages_until()) == b"CZ"


# ---------------------------------------------------------------------------------------
# The front door


def test_plaintext_after_ssl_request_is_refused(make_gateway, handle, certs):
    for tls in (None, certs.server_context()):
        gateway = make_gateway(tls=tls)
        with RawClient(gateway.port) as raw:
            # CVE-2021-23214: a StartupMessage queued behind the SSLRequest.
            raw.send(pgwire.ssl_request() + pgwire.startup_message({"user": handle.id}))
            assert raw.read_byte() == b"E"
            assert raw.closed()


def test_ssl_request_is_answered_once(make_gateway, certs, handle):
    gateway = make_gateway()
    with RawClient(gateway.port) as raw:
        raw.send(pgwire.ssl_request())
        assert raw.read_byte() == b"N"
        raw.send(pgwire.ssl_request())
        assert raw.read_byte() == b"E"
        assert raw.closed()
    tls_gateway = make_gateway(tls=certs.server_context())
    with RawClient(tls_gateway.port) as raw:
        raw.send(pgwire.ssl_request())
        assert raw.read_byte() == b"S"
        tls_sock = certs.client_context().wrap_socket(raw.sock, server_hostname="localhost")
        tls_sock.sendall(pgwire.ssl_request())  # inside TLS: refused
        assert tls_sock.recv(1) == b"E"


def test_gssenc_then_ssl_then_startup(make_gateway, certs, handle):
    gateway = make_gateway(tls=certs.server_context())
    with RawClient(gateway.port) as raw:
        raw.send(struct.pack("!ii", 8, pgwire.GSSENC_REQUEST))
        assert raw.read_byte() == b"N"
        raw.send(pgwire.ssl_request())
        assert raw.read_byte() == b"S"
        raw.sock = certs.client_context().wrap_socket(raw.sock, server_hostname="localhost")
        assert kinds(raw.login(handle.id, handle.secret)).endswith(b"Z")
        raw.send(pgwire.query("SELECT 1"))
        assert kinds(raw.messages_until()) == b"TDCZ"


def test_direct_tls_is_closed(make_gateway, certs):
    gateway = make_gateway(tls=certs.server_context())
    context = certs.client_context()
    context.set_alpn_protocols(["postgresql"])
    with (
        socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock,
        pytest.raises((ssl.SSLError, ConnectionError, OSError)),
    ):
        context.wrap_socket(sock, server_hostname="localhost")


def test_newer_protocol_minor_is_negotiated_down(gateway, handle):
    with RawClient(gateway.port) as raw:
        version = 3 << 16 | 2
        raw.send(pgwire.startup_message({"user": handle.id, "_pq_.something": "1"}, version=version))
        kind, body = raw.message()
        assert kind == b"v"
        assert struct.unpack("!ii", body[:8]) == (3 << 16, 1)
        assert body[8:] == b"_pq_.something\0"
        assert raw.message()[0] == b"R"  # then SCRAM as usual


def test_protocol_2_is_refused(gateway):
    with RawClient(gateway.port) as raw:
        body = struct.pack("!i", 2 << 16) + b"user\0x\0\0"
        raw.send(struct.pack("!i", len(body) + 4) + body)
        assert raw.read_byte() == b"E"
        assert raw.closed()


def test_only_scram_sha_256_is_offered(gateway, handle):
    with RawClient(gateway.port) as raw:
        raw.send(pgwire.startup_message({"user": handle.id}))
        kind, body = raw.message()
        assert kind == b"R"
        assert pgwire.parse_auth_request(body) == (10, b"SCRAM-SHA-256\0\0")
        raw.send(pgwire.sasl_initial_response("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=abc"))
        fields = error_fields(raw.messages_until(b""))
        assert fields["C"] == "28P01"


def test_slow_clients_are_cut_off(make_gateway, handle):
    gateway = make_gateway(auth_timeout=0.5)
    for prefix in (b"", b"\0\0\0\x50\0\3", pgwire.startup_message({"user": handle.id})):
        with RawClient(gateway.port) as raw:
            raw.send(prefix)
            started = time.monotonic()
            assert raw.closed()
            assert time.monotonic() - started < 3
    assert gateway.live_sessions() == 0


# ---------------------------------------------------------------------------------------
# Junk


def send_junk(port, data):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except OSError:
            pass


startup_junk = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda code, rest: struct.pack("!ii", 8 + len(rest), code) + rest,
        st.sampled_from(
            [pgwire.SSL_REQUEST, pgwire.GSSENC_REQUEST, pgwire.CANCEL_REQUEST, pgwire.PROTOCOL_3_0, 0]
        ),
        st.binary(max_size=40),
    ),
    st.builds(
        lambda length, rest: struct.pack("!i", length) + rest,
        st.integers(min_value=-(2**31), max_value=2**31 - 1),
        st.binary(max_size=32),
    ),
    st.builds(
        lambda params, cut: pgwire.startup_message(params)[:cut],
        st.dictionaries(
            st.text(min_size=1, max_size=8).filter(lambda s: "\0" not in s),
            st.text(max_size=8).filter(lambda s: "\0" not in s),
            max_size=4,
        ),
        st.integers(min_value=0, max_value=200),
    ),
)


@settings(max_examples=120, deadline=None, suppress_health_check=SUPPRESS)
@given(data=startup_junk)
def test_junk_at_the_front_door(gateway, handle, data):
    send_junk(gateway.port, data)
    assert_good_client_works(gateway, handle)


typed_junk = st.lists(
    st.one_of(
        st.builds(
            lambda kind, body: pgwire.message(bytes([kind]), body),
            st.sampled_from(list(b"QPFBCDEHScdfX?p\0\xff")),
            st.binary(max_size=64),
        ),
        st.builds(
            lambda kind, length: bytes([kind]) + struct.pack("!i", length),
            st.integers(0, 255),
            st.integers(-(2**31), 2**31 - 1),
        ),
        st.binary(max_size=32),
    ),
    min_size=1,
    max_size=5,
).map(b"".join)


@settings(max_examples=40, deadline=None, suppress_health_check=SUPPRESS)
@given(data=typed_junk)
def test_junk_after_login(gateway, handle, data):
    with logged_in(gateway, handle) as raw:
        try:
            raw.send(data)
            raw.sock.shutdown(socket.SHUT_WR)
            raw.closed()
        except OSError:
            pass
    assert_good_client_works(gateway, handle)


def test_after_the_junk_a_good_client_still_connects(gateway, handle):
    for data in (b"\x16\x03\x01", b"\0\0\0\x08\x04\xd2\x16\x2f" * 3, b"Q\x7f\xff\xff\xff"):
        send_junk(gateway.port, data)
    assert_good_client_works(gateway, handle)
    deadline = time.monotonic() + 5
    while gateway.live_sessions() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gateway.live_sessions() == 0
