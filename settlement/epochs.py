"""Closing an epoch: collecting every metered charge on chain, then posting the providers' cumulative earnings.

An epoch is a persisted state machine, one row in ``epochs`` whose ``status`` names the next step:

    open      (one database transaction) meter finished jobs that no task metered yet; take every metered
              charge not yet settled whose job is cleared (its sampled hops validated, see settlement.ledger)
              and whose channel is not known closed; work out each channel's new claim (what it had claimed
              plus its newly metered charges, under its newest voucher), the exact payments to pass on and the
              refunds exact payers are owed; give the charges and their ledger entries this epoch; build the
              Merkle tree of cumulative earnings. Nothing to settle: no epoch.
    redeem    VoucherEscrow.redeem in batches of at most ``batch_size`` channels (a gas budget), exiting
              channels first, each batch without the channels whose claim the chain already shows or that
              closed meanwhile; then drop from the epoch every channel whose claim did not land (its payer
              finalized an exit before the batch did) and rebuild the tree over what was collected
    forward   one token transfer of the epoch's exact payments from the operator to the distributor
    refund    one token transfer per exact payer owed a refund; one that reverts stays owed, is retried at
              every later close, and does not hold the epoch up
    post      PayoutDistributor.postRoot(number, root, total), unless the chain already shows it
    posted    done

Redemption never stalls. The escrow skips (and logs) an entry that cannot pay rather than reverting its batch,
because the one race that matters cannot be excluded from here: a payer may finalize its exit in the block
before a batch lands. Reading the chain before each batch only keeps entries known to be dead out of it. A
resumed epoch rereads the chain, so what became unredeemable while it was stopped is dropped, not replayed.

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
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from settlement.contracts import BPS, CHANNEL_CLOSED, PROVIDER_BPS, BatchClaim, ChannelState, Redemption
from settlement.db import channels
from settlement.db.schema import FINISHED_JOBS, Channel, Charge, Epoch, EpochStatus, Job, LedgerEntry, Refund
from settlement.deploy import Contracts
from settlement.errors import LedgerMismatch, TransactionReverted
from settlement.ledger import meter_job
from settlement.merkle import PayoutTree
from settlement.outbox import reconcile, send_once

log = logging.getLogger(__name__)

# Gas of one redemption entry, paid or skipped, with room to spare (the Forge gas snapshot measures ~11k paid),
# and of a batch around its entries: the transaction, the role check, the transfer to the distributor, the log.
REDEEM_GAS_PER_ENTRY = 16_000
REDEEM_GAS_PER_BATCH = 100_000
# Half of a 16.7M per-transaction cap (EIP-7825) and of today's 30M+ blocks: a batch is mined even when the
# block is busy. ~490 channels a batch.
DEFAULT_REDEEM_GAS_BUDGET = 8_000_000


def redeem_batch_size(gas_budget: int) -> int:
    """Channels per redemption batch that fit ``gas_budget``."""
    return max(1, (gas_budget - REDEEM_GAS_PER_BATCH) // REDEEM_GAS_PER_ENTRY)


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
        redeem_gas_budget: int = DEFAULT_REDEEM_GAS_BUDGET,
    ) -> None:
        self.sessions = sessions
        self.contracts = contracts
        self.chain = contracts.chain
        self.operator = operator
        self.checkpoint = checkpoint
        self.clock = clock
        self.sample_rate = sample_rate  # for the jobs metered here, see meter_finished
        self.batch_size = redeem_batch_size(redeem_gas_budget)
        self.treasury = to_checksum_address(contracts.deployment.roles["treasury"])

    def close(self) -> EpochReport:
        self.meter_finished()
        epoch = self._unfinished() or self._open()
        if epoch is None:
            self.pay_refunds()
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
                    values["posted_at"] = self._now()
                session.execute(update(Epoch).where(Epoch.number == epoch.number).values(**values))
            epoch.status = following
            self.checkpoint(step)
        log.info("epoch %d posted: root %s, %d settled", epoch.number, epoch.root, epoch.settled)
        self.pay_refunds()
        with self.sessions() as session:
            refunded = session.scalar(
                select(func.coalesce(func.sum(Refund.amount), 0)).where(
                    Refund.epoch == epoch.number, Refund.paid_at.is_not(None)
                )
            )
        return EpochReport(
            epoch.number,
            EpochStatus.POSTED,
            epoch.root,
            epoch.settled,
            epoch.provider_total,
            len(epoch.redemptions),
            epoch.forward,
            int(refunded or 0),
        )

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

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
        with self.sessions() as session:
            last = session.scalar(select(func.max(Epoch.number))) or 0
            if last != on_chain:
                raise LedgerMismatch(
                    f"the distributor is at epoch {on_chain} but this database last posted epoch {last}"
                )
            waiting = session.execute(
                select(Channel.id, Channel.config).where(
                    Channel.id.in_(select(Charge.channel_id).where(*self._unsettled()).distinct())
                )
            ).all()
        # The chain is read before the transaction that takes the charges, so no lock is held across RPCs.
        states = {channel: self._channel_state(channel, config) for channel, config in waiting}
        number = last + 1
        with self.sessions.begin() as session:
            closed = [channel for channel, state in states.items() if state.withdrawable_at == CHANNEL_CLOSED]
            if closed:
                session.execute(
                    update(Channel)
                    .where(Channel.id.in_(closed), Channel.closed_at.is_(None))
                    .values(closed_at=self._now())
                )
            charges = session.scalars(
                select(Charge).where(*self._unsettled()).order_by(Charge.id).with_for_update()
            ).all()
            redemptions, forward, refunds, taken = self._collect(session, charges, states)
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
            session.add_all(
                Refund(epoch=number, payer=payer, amount=amount) for payer, amount in sorted(refunds.items())
            )
            epoch = Epoch(
                number=number,
                status=EpochStatus.REDEEM,
                redemptions=redemptions,
                forward=forward,
                created_at=self._now(),
                **self._payouts(session, number),
            )
            session.add(epoch)
        self.checkpoint("open")
        log.info("epoch %d opened: %d charges, %d settled", number, len(taken), epoch.settled)
        return epoch

    @staticmethod
    def _unsettled() -> tuple[Any, ...]:
        """Metered charges in no epoch yet, whose job is cleared, on no channel known closed."""
        return (
            Charge.epoch.is_(None),
            Charge.metered.is_not(None),
            Charge.job_id.in_(select(Job.id).where(Job.cleared_at.is_not(None))),
            or_(
                Charge.channel_id.is_(None),
                Charge.channel_id.in_(select(Channel.id).where(Channel.closed_at.is_(None))),
            ),
        )

    def _channel_state(self, channel_id: str, config: dict[str, Any] | None) -> ChannelState:
        """A channel as the chain shows it: on VoucherEscrow, or (with a ChannelConfig) on x402's BatchSettlement,
        whose balance plays the deposit's part and whose pending withdrawal its exit's."""
        channel = bytes.fromhex(channel_id[2:])
        if config is None:
            return self.contracts.escrow.channel(channel)
        state = self.contracts.batch.channel(channel)
        exit_at = (
            state.withdraw_initiated_at + int(config["withdrawDelay"]) if state.withdraw_initiated_at else 0
        )
        return ChannelState(state.balance, state.total_claimed, exit_at)

    def _collect(
        self, session: Session, charges: Sequence[Charge], states: dict[str, ChannelState]
    ) -> tuple[list[dict[str, Any]], int, dict[str, int], list[Charge]]:
        """The redemptions (exiting channels first, soonest exit first), exact forward, refunds and the charges
        they settle."""
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
        due: list[tuple[int, str, dict[str, Any]]] = []
        for channel_id, pending in by_channel.items():
            amount = sum(charge.metered or 0 for charge in pending)
            channel = session.get(Channel, channel_id)
            assert channel is not None
            if amount == 0:
                taken += pending
                continue
            claim_to = channel.claimed + amount
            state = states.get(channel_id) or self._channel_state(channel_id, channel.config)
            if state.withdrawable_at == CHANNEL_CLOSED:
                log.error(
                    "channel %s closed with %d charged and never redeemed: it cannot be collected",
                    channel_id,
                    amount,
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
            # An exiting channel can close at its withdrawableAt: it goes in the first batch.
            exit_at = state.withdrawable_at or CHANNEL_CLOSED
            redemption: dict[str, Any] = {
                "channel": channel_id,
                "voucher": str(channel.voucher_amount),
                "signature": channel.voucher_signature,
                "claimTo": str(claim_to),
            }
            if channel.config is not None:
                redemption["config"] = channel.config  # a batch-settlement channel: claimed with its config
            due.append((exit_at, channel_id, redemption))
            taken += pending
        redemptions = [redemption for _, _, redemption in sorted(due, key=lambda item: item[:2])]
        return redemptions, forward, dict(refunds), taken

    def _payouts(self, session: Session, number: int) -> dict[str, Any]:
        """Epoch ``number``'s settled total and the tree over every settled entry: the Epoch columns they fill.
        An epoch left with nothing of its own (every channel's payer left first) posts the tree it found."""
        settled = session.scalar(
            select(func.coalesce(func.sum(Charge.metered), 0)).where(Charge.epoch == number)
        )
        leaves = self._leaves(session)
        tree = PayoutTree.build(leaves) if leaves else None
        return {
            "settled": int(settled or 0),
            "leaves": {account: str(amount) for account, amount in leaves.items()},
            "root": "0x" + (tree.root if tree else bytes(32)).hex(),
            "provider_total": sum(leaves.values()),
        }

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
        """VoucherEscrow.redeem for its channels, then BatchSettlement.claim for x402's (the operator is their
        receiver authorizer) and one settle of what was claimed to the distributor, their receiver."""
        escrow, batch = self.contracts.escrow, self.contracts.batch
        escrowed = [r for r in epoch.redemptions if "config" not in r]
        claimed = [r for r in epoch.redemptions if "config" in r]
        # Batches are cut from the stored list, so a rerun gives each key the same channels it had.
        for index, start in enumerate(range(0, len(escrowed), self.batch_size)):
            key = self._key(epoch, f"{EpochStatus.REDEEM}:{index}")
            redemptions = [
                Redemption(
                    bytes.fromhex(r["channel"][2:]),
                    int(r["voucher"]),
                    int(r["claimTo"]),
                    bytes.fromhex(r["signature"][2:]),
                )
                for r in escrowed[start : start + self.batch_size]
                if self._redeemable(self._channel_state(r["channel"], None), int(r["claimTo"]))
            ]
            if redemptions:
                self._send(key, partial(escrow.redeem_call, redemptions), "VoucherEscrow.redeem")
            else:
                reconcile(self.sessions, self.chain, key)
        for index, start in enumerate(range(0, len(claimed), self.batch_size)):
            key = self._key(epoch, f"claim:{index}")
            claims = [
                BatchClaim(
                    r["config"], int(r["voucher"]), bytes.fromhex(r["signature"][2:]), int(r["claimTo"])
                )
                for r in claimed[start : start + self.batch_size]
                if self._redeemable(self._channel_state(r["channel"], r["config"]), int(r["claimTo"]))
            ]
            if claims:
                self._send(key, partial(batch.claim_call, claims), "BatchSettlement.claim")
            else:
                reconcile(self.sessions, self.chain, key)
        if claimed:
            receiver, token = self.contracts.distributor.address, self.contracts.token.address
            owed = batch.receiver(receiver, token)
            key = self._key(epoch, "settle")
            if owed.total_claimed > owed.total_settled:
                self._send(
                    key, partial(batch.settle_call, receiver=receiver, token=token), "BatchSettlement.settle"
                )
            else:
                reconcile(self.sessions, self.chain, key)
        self._keep_what_landed(epoch)
        return EpochStatus.FORWARD

    @staticmethod
    def _redeemable(state: ChannelState, claim_to: int) -> bool:
        return state.claimed < claim_to and state.withdrawable_at != CHANNEL_CLOSED

    def _keep_what_landed(self, epoch: Epoch) -> None:
        """Records each channel's claim where the chain shows it; drops from the epoch the channels where it
        does not (the payer left first, or the entry was skipped) and rebuilds the tree over the rest."""
        states = {r["channel"]: self._channel_state(r["channel"], r.get("config")) for r in epoch.redemptions}
        landed = [r for r in epoch.redemptions if states[r["channel"]].claimed >= int(r["claimTo"])]
        lost = [r["channel"] for r in epoch.redemptions if states[r["channel"]].claimed < int(r["claimTo"])]
        with self.sessions.begin() as session:
            for r in landed:
                session.execute(channels.claim(r["channel"], int(r["claimTo"])))
            if not lost:
                return
            for channel in lost:
                closed = states[channel].withdrawable_at == CHANNEL_CLOSED
                log.error(
                    "epoch %d: channel %s's redemption did not land (%s); its charges leave the epoch",
                    epoch.number, channel, "its payer left first" if closed else "skipped by the escrow",
                )  # fmt: skip
                if closed:
                    session.execute(
                        update(Channel).where(Channel.id == channel).values(closed_at=self._now())
                    )
            dropped = select(Charge.job_id).where(Charge.epoch == epoch.number, Charge.channel_id.in_(lost))
            session.execute(
                update(LedgerEntry)
                .where(LedgerEntry.job_id.in_(dropped), LedgerEntry.epoch == epoch.number)
                .values(epoch=None)
            )
            session.execute(
                update(Charge)
                .where(Charge.epoch == epoch.number, Charge.channel_id.in_(lost))
                .values(epoch=None)
            )
            session.flush()
            payouts = self._payouts(session, epoch.number)
            session.execute(
                update(Epoch).where(Epoch.number == epoch.number).values(redemptions=landed, **payouts)
            )
        epoch.redemptions = landed
        for name, value in payouts.items():
            setattr(epoch, name, value)

    def _forward(self, epoch: Epoch) -> str:
        if epoch.forward:
            token, distributor = self.contracts.token, self.contracts.distributor.address
            self._send(
                self._key(epoch, EpochStatus.FORWARD),
                partial(token.transfer_call, to=distributor, amount=epoch.forward),
                "PaymentToken.transfer",
            )
        return EpochStatus.REFUND

    def _refund(self, epoch: Epoch) -> str:
        self.pay_refunds(epoch.number)
        return EpochStatus.POST

    def pay_refunds(self, epoch: int | None = None) -> int:
        """Pays the refunds still owed (of ``epoch``, or of every epoch); returns how many are still owed. One
        that reverts keeps its error and waits for the next close: it never holds an epoch or the others up."""
        token = self.contracts.token
        with self.sessions() as session:
            query = select(Refund).where(Refund.paid_at.is_(None)).order_by(Refund.epoch, Refund.payer)
            owed = session.scalars(query if epoch is None else query.where(Refund.epoch == epoch)).all()
        unpaid = 0
        for refund in owed:
            error: str | None = None
            try:
                self._send(
                    f"epoch:{refund.epoch}:{EpochStatus.REFUND}:{refund.payer}",
                    partial(token.transfer_call, to=refund.payer, amount=refund.amount),
                    "PaymentToken.transfer",
                )
            except TransactionReverted as exc:
                error = str(exc)
                unpaid += 1
                log.error("epoch %d: refund of %d to %s failed, to be retried: %s", refund.epoch,
                          refund.amount, refund.payer, error)  # fmt: skip
            with self.sessions.begin() as session:
                values: dict[str, Any] = (
                    {"error": error} if error else {"paid_at": self._now(), "error": None}
                )
                session.execute(update(Refund).where(Refund.id == refund.id).values(**values))
        return unpaid

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
            partial(
                distributor.post_root_call, epoch=epoch.number, root=root, provider_total=epoch.provider_total
            ),
            "PayoutDistributor.postRoot",
        )
        return EpochStatus.POSTED


__all__ = ["EpochCloser", "EpochReport", "LedgerMismatch"]
