"""a last span's hop records the sampling parameters its session was opened with (its receipt's samplingHash)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 18:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Null on earlier hops: their last span was opened with the job's own sampling parameters.
    op.add_column("hops", sa.Column("sampling", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("hops", "sampling")
