"""pgwire without a network: the Framer over any split of a stream, the parsers' exactness,
and the builders' bytes."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.gateway import pgwire
from broker.gateway.pgwire import Framer, ProtocolError

message = st.builds(
    lambda kind, body: pgwire.message(bytes([kind]), body),
    st.sampled_from(list(b"QPBDESZdc")),
    st.binary(max_size=300),
)


def cuts(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in points})
    pieces, last = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


@settings(max_examples=300, deadline=None)
@given(messages=st.lists(message, max_size=20), points=st.lists(st.integers(0, 10_000), max_size=12))
def test_framer_forwards_any_split_unchanged_and_sees_whole_messages(messages, points):
    stream = b"".join(messages)
    seen: list[tuple[bytes, bytes]] = []

    def handler(kind, body):
        # The offsets name exactly this message in the whole stream.
        assert (
            stream[framer.message_start : framer.message_end]
            == bytes([kind]) + stream[framer.message_start + 1 : framer.message_start + 5] + body
        )
        seen.append((kind, body))

    framer = Framer(b"QP", handler, max_length=1 << 20)
    out = b"".join(framer.feed(piece) for piece in cuts(stream, points))
    assert out == stream
    expected = [(m[0], m[5:]) for m in messages if m[:1] in (b"Q", b"P")]
    assert seen == expected
    assert framer.at_boundary and framer.stopped is None


@settings(max_examples=200, deadline=None)
@given(messages=st.lists(message, max_size=20), points=st.lists(st.integers(0, 10_000), max_size=12))
def test_framer_replaces_watched_messages(messages, points):
    stream = b"".join(messages)
    framer = Framer(b"Q", lambda kind, body: pgwire.query("SELECT 'replaced'"), max_length=1 << 20)
    out = b"".join(framer.feed(piece) for piece in cuts(stream, points))
    expected = b"".join(pgwire.query("SELECT 'replaced'") if m[:1] == b"Q" else m for m in messages)
    assert out == expected


def test_framer_stops_at_an_oversized_or_unknown_message():
    good = pgwire.query("SELECT 1")
    framer = Framer(b"Q", lambda k, b: None, max_length=100, allowed=b"S")
    out = framer.feed(good + b"Q" + struct.pack("!i", 101) + b"x" * 10)
    assert out == good
    assert isinstance(framer.stopped, ProtocolError)
    assert framer.feed(good) == b""  # nothing more once stopped

    framer = Framer(b"Q", lambda k, b: None, max_length=100, allowed=b"S")
    out = framer.feed(pgwire.message(b"S") + pgwire.message(b"?", b"x"))
    assert out == pgwire.message(b"S")
    assert str(framer.stopped) == "invalid frontend message type"


def test_framer_boundary_tracks_pass_through_messages():
    framer = Framer(b"", lambda k, b: None, max_length=1 << 20)
    row = pgwire.message(b"D", b"x" * 1000)
    assert framer.feed(row[:10]) == row[:10]
    assert not framer.at_boundary
    assert framer.feed(row[10:]) == row[10:]
    assert framer.at_boundary


def test_a_handler_can_stop_and_drop():
    def handler(kind, body):
        framer.stop("enough")
        return b""

    framer = Framer(b"S", handler, max_length=1 << 20)
    before = pgwire.message(b"D", b"row")
    out = framer.feed(before + pgwire.parameter_status("client_encoding", "LATIN1") + pgwire.message(b"D"))
    assert out == before
    assert framer.stopped == "enough"


def test_a_big_watched_message_is_assembled_once():
    big = pgwire.query("SELECT '" + "x" * 1_000_000 + "'")
    seen = []
    framer = Framer(b"Q", lambda k, b: seen.append(len(b)), max_length=1 << 21)
    out = b"".join(framer.feed(big[i : i + 4096]) for i in range(0, len(big), 4096))
    assert out == big and seen == [len(big) - 5]


def test_parse_startup_packets():
    assert pgwire.parse_startup_packet(struct.pack("!i", pgwire.SSL_REQUEST)) == pgwire.SSLRequest()
    assert pgwire.parse_startup_packet(struct.pack("!i", pgwire.GSSENC_REQUEST)) == pgwire.GSSENCRequest()
    cancel = pgwire.parse_startup_packet(struct.pack("!ii", pgwire.CANCEL_REQUEST, 7) + b"abcd")
    assert cancel == pgwire.CancelRequest(7, b"abcd")
    startup = pgwire.parse_startup_packet(pgwire.startup_message({"user": "u", "database": "d"})[4:])
    assert isinstance(startup, pgwire.StartupMessage)
    assert startup.params == {"user": "u", "database": "d"} and (startup.major, startup.minor) == (3, 0)
    for body in (
        struct.pack("!i", pgwire.SSL_REQUEST) + b"x",  # trailing bytes
        struct.pack("!ii", pgwire.CANCEL_REQUEST, 7) + b"abc",  # short key
        struct.pack("!i", 2 << 16) + b"user\0u\0\0",  # protocol 2
        struct.pack("!i", pgwire.PROTOCOL_3_0) + b"user\0u\0",  # no terminator
        struct.pack("!i", pgwire.PROTOCOL_3_0) + b"user\0u\0\0extra",  # after the terminator
        struct.pack("!i", pgwire.PROTOCOL_3_0) + b"user\0\xff\0\0",  # not UTF-8
        b"\0\0",
    ):
        with pytest.raises(ProtocolError):
            pgwire.parse_startup_packet(body)


def test_parse_query_and_parse_are_exact():
    assert pgwire.parse_query(b"SELECT 1\0") == b"SELECT 1"
    parsed = pgwire.parse_parse(b"s\0SELECT $1\0" + struct.pack("!hI", 1, 23))
    assert parsed == pgwire.Parse(b"s", b"SELECT $1", (23,))
    assert pgwire.parse_parse(pgwire.parse(b"n", "SELECT 1", [25, 23])[5:]).param_types == (25, 23)
    for bad in (b"SELECT 1", b"SELECT 1\0x", b"a\0b\0"):
        with pytest.raises(ProtocolError):
            pgwire.parse_query(bad)
    for bad in (b"s\0q\0", b"s\0q\0\0\x01", b"s\0q\0\xff\xff", b"s\0q\0\0\0x"):
        with pytest.raises(ProtocolError):
            pgwire.parse_parse(bad)


def test_error_response_bytes():
    data = pgwire.error_response("42501", "refused", detail="d", hint="h")
    assert data[:1] == b"E"
    assert struct.unpack("!i", data[1:5])[0] == len(data) - 1
    assert pgwire.parse_error_fields(data[5:]) == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "42501",
        "M": "refused",
        "D": "d",
        "H": "h",
    }
    assert pgwire.notice_response("01000", "n")[:1] == b"N"
    with pytest.raises(ValueError):
        pgwire.error_response("42501", "nul\0inside")


def test_auth_builders():
    assert pgwire.auth_ok() == b"R\0\0\0\x08\0\0\0\0"
    assert pgwire.auth_sasl(["SCRAM-SHA-256"]) == b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0"
    assert pgwire.auth_sasl_continue(b"abc")[5:9] == b"\0\0\0\x0b"
    assert pgwire.auth_sasl_final(b"v=x")[5:9] == b"\0\0\0\x0c"
    assert pgwire.ready_for_query(b"T") == b"Z\0\0\0\x05T"
    assert pgwire.backend_key_data(1, b"abcd") == b"K\0\0\0\x0c\0\0\0\x01abcd"


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read_exactly(self, n: int) -> bytes:
        if len(self.data) < n:
            raise EOFError
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk


def test_readers_check_lengths_before_reading():
    async def read(fn, data, **kw):
        return await fn(_Bytes(data), **kw)

    assert asyncio.run(read(pgwire.read_message, pgwire.query("x"))) == (b"Q", b"x\0")
    with pytest.raises(ProtocolError):
        asyncio.run(read(pgwire.read_message, b"Q" + struct.pack("!i", 1000), max_size=100))
    with pytest.raises(ProtocolError):
        asyncio.run(read(pgwire.read_startup_packet, struct.pack("!i", 20_000)))
    with pytest.raises(ProtocolError):
        asyncio.run(read(pgwire.read_startup_packet, struct.pack("!i", 4)))


def test_hold_keeps_the_message_and_what_follows_until_release():
    waiting = [True]
    seen = []

    def handler(kind, body):
        if body.startswith(b"wait") and waiting[0]:
            framer.hold()
            return None
        seen.append(body)
        return None

    framer = Framer(b"Q", handler, max_length=1 << 20)
    first, held, after = pgwire.query("a"), pgwire.query("wait"), pgwire.message(b"D", b"row")
    assert framer.feed(first + held + after[:3]) == first
    assert framer.holding
    assert framer.feed(after[3:]) == b""
    waiting[0] = False
    assert framer.release() == held + after
    assert not framer.holding and framer.at_boundary
    assert seen == [b"a\0", b"wait\0"]
