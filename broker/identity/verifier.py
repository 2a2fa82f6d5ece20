"""Turn a bearer JWT into an `Identity` (docs/contract.md §3; the checks are listed in docs/security.md).

Order matters: everything the token says about itself is checked against configuration
before a key is looked up, the signature is checked before any claim is trusted, and the
single-use `jti` is consumed only once the token is otherwise valid (so an attacker cannot
burn a victim's jti with a forged token).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Protocol, TypeGuard

import jwt
import requests
from jwt.exceptions import InvalidJTIError, InvalidSubjectError
from jwt.types import Options

from broker.config import ASYMMETRIC_ALGORITHMS, IssuerSettings, Settings
from broker.identity.errors import InvalidToken
from broker.identity.ids import check_namespace, workload_id
from broker.identity.jwks import MAX_KID_LENGTH, JwksCache
from broker.identity.spiffe import parse_spiffe_id
from broker.identity.types import Identity, IdentityUse

MAX_SUBJECT_LENGTH = 2048
MAX_JTI_LENGTH = 256
# Distinct tokens remembered as verified (about 2 KB each); the oldest go first.
VERIFIED_CACHE_SIZE = 4096
# 9999-12-31T23:59:59Z: the last instant a `datetime` can hold.
_MAX_TIMESTAMP = 253402300799
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
# Never followed (docs/contract.md §3); refusing them outright means no code path can start to.
_KEY_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c"})
# JWT-SVID §2: alg and kid, optionally typ JWT/JOSE; nothing else.
_SVID_HEADERS = frozenset({"alg", "kid", "typ"})
_SVID_TYPES = frozenset({"JWT", "JOSE"})


class JtiStore(Protocol):
    """Remembers the `jti`s of single-use tokens, shared by every worker and replica."""

    def claim(self, issuer_name: str, jti: str, expires_at: datetime) -> bool:
        """Record the jti atomically; True only for its first use.

        The record must be kept at least until `expires_at` (the token's `exp` plus the
        clock skew, the last moment the token could still be accepted).
        """
        ...


@dataclass(frozen=True)
class _Issuer:
    settings: IssuerSettings
    algorithms: tuple[str, ...]
    keys: JwksCache


@dataclass(frozen=True)
class _Verified:
    identity: Identity
    claims: dict[str, Any]
    issuer: _Issuer
    kid: str
    algorithm: str
    key: jwt.PyJWK


class _VerifiedTokens:
    """Tokens whose signature and claims were already checked, by SHA-256 of the token.

    An agent presents one token for its start, its finish and everything between; the
    signature check is the costly part of verifying it and its answer can't change while
    the key it was checked with is still the issuer's. A hit is used only if the issuer's
    JWKS still yields that same key object (a rotation or a changed file builds new ones)
    and the time claims still hold now. Single-use tokens never enter: each use must
    consume its jti.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[bytes, _Verified] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def digest(token: object, max_bytes: int) -> bytes | None:
        if not isinstance(token, str) or len(token) > max_bytes:
            return None  # left to the full path, which says why
        return hashlib.sha256(token.encode()).digest()

    def get(self, digest: bytes) -> _Verified | None:
        return self._entries.get(digest)

    def put(self, digest: bytes, verified: _Verified) -> None:
        with self._lock:
            self._entries[digest] = verified
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


class Verifier:
    """Verifies bearer JWTs against the configured issuers. Thread-safe; build one per process."""

    def __init__(
        self,
        issuers: Sequence[IssuerSettings],
        *,
        clock_skew_seconds: int,
        max_token_bytes: int,
        jti_store: JtiStore | None,
        operator_groups: Sequence[str],
        clock: Callable[[], float] = time.time,
        session: requests.Session | None = None,
    ) -> None:
        """Loads every `jwks_file` now; raises `JwksError` or `ValueError` on bad setup."""
        if len({i.issuer for i in issuers}) != len(issuers):
            raise ValueError("two issuers share one 'issuer' (iss) value")
        check_namespace(issuers)
        single_use = [i.name for i in issuers if i.single_use]
        if single_use and jti_store is None:
            raise ValueError(f"single_use issuers {single_use} need a jti store")
        self._skew = clock_skew_seconds
        self._max_token_bytes = max_token_bytes
        self._jti_store = jti_store
        self._operator_groups = frozenset(operator_groups)
        self._clock = clock
        self._issuers = {i.issuer: _build_issuer(i, clock, session) for i in issuers}
        self._verified = _VerifiedTokens(VERIFIED_CACHE_SIZE)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        jti_store: JtiStore | None,
        clock: Callable[[], float] = time.time,
        session: requests.Session | None = None,
    ) -> Verifier:
        return cls(
            settings.issuers,
            clock_skew_seconds=settings.limits.clock_skew_seconds,
            max_token_bytes=settings.limits.max_token_bytes,
            jti_store=jti_store,
            operator_groups=settings.operators.groups,
            clock=clock,
            session=session,
        )

    def key_cache(self, issuer_name: str) -> JwksCache:
        """The JWKS cache of the issuer named `issuer_name` (for stats and readiness)."""
        for issuer in self._issuers.values():
            if issuer.settings.name == issuer_name:
                return issuer.keys
        raise KeyError(issuer_name)

    def close(self) -> None:
        for issuer in self._issuers.values():
            issuer.keys.close()

    def verify(self, token: str) -> Identity:
        """The identity the token proves, or `InvalidToken` (never another exception
        about the token; a failing `JtiStore` propagates its own error)."""
        digest = self._verified.digest(token, self._max_token_bytes)
        seen = self._verified.get(digest) if digest is not None else None
        if seen is not None and seen.issuer.keys.signing_key(seen.kid, seen.algorithm) is seen.key:
            # The signature was checked against this very key; time is all that moved.
            self._check_times(seen.claims, seen.issuer.settings)
            return seen.identity
        header, unverified = _parse_unverified(token, self._max_token_bytes)
        _check_common_header(header)
        issuer = self._issuer_for(unverified)
        kid, algorithm = _check_issuer_header(header, issuer)
        key = issuer.keys.signing_key(kid, algorithm)
        claims = _decode(token, key, issuer, self._skew)
        exp = self._check_times(claims, issuer.settings)
        identity = self._identity(claims, issuer.settings, exp)
        if issuer.settings.single_use:
            self._consume_jti(identity, exp)
        elif digest is not None:
            self._verified.put(digest, _Verified(identity, claims, issuer, kid, algorithm, key))
        return identity

    def _issuer_for(self, unverified: dict[str, Any]) -> _Issuer:
        # Exact match only: no prefix, case or trailing-slash folding (J18).
        iss = unverified.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise InvalidToken("unknown issuer")
        return issuer

    def _check_times(self, claims: dict[str, Any], issuer: IssuerSettings) -> float:
        # Done here rather than by PyJWT: PyJWT reads the wall clock (tests inject one) and
        # coerces with int(), so it would take "9999999999" or true as a time (J15).
        exp = _timestamp(claims, "exp")
        nbf = _timestamp(claims, "nbf")
        iat = _timestamp(claims, "iat")
        now = self._clock()
        if exp is None:
            raise InvalidToken("token has no 'exp' claim")
        if exp <= now - self._skew:
            raise InvalidToken("token expired")
        if nbf is not None and nbf > now + self._skew:
            raise InvalidToken("token not yet valid")
        if iat is not None and iat > now + self._skew:
            raise InvalidToken("token issued in the future")
        limit = issuer.max_token_lifetime_seconds
        if limit is not None and exp - (now if iat is None else iat) > limit:
            raise InvalidToken("token lifetime exceeds the issuer's maximum")
        return exp

    def _identity(self, claims: dict[str, Any], issuer: IssuerSettings, exp: float) -> Identity:
        subject = claims.get("sub")
        if not _valid_subject(subject):
            raise InvalidToken("invalid sub claim")
        if issuer.kind == "spiffe":
            assert issuer.trust_domain is not None
            parse_spiffe_id(subject, issuer.trust_domain)
        groups = _groups(claims.get(issuer.groups_claim))
        jti = claims.get("jti")
        return Identity(
            id=workload_id(issuer, subject),
            issuer_name=issuer.name,
            issuer=issuer.issuer,
            subject=subject,
            kind=issuer.kind,
            uses=self._uses(issuer, groups),
            groups=groups,
            claims=MappingProxyType(claims),
            expires_at=datetime.fromtimestamp(exp, UTC),
            jti=jti if isinstance(jti, str) else None,
        )

    def _uses(self, issuer: IssuerSettings, groups: frozenset[str]) -> frozenset[IdentityUse]:
        uses: set[IdentityUse] = set(issuer.use)
        # An operator issuer (say corp SSO) vouches for many people; only the operator
        # groups among them may act as operators (docs/contract.md §3).
        if not groups & self._operator_groups:
            uses.discard("operator")
        return frozenset(uses)

    def _consume_jti(self, identity: Identity, exp: float) -> None:
        jti = identity.jti
        if not jti or len(jti) > MAX_JTI_LENGTH:
            raise InvalidToken("single-use token needs a valid jti claim")
        assert self._jti_store is not None
        # Tokens are accepted until exp + skew, so the store must remember them as long.
        keep_until = datetime.fromtimestamp(min(exp + self._skew, _MAX_TIMESTAMP), UTC)
        if not self._jti_store.claim(identity.issuer_name, jti, keep_until):
            raise InvalidToken("token already used")


def _build_issuer(
    settings: IssuerSettings,
    clock: Callable[[], float],
    session: requests.Session | None,
) -> _Issuer:
    # Re-checked here, not only in config: HMAC or `none` must be impossible whatever
    # built the settings object.
    algorithms = tuple(a for a in settings.allowed_algorithms if a in ASYMMETRIC_ALGORITHMS)
    if not algorithms:
        raise ValueError(f"issuer {settings.name!r} allows no asymmetric algorithm")
    return _Issuer(settings, algorithms, JwksCache(settings, clock=clock, session=session))


# -- before the signature: only shape checks, nothing trusted ------------------------------


def _parse_unverified(token: str, max_bytes: int) -> tuple[dict[str, Any], dict[str, Any]]:
    if not isinstance(token, str):
        raise InvalidToken("malformed token")
    # Length in characters is a lower bound of the length in bytes, so this caps bytes too.
    if len(token) > max_bytes:
        raise InvalidToken("token too large")
    segments = token.split(".")
    if not token.isascii() or len(segments) != 3:
        raise InvalidToken("malformed token")
    return _json_segment(segments[0]), _json_segment(segments[1])


def _json_segment(segment: str) -> dict[str, Any]:
    if len(segment) % 4 == 1 or not _B64URL.fullmatch(segment):
        raise InvalidToken("malformed token")
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (binascii.Error, ValueError, RecursionError):
        raise InvalidToken("malformed token") from None
    if not isinstance(value, dict):
        raise InvalidToken("malformed token")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two `iss` (or `alg`) members are read differently by different parsers; refuse them.
    value = dict(pairs)
    if len(value) != len(pairs):
        raise ValueError("duplicate member")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_common_header(header: dict[str, Any]) -> None:
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or algorithm not in ASYMMETRIC_ALGORITHMS:
        raise InvalidToken("algorithm not accepted")
    if "crit" in header:
        raise InvalidToken("critical header parameters are not supported")
    if _KEY_HEADERS & header.keys():
        raise InvalidToken("keys embedded in or linked from the token are not accepted")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise InvalidToken("token has no kid")
    if len(kid) > MAX_KID_LENGTH:
        raise InvalidToken("invalid kid")


def _check_issuer_header(header: dict[str, Any], issuer: _Issuer) -> tuple[str, str]:
    # The allow-list comes from configuration; the header only picks within it (J03).
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or algorithm not in issuer.algorithms:
        raise InvalidToken("algorithm not accepted")
    if issuer.settings.kind == "spiffe":
        typ = header.get("typ", "JWT")
        if not isinstance(typ, str) or typ not in _SVID_TYPES:
            raise InvalidToken("JWT-SVID typ must be JWT or JOSE")
        if not header.keys() <= _SVID_HEADERS:
            raise InvalidToken("header parameter not allowed in a JWT-SVID")
    return header["kid"], algorithm


# -- the signature and registered claims -------------------------------------------------


def _decode(token: str, key: jwt.PyJWK, issuer: _Issuer, skew: int) -> dict[str, Any]:
    required = ["exp", "iss", "aud", "sub"]
    if issuer.settings.single_use:
        required.append("jti")
    # Every option spelled out, defaults included, so a PyJWT default change cannot loosen it.
    options: Options = {
        "verify_signature": True,
        "verify_aud": True,
        "verify_iss": True,
        "verify_sub": True,
        "verify_jti": True,
        # See Verifier._check_times: the time claims are checked there, strictly typed.
        "verify_exp": False,
        "verify_nbf": False,
        "verify_iat": False,
        # `aud` may be a list that holds one of our audiences.
        "strict_aud": False,
        "require": required,
        "enforce_minimum_key_length": True,
    }
    try:
        return jwt.decode(
            token,
            key=key,
            algorithms=list(issuer.algorithms),
            options=options,
            audience=issuer.settings.audiences,
            issuer=issuer.settings.issuer,
            leeway=skew,
        )
    except jwt.PyJWTError as error:
        raise InvalidToken(_describe(error)) from None


def _describe(error: jwt.PyJWTError) -> str:
    if isinstance(error, jwt.InvalidSignatureError):
        return "signature verification failed"
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"token has no '{error.claim}' claim"
    if isinstance(error, jwt.InvalidAudienceError):
        return "audience not accepted"
    if isinstance(error, jwt.InvalidIssuerError):
        return "unknown issuer"
    if isinstance(error, jwt.InvalidAlgorithmError):
        return "algorithm not accepted"
    if isinstance(error, InvalidSubjectError):
        return "invalid sub claim"
    if isinstance(error, InvalidJTIError):
        return "invalid jti claim"
    if isinstance(error, jwt.DecodeError):
        return "malformed token"
    return "invalid token"


def _timestamp(claims: dict[str, Any], name: str) -> float | None:
    if name not in claims:
        return None
    value = claims[name]
    # bool is an int subclass: `true` must not read as 1970-01-01T00:00:01Z.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"invalid {name} claim")
    if not (math.isfinite(value) and 0 <= value <= _MAX_TIMESTAMP):
        raise InvalidToken(f"invalid {name} claim")
    return float(value)


def _valid_subject(subject: object) -> TypeGuard[str]:
    # Control characters in a workload id would end up in logs, audit rows and globs.
    return isinstance(subject, str) and 0 < len(subject) <= MAX_SUBJECT_LENGTH and subject.isprintable()


def _groups(value: object) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset({value})
    if isinstance(value, list) and all(isinstance(group, str) for group in value):
        return frozenset(value)
    return frozenset()
