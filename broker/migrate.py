"""`broker migrate`: bring the schema to head with Alembic (files under `migrations/`).

Also where the running broker compares the database's revision with the migrations it
ships, so that `/readyz` and the scheduler can say "run `broker migrate`" instead of
failing every request and every sweep on a missing table.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import ProgrammingError, SQLAlchemyError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Alembic's default version table; migrations/env.py does not rename it.
_STAMPED_REVISIONS = text("SELECT version_num FROM alembic_version")


class SchemaState(StrEnum):
    OK = "ok"
    # Never migrated, or at an older revision: this build's queries would fail.
    BEHIND = "behind"
    # Stamped with a revision this build does not ship: a newer build migrated it. That
    # is every rolling upgrade (each replica migrates, then serves; docs/operations.md),
    # so the older replicas still running must not be taken out of service by it.
    AHEAD = "ahead"


@dataclass(frozen=True)
class ShippedRevisions:
    heads: frozenset[str]
    known: frozenset[str]


def _alembic_files() -> Config:
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    return config


def alembic_config(database_url: str) -> Config:
    config = _alembic_files()
    config.attributes["database_url"] = database_url
    return config


def upgrade_to_head(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "head")


def current_revision(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


@functools.cache
def shipped_revisions() -> ShippedRevisions:
    """The revisions under `migrations/`, read once per process (it imports every file)."""
    script = ScriptDirectory.from_config(_alembic_files())
    return ShippedRevisions(
        heads=frozenset(script.get_heads()),
        known=frozenset(revision.revision for revision in script.walk_revisions()),
    )


def schema_state(connection: Connection) -> SchemaState:
    """The database's revision against the shipped ones, in one small query.

    Give it a connection of its own: a missing version table aborts its transaction.
    Database errors other than that one (it can't be reached) are the caller's.
    """
    shipped = shipped_revisions()
    try:
        stamped = frozenset(connection.execute(_STAMPED_REVISIONS).scalars())
    except ProgrammingError as error:
        if not isinstance(error.orig, psycopg.errors.UndefinedTable):
            raise
        stamped = frozenset()
    if stamped == shipped.heads:
        return SchemaState.OK
    if stamped <= shipped.known:
        return SchemaState.BEHIND
    return SchemaState.AHEAD


def schema_state_of(engine: Engine) -> SchemaState | None:
    """As `schema_state`, on a connection of its own; None if the database can't be reached."""
    try:
        with engine.connect() as connection:
            return schema_state(connection)
    except SQLAlchemyError:
        # Whoever asks at start only wants to warn about the schema; an unreachable
        # database is reported by /readyz and by every job that needs it.
        return None
