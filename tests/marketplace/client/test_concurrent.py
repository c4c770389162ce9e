"""Many requests at once on one wallet, against a live gateway with providers: vouchers reach the gateway in the
order they were signed, so none is refused."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from eth_account import Account

from marketplace.client import StrataClient
from marketplace.gateway.payments.x402 import PAYMENT_SIGNATURE
from settlement.deploy import ONE_TOKEN
from tests.marketplace.harness import (
    GatewayServer,
    Market,
    ProviderProcess,
    announce,
    channel_state,
    open_channel,
    wallet_for,
)

REQUESTS = 50

# What is tested is the client's ordering, not the database: one backend is enough.
on_sqlite = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


@on_sqlite
def test_fifty_concurrent_requests_on_one_wallet_are_all_served(
    start_gateway: Callable[..., GatewayServer], market: Market, providers: dict[str, ProviderProcess]
) -> None:
    # Room for every request at once: in the tokenizers' queue, and in the book (each provider process takes 64
    # sessions).
    gateway = start_gateway(tokenize_queue=REQUESTS)
    root = gateway.gateway.catalog.get("tiny").root
    for name in ("a", "b", "c"):
        announce(gateway.url, providers[name], root, capacity=REQUESTS)
    client = Account.create()  # an account of its own: the shared clients' channels are other tests'
    market.contracts.token.mint(market.admin, to=client.address, amount=50 * ONE_TOKEN)
    market.contracts.chain.w3.provider.make_request("anvil_setBalance", [client.address, hex(10**20)])  # type: ignore[arg-type]
    wallet = wallet_for(market, client, open_channel(market, client, 50 * ONE_TOKEN))
    refused: list[str] = []

    class Watching(httpx.AsyncHTTPTransport):
        """Notes every refused voucher: a 402 to a request that carried one."""

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            response = await super().handle_async_request(request)
            if response.status_code == 402 and PAYMENT_SIGNATURE in request.headers:
                await response.aread()
                refused.append(response.text)
            return response

    async def ask_all() -> list[httpx.Response]:
        async with StrataClient(gateway.url, wallet, transport=Watching()) as strata:

            async def one(i: int) -> httpx.Response:
                body: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": f"n{i}"}],
                                        "max_tokens": 4, "temperature": 0, "stream": i % 2 == 0}  # fmt: skip
                response = await strata.http.post("/v1/chat/completions", json=body)
                await response.aread()  # a stream read to its end: its last chunk says what it cost
                await response.aclose()
                return response

            return await asyncio.gather(*(one(i) for i in range(REQUESTS)))

    responses = asyncio.run(ask_all())
    failed = [r.text[:200] for r in responses if r.status_code != 200]
    assert failed == []
    assert refused == []
    state = channel_state(gateway.url, wallet.channel_id)
    assert state["reserved"] == "0" and wallet.in_flight == 0
    assert wallet.charged == int(state["charged"]) > 0
    assert wallet.highest == int(state["voucherAmount"])
