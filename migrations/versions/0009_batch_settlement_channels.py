"""channels of x402's batch-settlement scheme beside VoucherEscrow's; the write-only vouchers table goes

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 22:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("channels", schema=None) as batch_op:
        batch_op.add_column(sa.Column("scheme", sa.String(16), nullable=False, server_default="voucher"))
        # A batch-settlement channel's id is a hash of its ChannelConfig: the config is kept to claim with.
        batch_op.add_column(sa.Column("config", sa.JSON(), nullable=True))
        # What the payer's vouchers authorized, request by request; VoucherEscrow channels keep it equal to charged.
        batch_op.add_column(sa.Column("acknowledged", sa.BigInteger(), nullable=False, server_default="0"))
        # A cooperative refund asked for and not yet made (its amount, 0 for all that is not charged), and the
        # last one's transaction.
        batch_op.add_column(sa.Column("refunding", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("refund_tx", sa.String(66), nullable=True))
    op.execute("UPDATE channels SET acknowledged = charged")
    with op.batch_alter_table("vouchers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_vouchers_channel_id"))
    op.drop_table("vouchers")


def downgrade() -> None:
    op.create_table(
        "vouchers",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("channel_id", sa.String(66), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("signature", sa.String(132), nullable=False),
        sa.Column("job_id", sa.String(66), nullable=True),
        sa.Column("accepted_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["channel_id"], ["channels.id"], name=op.f("fk_vouchers_channel_id_channels")
        ),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_vouchers_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vouchers")),
        sa.UniqueConstraint("channel_id", "amount", name=op.f("uq_vouchers_channel_id")),
    )
    with op.batch_alter_table("vouchers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_vouchers_channel_id"), ["channel_id"], unique=False)
    with op.batch_alter_table("channels", schema=None) as batch_op:
        batch_op.drop_column("refund_tx")
        batch_op.drop_column("refunding")
        batch_op.drop_column("acknowledged")
        batch_op.drop_column("config")
        batch_op.drop_column("scheme")
