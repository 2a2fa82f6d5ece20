"""SCRAM-SHA-256 on the server side (RFC 5802, RFC 7677), as Postgres speaks it.

The gateway stores a `Verifier` per handle, never the handle's secret. A client proves it
knows the secret without sending it: the check recovers ClientKey = proof XOR
HMAC(StoredKey, AuthMessage) and compares H(ClientKey) with StoredKey in constant time.

Why not scramp's server: libpq, lib/pq and pgx send the client-first message `n,,n=,r=…`
with an empty username (Postgres takes the user from the startup packet), and scramp 1.5
refuses an empty `n=`. The username can't be rewritten either: the client-first-bare is
part of the signed AuthMessage. So the exchange is written here, and scramp only derives
verifiers (`make_auth_info`).

Only `SCRAM-SHA-256` is offered. Channel binding (`-PLUS`) is not: the gs2 flag `p` is
refused, `n` and `y` are accepted and must match the final message's `c=` attribute.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass

import scramp

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096
SALT_BYTES = 16  # as Postgres's own verifiers
_NONCE_BYTES = 18  # as Postgres's server nonce
_KEY_BYTES = 32
_PREFIX = "SCRAM-SHA-256$"


class ScramError(Exception):
    """The exchange failed. The reason is for the gateway's tests only: clients always
    get the same 28P01 answer, whatever part failed."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as error:
        raise ScramError("invalid base64") from error


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


@dataclass(frozen=True)
class Verifier:
    """What the gateway keeps for a handle: enough to check a proof, not to make one."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    def to_string(self) -> str:
        """Postgres's own format: `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`."""
        return f"{_PREFIX}{self.iterations}:{_b64(self.salt)}${_b64(self.stored_key)}:{_b64(self.server_key)}"

    @classmethod
    def from_string(cls, text: str) -> Verifier:
        try:
            head, keys = text.removeprefix(_PREFIX).split("$")
            iterations, salt = head.split(":")
            stored, server = keys.split(":")
            verifier = cls(_unb64(salt), int(iterations), _unb64(stored), _unb64(server))
        except (ValueError, ScramError) as error:
            raise ValueError("not a SCRAM-SHA-256 verifier") from error
        if not text.startswith(_PREFIX) or verifier.iterations < 1:
            raise ValueError("not a SCRAM-SHA-256 verifier")
        if len(verifier.stored_key) != _KEY_BYTES or len(verifier.server_key) != _KEY_BYTES:
            raise ValueError("not a SCRAM-SHA-256 verifier")
        return verifier


def make_verifier(password: str, *, iterations: int = DEFAULT_ITERATIONS) -> Verifier:
    """Derive a verifier from a secret, with a fresh random salt (PBKDF2, so not cheap)."""
    mechanism = scramp.ScramMechanism(MECHANISM)
    salt, stored, server, count = mechanism.make_auth_info(
        password, iteration_count=iterations, salt=secrets.token_bytes(SALT_BYTES)
    )
    return Verifier(bytes(salt), int(count), bytes(stored), bytes(server))


def fake_verifier(user: str, key: bytes, *, iterations: int = DEFAULT_ITERATIONS) -> Verifier:
    """A verifier for a user that doesn't exist, so the exchange looks the same.

    The salt is derived from `user` under `key`, so asking twice about the same unknown
    handle shows the same salt, as a real one would. Give every gateway replica the same
    `key`, or a client could tell a real handle (stable salt) from an unknown one
    (a salt that differs between replicas).
    """
    digest = _hmac(key, b"fake-salt\0" + user.encode())
    keys = _hmac(key, b"fake-keys\0" + user.encode())
    return Verifier(digest[:SALT_BYTES], iterations, keys, _hmac(keys, b"server"))


@dataclass(frozen=True)
class _ClientFirst:
    gs2_header: str
    bare: str
    nonce: str


def _parse_client_first(text: str) -> _ClientFirst:
    parts = text.split(",", 2)
    if len(parts) != 3:
        raise ScramError("malformed client-first-message")
    flag, authzid, bare = parts
    if flag.startswith("p="):
        raise ScramError("channel binding is not offered")
    if flag not in ("n", "y"):
        raise ScramError("malformed gs2 flag")
    if authzid:
        raise ScramError("authorization identity is not supported")
    attrs = bare.split(",")
    if len(attrs) < 2 or attrs[0].startswith("m="):
        raise ScramError("malformed client-first-message")
    # The username is ignored: libpq sends it empty, and the startup packet's user counts.
    if not attrs[0].startswith("n=") or not attrs[1].startswith("r="):
        raise ScramError("malformed client-first-message")
    nonce = attrs[1][2:]
    if not nonce or not all(0x21 <= ord(c) <= 0x7E and c != "," for c in nonce):
        raise ScramError("nonce is not printable")
    return _ClientFirst(f"{flag},,", bare, nonce)


class ScramExchange:
    """One server-side exchange. Call `client_first`, then `client_final`.

    With `valid=False` (an unknown user, checked against `fake_verifier`), every step
    runs the same code and the same computations, and `client_final` fails at the end.
    """

    def __init__(self, verifier: Verifier, *, valid: bool = True, server_nonce: str | None = None) -> None:
        self._verifier = verifier
        self._valid = valid
        self._server_nonce = server_nonce  # fixed only for RFC test vectors
        self._first: _ClientFirst | None = None
        self._server_first = ""
        self._nonce = ""

    def client_first(self, data: bytes) -> bytes:
        """Take the client-first-message, return the server-first-message."""
        if self._first is not None:
            raise ScramError("unexpected client-first-message")
        self._first = _parse_client_first(_text(data))
        self._nonce = self._first.nonce + (self._server_nonce or _b64(secrets.token_bytes(_NONCE_BYTES)))
        v = self._verifier
        self._server_first = f"r={self._nonce},s={_b64(v.salt)},i={v.iterations}"
        return self._server_first.encode("ascii")

    def client_final(self, data: bytes) -> bytes:
        """Check the client-final-message; return the server-final-message (`v=…`)."""
        first = self._first
        if first is None or not self._server_first:
            raise ScramError("unexpected client-final-message")
        self._server_first = ""  # one attempt per exchange
        without_proof, proof = _split_proof(_text(data))
        attrs = without_proof.split(",")
        if len(attrs) < 2 or attrs[0] != "c=" + _b64(first.gs2_header.encode("ascii")):
            raise ScramError("channel binding mismatch")
        if attrs[1] != "r=" + self._nonce:
            raise ScramError("nonce mismatch")
        auth_message = f"{first.bare},r={self._nonce},s={_b64(self._verifier.salt)},"
        auth_message += f"i={self._verifier.iterations},{without_proof}"
        return self._verify(auth_message.encode(), proof)

    def _verify(self, auth_message: bytes, proof: bytes) -> bytes:
        v = self._verifier
        signature = _hmac(v.stored_key, auth_message)
        if len(proof) != len(signature):
            raise ScramError("invalid proof")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        matches = hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key)
        if not (matches and self._valid):
            raise ScramError("invalid proof")
        return b"v=" + _b64(_hmac(v.server_key, auth_message)).encode("ascii")


def _split_proof(text: str) -> tuple[str, bytes]:
    head, sep, proof = text.rpartition(",p=")
    if not sep or "," in proof:
        raise ScramError("malformed client-final-message")
    return head, _unb64(proof)


def _text(data: bytes) -> str:
    # Every attribute we read is base64 or printable ASCII; a SASLprep'd username may be
    # UTF-8, and it is part of the signed AuthMessage, so it is kept byte for byte.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ScramError("message is not UTF-8") from error
