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
from dataclasses import dataclass
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from marketplace.gateway.chainwatch import BIGINT_MAX, ChainWatcher, ChannelView
from marketplace.gateway.errors import PaymentRejected, Unavailable, chain_read
from marketplace.gateway.payments.x402 import (
    EXACT,
    VOUCHER,
    ExactPayment,
    VoucherPayment,
    network_of,
    requirement,
)
from settlement.contracts import BPS, AuthorizationFate
from settlement.db import channels
from settlement.db.schema import Authorization, AuthorizationStatus, Channel, Charge, Job, Voucher, utcnow
from settlement.deploy import Contracts
from settlement.eip712 import DOMAIN_VERSION, VOUCHER_ESCROW_DOMAIN_NAME, Domain
from settlement.eip712 import Voucher as SignedVoucher
from settlement.errors import ChainError, TransactionReverted

log = logging.getLogger(__name__)


NONE = "none"  # the scheme of jobs served with payments off

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
    failover_margin_bps: int = (
        0  # added to a route's cost in every quote, so a dearer spare can finish the job
    )

    @classmethod
    def of(
        cls, contracts: Contracts, *, timeout_s: int, settle_margin_s: int, failover_margin_bps: int = 0
    ) -> Terms:
        return cls(
            chain_id=contracts.chain.chain_id,
            token=contracts.token.address,
            token_domain=contracts.token.domain(),
            escrow=contracts.escrow.address,
            escrow_domain=contracts.escrow.domain(),
            pay_to=to_checksum_address(contracts.deployment.roles["operator"]),
            timeout_s=timeout_s,
            settle_margin_s=settle_margin_s,
            failover_margin_bps=failover_margin_bps,
        )

    @property
    def network(self) -> str:
        return network_of(self.chain_id)

    def with_margin(self, cost: int) -> int:
        """What a route costing ``cost`` is quoted: the cost and the failover margin, rounded up."""
        return cost + -(-cost * self.failover_margin_bps // BPS)

    def accepts(
        self, quote: int, *, route: list[dict[str, Any]], tokens: int, cost: int | None = None
    ) -> list[dict[str, Any]]:
        """The requirements a 402 offers: a voucher on the escrow, or an exact transfer of the quote. Both say
        what the route costs (``routeCost``) and the failover margin in the quote above it (``failoverMarginBps``):
        the client authorizes the margin, and pays only what is metered."""

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
        if cost is not None:
            for extra in (voucher_extra, exact_extra):
                extra.update(routeCost=str(cost), failoverMarginBps=self.failover_margin_bps)
        return [offer(VOUCHER, self.escrow, voucher_extra), offer(EXACT, self.pay_to, exact_extra)]


@dataclass(frozen=True)
class Reservation:
    """Money set aside for one job: reserved on a channel, or already transferred (exact)."""

    scheme: str
    payer: str | None
    quote: int
    channel_id: str | None = None
    voucher_amount: int | None = None
    tx_hash: str | None = None


@dataclass(frozen=True)
class Settled:
    """The outcome of a job's payment, as PAYMENT-RESPONSE reports it."""

    reservation: Reservation
    charged: int
    refund: int
    channel_charged: int | None  # the channel's cumulative charge after this job


def _check_amount(amount: int, what: str) -> None:
    if amount > BIGINT_MAX:
        raise PaymentRejected("amount_out_of_range", f"{what} {amount} is above {BIGINT_MAX}")


class PaymentGate:
    def __init__(
        self, terms: Terms, watcher: ChainWatcher, contracts: Contracts, gateway: LocalAccount
    ) -> None:
        self.terms = terms
        self.watcher = watcher
        self.contracts = contracts
        self.gateway = gateway

    def _common(self, payment: VoucherPayment | ExactPayment) -> None:
        if payment.network != self.terms.network:
            raise PaymentRejected(
                "wrong_network", f"payment on {payment.network}; this gateway is paid on {self.terms.network}"
            )
        if payment.asset != self.terms.token:
            raise PaymentRejected(
                "wrong_asset", f"payment in {payment.asset}; this gateway takes {self.terms.token}"
            )

    # -- vouchers ------------------------------------------------------------------------------------------

    async def check_voucher(self, payment: VoucherPayment) -> ChannelView:
        """Everything about a voucher that needs no database: form, signer, chain state. Returns the channel."""
        self._common(payment)
        _check_amount(payment.amount, "maxClaimableAmount")
        channel = payment.channel_id
        payer = to_checksum_address(channel[:20])
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
        payer = to_checksum_address(payment.channel_id[:20])
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
        await session.execute(
            insert(Voucher),
            {"channel_id": channel, "amount": payment.amount, "signature": signature, "job_id": job.id},
        )
        return Reservation(VOUCHER, payer, quote, channel_id=channel, voucher_amount=payment.amount)

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
        now = int(time.time())
        if auth.valid_after > now:
            raise PaymentRejected(
                "authorization_not_yet_valid", f"authorization is valid from {auth.valid_after}"
            )
        if auth.valid_before < now + self.terms.settle_margin_s:
            raise PaymentRejected(
                "authorization_expired",
                f"authorization expires at {auth.valid_before}: less than {self.terms.settle_margin_s} s to settle",
            )
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
        channel_charged = None
        if reservation.scheme == VOUCHER:
            result = await session.execute(
                channels.SETTLE,
                {
                    "channel": reservation.channel_id,
                    "quote": reservation.quote,
                    "charged": charged,
                    "now": utcnow(),
                },
            )
            channel_charged = int(result.scalar_one())
        return Settled(reservation, charged, refund, channel_charged)
