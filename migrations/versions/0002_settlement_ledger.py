"""settlement ledger

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 09:09:18.231497
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import settlement.db.schema

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "chain_sends",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("sender", sa.String(length=42), nullable=False),
        sa.Column("nonce", sa.BigInteger(), nullable=False),
        sa.Column("tx_hash", sa.String(length=66), nullable=False),
        sa.Column("raw", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", settlement.db.schema.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chain_sends")),
        sa.UniqueConstraint("key", name=op.f("uq_chain_sends_key")),
    )
    op.create_table(
        "epochs",
        sa.Column("number", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("settled", sa.BigInteger(), nullable=False),
        sa.Column("redemptions", sa.JSON(), nullable=False),
        sa.Column("forward", sa.BigInteger(), nullable=False),
        sa.Column("refunds", sa.JSON(), nullable=False),
        sa.Column("leaves", sa.JSON(), nullable=False),
        sa.Column("root", sa.String(length=66), nullable=False),
        sa.Column("provider_total", sa.BigInteger(), nullable=False),
        sa.Column("created_at", settlement.db.schema.UTCDateTime(timezone=True), nullable=False),
        sa.Column("posted_at", settlement.db.schema.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("number", name=op.f("pk_epochs")),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=66), nullable=False),
        sa.Column("hop_id", sa.Integer(), nullable=False),
        sa.Column("provider", sa.String(length=42), nullable=False),
        sa.Column("token_layers", sa.BigInteger(), nullable=False),
        sa.Column("charge", sa.BigInteger(), nullable=False),
        sa.Column("provider_share", sa.BigInteger(), nullable=False),
        sa.Column("platform_fee", sa.BigInteger(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=True),
        sa.Column("created_at", settlement.db.schema.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("provider_share + platform_fee = charge", name=op.f("ck_ledger_entries_split")),
        sa.CheckConstraint(
            "provider_share >= 0 AND platform_fee >= 0", name=op.f("ck_ledger_entries_non_negative")
        ),
        sa.ForeignKeyConstraint(["hop_id"], ["hops.id"], name=op.f("fk_ledger_entries_hop_id_hops")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_ledger_entries_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
        sa.UniqueConstraint("hop_id", name=op.f("uq_ledger_entries_hop_id")),
    )
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ledger_entries_job_id"), ["job_id"], unique=False)
        batch_op.create_index("ix_ledger_entries_provider_epoch", ["provider", "epoch"], unique=False)

    with op.batch_alter_table("channels", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed", sa.BigInteger(), nullable=False, server_default="0"))

    with op.batch_alter_table("charges", schema=None) as batch_op:
        batch_op.add_column(sa.Column("metered", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("epoch", sa.Integer(), nullable=True))
        batch_op.create_index("ix_charges_unsettled", ["epoch", "metered"], unique=False)

    with op.batch_alter_table("hops", schema=None) as batch_op:
        batch_op.add_column(sa.Column("transcript", sa.JSON(), nullable=True))

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("metered_at", settlement.db.schema.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("metered_at")

    with op.batch_alter_table("hops", schema=None) as batch_op:
        batch_op.drop_column("transcript")

    with op.batch_alter_table("charges", schema=None) as batch_op:
        batch_op.drop_index("ix_charges_unsettled")
        batch_op.drop_column("epoch")
        batch_op.drop_column("metered")

    with op.batch_alter_table("channels", schema=None) as batch_op:
        batch_op.drop_column("claimed")

    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_index("ix_ledger_entries_provider_epoch")
        batch_op.drop_index(batch_op.f("ix_ledger_entries_job_id"))

    op.drop_table("ledger_entries")
    op.drop_table("epochs")
    op.drop_table("chain_sends")
