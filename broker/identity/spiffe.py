"""SPIFFE ID validation (SPIFFE-ID.md §2), strict by design.

A JWT-SVID's `sub` becomes the workload id that policy globs match against, so anything a
parser elsewhere might normalise differently (case, percent-escapes, dot segments, ports) is
refused rather than cleaned up.
"""

from __future__ import annotations

import re

from broker.identity.errors import InvalidToken

MAX_SPIFFE_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255
_SCHEME = "spiffe://"
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def parse_spiffe_id(value: str, trust_domain: str) -> str:
    """Return `value` unchanged if it is a valid workload SPIFFE ID in `trust_domain`.

    A bare trust-domain ID (`spiffe://example.org`) is refused: it names no workload.
    Raises `InvalidToken` otherwise.
    """
    if not isinstance(value, str) or not value.isascii():
        raise InvalidToken("invalid SPIFFE ID")
    if len(value) > MAX_SPIFFE_ID_BYTES or not value.startswith(_SCHEME):
        raise InvalidToken("invalid SPIFFE ID")
    domain, slash, path = value[len(_SCHEME) :].partition("/")
    if not _valid_trust_domain(domain) or not slash or not _valid_path(path):
        raise InvalidToken("invalid SPIFFE ID")
    if domain != trust_domain:
        raise InvalidToken("SPIFFE ID is outside the issuer's trust domain")
    return value


def _valid_trust_domain(domain: str) -> bool:
    # The character set alone rules out a port (`:`), userinfo (`@`), upper case and escapes.
    return 0 < len(domain) <= MAX_TRUST_DOMAIN_BYTES and _TRUST_DOMAIN.fullmatch(domain) is not None


def _valid_path(path: str) -> bool:
    # `path` is what follows the first `/`; `?` and `#` are outside the segment alphabet.
    return all(
        _SEGMENT.fullmatch(segment) is not None and segment not in {".", ".."} for segment in path.split("/")
    )
