"""The gateway end to end: a real anvil, real provider processes, real payments, on SQLite and PostgreSQL.

Every refused request is checked to have changed nothing: neither the channel's figures at the gateway nor
any balance on chain.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import select

from marketplace.client import ChannelWallet, InsufficientDeposit, fund_channel
from marketplace.gateway.catalog import load_model
from marketplace.gateway.payments.x402 import PAYMENT_REQUIRED, decode_header
from marketplace.provider.announce import DEFAULT_RETENTION_S, Announcer, Offer
from settlement.db.schema import Authorization, Channel, Charge, Hop, Job, Receipt
from settlement.deploy import ONE_TOKEN
from settlement.eip712 import Domain, Heartbeat, JobRead, TransferAuthorization
from tests.marketplace.harness import (
    PRICE,
    WITHDRAW_DELAY_S,
    GatewayServer,
    Market,
    ProviderProcess,
    RpcProxy,
    announce,
    chain_clock_moved,
    channel_state,
    chat_body,
    exact_header,
    open_channel,
    post,
    requirement,
    rows,
    settled,
    strata_client,
    voucher_header,
    wait_until,
    wallet_for,
    withdraw,
)

CHAT = "/v1/chat/completions"
LAYERS = 6
PER_TOKEN = LAYERS * PRICE // 1_000_000  # every hop prices a layer at one base unit per token


def prompt_tokens(model_dir: Path, content: str) -> int:
    return len(load_model(model_dir).encode_chat([{"role": "user", "content": content}]))


def token_domain(market: Market) -> Domain:
    return market.contracts.token.domain()


def balances(market: Market, *accounts: str) -> dict[str, int]:
    return {account: market.contracts.token.balance_of(account) for account in accounts}


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


# -- paying ------------------------------------------------------------------------------------------------


def test_unpaid_request_gets_a_quote_for_the_cheapest_route(
    gateway: GatewayServer, market: Market, model_dir: Path, providers: dict[str, ProviderProcess]
) -> None:
    response = post(gateway.url, CHAT, chat_body("quote me", max_tokens=10))
    assert response.status_code == 402
    assert error_code(response) == "payment_required"
    required = decode_header(response.headers[PAYMENT_REQUIRED])
    assert required["x402Version"] == 2
    assert required["resource"]["url"] == gateway.url + CHAT
    cost = (prompt_tokens(model_dir, "quote me") + 10) * PER_TOKEN
    quote = cost + -(-cost // 10)  # and the default failover margin of 10%, rounded up
    voucher, exact, batch = required["accepts"]
    assert (voucher["scheme"], exact["scheme"], batch["scheme"]) == ("voucher", "exact", "batch-settlement")
    for offer in (voucher, exact, batch):
        assert offer["network"] == "eip155:31337"
        assert offer["asset"] == market.contracts.token.address
        assert offer["amount"] == str(quote)
        assert (offer["extra"]["routeCost"], offer["extra"]["failoverMarginBps"]) == (str(cost), 1_000)
    assert voucher["payTo"] == voucher["extra"]["escrow"] == market.contracts.escrow.address
    assert exact["payTo"] == market.operator.address
    assert (exact["extra"]["name"], exact["extra"]["version"]) == ("Strata USD", "1")
    # Price-time priority: the backup serves B's span at B's price but was posted later.
    route = [hop["provider"] for hop in voucher["extra"]["route"]]
    assert route == [providers[name].account.address for name in ("a", "b", "c")]


def test_paid_chat_is_charged_its_verified_receipts(
    gateway: GatewayServer, market: Market, model_dir: Path, providers: dict[str, ProviderProcess]
) -> None:
    client = market.clients[0]
    channel = open_channel(market, client, 10 * ONE_TOKEN)
    first = post(gateway.url, CHAT, chat_body("pay me", max_tokens=12))
    offer = requirement(first, "voucher")
    quote = int(offer["amount"])

    response = post(
        gateway.url, CHAT, chat_body("pay me", max_tokens=12), voucher_header(client, channel, quote, offer)
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    usage = answer["usage"]
    charged = (usage["prompt_tokens"] + usage["completion_tokens"] - 1) * PER_TOKEN
    payment = settled(response)
    assert payment["success"] is True and payment["payer"] == client.address
    assert payment["amount"] == str(charged) and charged <= quote
    assert payment["extra"]["cumulativeCharged"] == str(charged)
    assert payment["extra"]["voucherAmount"] == str(quote)
    state = channel_state(gateway.url, channel)
    assert (state["charged"], state["reserved"], state["voucherAmount"]) == (str(charged), "0", str(quote))

    job_id = "0x" + answer["id"].removeprefix("chatcmpl-")
    (job,) = rows(gateway, select(Job).where(Job.id == job_id))
    assert (job.status, job.charged, job.quote) == ("completed", charged, quote)
    hops = rows(gateway, select(Hop).where(Hop.job_id == job_id).order_by(Hop.position))
    assert [h.provider for h in hops] == [providers[n].account.address for n in ("a", "b", "c")]
    assert all(h.status == "billed" for h in hops)
    receipts = rows(gateway, select(Receipt).where(Receipt.job_id == job_id))
    assert len(receipts) == 3 and all(r.verified for r in receipts)
    assert sum(r.amount for r in receipts) == charged
    (charge,) = rows(gateway, select(Charge).where(Charge.job_id == job_id))
    assert (charge.amount, charge.quote, charge.refund) == (charged, quote, 0)

    # The next voucher must cover what is charged plus the next quote, and be above the last one.
    again = post(
        gateway.url,
        CHAT,
        chat_body("pay me", max_tokens=12),
        voucher_header(client, channel, charged + quote, offer),
    )
    assert again.status_code == 200, again.text
    assert channel_state(gateway.url, channel)["charged"] == str(2 * charged)


def test_sdk_and_openai_client_stream_what_a_whole_answer_says(
    gateway: GatewayServer, market: Market
) -> None:
    from openai import AsyncOpenAI

    client = market.clients[2]
    wallet = wallet_for(market, client, open_channel(market, client, 10 * ONE_TOKEN))
    messages = [{"role": "user", "content": "stream this"}]

    async def ask() -> tuple[dict[str, Any], list[Any], str]:
        async with strata_client(gateway.url, wallet) as strata:
            whole = await strata.chat("tiny", messages, max_tokens=12, temperature=0)
            openai = AsyncOpenAI(base_url=gateway.url + "/v1", api_key="unused", http_client=strata.http)
            stream = await openai.chat.completions.create(
                model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
            chunks = [chunk async for chunk in stream]
            sdk_text = "".join(
                [text async for text in strata.stream_chat("tiny", messages, max_tokens=12, temperature=0)]
            )
            return whole, chunks, sdk_text

    whole, chunks, sdk_text = asyncio.run(ask())
    text = whole["choices"][0]["message"]["content"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text == sdk_text
    finish = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finish.choices[0].finish_reason == whole["choices"][0]["finish_reason"]
    payment = finish.payment  # type: ignore[attr-defined]
    assert payment["extra"]["status"] == "settled"
    assert chunks[-1].usage.completion_tokens == whole["usage"]["completion_tokens"]
    # The wallet followed every charge, streamed ones included, and holds nothing in flight.
    state = channel_state(gateway.url, wallet.channel_id)
    assert wallet.charged == int(state["charged"]) == 3 * int(payment["amount"])
    assert wallet.in_flight == 0 and state["reserved"] == "0"


def test_x402_exact_client_pays_the_quote_and_is_owed_the_rest(
    gateway: GatewayServer, market: Market
) -> None:
    from x402 import x402Client
    from x402.http.clients import x402HttpxClient
    from x402.mechanisms.evm.exact import register_exact_evm_client
    from x402.mechanisms.evm.signers import EthAccountSigner

    client = market.clients[1]
    payer = x402Client()
    register_exact_evm_client(payer, EthAccountSigner(client))
    payer.set_spend_controls(
        {"allowed_assets": [{"network": "eip155:31337", "asset": market.contracts.token.address}]}
    )
    before = balances(market, client.address, market.operator.address)

    async def ask() -> httpx.Response:
        async with x402HttpxClient(payer, timeout=60) as http:
            return await http.post(gateway.url + CHAT, json=chat_body("exact", max_tokens=6))

    response = asyncio.run(ask())
    assert response.status_code == 200, response.text
    payment = settled(response)
    quote, charged = int(payment["extra"]["quote"]), int(payment["amount"])
    assert payment["extra"]["scheme"] == "exact" and payment["transaction"].startswith("0x")
    assert int(payment["extra"]["refund"]) == quote - charged and 0 < charged <= quote
    after = balances(market, client.address, market.operator.address)
    assert after[client.address] == before[client.address] - quote
    assert after[market.operator.address] == before[market.operator.address] + quote
    job_id = payment["extra"]["jobId"]
    (charge,) = rows(gateway, select(Charge).where(Charge.job_id == job_id))
    assert (charge.scheme, charge.amount, charge.refund) == ("exact", charged, quote - charged)
    (authorization,) = rows(gateway, select(Authorization).where(Authorization.job_id == job_id))
    assert authorization.status == "settled" and authorization.tx_hash == payment["transaction"]


def _sent_first(
    gateway: GatewayServer, market: Market, body: dict[str, Any], header: str, first: TransferAuthorization,
    signer: LocalAccount,
) -> tuple[httpx.Response, str]:  # fmt: skip
    """Posts a paid request and, once the gateway's transfer is in the mempool, has ``first`` (signed by
    ``signer``) mined ahead of it in the same block, as a front-runner with a higher tip would."""
    chain, sender = market.contracts.chain, market.gateway_key.address
    sent = chain.nonce(sender, pending=True)
    chain.w3.provider.make_request("evm_setAutomine", [False])
    try:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(post, gateway.url, CHAT, body, header)
            deadline = time.monotonic() + 60
            while chain.nonce(sender, pending=True) == sent:  # the gateway's transfer is in the mempool
                assert time.monotonic() < deadline and not answer.done(), (
                    "the gateway never sent its transfer"
                )
                time.sleep(0.02)
            call = market.contracts.token.transfer_with_authorization_call(
                authorization=first, signature=first.sign(signer, market.contracts.token.domain())
            )
            front = call.build_transaction(
                {"from": market.admin.address, "nonce": chain.nonce(market.admin.address, pending=True),
                 "gas": 200_000, "maxFeePerGas": 10**12, "maxPriorityFeePerGas": 10**11}
            )  # fmt: skip
            front_hash = chain.w3.eth.send_raw_transaction(
                market.admin.sign_transaction(front).raw_transaction
            )
            chain.w3.provider.make_request("evm_mine", [])
            chain.w3.provider.make_request("evm_setAutomine", [True])
            return answer.result(timeout=120), front_hash.to_0x_hex()
    finally:
        chain.w3.provider.make_request("evm_setAutomine", [True])


def test_an_exact_transfer_someone_else_sends_first_still_pays_for_the_job(
    gateway: GatewayServer, market: Market
) -> None:
    """Anyone holding an authorization may submit it. A third party who sees the gateway's transfer pending and
    sends the same authorization first, with a higher tip, makes the gateway's own transfer revert as used; the
    tokens still reached the payee, so the job runs, paid by the transfer that landed, and nothing is lost."""
    client = market.clients[1]
    body = chat_body("front-run", max_tokens=4)
    offer = requirement(post(gateway.url, CHAT, body), "exact")
    authorization = TransferAuthorization(
        client.address, offer["payTo"], int(offer["amount"]), 0, int(time.time()) + 300, os.urandom(32)
    )
    domain = market.contracts.token.domain()
    header = exact_header(
        client, offer, domain, valid_before=authorization.valid_before, nonce=authorization.nonce
    )
    before = balances(market, client.address, market.operator.address)
    response, front_hash = _sent_first(gateway, market, body, header, authorization, client)

    assert response.status_code == 200, response.text
    payment = settled(response)
    assert payment["transaction"] == front_hash
    (authorization_row,) = rows(
        gateway, select(Authorization).where(Authorization.job_id == payment["extra"]["jobId"])
    )
    assert (authorization_row.status, authorization_row.tx_hash) == ("settled", front_hash)
    after = balances(market, client.address, market.operator.address)
    quote = int(payment["extra"]["quote"])
    assert after[client.address] == before[client.address] - quote  # paid once
    assert after[market.operator.address] == before[market.operator.address] + quote
    assert int(payment["extra"]["refund"]) == quote - int(payment["amount"])


def test_a_payer_who_spends_its_own_nonce_first_is_not_served(gateway: GatewayServer, market: Market) -> None:
    """Nonces are the payer's, not the authorization's: the payer sees the gateway's transfer pending and spends
    the same nonce first on an authorization of one unit to itself. The gateway's transfer reverts as used, and
    an AuthorizationUsed log for that nonce is on chain, but no transfer to the payee: nothing was paid, so
    nothing is served and nothing is owed back."""
    client = market.clients[1]
    body = chat_body("free lunch", max_tokens=4)
    offer = requirement(post(gateway.url, CHAT, body), "exact")
    nonce, valid_before = os.urandom(32), int(time.time()) + 300
    domain = market.contracts.token.domain()
    header = exact_header(client, offer, domain, valid_before=valid_before, nonce=nonce)
    to_itself = TransferAuthorization(client.address, client.address, 1, 0, valid_before, nonce)
    before = balances(market, client.address, market.operator.address)
    response, _ = _sent_first(gateway, market, body, header, to_itself, client)

    assert (response.status_code, error_code(response)) == (402, "authorization_used"), response.text
    assert balances(market, client.address, market.operator.address) == before
    (job,) = rows(
        gateway, select(Job).where(Job.payer == client.address, Job.error_code == "settlement_failed")
    )
    assert job.status == "failed"
    assert rows(gateway, select(Charge).where(Charge.job_id == job.id)) == []


def test_an_exact_transfer_that_lands_after_the_gateway_gave_up_is_refunded_in_full(
    start_gateway: Callable[..., GatewayServer], market: Market
) -> None:
    """No block for longer than the gateway waits for a receipt: the client gets 503 ``settlement_pending`` and no
    job runs. The transfer lands later; the gateway's next pass over unknown payments finds it on chain and owes
    the whole amount back, which the next epoch pays."""
    client, chain = market.clients[2], market.contracts.chain
    server = start_gateway(receipt_timeout_s=2, payment_reconcile_s=0.3)
    body = chat_body("late", max_tokens=4)
    offer = requirement(post(server.url, CHAT, body), "exact")
    header = exact_header(client, offer, market.contracts.token.domain())
    before = balances(market, client.address, market.operator.address)
    chain.w3.provider.make_request("evm_setAutomine", [False])
    try:
        response = post(server.url, CHAT, body, header)
    finally:
        chain.w3.provider.make_request("evm_setAutomine", [True])
    assert (response.status_code, error_code(response)) == (503, "settlement_pending"), response.text
    assert int(response.headers["Retry-After"]) > 0
    (job,) = rows(server, select(Job).where(Job.payer == client.address, Job.scheme == "exact"))
    assert job.status == "paying"

    chain.w3.provider.make_request("evm_mine", [])  # the transfer lands after all
    wait_until(lambda: rows(server, select(Job).where(Job.id == job.id))[0].status == "failed", 30)
    (late,) = rows(server, select(Job).where(Job.id == job.id))
    (charge,) = rows(server, select(Charge).where(Charge.job_id == job.id))
    (authorization,) = rows(server, select(Authorization).where(Authorization.job_id == job.id))
    after = balances(market, client.address, market.operator.address)
    assert after[client.address] == before[client.address] - charge.quote  # it did pay
    assert late.error_code == "payment_unconfirmed"
    assert (charge.amount, charge.refund) == (0, charge.quote)  # and is owed all of it back
    assert authorization.status == "settled" and authorization.tx_hash is not None


@pytest.fixture
def rpc_proxy(market: Market) -> Iterator[RpcProxy]:
    proxy = RpcProxy(market.anvil.url)
    try:
        yield proxy
    finally:
        proxy.close()


def test_with_the_chain_gone_payments_get_503_chain_unavailable_and_nothing_is_charged(
    start_gateway: Callable[..., GatewayServer], market: Market, rpc_proxy: RpcProxy
) -> None:
    """The gateway's RPC endpoint goes away mid-traffic. Once its cached view of a channel is older than the bound
    (1 s here), a paid request is answered 503 chain_unavailable with Retry-After: not served blind against a
    deposit that may have been withdrawn since. Exact payments, which need the chain to settle, too."""
    client = market.clients[0]
    channel = open_channel(market, client, 1 * ONE_TOKEN)
    server = start_gateway(rpc_url=rpc_proxy.url, channel_max_age_s=1)
    body = chat_body("while it lasts", max_tokens=4)
    offer = requirement(post(server.url, CHAT, body), "voucher")
    paid = post(server.url, CHAT, body, voucher_header(client, channel, int(offer["amount"]), offer))
    assert paid.status_code == 200, paid.text
    charged = channel_state(server.url, channel)["charged"]

    rpc_proxy.down = True
    time.sleep(1.5)
    cumulative = int(charged) + int(offer["amount"])
    refused = post(server.url, CHAT, body, voucher_header(client, channel, cumulative, offer))
    assert (refused.status_code, error_code(refused)) == (503, "chain_unavailable"), refused.text
    assert int(refused.headers["Retry-After"]) > 0
    exact_offer = requirement(post(server.url, CHAT, body), "exact")
    refused = post(
        server.url, CHAT, body, exact_header(market.clients[1], exact_offer, market.contracts.token.domain())
    )
    assert (refused.status_code, error_code(refused)) == (503, "chain_unavailable"), refused.text
    # Nothing more charged; the channel's own route says the chain is gone too.
    (row,) = rows(server, select(Channel).where(Channel.id == "0x" + channel.hex()))
    assert (str(row.charged), row.reserved) == (charged, 0)
    gone = httpx.get(f"{server.url}/v1/channels/0x{channel.hex()}")
    assert (gone.status_code, error_code(gone)) == (503, "chain_unavailable")


def test_the_watcher_outlives_a_429_an_rpc_error_and_a_capped_log_range_and_sees_the_exit(
    start_gateway: Callable[..., GatewayServer], market: Market, rpc_proxy: RpcProxy
) -> None:
    """The gateway's endpoint answers 429 once, then a JSON-RPC error, and refuses log queries over 3 blocks:
    its chain watcher keeps following (reading the range in halves) and sees the payer's exit."""
    client = market.clients[2]
    channel = open_channel(market, client, 1 * ONE_TOKEN)
    server = start_gateway(rpc_url=rpc_proxy.url)
    assert not channel_state(server.url, channel)["exiting"]  # read, and cached
    rpc_proxy.faults = ["429", "rpc_error"]
    rpc_proxy.max_log_blocks = 3
    for _ in range(10):
        market.contracts.chain.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
    market.contracts.escrow.initiate_withdraw(client, channel=channel)
    wait_until(lambda: channel_state(server.url, channel)["exiting"], 60)
    assert rpc_proxy.faults == [] and rpc_proxy.refused_log_ranges > 0
    health = httpx.get(server.url + "/health").json()["chainWatcher"]
    assert health["failedRounds"] == 0 and health["lagBlocks"] <= 1, health


# -- refusals ----------------------------------------------------------------------------------------------


def _encoded(document: Any) -> str:
    return base64.b64encode(json.dumps(document).encode()).decode()


def test_bad_vouchers_are_refused_and_change_nothing(gateway: GatewayServer, market: Market) -> None:
    client = market.clients[0]
    channel = open_channel(market, client, 1 * ONE_TOKEN)
    body = chat_body("refuse me", max_tokens=4)
    offer = requirement(post(gateway.url, CHAT, body), "voucher")
    quote = int(offer["amount"])
    good = voucher_header(client, channel, quote, offer)
    assert post(gateway.url, CHAT, body, good).status_code == 200
    charged = int(channel_state(gateway.url, channel)["charged"])
    empty = os.urandom(12)  # a channel of this payer that was never funded
    stranger = Account.create()

    cases: list[tuple[str, int, str]] = [
        ("not base64 at all!", 400, "invalid_payment_header"),
        (_encoded(["a", "list"]), 400, "invalid_payment_header"),
        (
            _encoded({"x402Version": 2, "accepted": offer, "payload": {"channelId": "0x12"}}),
            400,
            "invalid_payment_header",
        ),
        ("A" * 9000, 400, "invalid_payment_header"),
        (base64.b64encode(b"[" * 3000 + b"]" * 3000).decode(), 400, "invalid_payment_header"),  # too deep
        (_encoded({"x402Version": 1, "accepted": offer, "payload": {}}), 400, "unsupported_x402_version"),
        (
            voucher_header(client, channel, charged + quote + 1, {**offer, "scheme": "upto"}),
            402,
            "unsupported_scheme",
        ),
        (
            voucher_header(client, channel, charged + quote + 1, {**offer, "network": "eip155:1"}),
            402,
            "wrong_network",
        ),
        (
            voucher_header(client, channel, charged + quote + 1, {**offer, "asset": stranger.address}),
            402,
            "wrong_asset",
        ),
        (voucher_header(stranger, channel, charged + quote + 1, offer), 402, "invalid_signature"),
        (voucher_header(client, channel, 2 * ONE_TOKEN, offer), 402, "insufficient_deposit"),
        (
            voucher_header(client, bytes.fromhex(client.address[2:]) + empty, quote, offer),
            402,
            "unknown_channel",
        ),
        (good, 402, "voucher_not_increasing"),  # a replay
        (voucher_header(client, channel, quote - 1, offer), 402, "voucher_not_increasing"),  # a decrease
        (
            voucher_header(client, channel, quote + 1, offer),
            402,
            "voucher_too_low",
        ),  # covers not charged + quote
        (voucher_header(client, channel, 2**70, offer), 402, "amount_out_of_range"),
    ]
    before_state = channel_state(gateway.url, channel)
    before = balances(market, client.address, market.contracts.escrow.address)
    for header, status, code in cases:
        response = post(gateway.url, CHAT, body, header)
        assert (response.status_code, error_code(response)) == (status, code), (code, response.text)
        if status == 402:
            assert decode_header(response.headers[PAYMENT_REQUIRED])["error"] == code
    assert channel_state(gateway.url, channel) == before_state
    assert balances(market, client.address, market.contracts.escrow.address) == before


def test_exiting_and_closed_channels_are_refused(gateway: GatewayServer, market: Market) -> None:
    client = market.clients[2]
    channel = open_channel(market, client, 1 * ONE_TOKEN)
    body = chat_body("exit", max_tokens=4)
    offer = requirement(post(gateway.url, CHAT, body), "voucher")
    market.contracts.escrow.initiate_withdraw(client, channel=channel)
    wait_until(lambda: channel_state(gateway.url, channel)["exiting"])
    response = post(gateway.url, CHAT, body, voucher_header(client, channel, int(offer["amount"]), offer))
    assert (response.status_code, error_code(response)) == (402, "channel_exiting")
    with chain_clock_moved(market, WITHDRAW_DELAY_S):
        market.contracts.escrow.finalize_withdraw(client, channel=channel)
        wait_until(lambda: channel_state(gateway.url, channel)["closed"])
        response = post(gateway.url, CHAT, body, voucher_header(client, channel, int(offer["amount"]), offer))
        assert (response.status_code, error_code(response)) == (402, "channel_closed")
        assert channel_state(gateway.url, channel)["charged"] == "0"


def test_bad_exact_authorizations_are_refused_and_move_no_money(
    gateway: GatewayServer, market: Market
) -> None:
    client = market.clients[1]
    body = chat_body("exact refusals", max_tokens=4)
    offer = requirement(post(gateway.url, CHAT, body), "exact")
    domain = market.contracts.token.domain()
    now = int(time.time())
    nonce = os.urandom(32)
    used = exact_header(client, offer, domain, nonce=nonce)
    assert post(gateway.url, CHAT, body, used).status_code == 200
    broke = Account.create()
    cases = [
        (exact_header(client, offer, domain, valid_before=now - 1), "authorization_expired"),
        (
            exact_header(client, offer, domain, valid_before=now + 5),
            "authorization_expired",
        ),  # no time to settle
        (exact_header(client, offer, domain, valid_after=now + 3600), "authorization_not_yet_valid"),
        (exact_header(client, offer, domain, to=client.address), "wrong_recipient"),
        (exact_header(client, offer, domain, value=int(offer["amount"]) - 1), "amount_too_low"),
        (exact_header(client, offer, domain, signer=broke), "invalid_signature"),
        (used, "authorization_used"),
        (exact_header(broke, offer, domain), "insufficient_balance"),
        (exact_header(client, {**offer, "network": "eip155:10"}, domain), "wrong_network"),
    ]
    before = balances(market, client.address, broke.address, market.operator.address)
    for header, code in cases:
        response = post(gateway.url, CHAT, body, header)
        assert (response.status_code, error_code(response)) == (402, code), (code, response.text)
    assert balances(market, client.address, broke.address, market.operator.address) == before


def test_bad_requests_are_refused_before_any_payment(gateway: GatewayServer, market: Market) -> None:
    client = market.clients[0]
    channel = open_channel(market, client, 1 * ONE_TOKEN)
    offer = requirement(post(gateway.url, CHAT, chat_body()), "voucher")
    payment = voucher_header(client, channel, int(offer["amount"]) * 100, offer)
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({**chat_body(), "model": "no-such-model"}, 404, "unknown_model"),
        ({**chat_body(), "model": "lonely"}, 409, "no_route"),
        (chat_body("x" * 3000), 400, "prompt_too_long"),
        (chat_body(max_tokens=4000), 400, "prompt_too_long"),
        (chat_body(max_price=1), 409, "max_price_exceeded"),
        (chat_body(max_price=0), 400, "invalid_request"),  # no request is free, so none could ever be paid
        (chat_body(functions=[{"name": "f"}]), 400, "unsupported_parameter"),
        (chat_body(reasoning_effort="high"), 400, "unsupported_parameter"),
        (chat_body(top_logprobs=2), 400, "conflicting_parameters"),  # without logprobs: true
        (chat_body(n=9), 400, "invalid_request"),
        (chat_body(logit_bias={"100000": 5}), 400, "token_out_of_range"),
        (chat_body(tool_choice="required"), 400, "conflicting_parameters"),  # without tools
        (chat_body(temperature=3), 400, "invalid_request"),
        ({"model": "tiny"}, 400, "invalid_request"),
        ({**chat_body(), "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_request"),
    ]
    for body, status, code in cases:
        for header in (None, payment):
            response = post(gateway.url, CHAT, body, header)
            assert (response.status_code, error_code(response)) == (status, code), (code, response.text)
    response = httpx.post(
        gateway.url + CHAT, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert (response.status_code, error_code(response)) == (400, "invalid_request")
    assert httpx.get(gateway.url + "/v1/nowhere").json()["error"]["code"] == "not_found"
    state = channel_state(gateway.url, channel)
    assert (state["charged"], state["reserved"], state["voucherAmount"]) == ("0", "0", "0")


def test_concurrent_requests_cannot_spend_the_same_headroom(gateway: GatewayServer, market: Market) -> None:
    client = market.clients[2]
    channel = open_channel(market, client, 10 * ONE_TOKEN)
    body = chat_body("race", max_tokens=48)
    offer = requirement(post(gateway.url, CHAT, body), "voucher")
    quote = int(offer["amount"])
    # Each voucher covers one quote; none covers two. While one request runs, no other fits beside it.
    headers = [voucher_header(client, channel, quote + i, offer) for i in range(6)]

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as http:
            return list(
                await asyncio.gather(
                    *(
                        http.post(gateway.url + CHAT, json=body, headers={"PAYMENT-SIGNATURE": h})
                        for h in headers
                    )
                )
            )

    responses = asyncio.run(race())
    paid = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert paid and refused
    assert {error_code(r) for r in refused} <= {"voucher_too_low", "voucher_not_increasing"}
    state = channel_state(gateway.url, channel)
    assert state["reserved"] == "0"
    assert (
        int(state["charged"]) == sum(int(settled(r)["amount"]) for r in paid) <= int(state["voucherAmount"])
    )


# -- the market --------------------------------------------------------------------------------------------


def test_order_book_models_providers_and_health(
    gateway: GatewayServer, providers: dict[str, ProviderProcess]
) -> None:
    book = httpx.get(gateway.url + "/v1/orderbook", params={"model": "tiny"}).json()
    assert [span["layers"] for span in book["spans"]] == [[0, 2], [2, 4], [4, 6]]
    middle = book["spans"][1]["levels"]
    assert middle == [{"pricePerMillion": str(PRICE), "asks": 2, "capacity": 16, "free": 16}]
    assert [ask["provider"] for ask in book["bestRoute"]["asks"]] == [
        providers[name].account.address for name in ("a", "b", "c")
    ]
    assert book["bestRoute"]["pricePerMillionTokens"] == str(LAYERS * PRICE)

    models = {m["id"]: m for m in httpx.get(gateway.url + "/v1/models").json()["data"]}
    assert models["tiny"]["price_per_million_tokens"] == str(LAYERS * PRICE)
    assert models["lonely"]["price_per_million_tokens"] is None
    assert models["tiny"]["layers"] == LAYERS and models["tiny"]["root"].startswith("0x")

    listed = httpx.get(gateway.url + "/v1/providers").json()["data"]
    assert {p["address"] for p in listed} >= {p.account.address for p in providers.values()}
    one = httpx.get(gateway.url + f"/v1/providers/{providers['b'].account.address}").json()
    assert one["active"] and one["matchable"] and one["asks"][0]["layers"] == [2, 4]
    assert httpx.get(gateway.url + "/v1/providers/0x" + "ab" * 20).status_code == 404

    health = httpx.get(gateway.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    watching = health.json()["chainWatcher"]
    assert watching["lagBlocks"] is not None and watching["failedRounds"] == 0
    assert health.json()["validation"]["status"] == "ok"
    metrics = httpx.get(gateway.url + "/metrics").text
    assert "strata_http_requests_total" in metrics and "strata_chain_watcher_lag_blocks" in metrics
    operations = {
        op["operationId"] for path in gateway.app.openapi()["paths"].values() for op in path.values()
    }
    assert operations == {
        "createChatCompletion", "createCompletion", "listModels", "retrieveModel", "createJob", "getJob",
        "postAsk", "listAsks", "getOrderBook", "postHeartbeat", "listProviders", "getProvider", "getChannel",
        "getPayout", "listSlashes", "getSlash", "getHealth", "getMetrics", "refundBatchChannel",
    }  # fmt: skip


def test_completions_take_text_and_token_ids(gateway: GatewayServer, market: Market) -> None:
    client = market.clients[0]
    wallet = wallet_for(market, client, open_channel(market, client, 10 * ONE_TOKEN))

    async def complete() -> tuple[dict[str, Any], dict[str, Any]]:
        async with strata_client(gateway.url, wallet) as strata:
            by_text = await strata.http.post(
                "/v1/completions", json={"model": "tiny", "prompt": "abc", "temperature": 0}
            )
            by_ids = await strata.http.post(
                "/v1/completions", json={"model": "tiny", "prompt": [97, 98, 99], "temperature": 0}
            )
            return by_text.json(), by_ids.json()

    by_text, by_ids = asyncio.run(complete())
    assert by_text["object"] == "text_completion"
    assert by_text["choices"][0]["text"] == by_ids["choices"][0]["text"]
    assert by_text["usage"]["completion_tokens"] <= 16


def test_asks_and_heartbeats_are_checked(
    gateway: GatewayServer, market: Market, providers: dict[str, ProviderProcess]
) -> None:
    root = gateway.gateway.catalog.get("tiny").root
    backup = providers["backup"]
    announcer = announce(gateway.url, backup, root)  # a fresh nonce for the tests below
    ask = announcer.signed_ask()

    def posted(changes: dict[str, Any]) -> httpx.Response:
        return httpx.post(gateway.url + "/v1/asks", json={**ask, **changes})

    unstaked = Account.create()
    forged = {**announcer.signed_ask(), "pricePerMillion": "1"}
    cases = [
        (forged, 403, "invalid_signature"),
        (
            {"gateway": unstaked.address},
            403,
            "wrong_gateway",
        ),  # an ask for another gateway is not replayed here
        ({"tlsFingerprint": "0x" + "00" * 32}, 400, "plaintext_endpoint"),
        ({"provider": unstaked.address, "signature": ask["signature"]}, 403, "invalid_signature"),
        ({}, 409, "stale_nonce"),  # the same ask again
        ({"modelRoot": "0x" + "11" * 32}, 404, "unknown_model"),
        ({"layerEnd": 7}, 400, "bad_span"),
        ({"endpoint": "no-port"}, 400, "bad_endpoint"),
        ({"expiresAt": int(time.time()) - 5}, 400, "bad_expiry"),
        ({"pricePerMillion": "0"}, 400, "invalid_request"),
        ({"capacity": -1}, 400, "invalid_request"),
    ]
    # Signed as it is, but keeping steps for less than the validators may ask for them.
    short = Announcer(
        gateway.url,
        backup.account,
        replace(announcer.offer, retention_s=60),
        domain=backup.domain,
        trusted=None,
    )
    short.gateway = announcer.gateway
    short_ask = short.signed_ask()
    cases.append((short_ask, 400, "short_retention"))
    posted({})  # uses the nonce once, so the case above is a replay
    before = httpx.get(gateway.url + "/v1/asks", params={"model": "tiny"}).json()
    for changes, status, code in cases:
        body = changes if changes is forged or changes is short_ask else {**ask, **changes}
        response = httpx.post(gateway.url + "/v1/asks", json=body)
        assert (response.status_code, error_code(response)) == (status, code), (code, response.text)
    assert httpx.get(gateway.url + "/v1/asks", params={"model": "tiny"}).json() == before

    # A well-signed ask from a key with no stake is refused.
    offer = Offer(root, 0, 2, PRICE, 1, "127.0.0.1:1", backup.fingerprint, DEFAULT_RETENTION_S)
    stranger = Announcer(gateway.url, unstaked, offer, domain=backup.domain, trusted=None)
    stranger.gateway = market.gateway_key.address
    response = httpx.post(gateway.url + "/v1/asks", json=stranger.signed_ask())
    assert (response.status_code, error_code(response)) == (403, "provider_not_staked")

    here = market.gateway_key.address
    beat = {"provider": backup.account.address, "gateway": here, "timestamp": int(time.time()) + 30}

    def signed(by: Any, timestamp: int, gateway_address: str = here) -> dict[str, Any]:
        signature = Heartbeat(backup.account.address, gateway_address, timestamp).sign(by, backup.domain)
        return {
            **beat,
            "gateway": gateway_address,
            "timestamp": timestamp,
            "signature": "0x" + signature.hex(),
        }

    assert (
        httpx.post(
            gateway.url + "/v1/providers/heartbeat", json=signed(backup.account, beat["timestamp"])
        ).status_code
        == 200
    )
    heartbeat_cases = [
        (signed(unstaked, beat["timestamp"] + 1), 403, "invalid_signature"),
        (signed(backup.account, beat["timestamp"]), 409, "stale_heartbeat"),
        (signed(backup.account, int(time.time()) + 3600), 400, "bad_timestamp"),
        ({**signed(unstaked, 5), "provider": unstaked.address}, 400, "bad_timestamp"),
        (signed(backup.account, beat["timestamp"] + 2, unstaked.address), 403, "wrong_gateway"),
    ]
    for body, status, code in heartbeat_cases:
        response = httpx.post(gateway.url + "/v1/providers/heartbeat", json=body)
        assert (response.status_code, error_code(response)) == (status, code), (code, response.text)
    stranger_beat = Heartbeat(unstaked.address, here, int(time.time())).sign(unstaked, backup.domain)
    response = httpx.post(
        gateway.url + "/v1/providers/heartbeat",
        json={
            "provider": unstaked.address,
            "gateway": here,
            "timestamp": int(time.time()),
            "signature": "0x" + stranger_beat.hex(),
        },
    )
    assert (response.status_code, error_code(response)) == (404, "unknown_provider")


def test_capacity_zero_withdraws_a_span(
    gateway: GatewayServer, providers: dict[str, ProviderProcess]
) -> None:
    root = gateway.gateway.catalog.get("tiny").root
    announcer = announce(gateway.url, providers["backup"], root)
    withdraw(announcer)
    book = httpx.get(gateway.url + "/v1/orderbook", params={"model": "tiny"}).json()
    assert book["spans"][1]["levels"][0]["asks"] == 1
    announce(gateway.url, providers["backup"], root)  # back, behind B in time priority
    book = httpx.get(gateway.url + "/v1/orderbook", params={"model": "tiny"}).json()
    assert book["spans"][1]["levels"][0]["asks"] == 2
    assert book["bestRoute"]["asks"][1]["provider"] == providers["b"].account.address


# -- jobs and disconnects ----------------------------------------------------------------------------------


def test_a_job_rests_until_a_route_within_its_price_appears(
    gateway: GatewayServer, market: Market, model_dir: Path, providers: dict[str, ProviderProcess]
) -> None:
    client = market.clients[0]
    channel = open_channel(market, client, 10 * ONE_TOKEN)
    tokens = prompt_tokens(model_dir, "patience") + 8
    max_price = tokens * PER_TOKEN // 2  # half of today's price
    body = {"model": "tiny", "messages": [{"role": "user", "content": "patience"}], "max_tokens": 8,
            "temperature": 0, "max_price": max_price, "ttl_s": 120}  # fmt: skip
    offer = requirement(post(gateway.url, "/v1/jobs", body), "voucher")
    assert int(offer["amount"]) == max_price
    response = post(gateway.url, "/v1/jobs", body, voucher_header(client, channel, max_price, offer))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "resting"
    assert channel_state(gateway.url, channel)["reserved"] == str(max_price)

    root = gateway.gateway.catalog.get("tiny").root
    try:
        for name in ("a", "b", "c"):  # the providers halve their prices
            announce(gateway.url, providers[name], root, price=PRICE // 2)
        done = wait_until(
            lambda: (
                (j := httpx.get(f"{gateway.url}/v1/jobs/{job['id']}").json())["status"] == "completed" and j
            )
        )
    finally:
        for name in ("a", "b", "c", "backup"):  # back to the book every other test expects
            announce(gateway.url, providers[name], root)
    assert 0 < int(done["charged"]) <= max_price
    assert done["output"] is None and done["usage"]["completion_tokens"] >= 1  # the output is the payer's

    def read(by: Any, expires_at: int) -> httpx.Response:
        signature = JobRead(bytes.fromhex(job["id"][2:]), expires_at).sign(
            by, market.contracts.protocol_domain()
        )
        headers = {"X-Strata-Job-Read": f"{expires_at}:0x{signature.hex()}"}
        return httpx.get(f"{gateway.url}/v1/jobs/{job['id']}", headers=headers)

    soon = int(time.time()) + 60
    assert read(client, soon).json()["output"]
    assert error_code(read(market.clients[1], soon)) == "not_the_payer"
    assert error_code(read(client, int(time.time()) - 1)) == "read_proof_expired"
    sdk = asyncio.run(_read_with_sdk(gateway.url, wallet_for(market, client, channel), job["id"]))
    assert sdk["output"] == read(client, soon).json()["output"]
    state = channel_state(gateway.url, channel)
    assert (state["charged"], state["reserved"]) == (done["charged"], "0")


def test_a_job_that_finds_no_route_expires_and_releases_its_reservation(
    gateway: GatewayServer, market: Market
) -> None:
    client = market.clients[1]
    channel = open_channel(market, client, 1 * ONE_TOKEN)
    body = {"model": "lonely", "prompt": "anyone?", "max_tokens": 4, "max_price": 5000, "ttl_s": 1}
    offer = requirement(post(gateway.url, "/v1/jobs", body), "voucher")
    response = post(gateway.url, "/v1/jobs", body, voucher_header(client, channel, 5000, offer))
    assert response.status_code == 202
    job_id = response.json()["id"]
    done = wait_until(
        lambda: (j := httpx.get(f"{gateway.url}/v1/jobs/{job_id}").json())["status"] == "expired" and j
    )
    assert done["charged"] == "0"
    state = channel_state(gateway.url, channel)
    assert (state["charged"], state["reserved"], state["voucherAmount"]) == ("0", "0", "5000")
    assert httpx.get(gateway.url + "/v1/jobs/0x" + "00" * 32).status_code == 404
    assert httpx.get(gateway.url + "/v1/jobs/nope").status_code == 400


def test_a_client_that_disconnects_pays_only_for_what_was_computed(
    gateway: GatewayServer, market: Market
) -> None:
    client = market.clients[2]
    channel = open_channel(market, client, 10 * ONE_TOKEN)
    body = chat_body("long story", max_tokens=1500, stream=True)
    offer = requirement(post(gateway.url, CHAT, body), "voucher")
    quote = int(offer["amount"])
    header = voucher_header(client, channel, quote, offer)
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", gateway.url + CHAT, json=body, headers={"PAYMENT-SIGNATURE": header}) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data:"))[5:])
        for _ in range(3):
            next(lines)
    job_id = "0x" + first["id"].removeprefix("chatcmpl-")
    job = wait_until(
        lambda: (j := httpx.get(f"{gateway.url}/v1/jobs/{job_id}").json())["status"] != "running" and j
    )
    assert job["status"] == "cancelled"
    assert 0 < int(job["charged"]) < quote
    assert job["usage"]["completion_tokens"] < 1500
    state = channel_state(gateway.url, channel)
    assert (state["charged"], state["reserved"]) == (job["charged"], "0")


def test_the_wallet_tops_up_its_channel_only_when_allowed(gateway: GatewayServer, market: Market) -> None:
    client = market.clients[0]
    channel = open_channel(market, client, 10)  # ten base units: less than any quote
    messages = [{"role": "user", "content": "top me up"}]

    async def ask(wallet: ChannelWallet) -> dict[str, Any]:
        async with strata_client(gateway.url, wallet) as strata:
            return await strata.chat("tiny", messages, max_tokens=4, temperature=0)

    with pytest.raises(InsufficientDeposit):
        asyncio.run(ask(wallet_for(market, client, channel)))
    assert channel_state(gateway.url, channel)["voucherAmount"] == "0"

    fund = functools.partial(fund_channel, market.contracts, client, channel)
    wallet = wallet_for(market, client, channel, fund=fund, top_up=ONE_TOKEN)
    asyncio.run(ask(wallet))
    assert market.contracts.escrow.channel(channel).deposit > ONE_TOKEN
    assert int(channel_state(gateway.url, channel)["charged"]) > 0


async def _read_with_sdk(url: str, wallet: Any, job_id: str) -> dict[str, Any]:
    async with strata_client(url, wallet) as strata:
        return await strata.job(job_id)
