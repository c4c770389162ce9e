"""validation: sampled hops, their verdicts and evidence; jobs cleared or voided

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 10:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import settlement.db.schema

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "validations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("hop_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=66), nullable=False),
        sa.Column("provider", sa.String(length=42), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("evidence", sa.Text(), nullable=True),
        sa.Column("evidence_hash", sa.String(length=66), nullable=True),
        sa.Column("slash_status", sa.String(length=16), nullable=True),
        sa.Column("slashed", sa.BigInteger(), nullable=True),
        sa.Column("slash_tx", sa.String(length=66), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("first_attempt_at", settlement.db.schema.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", settlement.db.schema.UTCDateTime(timezone=True), nullable=False),
        sa.Column("decided_at", settlement.db.schema.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["hop_id"], ["hops.id"], name=op.f("fk_validations_hop_id_hops")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_validations_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_validations")),
        sa.UniqueConstraint("evidence_hash", name=op.f("uq_validations_evidence_hash")),
        sa.UniqueConstraint("hop_id", name=op.f("uq_validations_hop_id")),
    )
    with op.batch_alter_table("validations", schema=None) as batch_op:
        batch_op.create_index("ix_validations_status", ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_validations_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_validations_provider"), ["provider"], unique=False)

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("cleared_at", settlement.db.schema.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("voided_at", settlement.db.schema.UTCDateTime(timezone=True), nullable=True)
        )
    # Jobs metered before validation existed were never sampled: they are cleared as they are.
    op.execute("UPDATE jobs SET cleared_at = metered_at WHERE metered_at IS NOT NULL")

    with op.batch_alter_table("hops", schema=None) as batch_op:
        batch_op.add_column(sa.Column("session", sa.String(length=32), nullable=True))

    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("voided", sa.Boolean(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_column("voided")

    with op.batch_alter_table("hops", schema=None) as batch_op:
        batch_op.drop_column("session")

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("voided_at")
        batch_op.drop_column("cleared_at")

    with op.batch_alter_table("validations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_validations_provider"))
        batch_op.drop_index(batch_op.f("ix_validations_job_id"))
        batch_op.drop_index("ix_validations_status")

    op.drop_table("validations")
