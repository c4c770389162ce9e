"""The SDK's spending caps, against a fake gateway (httpx.MockTransport): what it refuses to sign, and that it
refuses before signing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from eth_account import Account

from marketplace.client import ChannelWallet, PayingTransport, SpendingCapExceeded, StrataClient
from marketplace.gateway.payments.x402 import (
    PAYMENT_REQUIRED,
    PAYMENT_RESPONSE,
    PAYMENT_SIGNATURE,
    VOUCHER,
    decode_header,
    encode_header,
    requirement,
)
from settlement.contracts import random_channel_id

ESCROW = "0x" + "ee" * 20
TOKEN = "0x" + "70" * 20
CHAIN_ID = 31337
GATEWAY = "http://gateway.test"


class FakeGateway:
    """Quotes ``quote`` for every request, records every voucher it is sent, and answers a paid request with
    ``on_paid`` (a response, given the voucher's amount)."""

    def __init__(self, quote: int, on_paid: Callable[[int], httpx.Response], channel: dict[str, Any]) -> None:
        self.quote = quote
        self.on_paid = on_paid
        self.channel = channel
        self.vouchers: list[int] = []

    def required(self) -> dict[str, Any]:
        offer = requirement(
            VOUCHER, chain_id=CHAIN_ID, asset=TOKEN, amount=self.quote, pay_to=ESCROW, timeout_s=60,
            extra={"escrow": ESCROW},
        )  # fmt: skip
        return {"x402Version": 2, "resource": {"url": GATEWAY}, "accepts": [offer]}

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path.startswith("/v1/channels/"):
            return httpx.Response(200, json=self.channel)
        header = request.headers.get(PAYMENT_SIGNATURE)
        if header is None:
            return self.refusal("payment_required", {})
        self.vouchers.append(int(decode_header(header)["payload"]["maxClaimableAmount"]))
        return self.on_paid(self.vouchers[-1])

    def refusal(self, code: str, details: dict[str, Any]) -> httpx.Response:
        body = {"error": {"code": code, "message": code, "details": details}}
        return httpx.Response(402, json=body, headers={PAYMENT_REQUIRED: encode_header(self.required())})


def _wallet(**options: Any) -> ChannelWallet:
    account = Account.create()
    channel = random_channel_id(account.address)
    return ChannelWallet(account, channel, escrow=ESCROW, chain_id=CHAIN_ID, deposit=10**12, **options)


def _ask(wallet: ChannelWallet, fake: FakeGateway) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = PayingTransport(wallet, GATEWAY, inner=httpx.MockTransport(fake.handle))
        async with httpx.AsyncClient(base_url=GATEWAY, transport=transport) as http:
            return await http.post("/v1/chat/completions", json={"model": "tiny", "messages": []})

    return asyncio.run(go())


def _settled(wallet: ChannelWallet, amount: int, cumulative: int, quote: int) -> httpx.Response:
    extra = {"status": "settled", "channelId": wallet.channel_hex, "cumulativeCharged": str(cumulative),
             "charged": str(amount), "quote": str(quote)}  # fmt: skip
    payment = {"success": True, "amount": str(amount), "extra": extra}
    return httpx.Response(200, json={"ok": True}, headers={PAYMENT_RESPONSE: encode_header(payment)})


CHANNEL = {"voucherAmount": "0", "charged": "0", "reserved": "0", "deposit": str(10**12)}


def test_a_forged_minimum_above_the_cap_is_refused_and_nothing_above_the_cap_is_signed() -> None:
    quote, charged = 1_000, 400
    wallet = _wallet()
    fake = FakeGateway(quote, lambda amount: _settled(wallet, 300, charged, quote), CHANNEL)
    assert _ask(wallet, fake).status_code == 200
    assert fake.vouchers == [quote] and wallet.charged == charged

    # Now the gateway asks for far more than the channel's acknowledged charge plus the quote.
    forged = {
        "channel": {"voucherAmount": str(quote), "charged": "999999", "reserved": "0", "minimum": "5000000"}
    }
    fake.on_paid = lambda amount: fake.refusal("voucher_too_low", forged)
    with pytest.raises(SpendingCapExceeded) as refused:
        _ask(wallet, fake)
    assert refused.value.code == "minimum_above_cap" and refused.value.asked == 5_000_000
    # Every voucher signed is at most what was acknowledged charged plus this request's quote.
    assert fake.vouchers == [quote, charged + quote]
    assert max(fake.vouchers) <= max(quote, charged + quote) and wallet.in_flight == 0
    # The refusal's figures were not taken: the wallet's view is still its own.
    assert (wallet.charged, wallet.highest) == (charged, charged + quote)


def test_a_quote_above_max_per_request_is_refused_before_anything_is_signed() -> None:
    wallet = _wallet(max_per_request=5_000)
    fake = FakeGateway(5_001, lambda amount: _settled(wallet, 1, 1, 5_001), CHANNEL)
    with pytest.raises(SpendingCapExceeded) as refused:
        _ask(wallet, fake)
    assert (refused.value.code, refused.value.asked, refused.value.cap) == ("quote_above_cap", 5_001, 5_000)
    assert fake.vouchers == [] and wallet.highest == 0


def test_the_default_cap_holds_without_options() -> None:
    wallet = _wallet()
    fake = FakeGateway(wallet.max_per_request + 1, lambda amount: _settled(wallet, 1, 1, 1), CHANNEL)
    with pytest.raises(SpendingCapExceeded):
        _ask(wallet, fake)
    assert fake.vouchers == []


def test_a_charge_reported_above_the_newest_voucher_is_not_believed() -> None:
    quote = 1_000
    wallet = _wallet()
    fake = FakeGateway(quote, lambda amount: _settled(wallet, 10**9, 10**9, quote), CHANNEL)
    assert _ask(wallet, fake).status_code == 200
    assert wallet.charged == quote  # clamped to the voucher the gateway held
    fake.on_paid = lambda amount: _settled(wallet, 1, quote + 1, quote)
    _ask(wallet, fake)
    assert fake.vouchers == [quote, 2 * quote]


def test_a_refusal_within_the_cap_is_re_signed_once() -> None:
    """An honest refusal (a voucher of this wallet's for a request still running got there first) is answered
    from the wallet's own figures, once."""
    quote = 1_000
    wallet = _wallet()
    wallet.sync(CHANNEL)
    wallet.highest, wallet.in_flight = 2_500, 1_000  # that other request, signed, taken and running
    state = {"channel": {"voucherAmount": "2500", "charged": "0", "reserved": "1000", "minimum": "2501"}}

    def on_paid(amount: int) -> httpx.Response:
        if len(fake.vouchers) == 1:
            return fake.refusal("voucher_not_increasing", state)
        return _settled(wallet, 10, 10, quote)

    fake = FakeGateway(quote, on_paid, CHANNEL)
    assert _ask(wallet, fake).status_code == 200
    # The first voucher already covered everything; the second is one unit above the newest, within the cap.
    assert fake.vouchers == [2_501, 2_502] and wallet.in_flight == 1_000


def test_the_client_refuses_through_its_own_api() -> None:
    wallet = _wallet(max_per_request=10)
    fake = FakeGateway(11, lambda amount: _settled(wallet, 1, 1, 11), CHANNEL)

    async def go() -> None:
        async with StrataClient(GATEWAY, wallet, transport=httpx.MockTransport(fake.handle)) as strata:
            await strata.chat("tiny", [{"role": "user", "content": "hi"}])

    with pytest.raises(SpendingCapExceeded):
        asyncio.run(go())
    assert fake.vouchers == []
