"""approvals.person: one vote per person, not per token issuer

An approver may hold accounts at two issuers that assert the same verified email; each
account has its own identity id, so `(task_id, approver)` let one person cast two of a
task's `min_approvals`. `person` is the normalised name the vote is counted under (the
verified email of an OIDC approver, else its subject; broker/approvals/service.py), and
it is unique per task.

Existing rows get their approver id, lower-cased: the claims that would give the email
were never stored. Only votes on tasks still pending at the upgrade can be affected.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("approvals", sa.Column("person", sa.Text(), nullable=True))
    op.execute("UPDATE approvals SET person = lower(approver)")
    op.alter_column("approvals", "person", nullable=False)
    op.create_unique_constraint(op.f("uq_approvals_task_id_person"), "approvals", ["task_id", "person"])


def downgrade() -> None:
    op.drop_constraint(op.f("uq_approvals_task_id_person"), "approvals", type_="unique")
    op.drop_column("approvals", "person")
