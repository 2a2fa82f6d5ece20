"""Postgres frontend/backend protocol v3: framing, builders and parsers.

Two shapes of message exist on the wire. A startup packet (StartupMessage, SSLRequest,
GSSENCRequest, CancelRequest) is an int32 length that counts itself, then a body whose
first int32 is a code. Every later message is a type byte, then an int32 length that counts
itself but not the type byte, then the body. Nothing here trusts a length: each reader has
a cap and refuses a bigger message before buffering it.

`Framer` splits a stream into messages for the relay without copying the ones it is not
told to watch; the builders produce the backend messages the gateway writes itself; the
parsers decode the few frontend messages it must read (and refuse any that the server
would refuse too, so what the gateway inspects is exactly what the server will run).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

PROTOCOL_3_0 = 196608  # major 3 << 16 | minor 0
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

MAX_STARTUP_PACKET = 10_000
# A client message (a Query, a Bind with its parameters, a CopyData row) above this size is
# refused: the gateway buffers the messages it inspects, and 64 MiB bounds what one
# connection can make it hold.
MAX_CLIENT_MESSAGE = 64 * 1024 * 1024
# The upstream is trusted configuration: its messages (a DataRow may be near 1 GB) are only
# bounded by the int32 length itself.
MAX_SERVER_MESSAGE = 0x7FFFFFFF

# The first byte of a TLS record: a client doing `sslnegotiation=direct` (PG 17).
TLS_HANDSHAKE_BYTE = 0x16

_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")
_INT16 = struct.Struct("!h")
_HEADER = struct.Struct("!ci")

# The authentication request codes of an 'R' message.
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


class ProtocolError(Exception):
    """The peer broke the protocol. `str(error)` is safe to send to the client (08P01)."""


class ByteReader(Protocol):
    """What the readers below need from a connection."""

    async def read_exactly(self, n: int) -> bytes: ...


# ---------------------------------------------------------------------------------------
# Reading


async def read_startup_packet(reader: ByteReader, *, max_size: int = MAX_STARTUP_PACKET) -> bytes:
    """One startup packet's body (the code and what follows, without the length)."""
    (length,) = _INT32.unpack(await reader.read_exactly(4))
    if length < 8 or length > max_size:
        raise ProtocolError("invalid length of startup packet")
    return await reader.read_exactly(length - 4)


async def read_message(reader: ByteReader, *, max_size: int = MAX_CLIENT_MESSAGE) -> tuple[bytes, bytes]:
    """One typed message: (type byte, body)."""
    kind, length = _HEADER.unpack(await reader.read_exactly(5))
    if length < 4 or length > max_size:
        raise ProtocolError("invalid message length")
    return kind, await reader.read_exactly(length - 4)


class _Cursor:
    """Reads fields out of one message body; any overrun is a ProtocolError."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def cstring(self) -> bytes:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolError("invalid string in message")
        value = self.data[self.pos : end]
        self.pos = end + 1
        return value

    def int32(self) -> int:
        return self._unpack(_INT32)

    def int16(self) -> int:
        return self._unpack(_INT16)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError("invalid message format")
        value = self.data[self.pos : self.pos + n]
        self.pos += n
        return value

    def rest(self) -> bytes:
        value = self.data[self.pos :]
        self.pos = len(self.data)
        return value

    def end(self) -> None:
        # The server refuses a message with bytes after its last field (pq_getmsgend);
        # so does the gateway, so that both read the same fields.
        if self.pos != len(self.data):
            raise ProtocolError("invalid message format")

    def _unpack(self, fmt: struct.Struct) -> int:
        value: int = fmt.unpack(self.take(fmt.size))[0]
        return value


# ---------------------------------------------------------------------------------------
# Startup packets


@dataclass(frozen=True)
class SSLRequest:
    pass


@dataclass(frozen=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True)
class CancelRequest:
    pid: int
    secret: bytes


@dataclass(frozen=True)
class StartupMessage:
    version: int
    params: dict[str, str]

    @property
    def major(self) -> int:
        return self.version >> 16

    @property
    def minor(self) -> int:
        return self.version & 0xFFFF


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def parse_startup_packet(body: bytes) -> StartupPacket:
    """Decode a startup packet body (as returned by `read_startup_packet`)."""
    cursor = _Cursor(body)
    code = cursor.int32()
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        cursor.end()
        return SSLRequest() if code == SSL_REQUEST else GSSENCRequest()
    if code == CANCEL_REQUEST:
        pid = cursor.int32()
        secret = cursor.rest()
        # Protocol 3.0 keys are 4 bytes; 3.2 allows up to 256, and we only hand out 4.
        if not 4 <= len(secret) <= 256:
            raise ProtocolError("invalid length of cancel request")
        return CancelRequest(pid, secret)
    if code >> 16 != 3:
        raise ProtocolError("unsupported frontend protocol")
    return StartupMessage(code, _startup_params(cursor))


def _startup_params(cursor: _Cursor) -> dict[str, str]:
    params: dict[str, str] = {}
    while True:
        name = cursor.cstring()
        if not name:
            break
        value = cursor.cstring()
        try:
            params[name.decode()] = value.decode()
        except UnicodeDecodeError as error:
            raise ProtocolError("invalid startup packet layout: not UTF-8") from error
    cursor.end()  # The packet must end exactly at its terminator.
    return params


def startup_message(params: Mapping[str, str], version: int = PROTOCOL_3_0) -> bytes:
    body = _INT32.pack(version) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return _INT32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _INT32.pack(8) + _INT32.pack(SSL_REQUEST)


def cancel_request(pid: int, secret: bytes) -> bytes:
    body = _INT32.pack(CANCEL_REQUEST) + _INT32.pack(pid) + secret
    return _INT32.pack(len(body) + 4) + body


# ---------------------------------------------------------------------------------------
# Frontend messages the gateway reads


@dataclass(frozen=True)
class Parse:
    name: bytes
    query: bytes
    param_types: tuple[int, ...]


def parse_query(body: bytes) -> bytes:
    """A Query's SQL text (raw bytes, without the terminator)."""
    cursor = _Cursor(body)
    sql = cursor.cstring()
    cursor.end()
    return sql


def parse_parse(body: bytes) -> Parse:
    cursor = _Cursor(body)
    name = cursor.cstring()
    query = cursor.cstring()
    count = cursor.int16()
    if count < 0:
        raise ProtocolError("invalid message format")
    types = tuple(_UINT32.unpack(cursor.take(4))[0] for _ in range(count))
    cursor.end()
    return Parse(name, query, types)


@dataclass(frozen=True)
class SASLInitialResponse:
    mechanism: str
    data: bytes | None


def parse_sasl_initial(body: bytes) -> SASLInitialResponse:
    cursor = _Cursor(body)
    mechanism = cursor.cstring().decode("ascii", "replace")
    length = cursor.int32()
    data = None if length == -1 else cursor.take(length)
    cursor.end()
    return SASLInitialResponse(mechanism, data)


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    cursor = _Cursor(body)
    name = cursor.cstring()
    value = cursor.cstring()
    cursor.end()
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def parse_backend_key_data(body: bytes) -> tuple[int, bytes]:
    cursor = _Cursor(body)
    pid = cursor.int32()
    return pid, cursor.rest()


def parse_error_fields(body: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse or NoticeResponse, keyed by their code letter."""
    fields: dict[str, str] = {}
    cursor = _Cursor(body)
    while cursor.pos < len(body):
        code = cursor.take(1)
        if code == b"\0":
            break
        fields[code.decode("ascii", "replace")] = cursor.cstring().decode("utf-8", "replace")
    return fields


def parse_auth_request(body: bytes) -> tuple[int, bytes]:
    """An 'R' message: (code, the rest)."""
    cursor = _Cursor(body)
    code = cursor.int32()
    return code, cursor.rest()


def parse_sasl_mechanisms(data: bytes) -> list[str]:
    cursor = _Cursor(data)
    names = []
    while cursor.pos < len(data):
        name = cursor.cstring()
        if not name:
            break
        names.append(name.decode("ascii", "replace"))
    return names


# ---------------------------------------------------------------------------------------
# Builders


def cstr(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    if b"\0" in raw:
        raise ValueError("a protocol string cannot contain NUL")
    return raw + b"\0"


def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + _INT32.pack(len(body) + 4) + body


def auth_request(code: int, data: bytes = b"") -> bytes:
    return message(b"R", _INT32.pack(code) + data)


def auth_sasl(mechanisms: Iterable[str]) -> bytes:
    return auth_request(AUTH_SASL, b"".join(cstr(m) for m in mechanisms) + b"\0")


def auth_sasl_continue(data: bytes) -> bytes:
    return auth_request(AUTH_SASL_CONTINUE, data)


def auth_sasl_final(data: bytes) -> bytes:
    return auth_request(AUTH_SASL_FINAL, data)


def auth_ok() -> bytes:
    return auth_request(AUTH_OK)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(pid: int, secret: bytes) -> bytes:
    return message(b"K", _INT32.pack(pid) + secret)


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def negotiate_protocol_version(minor: int, unrecognised: Iterable[str]) -> bytes:
    names = list(unrecognised)
    return message(b"v", _INT32.pack(3 << 16 | minor) + _INT32.pack(len(names)) + b"".join(map(cstr, names)))


def _fields(severity: str, code: str, text: str, detail: str | None, hint: str | None) -> bytes:
    parts = [b"S", cstr(severity), b"V", cstr(severity), b"C", cstr(code), b"M", cstr(text)]
    if detail:
        parts += [b"D", cstr(detail)]
    if hint:
        parts += [b"H", cstr(hint)]
    return b"".join(parts) + b"\0"


def error_response(
    code: str, text: str, *, severity: str = "ERROR", detail: str | None = None, hint: str | None = None
) -> bytes:
    return message(b"E", _fields(severity, code, text, detail, hint))


def notice_response(
    code: str, text: str, *, severity: str = "NOTICE", detail: str | None = None, hint: str | None = None
) -> bytes:
    return message(b"N", _fields(severity, code, text, detail, hint))


def query(sql: str | bytes) -> bytes:
    return message(b"Q", cstr(sql))


def parse(name: bytes, sql: str | bytes, param_types: Iterable[int] = ()) -> bytes:
    types = list(param_types)
    body = cstr(name) + cstr(sql) + _INT16.pack(len(types)) + b"".join(_UINT32.pack(t) for t in types)
    return message(b"P", body)


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstr(mechanism) + _INT32.pack(len(data)) + data)


def terminate() -> bytes:
    return message(b"X")


# ---------------------------------------------------------------------------------------
# Stream framing for the relay


class Framer:
    """Follows message boundaries in one direction of a relayed stream.

    `feed(chunk)` returns the bytes to forward. Messages whose type is in `watch` are
    buffered whole and handed to `on_message(type, body)`, which returns replacement bytes
    (or None to forward the message unchanged). Every other message is forwarded as it
    arrives, in whatever pieces the socket gave, without being copied or buffered: only
    its 5-byte header is read. A message over `max_length`, or of a type outside
    `allowed` (when given), stops the framer with a ProtocolError in `stopped`; a handler
    may also call `stop(reason)`. Output up to the message that stopped it is still
    returned, so the stream forwarded so far always ends at a message boundary then.

    A handler may call `hold()` instead: that message and everything after it are kept,
    unforwarded, until `release()`, which hands the message to the handler again.

    During a handler call, `message_start`/`message_end` are the message's offsets in the
    whole stream (so a handler can tell whether two messages were adjacent).
    """

    def __init__(
        self,
        watch: bytes,
        on_message: Callable[[int, bytes], bytes | None],
        *,
        max_length: int,
        allowed: bytes | None = None,
    ) -> None:
        # `watch` and `allowed` are sets of type bytes, written as a bytes string (b"QP").
        self._watch = frozenset(watch)
        self._allowed = None if allowed is None else frozenset(allowed) | self._watch
        self._on_message = on_message
        self._max_length = max_length
        self._skip = 0  # bytes of a pass-through message still to forward
        self._partial = bytearray()  # a header or a watched message, still incomplete
        self._need = 0
        self._hold_requested = False
        self._held: bytearray | None = None
        self._offset = 0  # stream offset of the first byte not yet scanned
        self.message_start = 0
        self.message_end = 0
        self.stopped: object | None = None

    @property
    def at_boundary(self) -> bool:
        """True when everything returned so far ends at the end of a message."""
        return self._skip == 0

    def stop(self, reason: object) -> None:
        self.stopped = reason

    def hold(self) -> None:
        """From within a handler: keep this message and what follows until `release()`."""
        self._hold_requested = True

    @property
    def holding(self) -> bool:
        return self._held is not None

    def release(self) -> bytes:
        """Go on from the held message (which may be held again)."""
        if self._held is None:
            return b""
        data, self._held = bytes(self._held), None
        return self.feed(data)

    def feed(self, data: bytes) -> bytes:
        if self.stopped is not None or not data:
            return b""
        if self._held is not None:
            self._held += data
            return b""
        out: list[bytes] = []
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            self._offset += n
            if n == len(data):
                return data
            out.append(data[:n])
            data = data[n:]
        if self._partial:
            self._partial += data
            if len(self._partial) < self._need:
                return b"".join(out)
            data = bytes(self._partial)
            self._partial = bytearray()
        self._scan(data, out)
        return b"".join(out)

    def _scan(self, buf: bytes, out: list[bytes]) -> None:
        i = start = 0
        end = len(buf)
        while end - i >= 5 and self.stopped is None:
            kind = buf[i]
            (length,) = _INT32.unpack_from(buf, i + 1)
            if not self._valid(kind, length):
                break
            total = length + 1
            if kind in self._watch:
                if end - i < total:
                    break
                self.message_start, self.message_end = self._offset + i, self._offset + i + total
                replacement = self._on_message(kind, buf[i + 5 : i + total])
                if self._hold_requested:
                    self._hold_requested = False
                    self._held = bytearray(buf[i:])
                    end = i
                    break
                if replacement is not None:
                    out.append(buf[start:i])
                    out.append(replacement)
                    start = i + total
                i += total
            elif end - i >= total:
                i += total
            else:
                self._skip = total - (end - i)
                i = end
        out.append(buf if start == 0 and i == len(buf) else buf[start:i])
        self._offset += i  # a partial or held rest is scanned again later, from here
        if i < end and self.stopped is None:
            self._partial = bytearray(buf[i:])
            self._need = 5 if end - i < 5 else 1 + _INT32.unpack_from(buf, i + 1)[0]

    def _valid(self, kind: int, length: int) -> bool:
        if length < 4 or length > self._max_length:
            self.stop(ProtocolError("invalid message length"))
            return False
        if self._allowed is not None and kind not in self._allowed:
            self.stop(ProtocolError("invalid frontend message type"))
            return False
        return True
