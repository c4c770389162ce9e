"""validation attempts: when the last was made, and since when the provider has not answered

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 10:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import settlement.db.schema

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("validations") as batch:
        batch.add_column(
            sa.Column("last_attempt_at", settlement.db.schema.UTCDateTime(timezone=True), nullable=True)
        )
        batch.add_column(
            sa.Column("unreachable_since", settlement.db.schema.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("validations") as batch:
        batch.drop_column("unreachable_since")
        batch.drop_column("last_attempt_at")
