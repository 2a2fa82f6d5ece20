"""Signing keys of one issuer, from its JWKS file or URL (docs/contract.md §3; docs/security.md).

Why not `jwt.PyJWKClient`: it refetches on every unknown `kid` with no cooldown (an attacker
with random kids turns the broker into a JWKS flooder), and it empties its cache when a fetch
fails (an IdP blip becomes a broker outage). This cache:

- parses keys once into `PyJWK` objects, indexed by kid then algorithm, so a request costs a
  dict lookup (plus one `stat` for a file source);
- refetches a URL when `jwks_cache_seconds` have passed, or on an unknown kid, never more than
  once per `jwks_refresh_cooldown_seconds`, and remembers unknown kids for that long;
- when a refresh fails, keeps serving the previous keys for `jwks_stale_seconds` past their
  expiry, then fails closed with `KeysUnavailable`;
- re-reads a file when its mtime/size/inode change (atomic rename included).

Requests never wait for a refresh that another thread is doing if usable keys are cached.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from jwt import PyJWK, PyJWTError

from broker.config import IssuerSettings
from broker.identity.errors import InvalidToken, JwksError, KeysUnavailable

log = logging.getLogger(__name__)

FETCH_TIMEOUT_SECONDS = 5.0
MAX_JWKS_BYTES = 512 * 1024
MAX_KID_LENGTH = 256
NEGATIVE_CACHE_SIZE = 4096
# After a failed fetch, wait at least this long before the next one even with cooldown 0.
MIN_RETRY_SECONDS = 1.0
_MAX_REDIRECTS = 3
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}

KeySet = Mapping[str, Mapping[str, PyJWK]]
"""kid -> algorithm -> key. A JWK without `alg` may verify several algorithms of its type."""


@dataclass(frozen=True)
class JwksStats:
    fetches: int
    """Load attempts: HTTP GETs for a URL source, reads for a file source."""
    failures: int
    keys: int


@dataclass(frozen=True)
class _Snapshot:
    keys: KeySet
    fresh_until: float
    """Until then the keys are current; a file source stays current until the file changes."""
    stale_until: float
    """Until then the keys may still be served while refreshes fail."""
    tag: object
    """A file's (mtime, size, inode) when it was read; None for a URL."""


class JwksCache:
    """The signing keys of one issuer. Thread-safe; one instance per issuer, never shared."""

    def __init__(
        self,
        issuer: IssuerSettings,
        *,
        clock: Callable[[], float] = time.time,
        session: requests.Session | None = None,
        fetch_timeout: float = FETCH_TIMEOUT_SECONDS,
        max_bytes: int = MAX_JWKS_BYTES,
    ) -> None:
        """Load a file source at once (a broken file stops start-up with `JwksError`).

        A URL source is fetched on first use, so the broker starts while an IdP is down.
        """
        self.issuer_name = issuer.name
        self._algorithms = frozenset(issuer.allowed_algorithms)
        self._clock = clock
        self._cache_seconds = float(issuer.jwks_cache_seconds)
        self._cooldown = float(issuer.jwks_refresh_cooldown_seconds)
        self._stale_seconds = float(issuer.jwks_stale_seconds)
        self._fetch_timeout = min(fetch_timeout, FETCH_TIMEOUT_SECONDS)
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._negative: OrderedDict[str, float] = OrderedDict()
        self._negative_lock = threading.Lock()
        self._snapshot: _Snapshot | None = None
        self._next_attempt = -math.inf
        self._failed_tag: object = object()
        self._fetches = 0
        self._failures = 0
        self._path: Path | None = issuer.jwks_file
        self._uri: str | None = issuer.jwks_uri
        self._owns_session = False
        self._session: requests.Session | None = None
        if self._uri is not None:
            _check_uri(self._uri)
            self._owns_session = session is None
            self._session = session if session is not None else requests.Session()
        else:
            self._load_file_at_start()

    @property
    def stats(self) -> JwksStats:
        snapshot = self._snapshot
        keys = len(snapshot.keys) if snapshot is not None else 0
        return JwksStats(fetches=self._fetches, failures=self._failures, keys=keys)

    def close(self) -> None:
        if self._owns_session and self._session is not None:
            self._session.close()

    def signing_key(self, kid: str, algorithm: str) -> PyJWK:
        """The key that must verify a token with this `kid` and (already allowed) `alg`.

        Raises `InvalidToken` for an unknown kid or a key of another type, and
        `KeysUnavailable` when no usable key set is left.
        """
        now = self._clock()
        snapshot = self._snapshot
        if snapshot is None or self._expired(snapshot, now):
            snapshot = self._revalidate(now)
        key = _lookup(snapshot, kid, algorithm)
        if key is not None:
            return key
        return self._refresh_for_unknown_kid(kid, algorithm, now)

    # -- freshness ---------------------------------------------------------------------------

    def _expired(self, snapshot: _Snapshot, now: float) -> bool:
        if now >= snapshot.fresh_until:
            return True
        return self._path is not None and _file_tag(self._path) != snapshot.tag

    def _revalidate(self, now: float) -> _Snapshot:
        snapshot = self._snapshot
        usable = snapshot is not None and now < snapshot.stale_until
        # While another thread refreshes, serve what we have instead of queueing behind it.
        if not self._lock.acquire(blocking=not usable):
            assert snapshot is not None
            return snapshot
        try:
            current = self._snapshot
            if current is not None and not self._expired(current, now):
                return current
            if self._may_refresh(now):
                self._refresh(now)
            current = self._snapshot
        finally:
            self._lock.release()
        if current is None or now >= current.stale_until:
            raise KeysUnavailable("signing keys of the issuer are unavailable")
        return current

    def _refresh_for_unknown_kid(self, kid: str, algorithm: str, now: float) -> PyJWK:
        # A file is re-read when it changes, so an unknown kid there is simply unknown.
        if self._path is not None or self._known_unknown(kid, now):
            raise InvalidToken("unknown signing key")
        with self._lock:
            key = self._lookup_current(kid, algorithm)
            if key is None and now >= self._next_attempt:
                self._refresh(now)
                key = self._lookup_current(kid, algorithm)
        if key is not None:
            return key
        self._remember_unknown(kid, now)
        raise InvalidToken("unknown signing key")

    def _lookup_current(self, kid: str, algorithm: str) -> PyJWK | None:
        snapshot = self._snapshot
        return _lookup(snapshot, kid, algorithm) if snapshot is not None else None

    # -- negative cache ----------------------------------------------------------------------

    def _known_unknown(self, kid: str, now: float) -> bool:
        with self._negative_lock:
            until = self._negative.get(kid)
            return until is not None and now < until

    def _remember_unknown(self, kid: str, now: float) -> None:
        with self._negative_lock:
            self._negative[kid] = now + max(self._cooldown, MIN_RETRY_SECONDS)
            self._negative.move_to_end(kid)
            while len(self._negative) > NEGATIVE_CACHE_SIZE:
                self._negative.popitem(last=False)

    # -- loading (called with self._lock held) -----------------------------------------------

    def _load_file_at_start(self) -> None:
        with self._lock:
            if not self._refresh(self._clock()):
                raise JwksError(f"issuer {self.issuer_name!r}: cannot load jwks_file {self._path}")

    def _may_refresh(self, now: float) -> bool:
        # A URL waits out the cooldown; a file that failed to load waits until it changes.
        if self._path is not None:
            return _file_tag(self._path) != self._failed_tag
        return now >= self._next_attempt

    def _refresh(self, now: float) -> bool:
        self._fetches += 1
        # Tag before reading: a write racing the read then shows up as a change next time.
        tag = _file_tag(self._path) if self._path is not None else None
        try:
            keys = self._parse(self._read())
        except JwksError as error:
            self._failures += 1
            self._failed_tag = tag
            self._next_attempt = now + max(self._cooldown, MIN_RETRY_SECONDS)
            self._mark_failed(now)
            log.warning("jwks %s: refresh failed: %s", self.issuer_name, error)
            return False
        self._next_attempt = now + self._cooldown
        # A file only changes when someone edits it, and is re-read as soon as it does.
        fresh_until = math.inf if self._path is not None else now + self._cache_seconds
        self._snapshot = _Snapshot(keys, fresh_until, fresh_until + self._stale_seconds, tag)
        if not keys:
            log.warning("jwks %s: the key set holds no usable signing key", self.issuer_name)
        return True

    def _mark_failed(self, now: float) -> None:
        # A file's keys never expire on their own; its stale window starts at the failed read.
        snapshot = self._snapshot
        if snapshot is not None and snapshot.fresh_until == math.inf:
            self._snapshot = _Snapshot(snapshot.keys, now, now + self._stale_seconds, snapshot.tag)

    def _read(self) -> bytes:
        if self._path is not None:
            return _read_file(self._path, self._max_bytes)
        assert self._uri is not None and self._session is not None
        return self._fetch(self._session, self._uri)

    def _fetch(self, session: requests.Session, uri: str) -> bytes:
        deadline = time.monotonic() + self._fetch_timeout
        url = uri
        try:
            for _ in range(_MAX_REDIRECTS + 1):
                remaining = max(deadline - time.monotonic(), 0.001)
                response = session.get(
                    url,
                    timeout=(remaining, remaining),
                    allow_redirects=False,
                    stream=True,
                    headers={
                        "Accept": "application/jwk-set+json, application/json",
                        "Accept-Encoding": "identity",
                    },
                )
                with response:
                    if response.is_redirect:
                        url = _same_origin_redirect(uri, url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise JwksError(f"HTTP {response.status_code}")
                    return _read_capped(response, self._max_bytes, deadline)
        except requests.RequestException as error:
            raise JwksError(f"fetch failed: {type(error).__name__}") from None
        raise JwksError("too many redirects")

    def _parse(self, raw: bytes) -> dict[str, dict[str, PyJWK]]:
        try:
            document = json.loads(raw)
        except (ValueError, RecursionError):
            raise JwksError("not a JSON document") from None
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise JwksError("no 'keys' list")
        keys: dict[str, dict[str, PyJWK]] = {}
        for entry in entries:
            kid = _usable_kid(entry)
            if kid is None:
                continue
            if kid in keys:
                log.warning("jwks %s: duplicate kid ignored", self.issuer_name)
                continue
            by_algorithm = self._load_key(entry)
            if by_algorithm:
                keys[kid] = by_algorithm
        return keys

    def _load_key(self, entry: dict[str, Any]) -> dict[str, PyJWK]:
        by_algorithm: dict[str, PyJWK] = {}
        for algorithm in sorted(_algorithms_for(entry) & self._algorithms):
            try:
                key = PyJWK(entry, algorithm)
            except PyJWTError:
                log.warning("jwks %s: unusable key skipped", self.issuer_name)
                return {}
            if key.Algorithm.check_key_length(key.key) is not None:
                log.warning("jwks %s: key below minimum length skipped", self.issuer_name)
                return {}
            by_algorithm[algorithm] = key
        return by_algorithm


def _lookup(snapshot: _Snapshot, kid: str, algorithm: str) -> PyJWK | None:
    by_algorithm = snapshot.keys.get(kid)
    if by_algorithm is None:
        return None
    key = by_algorithm.get(algorithm)
    if key is None:
        raise InvalidToken("algorithm not accepted for this signing key")
    return key


def _usable_kid(entry: object) -> str | None:
    """The kid of a public signature key we may use, else None."""
    if not isinstance(entry, dict):
        return None
    kid = entry.get("kid")
    if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH:
        return None
    # SPIFFE trust bundles mark JWT authorities `"use": "jwt-svid"` instead of `sig`.
    if entry.get("use", "sig") not in {"sig", "jwt-svid"} or not isinstance(entry.get("kty"), str):
        return None
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    # A private key published by mistake is a leak to fix at the source, not a key to trust.
    if "d" in entry:
        return None
    return kid


def _algorithms_for(entry: dict[str, Any]) -> frozenset[str]:
    kty, crv, alg = entry.get("kty"), entry.get("crv"), entry.get("alg")
    if alg is not None and not isinstance(alg, str):
        return frozenset()
    if kty == "RSA":
        fits = _RSA_ALGORITHMS
    elif kty == "EC" and isinstance(crv, str) and crv in _EC_ALGORITHMS:
        fits = frozenset({_EC_ALGORITHMS[crv]})
    elif kty == "OKP" and crv == "Ed25519":
        fits = frozenset({"EdDSA"})
    else:
        return frozenset()
    # A JWK that names its algorithm is bound to it (RFC 7517 §4.4).
    return fits & {alg} if alg is not None else fits


def _check_uri(uri: str) -> None:
    parts = urlsplit(uri)
    if parts.scheme == "https" and parts.hostname:
        return
    # Plain HTTP lets anyone on the path swap the keys; only a same-host sidecar may use it.
    if parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS:
        return
    raise JwksError("jwks_uri must be https:// (http:// only for a loopback address)")


def _same_origin_redirect(origin: str, current: str, location: str) -> str:
    target = urljoin(current, location)
    want, got = urlsplit(origin), urlsplit(target)
    if (got.scheme, got.hostname, got.port) != (want.scheme, want.hostname, want.port):
        raise JwksError("redirect to another origin refused")
    return target


def _read_capped(response: requests.Response, max_bytes: int, deadline: float) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise JwksError("document too large")
    body = bytearray()
    # read1 returns whatever one socket read gives: a server dripping a byte at a time
    # cannot hold us past the deadline (iter_content would wait to fill each chunk).
    while chunk := response.raw.read1(16384, decode_content=True):
        body += chunk
        if len(body) > max_bytes:
            raise JwksError("document too large")
        if time.monotonic() > deadline:
            raise JwksError("fetch timed out")
    return bytes(body)


def _file_tag(path: Path) -> object:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(max_bytes + 1)
    except OSError as error:
        raise JwksError(f"cannot read file: {error.strerror}") from None
    if len(raw) > max_bytes:
        raise JwksError("document too large")
    return raw
