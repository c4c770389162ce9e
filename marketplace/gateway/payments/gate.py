"""Securing payment before serving, and charging what was served.

Voucher (the default): the voucher is checked locally against the cached chain state: signed by the payer its
channel id names, not above the deposit, the channel not exiting. It is then accepted and the quote reserved in
one conditional UPDATE of the channel row:

    SET voucher = v, reserved = reserved + quote
    WHERE voucher < v AND charged + reserved + quote <= v

so concurrent requests on one channel cannot both spend the same headroom (the database serialises the two
updates and re-checks the condition for the second), an old voucher cannot be replayed (its amount is not
above the newest), and a voucher that does not cover what is charged and reserved plus this quote changes
nothing. When the job ends the reservation becomes the metered charge: ``reserved -= quote, charged += amount``.
Settlement later redeems the newest voucher with ``claimTo = charged``.

Exact (x402's EIP-3009 scheme): the authorization is checked (form, signer, recipient, amount, time window,
unused nonce), simulated on chain from the gateway's account (which catches a short balance), recorded, then
sent, and the request is served only once its receipt is in. It pays the whole quote up front; the difference
between the quote and the metered charge is recorded as a refund owed to the payer.

Every function here works inside the caller's database transaction and never commits: the job's row, its
reservation and its charge land together or not at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NoReturn

from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from marketplace.gateway.chainwatch import BIGINT_MAX, ChainWatcher, ChannelView
from marketplace.gateway.errors import InvalidRequest, PaymentRejected, Unavailable, chain_read
from marketplace.gateway.payments.x402 import (
    BATCH,
    CHANNEL_BUSY,
    CUMULATIVE_MISMATCH,
    EXACT,
    REFUND_NO_BALANCE,
    VOUCHER,
    BatchPayment,
    ExactPayment,
    Payment,
    VoucherPayment,
    network_of,
    requirement,
)
from settlement.contracts import (
    BPS,
    MAX_WITHDRAW_DELAY_S,
    MIN_WITHDRAW_DELAY_S,
    AuthorizationFate,
    BatchChannelConfig,
)
from settlement.db import channels
from settlement.db.schema import (
    Authorization,
    AuthorizationStatus,
    Channel,
    Charge,
    Job,
    JobStatus,
    PaymentScheme,
    utcnow,
)
from settlement.deploy import Contracts
from settlement.eip712 import (
    BATCH_SETTLEMENT_DOMAIN_NAME,
    DOMAIN_VERSION,
    VOUCHER_ESCROW_DOMAIN_NAME,
    Domain,
    batch_channel_id,
)
from settlement.eip712 import Voucher as SignedVoucher
from settlement.errors import ChainError, TransactionReverted

log = logging.getLogger(__name__)


NONE = PaymentScheme.NONE  # the scheme of jobs served with payments off

# Reverts of transferWithAuthorization, as the client should read them.
_EXACT_REVERTS = {
    "ERC20InsufficientBalance": "insufficient_balance",
    "ERC3009InvalidSignature": "invalid_signature",
    "ERC3009UsedAuthorization": "authorization_used",
    "ERC3009InvalidAuthorizationTime": "authorization_expired",
}


def hex0x(raw: bytes) -> str:
    return "0x" + raw.hex()


@dataclass(frozen=True)
class BatchTerms:
    """How x402's batch-settlement channels pay this gateway: into the BatchSettlement contract, claimable by the
    operator (the receiver authorizer, who also redeems VoucherEscrow), settled to the PayoutDistributor."""

    domain: Domain  # x402 Batch Settlement's EIP-712 domain (its contract): channel ids and vouchers
    collector: str  # the ERC-3009 deposit collector
    receiver: str
    receiver_authorizer: str
    withdraw_delay_s: int  # the least a channel's withdrawal delay may be: the time the operator has to claim

    def channel_id(self, config: BatchChannelConfig) -> bytes:
        return batch_channel_id(
            self.domain,
            payer=config.payer,
            payer_authorizer=config.payer_authorizer,
            receiver=config.receiver,
            receiver_authorizer=config.receiver_authorizer,
            token=config.token,
            withdraw_delay=config.withdraw_delay,
            salt=config.salt,
        )


@dataclass(frozen=True)
class Terms:
    """What this gateway is paid in and where: the chain, the token, the escrow, the exact-payment payee."""

    chain_id: int
    token: str
    token_domain: Domain
    escrow: str
    escrow_domain: Domain
    pay_to: str  # receives exact payments: the operator, who passes them on at settlement
    timeout_s: int
    settle_margin_s: int
    batch: BatchTerms
    failover_margin_bps: int = (
        0  # added to a route's cost in every quote, so a dearer spare can finish the job
    )

    @classmethod
    def of(
        cls, contracts: Contracts, *, timeout_s: int, settle_margin_s: int, failover_margin_bps: int = 0
    ) -> Terms:
        operator = to_checksum_address(contracts.deployment.roles["operator"])
        delay = int(contracts.deployment.params.get("withdraw_delay_s", MIN_WITHDRAW_DELAY_S))
        return cls(
            chain_id=contracts.chain.chain_id,
            token=contracts.token.address,
            token_domain=contracts.token.domain(),
            escrow=contracts.escrow.address,
            escrow_domain=contracts.escrow.domain(),
            pay_to=operator,
            timeout_s=timeout_s,
            settle_margin_s=settle_margin_s,
            batch=BatchTerms(
                domain=Domain(
                    BATCH_SETTLEMENT_DOMAIN_NAME,
                    DOMAIN_VERSION,
                    contracts.chain.chain_id,
                    contracts.batch.address,
                ),
                collector=contracts.batch_collector,
                receiver=contracts.distributor.address,
                receiver_authorizer=operator,
                withdraw_delay_s=min(max(delay, MIN_WITHDRAW_DELAY_S), MAX_WITHDRAW_DELAY_S),
            ),
            failover_margin_bps=failover_margin_bps,
        )

    @property
    def network(self) -> str:
        return network_of(self.chain_id)

    def with_margin(self, cost: int) -> int:
        """What a route costing ``cost`` is quoted: the cost and the failover margin, rounded up."""
        return cost + -(-cost * self.failover_margin_bps // BPS)

    def accepts(
        self,
        quote: int,
        *,
        route: list[dict[str, Any]],
        tokens: int,
        cost: int | None = None,
        batch_state: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """The requirements a 402 offers: a voucher on the escrow, an exact transfer of the quote, or a voucher on
        an x402 batch-settlement channel. Each says what the route costs (``routeCost``) and the failover margin in
        the quote above it (``failoverMarginBps``): the client authorizes the margin, and pays only what is
        metered. ``batch_state`` is a corrective 402's channel and voucher state, for the batch offer."""

        def offer(scheme: str, pay_to: str, extra: dict[str, Any]) -> dict[str, Any]:
            return requirement(
                scheme,
                chain_id=self.chain_id,
                asset=self.token,
                amount=quote,
                pay_to=pay_to,
                timeout_s=self.timeout_s,
                extra=extra,
            )

        voucher_extra = {
            "name": VOUCHER_ESCROW_DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "escrow": self.escrow,
            "tokens": tokens,
            "route": route,
        }
        exact_extra: dict[str, Any] = {"name": self.token_domain.name, "version": self.token_domain.version}
        batch_extra: dict[str, Any] = {
            "receiverAuthorizer": self.batch.receiver_authorizer,
            "withdrawDelay": self.batch.withdraw_delay_s,
            "name": self.token_domain.name,  # the token's domain: deposits are ERC-3009 authorizations
            "version": self.token_domain.version,
            "assetTransferMethod": "eip3009",
            "tokens": tokens,
            "route": route,
            **(batch_state or {}),
        }
        if cost is not None:
            for extra in (voucher_extra, exact_extra, batch_extra):
                extra.update(routeCost=str(cost), failoverMarginBps=self.failover_margin_bps)
        return [
            offer(VOUCHER, self.escrow, voucher_extra),
            offer(EXACT, self.pay_to, exact_extra),
            offer(BATCH, self.batch.receiver, batch_extra),
        ]


@dataclass(frozen=True)
class Reservation:
    """Money set aside for one job: reserved on a channel, or already transferred (exact)."""

    scheme: str
    payer: str | None
    quote: int
    channel_id: str | None = None
    voucher_amount: int | None = None
    tx_hash: str | None = None  # the exact transfer, or the batch deposit this payment carried
    chain_state: dict[str, Any] | None = None  # batch-settlement: the channel's on-chain state

    @property
    def acknowledges(self) -> int | None:
        """What a batch-settlement payer adds to its cumulative for this request: its whole quote, whatever is
        metered (see settlement.db.channels.RESERVE_ONE for why)."""
        return self.quote if self.scheme == BATCH else None


@dataclass(frozen=True)
class Settled:
    """The outcome of a job's payment, as PAYMENT-RESPONSE reports it."""

    reservation: Reservation
    charged: int
    refund: int
    channel_charged: int | None  # the channel's cumulative charge after this job


def _refuse_batch(row: Channel, payment: BatchPayment, quote: int, view: ChannelView) -> NoReturn:
    """Why a batch-settlement voucher was not accepted: another request on the channel runs, or it is not what the
    payer was told it was charged plus this quote. The second is x402's corrective 402: its requirement carries
    the channel's state and the newest voucher the gateway holds, signed by the payer, to resynchronise with."""
    if row.reserved:
        raise PaymentRejected(CHANNEL_BUSY, "another request on this channel is running; retry after it")
    if row.refunding is not None:
        raise PaymentRejected(CHANNEL_BUSY, "a refund of this channel is being made; pay again after it")
    state = {
        "channelState": {**view.as_json(row.id), "chargedCumulativeAmount": str(row.acknowledged)},
        "voucherState": {"signedMaxClaimable": str(row.voucher_amount)}
        | ({"signature": row.voucher_signature} if row.voucher_signature else {}),
    }
    raise PaymentRejected(
        CUMULATIVE_MISMATCH,
        f"the voucher is for {payment.amount}; this request needs exactly {row.acknowledged + quote} "
        f"(charged so far {row.acknowledged} + this quote {quote})",
        batch_state=state,
    )


# Builds a job's row for the reservation its payment will hold (the gate writes it with the reservation).
JobRow = Callable[["Reservation"], Job]


def _check_amount(amount: int, what: str) -> None:
    if amount > BIGINT_MAX:
        raise PaymentRejected("amount_out_of_range", f"{what} {amount} is above {BIGINT_MAX}")


class PaymentGate:
    def __init__(
        self,
        terms: Terms,
        watcher: ChainWatcher,
        contracts: Contracts,
        gateway: LocalAccount,
        sessions: async_sessionmaker[AsyncSession] | None = None,
    ) -> None:
        self.terms = terms
        self.watcher = watcher
        self.contracts = contracts
        self.gateway = gateway
        self.sessions = sessions
        self.paying: set[str] = set()  # jobs whose exact transfer this process is sending

    async def secure(self, payment: Payment, quote: int, job: JobRow) -> Reservation:
        """Secures ``quote`` for the job ``job`` builds (given the pending reservation), with whatever scheme
        ``payment`` is in, and writes the job's row with it; raises PaymentRejected or Unavailable, having
        written nothing that holds money."""
        assert self.sessions is not None
        if isinstance(payment, ExactPayment):
            return await self._secure_exact(payment, quote, job)
        if isinstance(payment, BatchPayment):
            return await self._secure_batch(payment, quote, job)
        await self.check_voucher(payment)
        pending = Reservation(VOUCHER, payment.payer, quote, channel_id=hex0x(payment.channel_id))
        async with self.sessions() as session, session.begin():
            return await self.reserve_voucher(session, payment, quote, job(pending))

    async def _secure_batch(self, payment: BatchPayment, quote: int, job: JobRow) -> Reservation:
        assert self.sessions is not None
        if payment.kind == "refund":
            raise PaymentRejected(
                "refund_elsewhere", "a refund is asked for at GET /v1/batch-settlement/refund"
            )
        await self.check_batch(payment)
        tx_hash = None
        if payment.deposit is not None:
            await self._precheck_batch(payment, quote)
            tx_hash = await self.deposit(payment)
        view = await self.batch_state(payment.channel_id, fresh=tx_hash is not None)
        if payment.amount > view.deposit and tx_hash is None:
            view = await self.batch_state(payment.channel_id, fresh=True)  # a deposit newer than the cache
        if view.exiting:
            raise PaymentRejected(
                "channel_exiting", f"channel {hex0x(payment.channel_id)} is being withdrawn"
            )
        if payment.amount > view.deposit:
            raise PaymentRejected(
                "insufficient_deposit",
                f"voucher for {payment.amount} exceeds the channel's balance of {view.deposit}",
                deposit=str(view.deposit),
            )
        pending = Reservation(BATCH, payment.payer, quote, channel_id=hex0x(payment.channel_id))
        async with self.sessions() as session, session.begin():
            reservation = await self.reserve_batch(session, payment, quote, job(pending), view)
        return replace(reservation, tx_hash=tx_hash)

    async def _precheck_batch(self, payment: BatchPayment, quote: int) -> None:
        """Before the gateway pays gas for a deposit: the voucher it comes with must be the one the channel's row
        takes (else the corrective 402, whose state lets the client sign the right one; a new channel's first
        voucher is the quote), and the deposit must bring the channel's balance up to it. A deposit that would
        pay for nothing is never sent."""
        assert self.sessions is not None
        deposit = payment.deposit
        assert deposit is not None
        async with self.sessions() as session:
            row = await session.get(Channel, hex0x(payment.channel_id))
        if row is None and payment.amount != quote:
            raise PaymentRejected(
                CUMULATIVE_MISMATCH,
                f"a new channel's first voucher is for this request's quote, {quote}, not {payment.amount}",
            )
        if row is not None and (
            row.reserved or row.refunding is not None or row.acknowledged + quote != payment.amount
        ):
            _refuse_batch(row, payment, quote, await self.batch_state(payment.channel_id))
        view = await self.batch_state(payment.channel_id)
        if view.deposit + deposit.amount < payment.amount:
            raise PaymentRejected(
                "insufficient_deposit",
                f"a deposit of {deposit.amount} on a balance of {view.deposit} does not cover the voucher's "
                f"{payment.amount}",
                deposit=str(view.deposit),
            )

    async def refund(self, payment: BatchPayment, *, ask: Callable[[str], object], wait_s: float) -> Channel:
        """A batch-settlement payer's cooperative refund: granted when nothing runs on its channel and its voucher
        is for what it was told it was charged (the channel then admits nothing until it is made), handed to the
        operator, who makes it (settlement.refunds), and waited for; returns the channel's row once made. A
        refund already asked for is waited for again. Raises Unavailable ``refund_pending`` after ``wait_s``:
        the refund is still made."""
        assert self.sessions is not None
        if payment.kind != "refund":
            raise InvalidRequest(
                "invalid_payment_header", "a refund is paid with a batch-settlement refund payload"
            )
        await self.check_batch(payment)
        if payment.refund_amount is not None:
            _check_amount(payment.refund_amount, "amount")
        channel = hex0x(payment.channel_id)
        # A refund blocks its channel until the operator makes it, and its voucher (the channel's newest, signed
        # deterministically) is no secret: it is granted only when there is something to give back, so a stranger
        # replaying it can force at most one refund per deposit of the payer's, into the payer's own hands.
        async with self.sessions() as session:
            known = await session.get(Channel, channel)
        if known is None or known.scheme != BATCH:
            raise PaymentRejected(REFUND_NO_BALANCE, f"this gateway holds no channel {channel}")
        view = await self.batch_state(payment.channel_id, fresh=True)
        if known.refunding is None and view.deposit <= max(known.charged + known.reserved, view.claimed):
            raise PaymentRejected(REFUND_NO_BALANCE, f"channel {channel} holds nothing that was not charged")
        values = {"channel": channel, "amount": payment.refund_amount or 0, "voucher": payment.amount,
                  "now": utcnow()}  # fmt: skip
        async with self.sessions() as session, session.begin():
            granted = await session.execute(channels.REQUEST_REFUND, values)
            row = await session.get(Channel, channel)
        if granted.rowcount != 1:  # type: ignore[attr-defined]
            assert row is not None
            if row.refunding is None:
                _refuse_batch(row, payment, 0, view)
            # Asked already: waited for again, without asking the operator twice.
        else:
            ask(channel)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            async with self.sessions() as session:
                row = await session.get(Channel, channel)
            assert row is not None
            if row.refunding is None:
                return row
        raise Unavailable(
            "refund_pending",
            f"the refund of {channel} is asked for and not made yet; it will be",
            retry_after_s=5,
        )

    async def _secure_exact(self, payment: ExactPayment, quote: int, job: JobRow) -> Reservation:
        """The transfer is recorded as pending with the job (``paying``), sent, and the job released to run once
        its receipt is in (see marketplace.gateway.jobs on what decides a transfer's fate)."""
        assert self.sessions is not None
        await self.check_exact(payment, quote)
        auth = payment.authorization
        from_block = await self.head_block()
        row = job(Reservation(EXACT, auth.sender, auth.value))
        status, row.status = row.status, JobStatus.PAYING
        async with self.sessions() as session, session.begin():
            session.add(row)
            await session.flush()
            record = self.record_exact(session, payment, row.id, from_block)
        # Held until the outcome is committed, so reconciliation never judges a send still on its way.
        self.paying.add(row.id)
        try:
            tx_hash = await self._send_exact(payment, record.id, row.id, from_block)
            async with self.sessions() as session, session.begin():
                # Conditional, as reconciliation's are: of two writers, one decides the payment's fate.
                settled = await session.execute(
                    update(Authorization)
                    .where(Authorization.id == record.id, Authorization.status == AuthorizationStatus.PENDING)
                    .values(status=AuthorizationStatus.SETTLED, tx_hash=tx_hash)
                )
                if settled.rowcount != 1:  # type: ignore[attr-defined]
                    raise Unavailable("settlement_pending", "this payment was settled elsewhere; see the job")
                await session.execute(
                    update(Job).where(Job.id == row.id, Job.status == JobStatus.PAYING).values(status=status)
                )
        finally:
            self.paying.discard(row.id)
        return Reservation(EXACT, auth.sender, auth.value, tx_hash=tx_hash)

    async def _send_exact(self, payment: ExactPayment, record_id: int, job_id: str, from_block: int) -> str:
        """Sends the transfer; returns the hash of the transfer that paid, which may be someone else's.

        Anyone holding the signed authorization may submit it, and the tokens still go to the gateway's payee: a
        send refused as ``authorization_used``, or any refusal, is checked against the chain, and the transfer
        it authorized, found there, pays for the job. A spent nonce alone does not: a payer can cancel it, or
        spend it on another authorization of its own. A send whose outcome is unknown, or a refusal the chain
        cannot be asked about, leaves the authorization pending and the job paying, for reconciliation; the
        client gets 503 ``settlement_pending``."""
        assert self.sessions is not None
        auth = payment.authorization
        try:
            return await self.send_exact(payment)
        except PaymentRejected as refused:
            try:
                fate = await self.exact_fate(auth.sender, auth.nonce, auth.value, from_block)
            except Exception as exc:  # whatever the endpoint answers: the payment's fate is not known
                raise Unavailable(
                    "settlement_pending", f"the transfer was refused and the chain cannot say why yet: {exc}"
                ) from exc
            if fate.paid_by is not None:
                log.info(
                    "job %s: its authorization was sent by someone else first (%s)", job_id, fate.paid_by
                )
                return fate.paid_by
            async with self.sessions() as session, session.begin():
                await session.execute(
                    update(Authorization)
                    .where(Authorization.id == record_id, Authorization.status == AuthorizationStatus.PENDING)
                    .values(status=AuthorizationStatus.FAILED)
                )
                await session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == JobStatus.PAYING)
                    .values(status=JobStatus.FAILED, error_code="settlement_failed")
                )
            if fate.spent:  # whatever the revert said (replayed on the block before, it may say nothing)
                raise PaymentRejected(
                    "authorization_used", f"nonce 0x{auth.nonce.hex()} was spent, but not on this payment"
                ) from refused
            raise refused

    def _common(self, payment: Payment) -> None:
        if payment.network != self.terms.network:
            raise PaymentRejected(
                "wrong_network", f"payment on {payment.network}; this gateway is paid on {self.terms.network}"
            )
        if payment.asset != self.terms.token:
            raise PaymentRejected(
                "wrong_asset", f"payment in {payment.asset}; this gateway takes {self.terms.token}"
            )

    def _check_window(self, valid_after: int, valid_before: int, what: str) -> None:
        """An ERC-3009 authorization's time window (an exact payment's, or a deposit's) by the wall clock, as the
        token checks it: open now, and open long enough for the transfer to land."""
        now = int(time.time())
        if valid_after > now:
            raise PaymentRejected("authorization_not_yet_valid", f"{what} is valid from {valid_after}")
        if valid_before < now + self.terms.settle_margin_s:
            raise PaymentRejected(
                "authorization_expired",
                f"{what} expires at {valid_before}: less than {self.terms.settle_margin_s} s to land",
            )

    # -- vouchers ------------------------------------------------------------------------------------------

    async def check_voucher(self, payment: VoucherPayment) -> ChannelView:
        """Everything about a voucher that needs no database: form, signer, chain state. Returns the channel."""
        self._common(payment)
        _check_amount(payment.amount, "maxClaimableAmount")
        channel = payment.channel_id
        payer = payment.payer
        try:
            signer = SignedVoucher(channel, payment.amount).fast_signer(
                payment.signature, self.terms.escrow_domain
            )
        except ValueError as exc:
            raise PaymentRejected("invalid_signature", f"the voucher signature is malformed: {exc}") from exc
        if signer != payer:
            raise PaymentRejected(
                "invalid_signature", f"voucher signed by {signer}, but channel {hex0x(channel)} is {payer}'s"
            )
        view = await chain_read(self.watcher.channel(channel))
        if payment.amount * 10 > view.deposit * 9 and not view.closed:
            # Near or past the deposit as last seen: a deposit newer than the last poll, or a channel about to be
            # spent, is read again rather than trusted.
            view = await chain_read(self.watcher.channel(channel, fresh=True))
        if view.closed:
            raise PaymentRejected("channel_closed", f"channel {hex0x(channel)} was closed by its payer")
        if view.exiting:
            raise PaymentRejected(
                "channel_exiting",
                f"channel {hex0x(channel)} is being withdrawn (from {view.withdrawable_at})",
            )
        if view.deposit == 0:
            raise PaymentRejected("unknown_channel", f"channel {hex0x(channel)} has no deposit on chain")
        if payment.amount > view.deposit:
            raise PaymentRejected(
                "insufficient_deposit",
                f"voucher for {payment.amount} exceeds the channel's deposit of {view.deposit}",
                deposit=str(view.deposit),
            )
        return view

    async def reserve_voucher(
        self, session: AsyncSession, payment: VoucherPayment, quote: int, job: Job
    ) -> Reservation:
        """Accepts the voucher and reserves ``quote`` on its channel for ``job``, whose new row it adds, or
        raises. Rows go in as their foreign keys need: the channel's, the job's, then the voucher's."""
        channel = hex0x(payment.channel_id)
        payer = payment.payer
        signature = hex0x(payment.signature)
        values = {"channel": channel, "amount": payment.amount, "quote": quote, "signature": signature,
                  "now": utcnow()}  # fmt: skip
        result = await session.execute(channels.RESERVE, values)
        if result.rowcount != 1:  # type: ignore[attr-defined]
            # Most requests pay on a channel the gateway knows: only a first voucher (or a refused one) pays
            # for making sure the row exists and trying again.
            dialect = session.get_bind().dialect.name
            await session.execute(channels.open_if_absent(dialect, channel=channel, payer=payer))
            result = await session.execute(channels.RESERVE, values)
        if result.rowcount != 1:  # type: ignore[attr-defined]
            row = (await session.execute(select(Channel).where(Channel.id == channel))).scalar_one()
            state = {
                "channelId": channel,
                "voucherAmount": str(row.voucher_amount),
                "charged": str(row.charged),
                "reserved": str(row.reserved),
                "minimum": str(max(row.voucher_amount + 1, row.charged + row.reserved + quote)),
            }
            if payment.amount <= row.voucher_amount:
                raise PaymentRejected(
                    "voucher_not_increasing",
                    f"voucher for {payment.amount} is not above the channel's newest ({row.voucher_amount})",
                    channel=state,
                )
            raise PaymentRejected(
                "voucher_too_low",
                f"voucher for {payment.amount} does not cover charged {row.charged} + reserved "
                f"{row.reserved} + this quote {quote}",
                channel=state,
            )
        session.add(job)
        return Reservation(VOUCHER, payer, quote, channel_id=channel, voucher_amount=payment.amount)

    # -- x402 batch-settlement -------------------------------------------------------------------------------

    async def check_batch(self, payment: BatchPayment) -> None:
        """Everything about a batch-settlement payment that needs neither chain nor database: the channel is this
        gateway's (receiver, authorizer, token, delay), its id is its config's, and its voucher is signed by the
        payer's authorizer."""
        self._common(payment)
        _check_amount(payment.amount, "maxClaimableAmount")
        config, terms = payment.config, self.terms.batch
        if config.receiver != terms.receiver:
            raise PaymentRejected(
                "wrong_receiver", f"the channel pays {config.receiver}, not {terms.receiver}"
            )
        if config.receiver_authorizer != terms.receiver_authorizer:
            raise PaymentRejected(
                "wrong_receiver_authorizer",
                f"the channel's receiver authorizer is {config.receiver_authorizer}, not {terms.receiver_authorizer}",
            )
        if config.token != self.terms.token:
            raise PaymentRejected(
                "wrong_asset", f"the channel holds {config.token}; this gateway takes {self.terms.token}"
            )
        # A shorter delay would let a payer leave before the operator's next claim; a longer one only helps it.
        if not terms.withdraw_delay_s <= config.withdraw_delay <= MAX_WITHDRAW_DELAY_S:
            raise PaymentRejected(
                "withdraw_delay_out_of_range",
                f"withdrawDelay {config.withdraw_delay} is outside [{terms.withdraw_delay_s}, {MAX_WITHDRAW_DELAY_S}]",
            )
        if terms.channel_id(config) != payment.channel_id:
            raise PaymentRejected(
                "channel_id_mismatch", "the voucher's channelId is not its channelConfig's hash"
            )
        try:
            signer = SignedVoucher(payment.channel_id, payment.amount).fast_signer(
                payment.signature, terms.domain
            )
        except ValueError as exc:
            raise PaymentRejected("invalid_signature", f"the voucher signature is malformed: {exc}") from exc
        if signer != config.signer():
            raise PaymentRejected(
                "invalid_signature",
                f"voucher signed by {signer}, but the channel's vouchers are {config.signer()}'s",
            )

    async def batch_state(self, channel_id: bytes, *, fresh: bool = False) -> ChannelView:
        return await chain_read(self.watcher.channel(channel_id, fresh=fresh, batch=True))

    async def deposit(self, payment: BatchPayment) -> str:
        """Submits the deposit a first payment carries, and waits for it; returns the transaction's hash. The
        tokens go into the payer's own channel, so a deposit that lands for a request that is then refused loses
        the payer nothing: it stays there to pay with, or to withdraw."""
        deposit = payment.deposit
        assert deposit is not None
        if deposit.amount == 0:
            raise PaymentRejected("invalid_deposit", "a deposit must be above zero")
        _check_amount(deposit.amount, "deposit.amount")
        self._check_window(deposit.valid_after, deposit.valid_before, "the deposit")
        batch = self.contracts.batch
        call = batch.deposit_call(
            config=payment.config.to_json(),
            amount=deposit.amount,
            collector=self.terms.batch.collector,
            collector_data=batch.erc3009_collector_data(
                valid_after=deposit.valid_after,
                valid_before=deposit.valid_before,
                salt=deposit.salt,
                signature=deposit.signature,
            ),
        )
        try:
            # Simulated first: a deposit that would revert (a bad signature, a short balance, a used nonce) costs
            # the gateway no gas.
            chain = self.contracts.chain
            await chain_read(asyncio.to_thread(chain.call, call, "deposit", sender=self.gateway.address))
            receipt = await asyncio.to_thread(chain.transact, self.gateway, call, "deposit")
        except TransactionReverted as exc:
            raise PaymentRejected("deposit_failed", f"the deposit would revert: {exc.error or exc}") from exc
        except ChainError as exc:
            raise Unavailable(
                "settlement_pending",
                f"the deposit's outcome is not known yet ({exc}); if it lands it stays in the channel",
            ) from exc
        return str(receipt["transactionHash"].to_0x_hex())

    async def reserve_batch(
        self, session: AsyncSession, payment: BatchPayment, quote: int, job: Job, view: ChannelView
    ) -> Reservation:
        """Accepts the voucher and reserves ``quote`` for ``job``, or raises: busy while another request on the
        channel runs (the scheme serialises a channel's requests), and a corrective 402 carrying the channel's
        state when the voucher is not what the payer was told it was charged plus this quote."""
        channel = hex0x(payment.channel_id)
        signature = hex0x(payment.signature)
        values = {"channel": channel, "amount": payment.amount, "quote": quote, "signature": signature,
                  "now": utcnow()}  # fmt: skip
        result = await session.execute(channels.RESERVE_ONE, values)
        if result.rowcount != 1:  # type: ignore[attr-defined]
            dialect = session.get_bind().dialect.name
            opened = channels.open_if_absent(
                dialect, channel=channel, payer=payment.payer, scheme=BATCH, config=payment.config.to_json()
            )
            await session.execute(opened)
            result = await session.execute(channels.RESERVE_ONE, values)
        if result.rowcount != 1:  # type: ignore[attr-defined]
            row = (await session.execute(select(Channel).where(Channel.id == channel))).scalar_one()
            _refuse_batch(row, payment, quote, view)
        session.add(job)
        return Reservation(
            BATCH,
            payment.payer,
            quote,
            channel_id=channel,
            voucher_amount=payment.amount,
            chain_state=view.as_json(channel),
        )

    # -- exact ---------------------------------------------------------------------------------------------

    async def check_exact(self, payment: ExactPayment, quote: int) -> None:
        """Checks an EIP-3009 authorization, and simulates it on chain; raises PaymentRejected."""
        self._common(payment)
        auth = payment.authorization
        _check_amount(auth.value, "value")
        if auth.recipient != self.terms.pay_to:
            raise PaymentRejected(
                "wrong_recipient", f"authorization pays {auth.recipient}, not {self.terms.pay_to}"
            )
        if auth.value < quote:
            raise PaymentRejected(
                "amount_too_low", f"authorization for {auth.value} is below the quote of {quote}"
            )
        self._check_window(auth.valid_after, auth.valid_before, "the authorization")
        try:
            signer = auth.signer(payment.signature, self.terms.token_domain)
        except ValueError as exc:
            raise PaymentRejected(
                "invalid_signature", f"the authorization signature is malformed: {exc}"
            ) from exc
        if signer != auth.sender:
            raise PaymentRejected(
                "invalid_signature", f"authorization from {auth.sender} was signed by {signer}"
            )
        token = self.contracts.token
        try:
            used = await chain_read(asyncio.to_thread(token.authorization_used, auth.sender, auth.nonce))
            if used:
                raise PaymentRejected("authorization_used", f"nonce {hex0x(auth.nonce)} was already used")
            await chain_read(
                asyncio.to_thread(
                    token.simulate_transfer_with_authorization,
                    self.gateway.address,
                    authorization=auth,
                    signature=payment.signature,
                )
            )
        except TransactionReverted as exc:
            code = _EXACT_REVERTS.get(exc.error_name or "", "settlement_failed")
            raise PaymentRejected(code, f"the transfer would revert: {exc.error or exc}") from exc

    def record_exact(
        self, session: AsyncSession, payment: ExactPayment, job_id: str, from_block: int
    ) -> Authorization:
        """Records the authorization as pending, before it is sent; (payer, nonce) is unique."""
        auth = payment.authorization
        row = Authorization(
            from_block=from_block,
            payer=auth.sender,
            nonce=hex0x(auth.nonce),
            value=auth.value,
            valid_before=auth.valid_before,
            status=AuthorizationStatus.PENDING,
            job_id=job_id,
        )
        session.add(row)
        return row

    async def send_exact(self, payment: ExactPayment) -> str:
        """Sends the transfer and waits for its receipt; returns the transaction hash. A revert is the payment's
        PaymentRejected; a send whose outcome is unknown (no receipt in time, the chain unreachable) is
        Unavailable ``settlement_pending``: the transfer may still land, see :meth:`exact_transfer`."""
        try:
            receipt = await asyncio.to_thread(
                self.contracts.token.transfer_with_authorization,
                self.gateway,
                authorization=payment.authorization,
                signature=payment.signature,
            )
        except TransactionReverted as exc:
            code = _EXACT_REVERTS.get(exc.error_name or "", "settlement_failed")
            raise PaymentRejected(code, f"the transfer reverted: {exc.error or exc}") from exc
        except ChainError as exc:
            raise Unavailable(
                "settlement_pending",
                f"the transfer's outcome is not known yet ({exc}); if it lands it is refunded in full",
            ) from exc
        return str(receipt["transactionHash"].to_0x_hex())

    async def head_block(self) -> int:
        return await chain_read(asyncio.to_thread(self.contracts.chain.block_number))

    async def exact_fate(
        self, payer: str, nonce: bytes, value: int, from_block: int | None
    ) -> AuthorizationFate:
        """What became of an authorization the gateway took (see PaymentToken.authorization_fate): paid to the
        payee, whoever sent it, or not. Raises ChainError when the chain cannot say."""
        token = self.contracts.token
        start = from_block if from_block is not None else 0
        return await asyncio.to_thread(
            token.authorization_fate, payer, nonce, to=self.terms.pay_to, value=value, from_block=start
        )

    # -- the end of a job ------------------------------------------------------------------------------------

    async def settle(
        self, session: AsyncSession, reservation: Reservation, job_id: str, charged: int
    ) -> Settled:
        """Turns a reservation into the job's charge (0 when the job failed). Paid jobs get one Charge row."""
        if reservation.scheme == NONE:
            return Settled(reservation, 0, 0, None)
        if not 0 <= charged <= reservation.quote:
            raise ValueError(f"charge {charged} outside the quote {reservation.quote}")
        assert reservation.payer is not None
        refund = reservation.quote - charged if reservation.scheme == EXACT else 0
        await session.execute(
            insert(Charge),
            {"job_id": job_id, "payer": reservation.payer, "scheme": reservation.scheme,
             "channel_id": reservation.channel_id, "quote": reservation.quote, "amount": charged, "refund": refund},
        )  # fmt: skip
        if reservation.scheme not in (VOUCHER, BATCH):
            return Settled(reservation, charged, refund, None)
        acknowledged = reservation.acknowledges
        result = await session.execute(
            channels.SETTLE,
            {
                "channel": reservation.channel_id,
                "quote": reservation.quote,
                "charged": charged,
                "acknowledged": charged if acknowledged is None else acknowledged,
                "now": utcnow(),
            },
        )
        return Settled(reservation, charged, refund, int(result.scalar_one()))
