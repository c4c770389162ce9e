"""Closing an epoch: collecting every metered charge on chain, then posting the providers' cumulative earnings.

An epoch is a persisted state machine, one row in ``epochs`` whose ``status`` names the next step:

    open      (one database transaction) meter finished jobs that no task metered yet; take every metered
              charge not yet settled whose job is cleared (its sampled hops validated, see settlement.ledger);
              work out each channel's new claim (what it had claimed plus its newly metered charges, under
              its newest voucher), the exact payments to pass on and the refunds exact payers are owed; give
              the charges and their ledger entries this epoch; build the Merkle tree of cumulative earnings.
              Nothing to settle: no epoch.
    redeem    one VoucherEscrow.redeem for every channel whose claim the chain does not show yet
    forward   one token transfer of the epoch's exact payments from the operator to the distributor
    refund    one token transfer per exact payer owed a refund
    post      PayoutDistributor.postRoot(number, root, total), unless the chain already shows it
    posted    done

Each step is done when its transaction is mined, and each on-chain step goes through
:func:`settlement.outbox.send_once` under a key naming the epoch and step, after reading the chain's state. A
worker killed between any two steps, or an RPC that fails mid-step, therefore leads to the same single on-chain
effect when close_epoch runs again: it resumes the unfinished epoch before opening another.

The tree and the 80/20 split. Leaves are each provider's cumulative ``provider_share`` over settled entries, and
one more leaf for the treasury: the rounding residue ``settled × 80% (rounded down) − Σ provider shares``. The
contract pays the platform ``funded − funded × 80% (rounded down)`` when a root is posted; per-hop rounding
down leaves a little more than that in the providers' pool, and the treasury's leaf claims it, so the posted
total is exactly the pool and every base unit the clients paid has an owner:

    on chain funded          = Σ settled charges
    on chain providerTotal   = Σ provider shares + treasury leaf
    on chain feesPaid + leaf = Σ platform fees
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from settlement.contracts import BPS, CHANNEL_CLOSED, PROVIDER_BPS, Redemption
from settlement.db import channels
from settlement.db.schema import FINISHED_JOBS, Channel, Charge, Epoch, EpochStatus, Job, LedgerEntry
from settlement.deploy import Contracts
from settlement.errors import LedgerMismatch
from settlement.ledger import meter_job
from settlement.merkle import PayoutTree
from settlement.outbox import reconcile, send_once

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochReport:
    epoch: int | None  # None: nothing was waiting to settle
    status: str  # posted, or idle
    root: str | None = None
    settled: int = 0  # Σ charges this epoch collected
    provider_total: int = 0  # Σ leaves of the root
    channels: int = 0
    forwarded: int = 0
    refunded: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "status": self.status,
            "root": self.root,
            "settled": str(self.settled),
            "providerTotal": str(self.provider_total),
            "channels": self.channels,
            "forwarded": str(self.forwarded),
            "refunded": str(self.refunded),
        }


def _no_checkpoint(step: str) -> None:
    pass


class EpochCloser:
    """Runs close_epoch for one operator. One closer at a time: the Celery task holds a lock around it.

    ``checkpoint`` hears each step's name once the step is committed, and each transaction's ``recorded:<key>``
    and ``mined:<key>`` (see :func:`send_once`): the seam where tests kill the process.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        contracts: Contracts,
        operator: LocalAccount,
        *,
        checkpoint: Callable[[str], None] = _no_checkpoint,
        clock: Callable[[], float] = time.time,
        sample_rate: float = 0.0,
    ) -> None:
        self.sessions = sessions
        self.contracts = contracts
        self.chain = contracts.chain
        self.operator = operator
        self.checkpoint = checkpoint
        self.clock = clock
        self.sample_rate = sample_rate  # for the jobs metered here, see meter_finished
        self.treasury = to_checksum_address(contracts.deployment.roles["treasury"])

    def close(self) -> EpochReport:
        self.meter_finished()
        epoch = self._unfinished() or self._open()
        if epoch is None:
            return EpochReport(None, "idle")
        steps = {
            EpochStatus.REDEEM: self._redeem,
            EpochStatus.FORWARD: self._forward,
            EpochStatus.REFUND: self._refund,
            EpochStatus.POST: self._post,
        }
        while epoch.status != EpochStatus.POSTED:
            step = EpochStatus(epoch.status)
            following = steps[step](epoch)
            with self.sessions.begin() as session:
                values: dict[str, Any] = {"status": following}
                if following == EpochStatus.POSTED:
                    values["posted_at"] = datetime.fromtimestamp(self.clock(), UTC)
                session.execute(update(Epoch).where(Epoch.number == epoch.number).values(**values))
            epoch.status = following
            self.checkpoint(step)
        log.info("epoch %d posted: root %s, %d settled", epoch.number, epoch.root, epoch.settled)
        return EpochReport(
            epoch.number,
            EpochStatus.POSTED,
            epoch.root,
            epoch.settled,
            epoch.provider_total,
            len(epoch.redemptions),
            epoch.forward,
            sum(int(v) for v in epoch.refunds.values()),
        )

    # -- metering ----------------------------------------------------------------------------------------

    def meter_finished(self) -> int:
        """Meters finished jobs that no meter_job task got to (the broker was down, a task was lost)."""
        domain = self.contracts.protocol_domain()
        with self.sessions() as session:
            waiting = session.scalars(
                select(Job.id).where(Job.status.in_(FINISHED_JOBS), Job.metered_at.is_(None))
            ).all()
        for job_id in waiting:
            with self.sessions.begin() as session:
                meter_job(session, job_id, domain=domain, sample_rate=self.sample_rate)
        return len(waiting)

    # -- open ----------------------------------------------------------------------------------------------

    def _unfinished(self) -> Epoch | None:
        with self.sessions() as session:
            return session.scalar(
                select(Epoch).where(Epoch.status != EpochStatus.POSTED).order_by(Epoch.number)
            )

    def _open(self) -> Epoch | None:
        on_chain = self.contracts.distributor.epoch()
        with self.sessions.begin() as session:
            last = session.scalar(select(func.max(Epoch.number))) or 0
            if last != on_chain:
                raise LedgerMismatch(
                    f"the distributor is at epoch {on_chain} but this database last posted epoch {last}"
                )
            number = last + 1
            charges = session.scalars(
                select(Charge)
                .where(
                    Charge.epoch.is_(None),
                    Charge.metered.is_not(None),
                    Charge.job_id.in_(select(Job.id).where(Job.cleared_at.is_not(None))),
                )
                .order_by(Charge.id)
                .with_for_update()
            ).all()
            redemptions, forward, refunds, taken = self._collect(session, charges)
            if not taken:
                return None
            for charge in taken:
                charge.epoch = number
            session.flush()
            # A subquery, not a list of ids: an epoch may settle more jobs than a statement takes parameters.
            session.execute(
                update(LedgerEntry)
                .where(
                    LedgerEntry.job_id.in_(select(Charge.job_id).where(Charge.epoch == number)),
                    LedgerEntry.epoch.is_(None),
                    LedgerEntry.voided.is_(False),
                )
                .values(epoch=number)
            )
            settled = sum(charge.metered or 0 for charge in taken)
            leaves = self._leaves(session)
            tree = PayoutTree.build(leaves) if leaves else None
            epoch = Epoch(
                number=number,
                status=EpochStatus.REDEEM,
                settled=settled,
                redemptions=redemptions,
                forward=forward,
                refunds={payer: str(amount) for payer, amount in refunds.items()},
                leaves={account: str(amount) for account, amount in leaves.items()},
                root="0x" + (tree.root if tree else bytes(32)).hex(),
                provider_total=sum(leaves.values()),
                created_at=datetime.fromtimestamp(self.clock(), UTC),
            )
            session.add(epoch)
        self.checkpoint("open")
        log.info("epoch %d opened: %d charges, %d settled", number, len(taken), settled)
        return epoch

    def _collect(
        self, session: Session, charges: Sequence[Charge]
    ) -> tuple[list[dict[str, Any]], int, dict[str, int], list[Charge]]:
        """The redemptions, exact forward, refunds and the charges they settle."""
        by_channel: dict[str, list[Charge]] = defaultdict(list)
        forward = 0
        refunds: dict[str, int] = defaultdict(int)
        taken: list[Charge] = []
        for charge in charges:
            if charge.channel_id is not None:
                by_channel[charge.channel_id].append(charge)
                continue
            # Exact: the operator holds the whole quote; the metered part goes on, the rest goes back.
            metered = charge.metered or 0
            forward += metered
            if charge.quote > metered:
                refunds[to_checksum_address(charge.payer)] += charge.quote - metered
            taken.append(charge)
        redemptions: list[dict[str, Any]] = []
        for channel_id, pending in sorted(by_channel.items()):
            due = sum(charge.metered or 0 for charge in pending)
            channel = session.get(Channel, channel_id)
            assert channel is not None
            if due == 0:
                taken += pending
                continue
            claim_to = channel.claimed + due
            state = self.contracts.escrow.channel(bytes.fromhex(channel_id[2:]))
            if state.withdrawable_at == CHANNEL_CLOSED:
                log.error(
                    "channel %s closed with %d charged and never redeemed: it cannot be collected",
                    channel_id,
                    due,
                )
                continue
            if (
                channel.voucher_signature is None
                or claim_to > channel.voucher_amount
                or claim_to > state.deposit
            ):
                log.error(
                    "channel %s: claim %d is not covered (voucher %d, deposit %d); left unsettled",
                    channel_id, claim_to, channel.voucher_amount, state.deposit,
                )  # fmt: skip
                continue
            redemptions.append(
                {
                    "channel": channel_id,
                    "voucher": str(channel.voucher_amount),
                    "signature": channel.voucher_signature,
                    "claimTo": str(claim_to),
                }
            )
            taken += pending
        return redemptions, forward, dict(refunds), taken

    def _leaves(self, session: Session) -> dict[str, int]:
        """Cumulative earnings over every settled entry, with the treasury's rounding residue."""
        rows = session.execute(
            select(LedgerEntry.provider, func.sum(LedgerEntry.provider_share))
            .where(LedgerEntry.epoch.is_not(None))
            .group_by(LedgerEntry.provider)
        ).all()
        leaves = {to_checksum_address(provider): int(total) for provider, total in rows}
        settled = session.scalar(
            select(func.coalesce(func.sum(Charge.metered), 0)).where(Charge.epoch.is_not(None))
        )
        residue = int(settled or 0) * PROVIDER_BPS // BPS - sum(leaves.values())
        if residue < 0:
            raise LedgerMismatch(f"providers are owed {-residue} more than the pool of everything settled")
        if residue:
            leaves[self.treasury] = leaves.get(self.treasury, 0) + residue
        return {account: amount for account, amount in leaves.items() if amount > 0}

    # -- on-chain steps ----------------------------------------------------------------------------------

    def _key(self, epoch: Epoch, step: str) -> str:
        return f"epoch:{epoch.number}:{step}"

    def _send(self, key: str, build: Callable[[], Any], action: str) -> None:
        send_once(
            self.sessions,
            self.chain,
            self.operator,
            key,
            build,
            action,
            progress=self.checkpoint,
        )

    def _redeem(self, epoch: Epoch) -> str:
        escrow = self.contracts.escrow
        due = [
            r for r in epoch.redemptions
            if escrow.channel(bytes.fromhex(r["channel"][2:])).claimed < int(r["claimTo"])
        ]  # fmt: skip
        if not due:
            reconcile(self.sessions, self.chain, self._key(epoch, EpochStatus.REDEEM))
        else:
            batch = [
                Redemption(
                    bytes.fromhex(r["channel"][2:]),
                    int(r["voucher"]),
                    int(r["claimTo"]),
                    bytes.fromhex(r["signature"][2:]),
                )
                for r in due
            ]
            self._send(
                self._key(epoch, EpochStatus.REDEEM),
                lambda: escrow.contract.functions.redeem([r.as_abi() for r in batch]),
                "VoucherEscrow.redeem",
            )
        with self.sessions.begin() as session:
            for r in epoch.redemptions:
                session.execute(channels.claim(r["channel"], int(r["claimTo"])))
        return EpochStatus.FORWARD

    def _forward(self, epoch: Epoch) -> str:
        if epoch.forward:
            token, distributor = self.contracts.token, self.contracts.distributor.address
            self._send(
                self._key(epoch, EpochStatus.FORWARD),
                lambda: token.contract.functions.transfer(distributor, epoch.forward),
                "PaymentToken.transfer",
            )
        return EpochStatus.REFUND

    def _refund(self, epoch: Epoch) -> str:
        token = self.contracts.token
        for payer, amount in sorted(epoch.refunds.items()):
            self._send(
                self._key(epoch, f"{EpochStatus.REFUND}:{payer}"),
                partial(token.contract.functions.transfer, payer, int(amount)),
                "PaymentToken.transfer",
            )
        return EpochStatus.POST

    def _post(self, epoch: Epoch) -> str:
        distributor = self.contracts.distributor
        root = bytes.fromhex(epoch.root[2:])
        on_chain = distributor.epoch()
        if on_chain >= epoch.number:
            if on_chain == epoch.number and distributor.merkle_root() != root:
                raise LedgerMismatch(f"epoch {epoch.number} on chain has another root than {epoch.root}")
            reconcile(self.sessions, self.chain, self._key(epoch, EpochStatus.POST))
            return EpochStatus.POSTED
        self._send(
            self._key(epoch, EpochStatus.POST),
            lambda: distributor.contract.functions.postRoot(epoch.number, root, epoch.provider_total),
            "PayoutDistributor.postRoot",
        )
        return EpochStatus.POSTED


__all__ = ["EpochCloser", "EpochReport", "LedgerMismatch"]
