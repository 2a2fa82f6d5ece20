"""The shared minting helper (tests/support/tokens.py) produces what the config and verifier expect."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from broker.config import settings_from_mapping
from broker.identity import Verifier
from tests.support.tokens import OMIT, FakeClock, TestIssuer, b64url


def _decode(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def test_settings_dict_is_a_valid_issuers_entry(tmp_path: Path, spire: TestIssuer, sso: TestIssuer) -> None:
    settings = settings_from_mapping(
        {
            "database_url": "postgresql://broker@127.0.0.1/broker",
            "vault": {"addr": "http://127.0.0.1:8200", "auth": {"method": "token", "token": "t"}},
            "policy_file": str(tmp_path / "policy.yaml"),
            "issuers": [spire.settings_dict(), sso.settings_dict()],
            "operators": {"groups": ["sre"]},
        },
        env={},
    )
    verifier = Verifier.from_settings(settings, jti_store=None, clock=spire.clock)
    assert verifier.verify(spire.mint(spire.spiffe_id("agents/a"))).id == "spiffe://example.org/agents/a"
    assert verifier.verify(sso.mint("alice", groups=["sre"])).may("operator")
    verifier.close()


def test_settings_dict_with_jwks_uri_drops_the_file(spire: TestIssuer) -> None:
    entry = spire.settings_dict(jwks_uri="https://spire.test/jwks")
    assert "jwks_file" not in entry
    assert spire.settings(jwks_uri="https://spire.test/jwks").jwks_uri == "https://spire.test/jwks"


def test_mint_defaults_and_omit(spire: TestIssuer, clock: FakeClock) -> None:
    header, claims = (_decode(part) for part in spire.mint("s").split(".")[:2])
    assert header == {"alg": "ES256", "kid": spire.key.kid, "typ": "JWT"}
    now = int(clock())
    assert claims["iss"] == "https://spire.test" and claims["aud"] == "credential-broker"
    assert (claims["iat"], claims["exp"]) == (now, now + 300)
    assert isinstance(claims["jti"], str)
    header, claims = (
        _decode(part)
        for part in spire.mint("s", headers={"typ": OMIT}, extra_claims={"jti": OMIT}).split(".")[:2]
    )
    assert "typ" not in header and "jti" not in claims


def test_bearer_header(spire: TestIssuer) -> None:
    header = spire.bearer("s")
    assert header["Authorization"].startswith("Bearer ey")


def test_b64url_has_no_padding() -> None:
    assert b64url(b"a") == "YQ"
