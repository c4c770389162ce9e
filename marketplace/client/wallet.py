"""A payment channel's wallet: signs cumulative vouchers for the gateway's 402s (see :mod:`marketplace.client`
for how each voucher's amount is chosen), and deposits on chain."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address

from marketplace.gateway.payments.x402 import VOUCHER, X402_VERSION, encode_header, network_of
from settlement.eip712 import Voucher, voucher_domain


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


class ChannelWallet:
    """Signs cumulative vouchers for one channel and keeps count of what they promise."""

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
    ) -> None:
        if len(channel_id) != 32 or to_checksum_address(channel_id[:20]) != account.address:
            raise ValueError("the channel id must be 32 bytes and name this account as its payer")
        self.account = account
        self.channel_id = channel_id
        self.escrow = to_checksum_address(escrow)
        self.chain_id = chain_id
        self.domain = voucher_domain(chain_id, self.escrow)
        self.deposit = deposit  # None: unknown until the gateway or the chain says
        self.fund = fund  # deposits more on chain, returns the new total deposit
        self.top_up = top_up
        self.max_quote = max_quote
        self.highest = 0  # newest voucher signed
        self.charged = 0  # the channel's cumulative charge as last reported
        self.in_flight = 0  # quotes of this wallet's requests not yet settled
        self.stale = True  # the figures above need reading from the gateway before the next voucher
        self._lock = asyncio.Lock()

    @property
    def channel_hex(self) -> str:
        return "0x" + self.channel_id.hex()

    def accepts(self, requirement: dict[str, Any]) -> bool:
        extra = requirement.get("extra") or {}
        return (
            requirement.get("scheme") == VOUCHER
            and requirement.get("network") == network_of(self.chain_id)
            and str(requirement.get("payTo", "")).lower() == self.escrow.lower()
            and str(extra.get("escrow", requirement.get("payTo", ""))).lower() == self.escrow.lower()
        )

    def sync(self, state: dict[str, Any]) -> None:
        """Takes the channel's figures as the gateway reports them (``GET /v1/channels/{id}`` or a refusal)."""
        if "voucherAmount" in state:
            self.highest = max(self.highest, int(state["voucherAmount"]))
        if "charged" in state:
            self.charged = max(self.charged, int(state["charged"]))
        if "deposit" in state:
            self.deposit = int(state["deposit"])
        self.stale = False

    async def sign(self, quote: int, *, minimum: int = 0) -> int:
        """Signs the next voucher for a request quoted at ``quote``; returns its amount. Deposits if needed."""
        if self.max_quote is not None and quote > self.max_quote:
            raise PaymentFailed(f"the quote of {quote} is above this wallet's limit of {self.max_quote}")
        async with self._lock:
            amount = max(self.highest + 1, self.charged + self.in_flight + quote, minimum)
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

    def settled(self, quote: int, payment: dict[str, Any] | None) -> None:
        """A request quoted at ``quote`` ended; ``payment`` is its settled PAYMENT-RESPONSE, if one was seen."""
        self.in_flight = max(0, self.in_flight - quote)
        extra = (payment or {}).get("extra") or {}
        if extra.get("status") == "settled" and extra.get("channelId") == self.channel_hex:
            self.charged = max(self.charged, int(extra["cumulativeCharged"]))
        else:
            self.stale = True  # it ended without telling us what it cost


async def fund_channel(contracts: Any, account: LocalAccount, channel_id: bytes, amount: int) -> int:
    """Deposits ``amount`` into the channel on chain (approving the escrow first if needed); returns the new
    total deposit. ``contracts`` is a settlement.deploy.Contracts."""

    def deposit() -> int:
        if contracts.token.allowance(account.address, contracts.escrow.address) < amount:
            contracts.token.approve(account, spender=contracts.escrow.address, amount=amount)
        contracts.escrow.deposit(account, channel=channel_id, amount=amount)
        return int(contracts.escrow.channel(channel_id).deposit)

    return await asyncio.to_thread(deposit)
