"""Mint real, signed JWTs for tests: a throwaway issuer with its own keys and JWKS file.

Typical use (API tests)::

    from tests.support.tokens import TestIssuer

    spire = TestIssuer.create(tmp_path, name="spire", issuer="https://spire.test",
                              kind="spiffe", trust_domain="example.org", use=["workload"])
    sso = TestIssuer.create(tmp_path, name="corp-sso", use=["approver", "operator"])
    config = {..., "issuers": [spire.settings_dict(), sso.settings_dict()],
              "operators": {"groups": ["sre"]}}

    headers = spire.bearer(spire.spiffe_id("agents/reporter"))      # {"Authorization": ...}
    operator = sso.mint("alice@example.com", groups=["sre"])
    expired = spire.mint(spire.spiffe_id("agents/x"), exp_in=-60)
    no_exp = spire.mint(spire.spiffe_id("agents/x"), extra_claims={"exp": OMIT})
    no_kid = spire.mint(spire.spiffe_id("agents/x"), headers={"kid": OMIT})

Times come from `issuer.clock` (default `time.time`); pass a `FakeClock` to `create` to
mint tokens that agree with a verifier built on the same clock. `encode_token` builds any
header/payload, signed or not, for forged-token tests (alg none, HS256 with a public key).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms

from broker.config import IssuerSettings

DEFAULT_AUDIENCE = "credential-broker"


class _Omit:
    def __repr__(self) -> str:
        return "OMIT"


OMIT: Any = _Omit()
"""Use as a value in `extra_claims` or `headers` (or for `aud`/`iat`/`jti`) to drop it."""

_CURVES: dict[str, Callable[[], ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}


class FakeClock:
    """A settable clock: `clock()` is the time; `clock.advance(30)` moves it."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class SigningKey:
    """A private key, its `kid` and the algorithm it signs with."""

    kid: str
    algorithm: str
    private_key: Any

    @classmethod
    def generate(cls, algorithm: str = "ES256", kid: str | None = None) -> SigningKey:
        if algorithm in _CURVES:
            private: Any = ec.generate_private_key(_CURVES[algorithm]())
        elif algorithm[:2] in {"RS", "PS"}:
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif algorithm == "EdDSA":
            private = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(f"no test key type for {algorithm}")
        return cls(kid or f"{algorithm.lower()}-{uuid.uuid4().hex[:8]}", algorithm, private)

    def public_jwk(self, **extra: Any) -> dict[str, Any]:
        """The public JWK, with kid, alg and `use: sig` (override or drop via `extra`)."""
        jwk: dict[str, Any] = get_default_algorithms()[self.algorithm].to_jwk(
            self.private_key.public_key(), as_dict=True
        )
        jwk.update(kid=self.kid, alg=self.algorithm, use="sig")
        jwk.update(extra)
        return {k: v for k, v in jwk.items() if v is not OMIT}

    def public_pem(self) -> bytes:
        return bytes(
            self.private_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def sign(self, signing_input: bytes) -> bytes:
        algorithm = get_default_algorithms()[self.algorithm]
        return bytes(algorithm.sign(signing_input, self.private_key))


def encode_token(
    header: Mapping[str, Any],
    payload: Any,
    *,
    key: SigningKey | None = None,
    hmac_secret: bytes | None = None,
    signature: bytes = b"",
) -> str:
    """A compact JWS from exactly this header and payload (any JSON value, or raw bytes).

    Signed with `key` (ignoring the header's alg), MACed with HS256 under `hmac_secret`,
    or carrying `signature` verbatim (empty for `alg: none`).
    """
    raw_payload = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64url(json.dumps(dict(header)).encode())}.{b64url(raw_payload)}"
    if key is not None:
        signature = key.sign(signing_input.encode())
    elif hmac_secret is not None:
        signature = hmac.new(hmac_secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def _without_omitted(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not OMIT}


class TestIssuer:
    """An issuer for tests: real keys, a JWKS file on disk, and a `mint` for its tokens."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        *,
        jwks_path: Path,
        name: str,
        issuer: str,
        kind: str,
        trust_domain: str | None,
        use: list[str],
        audiences: list[str],
        groups_claim: str,
        single_use: bool,
        keys: list[SigningKey],
        clock: Callable[[], float],
        settings_extra: dict[str, Any],
    ) -> None:
        self.jwks_path = jwks_path
        self.name = name
        self.issuer = issuer
        self.kind = kind
        self.trust_domain = trust_domain
        self.use = use
        self.audiences = audiences
        self.groups_claim = groups_claim
        self.single_use = single_use
        self.keys = keys
        self.clock = clock
        self.settings_extra = settings_extra

    @classmethod
    def create(
        cls,
        directory: Path,
        *,
        name: str = "spire",
        issuer: str | None = None,
        kind: str = "oidc",
        trust_domain: str | None = None,
        use: Iterable[str] = ("workload",),
        audiences: Iterable[str] = (DEFAULT_AUDIENCE,),
        algorithm: str = "ES256",
        groups_claim: str = "groups",
        single_use: bool = False,
        clock: Callable[[], float] = time.time,
        key: SigningKey | None = None,
        **settings_extra: Any,
    ) -> TestIssuer:
        """A new issuer with one `algorithm` key, its JWKS written to `directory/<name>-jwks.json`.

        `issuer` defaults to `https://<name>.test`; a `spiffe` issuer's trust domain to
        `example.org`. `settings_extra` goes into `settings_dict()` as is (e.g.
        `max_token_lifetime_seconds=3600`, `algorithms=["ES256"]`). Pass `key` to reuse a
        pre-generated `SigningKey` (RSA generation costs ~0.1 s) instead of a new one.
        """
        if kind == "spiffe" and trust_domain is None:
            trust_domain = "example.org"
        test_issuer = cls(
            jwks_path=Path(directory) / f"{name}-jwks.json",
            name=name,
            issuer=issuer or f"https://{name}.test",
            kind=kind,
            trust_domain=trust_domain,
            use=list(use),
            audiences=list(audiences),
            groups_claim=groups_claim,
            single_use=single_use,
            keys=[key or SigningKey.generate(algorithm)],
            clock=clock,
            settings_extra=settings_extra,
        )
        test_issuer.write_jwks()
        return test_issuer

    # -- configuration -----------------------------------------------------------------------

    def settings_dict(self, **overrides: Any) -> dict[str, Any]:
        """This issuer's entry for the broker config's `issuers:` list.

        Passing `jwks_uri=...` replaces `jwks_file`.
        """
        entry: dict[str, Any] = {
            "name": self.name,
            "issuer": self.issuer,
            "jwks_file": str(self.jwks_path),
            "audiences": list(self.audiences),
            "kind": self.kind,
            "groups_claim": self.groups_claim,
            "use": list(self.use),
            "single_use": self.single_use,
        }
        if self.trust_domain is not None:
            entry["trust_domain"] = self.trust_domain
        entry.update(self.settings_extra)
        entry.update(overrides)
        if "jwks_uri" in overrides:
            entry.pop("jwks_file", None)
        return entry

    def settings(self, **overrides: Any) -> IssuerSettings:
        return IssuerSettings.model_validate(self.settings_dict(**overrides))

    # -- keys --------------------------------------------------------------------------------

    @property
    def key(self) -> SigningKey:
        """The key `mint` signs with: the newest one."""
        return self.keys[-1]

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.public_jwk() for key in self.keys]}

    def jwks_bytes(self) -> bytes:
        return json.dumps(self.jwks()).encode()

    def write_jwks(self, document: Any = None) -> None:
        """Publish the JWKS (or any `document`) atomically, as a real rotation would."""
        body = self.jwks_bytes() if document is None else json.dumps(document).encode()
        temporary = self.jwks_path.with_suffix(".tmp")
        temporary.write_bytes(body)
        os.replace(temporary, self.jwks_path)

    def rotate(self, algorithm: str | None = None, *, retire_old: bool = False) -> SigningKey:
        """Add a new signing key (and publish it); `mint` uses it from now on."""
        new_key = SigningKey.generate(algorithm or self.key.algorithm)
        self.keys = ([] if retire_old else self.keys) + [new_key]
        self.write_jwks()
        return new_key

    # -- tokens ------------------------------------------------------------------------------

    def spiffe_id(self, path: str) -> str:
        return f"spiffe://{self.trust_domain}/{path.lstrip('/')}"

    def mint(
        self,
        sub: Any,
        *,
        aud: Any = None,
        exp_in: float = 300,
        iat: Any = None,
        jti: Any = None,
        groups: Any = None,
        iss: Any = None,
        extra_claims: Mapping[str, Any] | None = None,
        headers: Mapping[str, Any] | None = None,
        key: SigningKey | None = None,
    ) -> str:
        """A token signed by this issuer's current key (or `key`).

        Defaults: `aud` the first audience, `iat` now, `exp` now + `exp_in`, a random `jti`,
        `iss` this issuer, header `{alg, kid, typ: JWT}`. `groups` sets the groups claim.
        `extra_claims`/`headers` add or override; a value of `OMIT` removes the entry.
        """
        now = self.clock()
        signing_key = key or self.key
        claims: dict[str, Any] = {
            "iss": self.issuer if iss is None else iss,
            "sub": sub,
            "aud": self.audiences[0] if aud is None else aud,
            "iat": int(now) if iat is None else iat,
            "exp": int(now + exp_in),
            "jti": uuid.uuid4().hex if jti is None else jti,
        }
        if groups is not None:
            claims[self.groups_claim] = groups
        claims.update(extra_claims or {})
        header = {"alg": signing_key.algorithm, "kid": signing_key.kid, "typ": "JWT"}
        header.update(headers or {})
        return encode_token(_without_omitted(header), _without_omitted(claims), key=signing_key)

    def bearer(self, sub: Any, **mint_options: Any) -> dict[str, str]:
        """`{"Authorization": "Bearer <token>"}` for a test client request."""
        return {"Authorization": f"Bearer {self.mint(sub, **mint_options)}"}


def mangled(token: str, rng: random.Random, alphabet: str = "AZaz09-_.=!+/ \u00e9") -> str:
    """`token` with one to four characters replaced, inserted or deleted at random."""
    chars = list(token)
    for _ in range(rng.randint(1, 4)):
        position = rng.randrange(len(chars))
        operation = rng.choice("rid")
        if operation == "r":
            chars[position] = rng.choice(alphabet)
        elif operation == "i":
            chars.insert(position, rng.choice(alphabet))
        else:
            del chars[position]
    return "".join(chars)


def same_token(a: str, b: str) -> bool:
    """Whether two spellings carry the same bytes: a base64url segment's last character
    has spare bits, so changing only those changes the text, not the signed token."""

    def parts(token: str) -> list[bytes] | None:
        segments = token.split(".")
        if len(segments) != 3 or not all(re.fullmatch(r"[A-Za-z0-9_-]*", s) for s in segments):
            return None
        try:
            return [base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)) for s in segments]
        except (binascii.Error, ValueError):
            return None

    return parts(a) is not None and parts(a) == parts(b)
