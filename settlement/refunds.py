"""Cooperative refunds of x402 batch-settlement channels: the operator, their receiver authorizer, gives a payer
back what it deposited and was not charged, at once, instead of after the channel's withdrawal delay.

The gateway takes the request (settlement.db.channels.REQUEST_REFUND marks the channel ``refunding`` when nothing
runs on it and the payer's voucher matches what it was told it was charged) and admits nothing more on the
channel until the refund is made. The operator's worker then refunds

    min(asked, balance − max(charged, claimed))

leaving in the channel everything charged and not yet claimed, for the next epoch to claim. A charge a validator
voids later only leaves more in the channel, which its payer can withdraw. The transaction goes through
settlement.outbox under a key naming the channel's refund nonce, so a worker killed mid-way sends it once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

from eth_account.signers.local import LocalAccount
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from settlement.db.schema import Channel
from settlement.deploy import Contracts
from settlement.outbox import send_once

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefundMade:
    channel_id: str
    amount: int  # 0: nothing was left to refund
    tx_hash: str | None


def refund_channel(
    sessions: sessionmaker[Session], contracts: Contracts, operator: LocalAccount, channel_id: str
) -> RefundMade | None:
    """Makes the refund asked for on ``channel_id``; None when none is asked for (already made: idempotent)."""
    with sessions() as session:
        row = session.scalar(select(Channel).where(Channel.id == channel_id))
    if row is None or row.refunding is None or row.config is None:
        return None
    batch = contracts.batch
    state = batch.channel(bytes.fromhex(channel_id[2:]))
    refundable = max(0, state.balance - max(row.charged, state.total_claimed))
    amount = refundable if row.refunding == 0 else min(row.refunding, refundable)
    tx_hash = None
    if amount:
        receipt = send_once(
            sessions,
            contracts.chain,
            operator,
            f"refund:{channel_id}:{state.refund_nonce}",
            partial(batch.refund_call, config=row.config, amount=amount),
            "BatchSettlement.refund",
        )
        tx_hash = "0x" + bytes(receipt["transactionHash"]).hex()
    with sessions.begin() as session:
        session.execute(
            update(Channel).where(Channel.id == channel_id).values(refunding=None, refund_tx=tx_hash)
        )
    log.info("channel %s: refunded %d to its payer (%s)", channel_id, amount, tx_hash)
    return RefundMade(channel_id, amount, tx_hash)


def refunds_asked(sessions: sessionmaker[Session]) -> list[str]:
    """Channels with a refund asked for and not yet made: what a worker that was down catches up on."""
    with sessions() as session:
        return list(session.scalars(select(Channel.id).where(Channel.refunding.is_not(None))))
