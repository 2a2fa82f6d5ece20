"""Engine, declarative base and the one transaction boundary per request or job.

Services receive a `Session` and may `flush()`; only `unit_of_work` commits. That keeps
the transaction scope visible at one level and lets the audit chain be
appended in the same transaction as the change it describes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy import Engine, MetaData, create_engine, event
from sqlalchemy.exc import DataError, DBAPIError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from broker import tracing

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class DatabaseUnavailable(Exception):
    """Postgres could not be reached or dropped the connection (API: 503 database_unavailable)."""


def make_engine(url: str, *, pool_size: int = 10, connect_timeout: int = 3) -> Engine:
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # No pre-ping: it costs a round trip per checkout (4 per task start+finish). A
        # connection a restart or failover left dead fails one request with a 503, and
        # SQLAlchemy then invalidates the whole pool, so the next request reconnects.
        pool_pre_ping=False,
        pool_recycle=300,
        pool_timeout=5,
        connect_args={"connect_timeout": connect_timeout, "application_name": "credential-broker"},
    )

    @event.listens_for(engine, "connect")
    def _utc(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET TIME ZONE 'UTC'")
            # A stuck lock must not hang a request forever; the caller gets a 503 instead.
            cursor.execute("SET lock_timeout = '5s'")
            cursor.execute("SET statement_timeout = '30s'")
        dbapi_connection.commit()

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)


def is_connection_error(error: BaseException) -> bool:
    if isinstance(error, OperationalError):
        return True
    return isinstance(error, DBAPIError) and bool(error.connection_invalidated)


@contextmanager
def pipelined(session: Session) -> Iterator[psycopg.Connection[Any]]:
    """The session's own connection, in psycopg pipeline mode, inside its transaction.

    Statements sent in the block travel together and are answered together: a read that
    must follow a lock (or a batch of writes) costs one round trip, not one each. Results
    are on the cursors once the block exits. Postgres still runs them one after another,
    each with its own snapshot, so a statement after `pg_advisory_xact_lock` or `FOR
    UPDATE` sees what committed while the lock was awaited. The commit stays with the
    unit of work. A connection failure becomes DatabaseUnavailable, as through SQLAlchemy.
    """
    connection = session.connection()
    driver: psycopg.Connection[Any] = connection.connection.driver_connection  # type: ignore[assignment]
    try:
        with driver.pipeline():
            yield driver
    except psycopg.OperationalError as error:
        if driver.broken:
            # As SQLAlchemy does on a disconnect: a restart or failover killed every pooled
            # connection, not just this one, so the pool starts afresh (one 503, not one
            # per stale connection).
            connection.invalidate(error)
            connection.engine.dispose()
        raise DatabaseUnavailable() from error
    except psycopg.DataError as error:
        # Bad input the database refused (out of range, bad encoding): the API's 400.
        raise DataError(None, None, error) from error
    except psycopg.ProgrammingError as error:
        # As SQLAlchemy would wrap it (a missing table: the schema is behind).
        raise ProgrammingError(None, None, error) from error


@contextmanager
def unit_of_work(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Commit on success, roll back on any error; connection failures become DatabaseUnavailable."""
    session = factory()
    try:
        with tracing.span("db.transaction"):
            yield session
            session.commit()
    except BaseException as error:
        with contextlib.suppress(Exception):  # a dead connection can't roll back either
            session.rollback()
        if is_connection_error(error):
            raise DatabaseUnavailable() from error
        raise
    finally:
        session.close()
