"""Spent `jti`s of single-use issuers, in Postgres so every worker and replica agrees."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Engine, delete, func
from sqlalchemy.dialects.postgresql import insert

from broker.models import UsedJti


class PostgresJtiStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def claim(self, issuer_name: str, jti: str, expires_at: datetime) -> bool:
        """True for the first use. Two concurrent claims: the unique key lets exactly one win."""
        statement = (
            insert(UsedJti)
            .values(issuer=issuer_name, jti=jti, expires_at=expires_at)
            .on_conflict_do_nothing()
            .returning(UsedJti.jti)
        )
        # Its own short transaction: a spent jti stays spent even if the request fails later.
        with self._engine.begin() as connection:
            return connection.execute(statement).first() is not None

    def purge_expired(self, now: datetime | None = None) -> int:
        cutoff = now if now is not None else func.now()
        with self._engine.begin() as connection:
            return connection.execute(delete(UsedJti).where(UsedJti.expires_at < cutoff)).rowcount
