"""The ledger's totals beside the chain's, for operators, the demo and the tests.

After every epoch they agree exactly (see settlement.epochs for why the treasury has a leaf of its own):

    settled charges     = distributor.funded()
    provider earnings   = distributor.providerTotal() − the treasury's leaf
    platform fees       = distributor.feesPaid() + the treasury's leaf
    voucher charges     = escrow.totalRedeemed()   (when this database is the escrow's only operator)
    batch charges       = BatchSettlement.receivers(distributor, token).totalSettled
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_utils.address import to_checksum_address
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from settlement.db.schema import Charge, Epoch, EpochStatus, LedgerEntry, PaymentScheme
from settlement.deploy import Contracts


@dataclass(frozen=True)
class LedgerAndChain:
    epoch: int  # the latest posted epoch, 0 before the first
    settled: int
    provider_earnings: int
    platform_fees: int
    voucher_charges: int
    pending: int  # metered, not yet in an epoch
    treasury_leaf: int
    funded: int
    provider_total: int
    fees_paid: int
    redeemed: int
    batch_charges: int
    batch_settled: int

    def rows(self) -> list[tuple[str, int, str, int]]:
        """(ledger figure, its value, chain figure, its value), equal pairs after every epoch."""
        return [
            ("Σ charges settled", self.settled, "funded", self.funded),
            (
                "Σ provider earnings",
                self.provider_earnings,
                "providerTotal − treasury leaf",
                self.provider_total - self.treasury_leaf,
            ),
            (
                "Σ platform fees",
                self.platform_fees,
                "feesPaid + treasury leaf",
                self.fees_paid + self.treasury_leaf,
            ),
            ("Σ voucher charges settled", self.voucher_charges, "redeemed from channels", self.redeemed),
            (
                "Σ batch-settlement charges settled",
                self.batch_charges,
                "settled to the distributor",
                self.batch_settled,
            ),
        ]

    @property
    def matches(self) -> bool:
        return all(ledger == chain for _, ledger, _, chain in self.rows())

    def as_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "pending": str(self.pending),
            "matches": self.matches,
            "treasuryLeaf": str(self.treasury_leaf),
            "checks": [
                {"ledgerFigure": a, "ledger": str(x), "chainFigure": b, "chain": str(y), "match": x == y}
                for a, x, b, y in self.rows()
            ],
        }


def ledger_and_chain(sessions: sessionmaker[Session], contracts: Contracts) -> LedgerAndChain:
    treasury = to_checksum_address(contracts.deployment.roles["treasury"])
    with sessions() as session:
        settled_charges = select(func.coalesce(func.sum(Charge.metered), 0)).where(Charge.epoch.is_not(None))
        settled_entries = LedgerEntry.epoch.is_not(None)
        latest = session.scalar(
            select(Epoch).where(Epoch.status == EpochStatus.POSTED).order_by(Epoch.number.desc())
        )
        settled = int(session.scalar(settled_charges) or 0)
        voucher = int(session.scalar(settled_charges.where(Charge.scheme == PaymentScheme.VOUCHER)) or 0)
        batch = int(session.scalar(settled_charges.where(Charge.scheme == PaymentScheme.BATCH)) or 0)
        pending = int(
            session.scalar(
                select(func.coalesce(func.sum(Charge.metered), 0)).where(
                    Charge.epoch.is_(None), Charge.metered.is_not(None)
                )
            )
            or 0
        )
        earnings = int(
            session.scalar(
                select(func.coalesce(func.sum(LedgerEntry.provider_share), 0)).where(settled_entries)
            )
            or 0
        )
        fees = int(
            session.scalar(
                select(func.coalesce(func.sum(LedgerEntry.platform_fee), 0)).where(settled_entries)
            )
            or 0
        )
    distributor = contracts.distributor
    return LedgerAndChain(
        epoch=latest.number if latest else 0,
        settled=settled,
        provider_earnings=earnings,
        platform_fees=fees,
        voucher_charges=voucher,
        pending=pending,
        treasury_leaf=int(latest.leaves.get(treasury, 0)) if latest else 0,
        funded=distributor.funded(),
        provider_total=distributor.provider_total(),
        fees_paid=distributor.fees_paid(),
        redeemed=contracts.escrow.total_redeemed(),
        batch_charges=batch,
        batch_settled=contracts.batch.receiver(distributor.address, contracts.token.address).total_settled,
    )
