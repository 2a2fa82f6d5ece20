"""audit key check: audit_head.key_check

`broker audit verify` run with no audit key, or another one than the broker writes
with, found every MAC wrong and reported each row as changed: dozens of "content
changed" lines and TAMPERED for what is a configuration mistake. The head now keeps an
HMAC of a fixed message under the audit key ("unkeyed" for a chain without one), so
verify can say first, in one line, that the key is missing or wrong, and a sealer
holding another key refuses to link rows it could not vouch for. It reveals nothing of
the key: every row's MAC is such an HMAC already.

Left NULL here (a migration has no key); the first seal after the upgrade fills it in
once the newest link verifies under the sealer's key.

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("audit_head", sa.Column("key_check", sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column("audit_head", "key_check")
