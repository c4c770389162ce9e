"""asks say how long their provider keeps a session's steps for validators; validations say what kept the
validator from judging them

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 12:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Asks posted before said nothing: 0, under any window, so the gateway books them no more.
    with op.batch_alter_table("asks") as batch:
        batch.add_column(sa.Column("retention_s", sa.BigInteger(), server_default="0", nullable=False))
    with op.batch_alter_table("validations") as batch:
        batch.add_column(sa.Column("trouble", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("validations") as batch:
        batch.drop_column("trouble")
    with op.batch_alter_table("asks") as batch:
        batch.drop_column("retention_s")
