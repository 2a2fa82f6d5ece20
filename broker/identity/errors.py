"""Errors of the identity layer.

`InvalidToken.detail` is shown to the caller (RFC 9457 `detail`), so it is worded to help a
legitimate client fix its request while telling an attacker nothing new: no key material, no
token text, no hint which of several internal checks came closest to passing.
"""

from __future__ import annotations


class InvalidToken(Exception):
    """The bearer token was refused; the API answers 401 `invalid_token`."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class KeysUnavailable(InvalidToken):
    """The issuer's signing keys could not be loaded and no usable cached copy remains.

    Still an `InvalidToken` (the token was not verified, so nothing is granted), but an API
    layer may choose to answer 503 with `Retry-After`: the caller did nothing wrong.
    """


class JwksError(Exception):
    """A JWKS document could not be fetched, read or parsed (internal; never shown)."""
