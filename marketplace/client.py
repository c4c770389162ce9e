"""The client SDK: pays a Strata gateway's 402s with vouchers on a payment channel, automatically.

    wallet = ChannelWallet(account, channel_id, escrow=ESCROW, chain_id=31337)
    async with StrataClient("http://127.0.0.1:8000", wallet) as strata:
        answer = await strata.chat("tiny", [{"role": "user", "content": "hello"}], max_tokens=16)

or hand OpenAI's client an HTTP client that pays:

    openai = AsyncOpenAI(base_url=".../v1", api_key="unused", http_client=strata.http)

How a voucher's amount is chosen. A channel's vouchers are cumulative: each one promises the channel's total so
far, and the gateway takes one only if it is above the newest it accepted and covers everything charged or
reserved on the channel plus the new quote. The wallet signs

    max(newest signed + 1, charged + quotes in flight + this quote)

where ``charged`` is the channel's cumulative charge as the gateway last reported it (``PAYMENT-RESPONSE``, or
the ``payment`` field of a stream's last chunk). Because charges are metered and often below the quote, this
keeps the signed total close to what was really spent, not to the sum of quotes. When the wallet's view is
stale (a stream it did not read to the end, another process using the channel) the gateway's refusal carries
the channel's real figures, and the wallet re-signs once from them.

Deposits: a voucher above the channel's deposit is refused. Given ``fund`` (an on-chain deposit, see
:func:`fund_channel`) and ``top_up``, the wallet deposits ``top_up`` more whenever a voucher would exceed the
deposit; without them it raises :class:`InsufficientDeposit` before sending anything.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address

from marketplace.payments.x402 import (
    PAYMENT_REQUIRED,
    PAYMENT_RESPONSE,
    PAYMENT_SIGNATURE,
    VOUCHER,
    X402_VERSION,
    decode_header,
    encode_header,
    network_of,
)
from settlement.eip712 import Voucher, voucher_domain

_RESIGN = {"voucher_not_increasing", "voucher_too_low", "insufficient_deposit"}


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


class PayingTransport(httpx.AsyncBaseTransport):
    """An httpx transport that answers a 402 by paying with ``wallet`` and retrying once."""

    def __init__(
        self,
        wallet: ChannelWallet,
        gateway_url: str,
        inner: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.wallet = wallet
        self.gateway_url = gateway_url.rstrip("/")
        self.inner = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        response = await self.inner.handle_async_request(request)
        if response.status_code != 402 or PAYMENT_SIGNATURE in request.headers:
            return response
        await response.aread()
        requirement = self._requirement(response)
        quote = int(requirement["amount"])
        if self.wallet.stale:
            await self._resync()
        minimum = 0
        for attempt in range(2):
            amount = await self.wallet.sign(quote, minimum=minimum)
            paid = await self._send_paid(request, self.wallet.header(amount, requirement))
            if paid.status_code != 402:
                return self._observed(paid, quote, request)
            self.wallet.settled(quote, None)
            await paid.aread()
            error = _error(paid)
            if attempt == 0 and error.get("code") in _RESIGN:
                state = (error.get("details") or {}).get("channel")
                if state:
                    self.wallet.sync(state)
                    minimum = int(state.get("minimum", 0))
                else:
                    await self._resync()
                requirement = self._requirement(paid)
                quote = int(requirement["amount"])
                continue
            return paid
        raise AssertionError("unreachable")

    def _requirement(self, response: httpx.Response) -> dict[str, Any]:
        header = response.headers.get(PAYMENT_REQUIRED)
        if header is None:
            raise PaymentFailed("a 402 without a PAYMENT-REQUIRED header")
        required = decode_header(header)
        for requirement in required.get("accepts", []):
            if isinstance(requirement, dict) and self.wallet.accepts(requirement):
                return requirement
        raise PaymentFailed(
            f"the gateway offers no voucher payment on {self.wallet.escrow}", "no_requirement"
        )

    async def _send_paid(self, request: httpx.Request, header: str) -> httpx.Response:
        headers = httpx.Headers(request.headers)
        headers[PAYMENT_SIGNATURE] = header
        retry = httpx.Request(
            request.method,
            request.url,
            headers=headers,
            content=request.content,
            extensions=request.extensions,
        )
        return await self.inner.handle_async_request(retry)

    async def _resync(self) -> None:
        url = httpx.URL(f"{self.gateway_url}/v1/channels/{self.wallet.channel_hex}")
        response = await self.inner.handle_async_request(httpx.Request("GET", url))
        await response.aread()
        if response.status_code == 200:
            self.wallet.sync(json.loads(response.content))
        elif response.status_code == 404:
            self.wallet.sync({"deposit": 0})
        else:
            raise PaymentFailed(f"reading the channel failed: HTTP {response.status_code}")

    def _observed(self, response: httpx.Response, quote: int, request: httpx.Request) -> httpx.Response:
        header = response.headers.get(PAYMENT_RESPONSE)
        payment = decode_header(header) if header else None
        if payment is not None and (payment.get("extra") or {}).get("status") == "settled":
            self.wallet.settled(quote, payment)
            return response
        # A stream: its last chunk says what it cost.
        stream = _WatchedStream(response.stream, lambda found: self.wallet.settled(quote, found))
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=stream,
            extensions=response.extensions,
            request=request,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


class _WatchedStream(httpx.AsyncByteStream):
    """Passes an SSE stream through, and reports the ``payment`` of its last chunk (None if it never came)."""

    def __init__(self, inner: Any, on_end: Callable[[dict[str, Any] | None], None]) -> None:
        self.inner = inner
        self.on_end = on_end
        self.payment: dict[str, Any] | None = None
        self._pending = b""
        self._reported = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            self._scan(chunk)
            yield chunk

    def _scan(self, chunk: bytes) -> None:
        self._pending += chunk
        *events, self._pending = self._pending.split(b"\n\n")
        for event in events:
            if b'"payment"' not in event:
                continue
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    data = json.loads(line[5:])
                    if isinstance(data, dict) and isinstance(data.get("payment"), dict):
                        self.payment = data["payment"]

    async def aclose(self) -> None:
        if not self._reported:
            self._reported = True
            self.on_end(self.payment)
        await self.inner.aclose()


def _error(response: httpx.Response) -> dict[str, Any]:
    try:
        body = json.loads(response.content)
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


class StrataClient:
    """A gateway client that pays per request from a channel. ``http`` is an httpx client that pays 402s."""

    def __init__(self, gateway_url: str, wallet: ChannelWallet, *, timeout_s: float = 300.0) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self.wallet = wallet
        self.http = httpx.AsyncClient(
            base_url=self.gateway_url, transport=PayingTransport(wallet, self.gateway_url), timeout=timeout_s
        )

    async def __aenter__(self) -> StrataClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.http.aclose()

    async def channel(self) -> dict[str, Any]:
        response = await self.http.get(f"/v1/channels/{self.wallet.channel_hex}")
        _raise_for_error(response)
        state: dict[str, Any] = response.json()
        self.wallet.sync(state)
        return state

    async def chat(self, model: str, messages: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
        response = await self.http.post(
            "/v1/chat/completions", json={"model": model, "messages": messages, **options}
        )
        _raise_for_error(response)
        answer: dict[str, Any] = response.json()
        return answer

    async def stream_chat(
        self, model: str, messages: list[dict[str, Any]], **options: Any
    ) -> AsyncIterator[str]:
        """Yields the answer's text as it is generated."""
        body = {"model": model, "messages": messages, **options, "stream": True}
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                _raise_for_error(response)
            async for chunk in stream_chunks(response):
                for choice in chunk.get("choices", []):
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text


async def stream_chunks(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON chunks of a streamed answer (SSE ``data:`` lines); an error chunk raises PaymentFailed.

    The last chunk before ``[DONE]`` carries the settled ``payment``."""
    async for line in response.aiter_lines():
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        chunk: dict[str, Any] = json.loads(line[5:])
        if "error" in chunk:
            raise PaymentFailed(chunk["error"].get("message", "the job failed"), chunk["error"].get("code"))
        yield chunk


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    error = _error(response)
    raise PaymentFailed(
        f"HTTP {response.status_code}: {error.get('message', response.text[:200])}", error.get("code")
    )


async def fund_channel(contracts: Any, account: LocalAccount, channel_id: bytes, amount: int) -> int:
    """Deposits ``amount`` into the channel on chain (approving the escrow first if needed); returns the new
    total deposit. ``contracts`` is a settlement.deploy.Contracts."""

    def deposit() -> int:
        if contracts.token.allowance(account.address, contracts.escrow.address) < amount:
            contracts.token.approve(account, spender=contracts.escrow.address, amount=amount)
        contracts.escrow.deposit(account, channel=channel_id, amount=amount)
        return int(contracts.escrow.channel(channel_id).deposit)

    return await asyncio.to_thread(deposit)
