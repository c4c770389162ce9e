"""A payment channel's wallet: signs cumulative vouchers for the gateway's 402s (see :mod:`marketplace.client`
for how each voucher's amount is chosen and capped), and deposits on chain."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address

from marketplace.gateway.payments.x402 import VOUCHER, X402_VERSION, encode_header, network_of
from settlement.contracts import payer_of
from settlement.deploy import ONE_TOKEN
from settlement.eip712 import Voucher, voucher_domain

log = logging.getLogger(__name__)

# The most one request may be quoted unless the caller says otherwise: 5 tokens (6 decimals) is far above what
# the demo market quotes a long answer (a few hundredths of a token), and small enough that a forged or mistaken
# quote cannot empty a typical channel in one request.
DEFAULT_MAX_PER_REQUEST = 5 * ONE_TOKEN


class PaymentFailed(Exception):
    """The gateway refused to be paid, or offered nothing this wallet can pay with."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class InsufficientDeposit(PaymentFailed):
    def __init__(self, needed: int, deposit: int) -> None:
        super().__init__(
            f"a voucher for {needed} exceeds the channel's deposit of {deposit}", "insufficient_deposit"
        )
        self.needed = needed
        self.deposit = deposit


class SpendingCapExceeded(PaymentFailed):
    """The wallet refused, before signing anything, to promise more than its caps allow.

    ``quote_above_cap``: a request's quote is above ``max_per_request``. ``minimum_above_cap``: the gateway asked
    for a voucher above what the wallet can account for (what it saw charged, what it has in flight, this quote);
    a gateway's word alone never raises what the wallet signs."""

    def __init__(self, message: str, code: str, *, asked: int, cap: int) -> None:
        super().__init__(message, code)
        self.asked = asked
        self.cap = cap


class ChannelWallet:
    """Signs cumulative vouchers for one channel and keeps count of what they promise.

    Use one wallet per channel in a process: its lock is the channel's, and it alone knows what it signed."""

    def __init__(
        self,
        account: LocalAccount,
        channel_id: bytes,
        *,
        escrow: str,
        chain_id: int,
        deposit: int | None = None,
        fund: Callable[[int], Awaitable[int]] | None = None,
        top_up: int = 0,
        max_quote: int | None = None,
        max_per_request: int = DEFAULT_MAX_PER_REQUEST,
    ) -> None:
        if len(channel_id) != 32 or payer_of(channel_id) != account.address:
            raise ValueError("the channel id must be 32 bytes and name this account as its payer")
        if max_per_request <= 0:
            raise ValueError("max_per_request must be positive (base units)")
        self.account = account
        self.channel_id = channel_id
        self.escrow = to_checksum_address(escrow)
        self.chain_id = chain_id
        self.domain = voucher_domain(chain_id, self.escrow)
        self.deposit = deposit  # None: unknown until the gateway or the chain says
        self.fund = fund  # deposits more on chain, returns the new total deposit
        self.top_up = top_up
        # max_quote is the older name of the same limit, kept for its callers: the tighter of the two applies.
        self.max_per_request = min(max_per_request, max_quote) if max_quote is not None else max_per_request
        self.max_quote = max_quote
        self.highest = 0  # newest voucher signed (base units)
        self.charged = 0  # the channel's cumulative charge as a PAYMENT-RESPONSE last acknowledged it
        self.in_flight = 0  # quotes of this wallet's requests sent and not yet ended
        # Quotes whose charge is unknown: requests that ended without saying what they cost, and what the first
        # read of the channel found reserved. Each may have been charged up to its quote, so vouchers cover them.
        self.unsettled = 0
        self.stale = True  # nothing known of the channel yet: read it once before the first voucher
        # Held from signing a voucher until the gateway has taken it, so that vouchers reach it in the order signed.
        self.lock = asyncio.Lock()

    @property
    def channel_hex(self) -> str:
        return "0x" + self.channel_id.hex()

    @property
    def accounted(self) -> int:
        """What every voucher must cover before its own quote: charged, unsettled and in flight."""
        return self.charged + self.unsettled + self.in_flight

    def ceiling(self, quote: int) -> int:
        """The most a voucher for a request quoted at ``quote`` may promise, and what it does promise.

        A voucher must be above the newest one (so ``highest + 1``, one base unit more than already promised) and
        cover what the channel owes, holds for requests in flight, and this quote."""
        return max(self.highest + 1, self.accounted + quote)

    def accepts(self, requirement: dict[str, Any]) -> bool:
        extra = requirement.get("extra") or {}
        return (
            requirement.get("scheme") == VOUCHER
            and requirement.get("network") == network_of(self.chain_id)
            and str(requirement.get("payTo", "")).lower() == self.escrow.lower()
            and str(extra.get("escrow", requirement.get("payTo", ""))).lower() == self.escrow.lower()
        )

    def sync(self, state: dict[str, Any]) -> None:
        """Takes the channel's figures as the gateway reports them (``GET /v1/channels/{id}``), once.

        A fresh wallet has no other way to learn what earlier processes signed on its channel, so its first read
        is believed; after that the gateway's figures never raise what the wallet signs (only its own vouchers and
        acknowledged charges do), so a later read changes nothing but the deposit it does not yet know."""
        if not self.stale:
            if self.deposit is None and "deposit" in state:
                self.deposit = int(state["deposit"])
            return
        if "voucherAmount" in state:
            self.highest = max(self.highest, int(state["voucherAmount"]))
        if "charged" in state:
            self.charged = max(self.charged, int(state["charged"]))
        if "reserved" in state:
            self.unsettled += int(state["reserved"])
        if "deposit" in state:
            self.deposit = int(state["deposit"])
        self.stale = False

    def check_quote(self, quote: int) -> None:
        if quote <= 0:
            raise PaymentFailed(f"the gateway quoted {quote}: not a price", "invalid_quote")
        if quote > self.max_per_request:
            raise SpendingCapExceeded(
                f"the quote of {quote} base units is above this wallet's limit of {self.max_per_request} per "
                "request (max_per_request)",
                "quote_above_cap",
                asked=quote,
                cap=self.max_per_request,
            )

    async def sign(self, quote: int, *, minimum: int = 0) -> int:
        """Signs the next voucher for a request quoted at ``quote``; returns its amount. Deposits if needed.

        ``minimum`` is what the gateway asked for: above :meth:`ceiling` it is refused (SpendingCapExceeded)."""
        async with self.lock:
            return await self.sign_locked(quote, minimum=minimum)

    async def sign_locked(self, quote: int, *, minimum: int = 0) -> int:
        """:meth:`sign`, for a caller already holding :attr:`lock`."""
        self.check_quote(quote)
        amount = self.ceiling(quote)
        if minimum > amount:
            raise SpendingCapExceeded(
                f"the gateway asks for a voucher of {minimum} on {self.channel_hex}, above what this wallet can "
                f"account for ({amount}: newest signed {self.highest}, charged {self.charged}, unsettled "
                f"{self.unsettled}, in flight {self.in_flight}, this quote {quote}); refusing to sign it. If another "
                "process pays from this channel, give each its own channel",
                "minimum_above_cap",
                asked=minimum,
                cap=amount,
            )
        if self.deposit is not None and amount > self.deposit:
            if self.fund is None or self.top_up <= 0:
                raise InsufficientDeposit(amount, self.deposit)
            self.deposit = await self.fund(amount - self.deposit + self.top_up)
        self.highest = amount
        self.in_flight += quote
        return amount

    def header(self, amount: int, requirement: dict[str, Any]) -> str:
        signature = Voucher(self.channel_id, amount).sign(self.account, self.domain)
        return encode_header(
            {
                "x402Version": X402_VERSION,
                "accepted": requirement,
                "payload": {
                    "channelId": self.channel_hex,
                    "maxClaimableAmount": str(amount),
                    "signature": "0x" + signature.hex(),
                },
            }
        )

    def refused(self, quote: int) -> None:
        """The gateway refused the voucher for a request quoted at ``quote``: nothing was reserved for it."""
        self.in_flight = max(0, self.in_flight - quote)

    def settled(self, quote: int, payment: dict[str, Any] | None) -> None:
        """A request quoted at ``quote`` ended; ``payment`` is its settled PAYMENT-RESPONSE, if one was seen.

        Without one the request may have been charged up to its quote, and it stays counted as unsettled."""
        self.in_flight = max(0, self.in_flight - quote)
        extra = (payment or {}).get("extra") or {}
        if extra.get("status") == "settled" and extra.get("channelId") == self.channel_hex:
            reported = int(extra["cumulativeCharged"])
            if reported > self.highest:
                # The gateway cannot charge above the newest voucher: a report above it is not believed.
                log.warning("channel %s: charge %d reported above the newest voucher %d", self.channel_hex,
                            reported, self.highest)  # fmt: skip
                reported = self.highest
            if reported >= self.charged + self.unsettled:
                self.unsettled = 0  # every unknown charge is inside this cumulative figure now
            self.charged = max(self.charged, reported)
        else:
            self.unsettled += quote


async def fund_channel(contracts: Any, account: LocalAccount, channel_id: bytes, amount: int) -> int:
    """Deposits ``amount`` into the channel on chain (approving the escrow first if needed); returns the new
    total deposit. ``contracts`` is a settlement.deploy.Contracts."""

    def deposit() -> int:
        if contracts.token.allowance(account.address, contracts.escrow.address) < amount:
            contracts.token.approve(account, spender=contracts.escrow.address, amount=amount)
        contracts.escrow.deposit(account, channel=channel_id, amount=amount)
        return int(contracts.escrow.channel(channel_id).deposit)

    return await asyncio.to_thread(deposit)
