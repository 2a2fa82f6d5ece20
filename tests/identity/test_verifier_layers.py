"""The second line of the JWT checks: `_decode` (PyJWT with every option spelled out) on its own.

`Verifier.verify` checks the algorithm and the issuer twice: on the unverified header
and claims before a key is looked up, and again inside `jwt.decode`. Through `verify`
the first check always refuses first, so dropping the second would go unnoticed; these
tests give `_decode` the tokens the first check would have stopped (docs/contract.md §3:
asymmetric algorithms as configured, `iss` exact, `exp`/`iss`/`aud`/`sub` required).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jwt
import pytest

from broker.identity import InvalidToken
from broker.identity.verifier import _build_issuer, _decode, _Issuer
from tests.support.tokens import FakeClock, SigningKey, TestIssuer, encode_token

SUB = "alice@example.com"


@pytest.fixture
def idp(tmp_path: Path, clock: FakeClock) -> TestIssuer:
    return TestIssuer.create(tmp_path, name="idp", algorithm="ES256", algorithms=["ES256"], clock=clock)


@pytest.fixture
def issuer(idp: TestIssuer, clock: FakeClock) -> Any:
    built = _build_issuer(idp.settings(), clock, None)
    yield built
    built.keys.close()


def _claims(idp: TestIssuer, clock: FakeClock, **changes: Any) -> dict[str, Any]:
    claims = {"iss": idp.issuer, "sub": SUB, "aud": "credential-broker", "exp": int(clock()) + 300}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _decoded(token: str, key: SigningKey, issuer: _Issuer) -> dict[str, Any]:
    return _decode(token, jwt.PyJWK(key.public_jwk()), issuer, 30)


def test_decode_accepts_a_good_token(idp, issuer, clock):
    token = encode_token({"alg": "ES256", "kid": idp.key.kid}, _claims(idp, clock), key=idp.key)
    assert _decoded(token, idp.key, issuer)["sub"] == SUB


def test_decode_refuses_an_algorithm_the_issuer_does_not_allow(idp, issuer, clock):
    """§3 asymmetric algorithms only, as configured: PS256 is asymmetric but not this issuer's."""
    other = SigningKey.generate("PS256", kid=idp.key.kid)
    token = encode_token({"alg": "PS256", "kid": other.kid}, _claims(idp, clock), key=other)
    with pytest.raises(InvalidToken, match="algorithm not accepted"):
        _decoded(token, other, issuer)


@pytest.mark.parametrize("iss", ["https://evil.test", "https://IDP.test", None])
def test_decode_refuses_another_or_missing_issuer(idp, issuer, clock, iss):
    """§3 iss equals the configured issuer exactly, and is required."""
    claims = (
        _claims(idp, clock, iss=iss) if iss else {k: v for k, v in _claims(idp, clock).items() if k != "iss"}
    )
    token = encode_token({"alg": "ES256", "kid": idp.key.kid}, claims, key=idp.key)
    with pytest.raises(InvalidToken):
        _decoded(token, idp.key, issuer)


@pytest.mark.parametrize("claim", ["sub", "aud", "exp"])
def test_decode_requires_every_registered_claim(idp, issuer, clock, claim):
    """§3 exp, aud and sub required (iss above)."""
    claims = {k: v for k, v in _claims(idp, clock).items() if k != claim}
    token = encode_token({"alg": "ES256", "kid": idp.key.kid}, claims, key=idp.key)
    with pytest.raises(InvalidToken, match=f"token has no '{claim}' claim"):
        _decoded(token, idp.key, issuer)
