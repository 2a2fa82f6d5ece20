"""Who is calling: verified JWT attestations (docs/contract.md §3)."""

from broker.identity.errors import InvalidToken, JwksError, KeysUnavailable
from broker.identity.jwks import JwksCache, JwksStats
from broker.identity.spiffe import parse_spiffe_id
from broker.identity.types import Identity, IdentityUse
from broker.identity.verifier import JtiStore, Verifier

__all__ = [
    "Identity",
    "IdentityUse",
    "InvalidToken",
    "JtiStore",
    "JwksCache",
    "JwksError",
    "JwksStats",
    "KeysUnavailable",
    "Verifier",
    "parse_spiffe_id",
]
