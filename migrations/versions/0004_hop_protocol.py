"""hop protocol: asks pin a TLS certificate; receipts name their gateway and commit to sampling

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 08:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("asks") as batch:
        batch.add_column(
            sa.Column(
                "tls_fingerprint", sa.String(length=66), nullable=False, server_default="0x" + "00" * 32
            )
        )
    with op.batch_alter_table("receipts") as batch:
        batch.add_column(sa.Column("gateway", sa.String(length=42), nullable=True))
        batch.add_column(sa.Column("sampling_hash", sa.String(length=66), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("receipts") as batch:
        batch.drop_column("sampling_hash")
        batch.drop_column("gateway")
    with op.batch_alter_table("asks") as batch:
        batch.drop_column("tls_fingerprint")
