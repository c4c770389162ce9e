"""refunds owed to exact payers get a row each, paid or not yet; channels remember that the escrow closed them;
authorizations remember the block from which their transfer is looked for

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 15:30:00.000000
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "refunds",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("epoch", sa.Integer(), nullable=False, index=True),
        sa.Column("payer", sa.String(42), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint("amount > 0", name="positive"),
        sa.UniqueConstraint("epoch", "payer"),
    )
    # An epoch past its refund step paid what it owed; one before it owes its refunds still. Their sends keep
    # their keys (epoch:N:refund:PAYER), so a refund already mined is found, not paid twice.
    epochs = sa.table(
        "epochs", sa.column("number", sa.Integer), sa.column("status"), sa.column("refunds", sa.JSON)
    )
    refunds = sa.table(
        "refunds", sa.column("epoch", sa.Integer), sa.column("payer"), sa.column("amount", sa.BigInteger)
    )
    # Rendering SQL offline there are no rows to read; an epoch mid-refund is a live database's concern.
    unpaid: list[Any] = []
    if not op.get_context().as_sql:
        query = sa.select(epochs.c.number, epochs.c.refunds)
        unpaid = list(
            op.get_bind().execute(query.where(epochs.c.status.in_(["redeem", "forward", "refund"])))
        )
    rows = [
        {"epoch": number, "payer": payer, "amount": int(amount)}
        for number, owed in unpaid
        for payer, amount in (owed or {}).items()
        if int(amount) > 0
    ]
    if rows:
        op.bulk_insert(refunds, rows)
    # Plain DROP COLUMN (SQLite has it since 3.35), not batch mode: it renders offline too.
    op.drop_column("epochs", "refunds")
    with op.batch_alter_table("channels") as batch:
        batch.add_column(sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("authorizations") as batch:
        batch.add_column(sa.Column("from_block", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("authorizations") as batch:
        batch.drop_column("from_block")
    with op.batch_alter_table("channels") as batch:
        batch.drop_column("closed_at")
    op.add_column("epochs", sa.Column("refunds", sa.JSON(), nullable=False, server_default="{}"))
    op.drop_table("refunds")
