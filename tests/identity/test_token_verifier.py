"""Verifier: good tokens, and every applicable attack of catalogue §1 (J01-J31)."""

from __future__ import annotations

import base64
import contextlib
import json
import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from broker.identity import Identity, InvalidToken, Verifier
from tests.support.tokens import (
    OMIT,
    FakeClock,
    SigningKey,
    TestIssuer,
    b64url,
    encode_token,
    mangled,
    same_token,
)

SVID = "spiffe://example.org/agents/reporter"


def claims_for(issuer: TestIssuer, clock: FakeClock, **overrides: Any) -> dict[str, Any]:
    claims = {
        "iss": issuer.issuer,
        "sub": SVID if issuer.kind == "spiffe" else "alice@example.com",
        "aud": "credential-broker",
        "iat": int(clock()),
        "exp": int(clock()) + 300,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not OMIT}


@pytest.fixture
def verifier(make_verifier: Callable[..., Verifier], spire: TestIssuer, sso: TestIssuer) -> Verifier:
    return make_verifier(spire, sso)


# -- accepted ---------------------------------------------------------------------------


def test_svid_is_accepted_as_its_spiffe_id(verifier: Verifier, spire: TestIssuer, clock: FakeClock) -> None:
    identity = verifier.verify(spire.mint(SVID, jti="j-1"))
    assert identity == Identity(
        id=SVID,
        issuer_name="spire",
        issuer="https://spire.test",
        subject=SVID,
        kind="spiffe",
        uses=frozenset({"workload"}),
        groups=frozenset(),
        claims=identity.claims,
        expires_at=datetime.fromtimestamp(int(clock()) + 300, UTC),
        jti="j-1",
    )
    assert identity.may("workload") and not identity.may("approver")
    assert identity.claims["aud"] == "credential-broker"
    with pytest.raises(TypeError):
        identity.claims["sub"] = "spiffe://example.org/other"  # type: ignore[index]


@pytest.mark.parametrize("algorithm", ["RS256", "PS256", "ES256", "ES384", "EdDSA"])
def test_oidc_token_is_accepted_as_issuer_name_and_sub(
    make_verifier: Any, tmp_path: Path, clock: FakeClock, algorithm: str
) -> None:
    idp = TestIssuer.create(tmp_path, name="ci", algorithm=algorithm, clock=clock)
    identity = make_verifier(idp).verify(idp.mint("repo:acme/app:ref:refs/heads/main"))
    assert identity.id == "ci:repo:acme/app:ref:refs/heads/main"
    assert identity.kind == "oidc"
    assert identity.subject == "repo:acme/app:ref:refs/heads/main"


@pytest.mark.parametrize("algorithm", ["RS256", "PS256", "ES256", "ES384", "ES512"])
def test_svid_algorithms_rs_es_ps_are_accepted(
    make_verifier: Any, tmp_path: Path, clock: FakeClock, algorithm: str
) -> None:
    spire = TestIssuer.create(tmp_path, name="spire", kind="spiffe", algorithm=algorithm, clock=clock)
    assert make_verifier(spire).verify(spire.mint(SVID)).id == SVID


def test_each_issuer_verifies_its_own_tokens(verifier: Verifier, spire: TestIssuer, sso: TestIssuer) -> None:
    assert verifier.verify(spire.mint(SVID)).issuer_name == "spire"
    assert verifier.verify(sso.mint("alice@example.com")).issuer_name == "corp-sso"


def test_cached_key_is_not_reloaded_per_request(verifier: Verifier, spire: TestIssuer) -> None:
    token = spire.mint(SVID)
    for _ in range(50):
        verifier.verify(token)
    assert verifier.key_cache("spire").stats.fetches == 1


# -- J01, J02, J03, J04, J29: algorithms ----------------------------------------------------


@pytest.mark.parametrize(
    "alg",
    ["none", "None", "NONE", "", None, OMIT, ["ES256"], "HS256", "HS384", "HS512", "ES256K"],
    ids=[
        "J01-none",
        "J01-None",
        "J01-NONE",
        "empty",
        "null",
        "missing",
        "list",
        "J02-HS256",
        "HS384",
        "HS512",
        "not-configured",
    ],
)
def test_J01_unsigned_or_symmetric_algorithms_are_refused(
    verifier: Verifier, spire: TestIssuer, clock: FakeClock, refused: Any, alg: Any
) -> None:
    header = {"alg": alg, "kid": spire.key.kid, "typ": "JWT"}
    token = encode_token({k: v for k, v in header.items() if v is not OMIT}, claims_for(spire, clock))
    refused(verifier, token, "algorithm not accepted")


@pytest.mark.parametrize("secret", ["pem", "jwk-json", "jwk-x"], ids=["J02-pem", "J02-jwk", "J02-x"])
def test_J02_hs256_macd_with_the_public_key_is_refused(
    verifier: Verifier, sso: TestIssuer, clock: FakeClock, refused: Any, secret: str
) -> None:
    key = sso.key
    material = {
        "pem": key.public_pem(),
        "jwk-json": json.dumps(key.public_jwk()).encode(),
        "jwk-x": key.public_jwk()["n"].encode(),
    }[secret]
    header = {"alg": "HS256", "kid": key.kid, "typ": "JWT"}
    token = encode_token(header, claims_for(sso, clock), hmac_secret=material)
    refused(verifier, token, "algorithm not accepted")


def test_J03_allowed_algorithms_come_from_config_not_the_token(
    make_verifier: Any, spire: TestIssuer, clock: FakeClock, refused: Any
) -> None:
    # The issuer is pinned to ES256; an RS256 key it also publishes must not be usable.
    rsa = spire.rotate("RS256")
    verifier = make_verifier(spire.settings(algorithms=["ES256"]))
    refused(verifier, spire.mint(SVID, key=rsa), "algorithm not accepted")
    assert verifier.verify(spire.mint(SVID, key=spire.keys[0])).id == SVID


@pytest.mark.parametrize(
    "header_alg",
    ["RS256", "ES384", "PS256", "EdDSA"],
    ids=["J04-RS256-on-EC-key", "ES384-on-P256-key", "PS256-on-EC-key", "EdDSA-on-EC-key"],
)
def test_J04_alg_that_does_not_fit_the_key_is_refused(
    make_verifier: Any, tmp_path: Path, clock: FakeClock, refused: Any, header_alg: str
) -> None:
    idp = TestIssuer.create(tmp_path, name="idp", algorithm="ES256", clock=clock)
    verifier = make_verifier(idp)
    token = idp.mint("alice", headers={"alg": header_alg})
    refused(verifier, token, "algorithm not accepted for this signing key")


def test_J04_rs256_token_for_es256_issuer_is_refused(
    make_verifier: Any, tmp_path: Path, clock: FakeClock, refused: Any
) -> None:
    idp = TestIssuer.create(tmp_path, name="idp", algorithm="ES256", clock=clock, algorithms=["ES256"])
    other = SigningKey.generate("RS256", kid=idp.key.kid)
    refused(make_verifier(idp), idp.mint("alice", key=other), "algorithm not accepted")


@pytest.mark.parametrize("alg", ["EdDSA", "HS256"], ids=["J29-EdDSA", "J29-HS256"])
def test_J29_svid_with_eddsa_or_hmac_is_refused(
    verifier: Verifier, spire: TestIssuer, clock: FakeClock, refused: Any, alg: str
) -> None:
    if alg == "EdDSA":
        token = spire.mint(SVID, key=SigningKey.generate("EdDSA", kid=spire.key.kid))
    else:
        header = {"alg": "HS256", "kid": spire.key.kid, "typ": "JWT"}
        token = encode_token(header, claims_for(spire, clock), hmac_secret=spire.key.public_pem())
    refused(verifier, token, "algorithm not accepted")


# -- J05, J07, J08, J10, J30: header --------------------------------------------------------


@pytest.mark.parametrize(
    "kid",
    [OMIT, "", None, 7, ["k"], {"k": 1}],
    ids=["J05-missing", "empty", "null", "number", "list", "object"],
)
def test_J05_token_without_a_string_kid_is_refused(
    verifier: Verifier, spire: TestIssuer, refused: Any, kid: Any
) -> None:
    refused(verifier, spire.mint(SVID, headers={"kid": kid}), "token has no kid")


@pytest.mark.parametrize(
    ("kid", "detail"),
    [
        ("../../dev/null", "unknown signing key"),
        ("' OR 1=1--", "unknown signing key"),
        ("%s%n", "unknown signing key"),
        ("\u0000", "unknown signing key"),
        ("k" * 257, "invalid kid"),
        ("k" * 10_240, "invalid kid"),
    ],
    ids=["J07-path", "J07-sql", "format", "nul", "257-chars", "J07-10KB"],
)
def test_J07_weird_kids_are_refused_without_any_lookup(
    make_verifier: Any, spire: TestIssuer, refused: Any, kid: str, detail: str
) -> None:
    verifier = make_verifier(spire, max_token_bytes=65536)
    refused(verifier, spire.mint(SVID, headers={"kid": kid}), detail)
    assert verifier.key_cache("spire").stats.fetches == 1


@pytest.mark.parametrize("header", ["jku", "x5u", "x5c", "jwk"], ids=lambda h: f"J08-{h}")
def test_J08_key_headers_are_refused_and_never_followed(
    make_verifier: Any,
    sso: TestIssuer,
    jwks_server: Any,
    refused: Any,
    header: str,
) -> None:
    uri = jwks_server.serve("/jwks", sso.jwks_bytes())
    verifier = make_verifier(sso.settings(jwks_uri=uri))
    attacker = SigningKey.generate("RS256", kid=sso.key.kid)
    value = {
        "jku": jwks_server.url("/attacker"),
        "x5u": jwks_server.url("/attacker"),
        "x5c": ["MIIB"],
        "jwk": attacker.public_jwk(),
    }[header]
    for key in (sso.key, attacker):
        token = sso.mint("alice", key=key, headers={header: value})
        refused(verifier, token, "keys embedded in or linked from the token are not accepted")
    assert jwks_server.count("/attacker") == 0
    assert jwks_server.count("/jwks") == 0  # refused before any key lookup


@pytest.mark.parametrize(
    "crit",
    [["exp"], ["b64"], [], "b64", ["x"]],
    ids=["J10-exp", "J10-b64", "empty", "string", "J10-unknown"],
)
def test_J10_crit_header_is_refused(verifier: Verifier, spire: TestIssuer, refused: Any, crit: Any) -> None:
    token = spire.mint(SVID, headers={"crit": crit, "x": 1, "exp": 1})
    refused(verifier, token, "critical header parameters are not supported")


def test_b64_false_without_crit_is_refused(make_verifier: Any, sso: TestIssuer, refused: Any) -> None:
    refused(make_verifier(sso), sso.mint("alice", headers={"b64": False}))


@pytest.mark.parametrize(
    ("typ", "accepted"),
    [("JWT", True), ("JOSE", True), (OMIT, True), ("at+jwt", False), ("jwt", False), ("", False), (1, False)],
    ids=["JWT", "JOSE", "absent", "J30-at+jwt", "lowercase", "empty", "number"],
)
def test_J30_svid_typ_must_be_jwt_or_jose(
    verifier: Verifier, spire: TestIssuer, refused: Any, typ: Any, accepted: bool
) -> None:
    token = spire.mint(SVID, headers={"typ": typ})
    if accepted:
        assert verifier.verify(token).id == SVID
    else:
        refused(verifier, token, "JWT-SVID typ must be JWT or JOSE")


@pytest.mark.parametrize("extra", ["cty", "x5t", "zip", "nonce"])
def test_J30_svid_with_extra_header_is_refused(
    verifier: Verifier, spire: TestIssuer, sso: TestIssuer, refused: Any, extra: str
) -> None:
    refused(verifier, spire.mint(SVID, headers={extra: "x"}), "header parameter not allowed in a JWT-SVID")
    # An OIDC issuer has no such rule.
    assert verifier.verify(sso.mint("alice", headers={extra: "x"})).subject == "alice"


# -- J09, J18: issuers ---------------------------------------------------------------------


def test_J09_token_signed_by_another_issuers_key_is_refused(
    verifier: Verifier, spire: TestIssuer, sso: TestIssuer, refused: Any
) -> None:
    refused(verifier, spire.mint(SVID, key=sso.key), "unknown signing key")
    refused(verifier, sso.mint("alice", key=spire.key), "unknown signing key")


def test_J09_same_kid_in_two_issuers_never_mixes_key_sets(
    make_verifier: Any, tmp_path: Path, clock: FakeClock, refused: Any
) -> None:
    a = TestIssuer.create(tmp_path, name="a", clock=clock)
    b = TestIssuer.create(tmp_path, name="b", clock=clock)
    b.keys = [SigningKey(a.key.kid, "ES256", b.key.private_key)]
    b.write_jwks()
    verifier = make_verifier(a, b)
    refused(verifier, a.mint("alice", key=b.key), "signature verification failed")
    assert verifier.verify(b.mint("alice")).issuer_name == "b"


@pytest.mark.parametrize(
    "iss",
    [
        "https://spire.test.evil",
        "https://spire.test/",
        "http://spire.test",
        "HTTPS://spire.test",
        "https://SPIRE.test",
        " https://spire.test",
        "https://spire.test\u0000",
        "https://spire.tes",
        ["https://spire.test"],
        None,
        OMIT,
    ],
    ids=[
        "J18-suffix",
        "trailing-slash",
        "J18-http",
        "upper-scheme",
        "upper-host",
        "leading-space",
        "nul",
        "prefix",
        "list",
        "null",
        "missing",
    ],
)
def test_J18_issuer_is_matched_exactly(verifier: Verifier, spire: TestIssuer, refused: Any, iss: Any) -> None:
    token = spire.mint(SVID, iss=None, extra_claims={"iss": iss})
    refused(verifier, token, "unknown issuer")


def test_unknown_issuer_with_valid_signature_is_refused(
    verifier: Verifier, tmp_path: Path, clock: FakeClock, refused: Any
) -> None:
    stranger = TestIssuer.create(tmp_path, name="stranger", clock=clock)
    refused(verifier, stranger.mint("alice"), "unknown issuer")


def test_forged_signature_is_refused(verifier: Verifier, spire: TestIssuer, refused: Any) -> None:
    head, body, signature = spire.mint(SVID).split(".")
    forged_body = b64url(json.dumps({**json.loads(_b64decode(body)), "sub": SVID + "x"}).encode())
    refused(verifier, f"{head}.{forged_body}.{signature}", "signature verification failed")
    refused(verifier, f"{head}.{body}.", "signature verification failed")


# -- J11-J15: time --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("skew", "exp_offset", "accepted"),
    [
        (30, -31, False),
        (30, -29, True),
        (30, -30, False),
        (0, 0, False),
        (0, 1, True),
        (0, -0.5, False),
        (30, 1, True),
    ],
    ids=[
        "J11-now-minus-skew-plus-1",
        "J11-now-minus-skew-minus-1",
        "now-minus-skew",
        "J11-exp-equals-now-skew-0",
        "exp-now-plus-1-skew-0",
        "fractional-past",
        "fresh",
    ],
)
def test_J11_expiry_with_skew(
    make_verifier: Any,
    spire: TestIssuer,
    clock: FakeClock,
    refused: Any,
    skew: int,
    exp_offset: float,
    accepted: bool,
) -> None:
    verifier = make_verifier(spire, skew=skew)
    token = spire.mint(SVID, iat=int(clock()) - 100, extra_claims={"exp": clock() + exp_offset})
    if accepted:
        assert verifier.verify(token).id == SVID
    else:
        refused(verifier, token, "token expired")


def test_J11_token_expires_as_the_clock_moves(
    verifier: Verifier, spire: TestIssuer, clock: FakeClock, refused: Any
) -> None:
    token = spire.mint(SVID, exp_in=60)
    assert verifier.verify(token).id == SVID
    clock.advance(60 + 29)
    assert verifier.verify(token).id == SVID
    clock.advance(1)
    refused(verifier, token, "token expired")


@pytest.mark.parametrize("exp", [OMIT, None], ids=["J12-missing", "null"])
def test_J12_token_without_exp_is_refused(
    verifier: Verifier, sso: TestIssuer, refused: Any, exp: Any
) -> None:
    refused(verifier, sso.mint("alice", extra_claims={"exp": exp}), "token has no 'exp' claim")


@pytest.mark.parametrize(
    ("claim", "offset", "detail"),
    [
        ("nbf", 31, "token not yet valid"),
        ("iat", 31, "token issued in the future"),
        ("nbf", 29, None),
        ("iat", 29, None),
        ("nbf", 30, None),
    ],
    ids=["J13-nbf-beyond-skew", "J13-iat-beyond-skew", "nbf-within-skew", "iat-within-skew", "nbf-at-skew"],
)
def test_J13_future_nbf_or_iat(
    verifier: Verifier,
    sso: TestIssuer,
    clock: FakeClock,
    refused: Any,
    claim: str,
    offset: int,
    detail: str | None,
) -> None:
    token = sso.mint("alice", extra_claims={claim: int(clock()) + offset})
    if detail is None:
        assert verifier.verify(token).subject == "alice"
    else:
        refused(verifier, token, detail)


@pytest.mark.parametrize(
    ("iat_offset", "exp_offset", "accepted"),
    [
        (0, 3600, True),
        (0, 3601, False),
        (-600, 3000, True),
        (-600, 3001, False),
        (OMIT, 3600, True),
        (OMIT, 3601, False),
        (0, 365 * 86400, False),
    ],
    ids=[
        "at-cap",
        "J14-over-cap",
        "old-iat-at-cap",
        "old-iat-over-cap",
        "no-iat-at-cap",
        "no-iat-over-cap",
        "J14-k8s-one-year",
    ],
)
def test_J14_lifetime_cap(
    make_verifier: Any,
    tmp_path: Path,
    clock: FakeClock,
    refused: Any,
    iat_offset: Any,
    exp_offset: int,
    accepted: bool,
) -> None:
    k8s = TestIssuer.create(tmp_path, name="k8s", clock=clock, max_token_lifetime_seconds=3600)
    now = int(clock())
    iat = OMIT if iat_offset is OMIT else now + iat_offset
    token = k8s.mint("system:serviceaccount:ci:deployer", extra_claims={"iat": iat, "exp": now + exp_offset})
    verifier = make_verifier(k8s)
    if accepted:
        assert verifier.verify(token).subject == "system:serviceaccount:ci:deployer"
    else:
        refused(verifier, token, "token lifetime exceeds the issuer's maximum")


def test_without_lifetime_cap_long_tokens_pass(verifier: Verifier, sso: TestIssuer) -> None:
    assert verifier.verify(sso.mint("alice", exp_in=365 * 86400)).subject == "alice"


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize(
    "value",
    ["9999999999", True, False, [1], {"t": 1}, -1, 1e20, 2**64],
    ids=["J15-string", "J15-true", "false", "list", "object", "negative", "1e20", "2^64"],
)
def test_J15_time_claims_must_be_plain_numbers(
    verifier: Verifier, sso: TestIssuer, refused: Any, claim: str, value: Any
) -> None:
    refused(verifier, sso.mint("alice", extra_claims={claim: value}), f"invalid {claim} claim")


@pytest.mark.parametrize(
    "literal",
    ["1e400", "NaN", "Infinity", "-Infinity"],
    ids=["overflow-to-inf", "NaN", "Infinity", "minus-Infinity"],
)
def test_J15_non_finite_numbers_are_refused(
    verifier: Verifier, sso: TestIssuer, clock: FakeClock, refused: Any, literal: str
) -> None:
    body = json.dumps(claims_for(sso, clock, exp=0)).replace('"exp": 0', f'"exp": {literal}')
    token = encode_token({"alg": "RS256", "kid": sso.key.kid, "typ": "JWT"}, body.encode(), key=sso.key)
    error = refused(verifier, token)
    assert error.detail in {"malformed token", "invalid exp claim"}


def test_float_exp_is_accepted(verifier: Verifier, sso: TestIssuer, clock: FakeClock) -> None:
    identity = verifier.verify(sso.mint("alice", extra_claims={"exp": clock() + 100.5}))
    assert identity.expires_at.timestamp() == clock() + 100.5


# -- J16, J17, J31: audience ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("aud", "detail"),
    [
        ("credential-broker", None),
        (["credential-broker"], None),
        (["other", "credential-broker"], None),
        ("other", "audience not accepted"),
        (["other"], "audience not accepted"),
        ("Credential-Broker", "audience not accepted"),
        ("credential-broker ", "audience not accepted"),
        (["credential-broker", 1], "audience not accepted"),
        ({"aud": "credential-broker"}, "audience not accepted"),
        ([], "token has no 'aud' claim"),
        ("", "token has no 'aud' claim"),
        (OMIT, "token has no 'aud' claim"),
    ],
    ids=[
        "string",
        "list-of-one",
        "J17-list-with-ours",
        "J17-other",
        "J17-list-other",
        "case",
        "trailing-space",
        "list-with-number",
        "object",
        "empty-list",
        "empty-string",
        "J16-missing",
    ],
)
def test_J17_audience(
    verifier: Verifier, sso: TestIssuer, refused: Any, aud: Any, detail: str | None
) -> None:
    token = sso.mint("alice", extra_claims={"aud": aud})
    if detail is None:
        assert verifier.verify(token).subject == "alice"
    else:
        refused(verifier, token, detail)


def test_any_configured_audience_is_accepted(make_verifier: Any, tmp_path: Path, clock: FakeClock) -> None:
    idp = TestIssuer.create(tmp_path, name="idp", clock=clock, audiences=["broker-a", "broker-b"])
    assert make_verifier(idp).verify(idp.mint("alice", aud="broker-b")).subject == "alice"


@pytest.mark.parametrize(
    ("claim", "detail"),
    [("aud", "token has no 'aud' claim"), ("exp", "token has no 'exp' claim")],
    ids=["J31-no-aud", "J31-no-exp"],
)
def test_J31_svid_without_aud_or_exp_is_refused(
    verifier: Verifier, spire: TestIssuer, refused: Any, claim: str, detail: str
) -> None:
    refused(verifier, spire.mint(SVID, extra_claims={claim: OMIT}), detail)


# -- J19, J27, J28: subject ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("sub", "detail"),
    [
        (OMIT, "token has no 'sub' claim"),
        (None, "token has no 'sub' claim"),
        (123, "invalid sub claim"),
        (["alice"], "invalid sub claim"),
        (True, "invalid sub claim"),
        ("", "invalid sub claim"),
        ("alice\nadmin", "invalid sub claim"),
        ("a" * 2049, "invalid sub claim"),
    ],
    ids=["J19-missing", "null", "J19-number", "list", "bool", "empty", "newline", "too-long"],
)
def test_J19_sub_must_be_a_non_empty_string(
    make_verifier: Any, sso: TestIssuer, refused: Any, sub: Any, detail: str
) -> None:
    verifier = make_verifier(sso, max_token_bytes=65536)
    refused(verifier, sso.mint(sub), detail)


@pytest.mark.parametrize(
    "sub",
    [
        "spiffe://Example.org/agents/reporter",
        "spiffe://example.org:8443/agents/reporter",
        "spiffe://user@example.org/agents/reporter",
        "spiffe://example.org/agents/reporter?q",
        "spiffe://example.org/agents/reporter#f",
        "spiffe://example.org/a/../b",
        "spiffe://example.org/" + "a" * 2040,
        "https://example.org/agents/reporter",
        "alice",
    ],
    ids=[
        "J27-upper",
        "J27-port",
        "J27-userinfo",
        "J27-query",
        "J27-fragment",
        "J27-dotdot",
        "J27-too-long",
        "J27-https",
        "not-a-uri",
    ],
)
def test_J27_svid_with_invalid_spiffe_id_is_refused(
    verifier: Verifier, spire: TestIssuer, refused: Any, sub: str
) -> None:
    error = refused(verifier, spire.mint(sub))
    assert error.detail in {"invalid SPIFFE ID", "invalid sub claim"}


def test_J28_svid_from_another_trust_domain_is_refused(
    verifier: Verifier, spire: TestIssuer, refused: Any
) -> None:
    token = spire.mint("spiffe://evil.org/agents/reporter")
    refused(verifier, token, "SPIFFE ID is outside the issuer's trust domain")


def test_oidc_sub_is_not_held_to_spiffe_rules(verifier: Verifier, sso: TestIssuer) -> None:
    assert verifier.verify(sso.mint("spiffe://evil.org/x")).id == "corp-sso:spiffe://evil.org/x"


# -- J22, J23: shape ------------------------------------------------------------------------


def test_J22_oversize_token_is_refused_before_decoding(
    make_verifier: Any, spire: TestIssuer, refused: Any
) -> None:
    verifier = make_verifier(spire, max_token_bytes=1024)
    refused(verifier, "!" * 1025, "token too large")
    refused(verifier, spire.mint(SVID, extra_claims={"pad": "x" * 1024}), "token too large")
    refused(verifier, "é" * 1025, "token too large")


def _segments(*parts: str) -> str:
    return ".".join(parts)


GOOD_HEADER = b64url(b'{"alg":"ES256","kid":"k","typ":"JWT"}')
GOOD_BODY = b64url(b'{"iss":"https://spire.test","sub":"x"}')


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        _segments(GOOD_HEADER, GOOD_BODY),
        _segments(GOOD_HEADER, GOOD_BODY, "sig", "x"),
        _segments(GOOD_HEADER, "a", "b", "c", "d"),
        _segments("!!!!", GOOD_BODY, "sig"),
        _segments(GOOD_HEADER, "!!!!", "sig"),
        _segments(GOOD_HEADER + "=", GOOD_BODY, "sig"),
        _segments("a", GOOD_BODY, "sig"),
        _segments(b64url(b"not json"), GOOD_BODY, "sig"),
        _segments(b64url(b'["alg","ES256"]'), GOOD_BODY, "sig"),
        _segments(GOOD_HEADER, b64url(b'["iss"]'), "sig"),
        _segments(GOOD_HEADER, b64url(b'"https://spire.test"'), "sig"),
        _segments(GOOD_HEADER, b64url(b"42"), "sig"),
        _segments(GOOD_HEADER, b64url(b"null"), "sig"),
        _segments(GOOD_HEADER, b64url(b"\xff\xfe"), "sig"),
        _segments(GOOD_HEADER, b64url(b"[" * 5000), "sig"),
        _segments(GOOD_HEADER, b64url(b'{"iss":"https://spire.test","iss":"x"}'), "sig"),
        _segments(b64url(b'{"alg":"ES256","alg":"none","kid":"k"}'), GOOD_BODY, "sig"),
        _segments(GOOD_HEADER, GOOD_BODY, "si\u00e9"),
        _segments(GOOD_HEADER, GOOD_BODY, "s!g"),
        "..",
        " " + _segments(GOOD_HEADER, GOOD_BODY, "sig"),
        None,
        b"a.b.c",
        123,
    ],
    ids=[
        "empty",
        "one-segment",
        "J23-two-segments",
        "J23-four-segments",
        "jwe-five-segments",
        "J23-bad-base64-header",
        "J23-bad-base64-payload",
        "padding",
        "impossible-length",
        "header-not-json",
        "header-array",
        "J23-payload-array",
        "payload-string",
        "payload-number",
        "payload-null",
        "payload-not-utf8",
        "deep-nesting",
        "duplicate-iss",
        "duplicate-alg",
        "non-ascii",
        "bad-signature-chars",
        "dots-only",
        "leading-space",
        "none-type",
        "bytes",
        "int",
    ],
)
def test_J23_malformed_tokens_raise_invalid_token_only(
    make_verifier: Any, spire: TestIssuer, refused: Any, token: Any
) -> None:
    verifier = make_verifier(spire, max_token_bytes=65536)
    error = refused(verifier, token)
    assert error.detail in {
        "malformed token",
        "signature verification failed",
        "token has no kid",
        "unknown signing key",
    }


def test_details_never_echo_the_token(verifier: Verifier, spire: TestIssuer, refused: Any) -> None:
    token = spire.mint("spiffe://evil.org/secret-path", headers={"kid": "secret-kid"})
    error = refused(verifier, token)
    assert "secret" not in error.detail and "secret" not in str(error)


# -- uses and operator groups ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("groups", "expected_groups", "operator"),
    [
        (["sre"], {"sre"}, True),
        (["dev", "sre"], {"dev", "sre"}, True),
        ("sre", {"sre"}, True),
        (["dev"], {"dev"}, False),
        (None, set(), False),
        (["sre", 1], set(), False),
        ({"sre": True}, set(), False),
        (["SRE"], {"SRE"}, False),
    ],
    ids=["sre", "several", "single-string", "other-group", "absent", "mixed-types", "object", "case"],
)
def test_operator_use_requires_an_operator_group(
    verifier: Verifier,
    sso: TestIssuer,
    groups: Any,
    expected_groups: set[str],
    operator: bool,
) -> None:
    identity = verifier.verify(sso.mint("alice@example.com", groups=groups))
    assert identity.groups == frozenset(expected_groups)
    assert identity.may("approver")
    assert identity.may("operator") is operator
    assert identity.id == "corp-sso:alice@example.com"


def test_operator_group_does_not_grant_operator_to_other_issuers(
    verifier: Verifier, spire: TestIssuer
) -> None:
    identity = verifier.verify(spire.mint(SVID, groups=["sre"]))
    assert identity.uses == frozenset({"workload"})


def test_no_operator_groups_configured_means_no_operators(make_verifier: Any, sso: TestIssuer) -> None:
    verifier = make_verifier(sso, operator_groups=())
    assert verifier.verify(sso.mint("alice", groups=["sre"])).uses == frozenset({"approver"})


def test_groups_claim_name_comes_from_config(make_verifier: Any, tmp_path: Path, clock: FakeClock) -> None:
    idp = TestIssuer.create(tmp_path, name="idp", clock=clock, use=["operator"], groups_claim="roles")
    verifier = make_verifier(idp)
    assert verifier.verify(idp.mint("bob", groups=["sre"])).may("operator")
    assert not verifier.verify(idp.mint("bob", extra_claims={"groups": ["sre"]})).may("operator")


# -- construction ---------------------------------------------------------------------------


def test_single_use_issuer_needs_a_jti_store(spire: TestIssuer, clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="jti store"):
        Verifier(
            [spire.settings(single_use=True)],
            clock_skew_seconds=30,
            max_token_bytes=8192,
            jti_store=None,
            operator_groups=[],
            clock=clock,
        )


def test_duplicate_iss_is_refused_at_construction(spire: TestIssuer, clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="iss"):
        Verifier(
            [spire.settings(), spire.settings(name="spire-2")],
            clock_skew_seconds=30,
            max_token_bytes=8192,
            jti_store=None,
            operator_groups=[],
            clock=clock,
        )


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


# -- robustness ---------------------------------------------------------------------------------

ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    10**30,
    "",
    "x",
    "ES256",
    "JWT",
    SVID,
    "credential-broker",
    "https://spire.test",
    [],
    ["x"],
    [1],
    ["credential-broker"],
    {},
    {"a": 1},
    "9999999999",
]


@pytest.mark.parametrize("seed", range(4))
def test_signed_tokens_with_odd_values_only_ever_raise_invalid_token(
    make_verifier: Any, spire: TestIssuer, sso: TestIssuer, clock: FakeClock, seed: int
) -> None:
    # Validly signed, so the odd values reach the claim checks after the signature.
    rng = random.Random(seed)
    verifier = make_verifier(spire, sso.settings(single_use=True))
    claim_names = ["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "groups"]
    header_names = ["alg", "kid", "typ", "crit", "b64", "cty"]
    for _ in range(400):
        issuer = rng.choice([spire, sso])
        claims = claims_for(issuer, clock, jti="j")
        header: dict[str, Any] = {"alg": issuer.key.algorithm, "kid": issuer.key.kid}
        for name in rng.sample(claim_names, rng.randint(0, 3)):
            claims[name] = rng.choice(ODD_VALUES)
        for name in rng.sample(header_names, rng.randint(0, 2)):
            header[name] = rng.choice(ODD_VALUES)
        with contextlib.suppress(InvalidToken):
            verifier.verify(encode_token(header, claims, key=issuer.key))


@pytest.mark.parametrize("seed", range(4))
def test_mangled_tokens_are_always_refused_with_invalid_token(
    verifier: Verifier, spire: TestIssuer, sso: TestIssuer, seed: int
) -> None:
    # Refused, not merely "no other exception": a check that let a mangled token through
    # would otherwise go unnoticed. Only a respelling of the very same bytes may pass.
    rng = random.Random(seed)
    for base in (spire.mint(SVID), sso.mint("alice")):
        for _ in range(300):
            token = mangled(base, rng)
            if same_token(token, base):
                continue
            with pytest.raises(InvalidToken):
                verifier.verify(token)
