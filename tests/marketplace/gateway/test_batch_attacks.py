"""Attacks on the gateway's x402 batch-settlement scheme, each against real processes (anvil, provider processes,
x402's real client): a stranger paying with a victim's old voucher, deposits that would pay for nothing at the
gateway's gas, numbers past what the contracts or the database hold, and refunds asked for with a victim's
voucher. Each test names the property it holds."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import httpx
from eth_account import Account
from eth_account.signers.local import LocalAccount
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.batch_settlement.client.eip3009 import (
    create_batch_settlement_eip3009_deposit_payload,
)
from x402.mechanisms.evm.batch_settlement.client.voucher import sign_voucher
from x402.schemas import PaymentRequirements

from marketplace.gateway.payments.x402 import PAYMENT_SIGNATURE, REFUND_NO_BALANCE, encode_header
from marketplace.testing.gateway import GatewayServer
from settlement.deploy import ONE_TOKEN
from tests.marketplace.gateway.test_batch_settlement import ask, channel_row, operator_worker, x402_payer
from tests.marketplace.harness import Market, chat_body, post, requirement

CHAT = "/v1/chat/completions"
REFUND = "/v1/batch-settlement/refund"
NETWORK = "eip155:31337"


def fresh_payer(market: Market) -> LocalAccount:
    """A payer of the test's own, so no channel on the shared chain is already funded for it."""
    account: LocalAccount = Account.create()
    market.contracts.token.mint(market.admin, to=account.address, amount=100 * ONE_TOKEN)
    return account


def offer_for(url: str, body: dict[str, Any]) -> dict[str, Any]:
    return requirement(post(url, CHAT, body), "batch-settlement")


def pay(url: str, accepted: dict[str, Any], payload: dict[str, Any], body: dict[str, Any]) -> httpx.Response:
    header = encode_header({"x402Version": 2, "accepted": accepted, "payload": payload})
    return post(url, CHAT, body, header)


def config_json(row_config: dict[str, Any]) -> dict[str, Any]:
    """A channel's config as x402 writes it in a payload (the gateway stores the same keys)."""
    keys = ("payer", "payerAuthorizer", "receiver", "receiverAuthorizer", "token", "withdrawDelay", "salt")
    return {k: row_config[k] for k in keys}


def gateway_nonce(market: Market) -> int:
    return int(market.contracts.chain.w3.eth.get_transaction_count(market.gateway_key.address))


# -- 1. a stranger's request paid out of someone else's channel with the victim's own (stale) voucher ----------


def test_a_stranger_cannot_pay_for_its_request_with_a_victims_stale_voucher(
    gateway: GatewayServer, market: Market
) -> None:
    """A channel's vouchers are no secret: an epoch's claim publishes them (BatchSettlement.claim's calldata), and
    the corrective 402's ``voucherState`` hands the newest to anyone presenting a valid voucher of the channel. Were
    a whole answer acknowledged at its metered charge, the newest voucher would stand ``quote − charged`` above
    what was acknowledged, and a stranger sizing a request to quote exactly that would be served on the victim's
    channel. Every request acknowledges its whole quote, so no size of request makes an old voucher match."""
    url = gateway.url
    victim = fresh_payer(market)
    payer, _ = x402_payer(market, victim)

    probe = offer_for(url, chat_body("x", max_tokens=1))
    tokens_min = int(probe["extra"]["tokens"])
    per_token = int(probe["extra"]["routeCost"]) // tokens_min
    bps = int(probe["extra"]["failoverMarginBps"])

    def quote(tokens: int) -> int:
        cost = tokens * per_token
        return cost + -(-cost * bps // 10_000)

    def attacker_tokens(leftover: int) -> int | None:
        return next((t for t in range(tokens_min, tokens_min + 4000) if quote(t) == leftover), None)

    async def victim_pays(max_tokens: int) -> tuple[int, dict[str, Any], str]:
        async with x402HttpxClient(payer, timeout=120) as http:
            return await ask(http, url, chat_body("the victim's question", max_tokens=max_tokens))

    # The victim's whole answers, sized (from the 402's own figures) so that a leftover is a quote a stranger can
    # ask for: with the default 10% margin, an answer of ~300 tokens leaves a stranger's minimal request's quote.
    victim_body = chat_body("the victim's question", max_tokens=1)
    victim_prompt = int(offer_for(url, victim_body)["extra"]["tokens"]) - 1
    sizes = [
        m for m in range(1, 1500) if attacker_tokens(-(-(victim_prompt + m) * per_token * bps // 10_000))
    ]
    found = None
    for max_tokens in sizes[:3]:
        status, payment, text = asyncio.run(victim_pays(max_tokens))
        assert status == 200, text
        channel_id = payment["extra"]["channelId"]
        row = channel_row(gateway, channel_id)
        leftover = row.voucher_amount - row.acknowledged
        tokens = attacker_tokens(leftover) if leftover > 0 else None
        if tokens is not None:
            found = (row, tokens)
            break
    if found is None:
        return  # every newest voucher is exactly what was acknowledged: no quote can make a stale one match
    row, tokens = found
    before = (row.charged, row.acknowledged)

    # The stranger: the victim's config and newest voucher, and a body whose quote is the leftover exactly.
    body = chat_body("x", max_tokens=1 + tokens - tokens_min)
    accepted = offer_for(url, body)
    assert int(accepted["amount"]) == row.voucher_amount - row.acknowledged
    payload = {
        "type": "voucher",
        "channelConfig": config_json(row.config),
        "voucher": {"channelId": row.id, "maxClaimableAmount": str(row.voucher_amount),
                    "signature": row.voucher_signature},
    }  # fmt: skip
    response = pay(url, accepted, payload, body)
    after = channel_row(gateway, row.id)
    assert response.status_code == 402, (
        f"a stranger was served ({response.status_code}) on the victim's channel: charged "
        f"{before[0]} -> {after.charged}, acknowledged {before[1]} -> {after.acknowledged}"
    )
    assert (after.charged, after.acknowledged) == before


# -- 2. deposits the gateway pays gas for, for a voucher the deposit cannot cover -------------------------------


def test_a_deposit_that_cannot_cover_its_voucher_is_refused_before_the_gateway_pays_gas_for_it(
    gateway: GatewayServer, market: Market
) -> None:
    """A first payment carrying a 1-base-unit deposit and a voucher for the whole quote, on a new channel each
    time (a new salt): were the deposit sent before its cover was checked, each would cost the gateway a
    transaction's gas for a payment it then refuses. It is refused before anything is sent."""
    url = gateway.url
    client = fresh_payer(market)
    _, scheme = x402_payer(market, client)
    body = chat_body("gas for nothing", max_tokens=4)
    accepted = offer_for(url, body)
    requirements = PaymentRequirements.model_validate(accepted)
    base = scheme.build_channel_config(requirements)
    sent_before = gateway_nonce(market)
    codes = []
    for index in range(3):
        config = replace(base, salt="0x" + f"{index + 1:064x}")
        payload = create_batch_settlement_eip3009_deposit_payload(
            scheme._signer, requirements, config, 1, int(accepted["amount"])
        ).to_dict()
        response = pay(url, accepted, payload, body)
        codes.append((response.status_code, response.json()["error"]["code"]))
    assert codes == [(402, "insufficient_deposit")] * 3, codes
    assert gateway_nonce(market) == sent_before, (
        f"the gateway sent {gateway_nonce(market) - sent_before} deposit transactions for payments it then refused"
    )


# -- 3. numbers out of range: a clear 4xx, not a 500 ------------------------------------------------------------


def _deposit_payload(
    url: str, market: Market, client: LocalAccount, body: dict[str, Any]
) -> tuple[dict, dict]:
    _, scheme = x402_payer(market, client)
    accepted = offer_for(url, body)
    requirements = PaymentRequirements.model_validate(accepted)
    config = scheme.build_channel_config(requirements)
    payload = create_batch_settlement_eip3009_deposit_payload(
        scheme._signer, requirements, config, 10 * int(accepted["amount"]), int(accepted["amount"])
    ).to_dict()
    return accepted, payload


def test_a_decimal_salt_above_2_256_is_a_400_not_a_500(gateway: GatewayServer, market: Market) -> None:
    """x402.py's _uint256 takes up to 78 decimal digits, then .to_bytes(32) raises OverflowError: a 500."""
    body = chat_body("big salt", max_tokens=2)
    accepted, payload = _deposit_payload(gateway.url, market, fresh_payer(market), body)
    payload["deposit"]["authorization"]["erc3009Authorization"]["salt"] = "9" * 78
    response = pay(gateway.url, accepted, payload, body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_payment_header", (
        response.status_code,
        response.text[:300],
    )


def test_a_deposit_valid_before_above_2_256_is_refused_cleanly(
    gateway: GatewayServer, market: Market
) -> None:
    """validBefore passes decoding (78 digits) and the expiry check, then cannot be ABI-encoded as a uint256."""
    body = chat_body("big validBefore", max_tokens=2)
    client = fresh_payer(market)
    accepted, payload = _deposit_payload(gateway.url, market, client, body)
    payload["deposit"]["authorization"]["erc3009Authorization"]["validBefore"] = "9" * 78
    sent_before = gateway_nonce(market)
    response = pay(gateway.url, accepted, payload, body)
    assert response.status_code in (400, 402), (response.status_code, response.text[:300])
    assert "error" in response.json()
    assert gateway_nonce(market) == sent_before


def _refund_header(market: Market, config: dict[str, Any], channel_id: str, voucher: int, signer: Any,
                   amount: str | None = None) -> str:  # fmt: skip
    fields = sign_voucher(signer, channel_id, voucher, NETWORK)
    payload: dict[str, Any] = {"type": "refund", "channelConfig": config, "voucher": fields.to_dict()}
    if amount is not None:
        payload["amount"] = amount
    offer = {"scheme": "batch-settlement", "network": NETWORK, "asset": market.contracts.token.address}
    return encode_header({"x402Version": 2, "accepted": offer, "payload": payload})


def test_a_refund_amount_above_bigint_is_a_400_and_changes_no_row(
    gateway: GatewayServer, market: Market
) -> None:
    """check_batch bounds the voucher's amount but not the refund's: 2^100 goes into channels.refunding
    (BigInteger)."""
    client = fresh_payer(market)
    payer, scheme = x402_payer(market, client)

    async def once() -> tuple[int, dict[str, Any], str]:
        async with x402HttpxClient(payer, timeout=120) as http:
            return await ask(http, gateway.url, chat_body("then refund", max_tokens=2))

    status, payment, text = asyncio.run(once())
    assert status == 200, text
    row = channel_row(gateway, payment["extra"]["channelId"])
    header = _refund_header(market, config_json(row.config), row.id, row.acknowledged, scheme._signer,
                            amount=str(2**100))  # fmt: skip
    response = httpx.get(gateway.url + REFUND, headers={PAYMENT_SIGNATURE: header}, timeout=60)
    assert response.status_code in (400, 402), (response.status_code, response.text[:300])
    assert channel_row(gateway, row.id).refunding is None


# -- 4. a stranger asks for a refund of someone else's channel ------------------------------------------------


def test_a_stranger_replaying_a_victims_voucher_forces_at_most_one_refund_into_the_victims_hands(
    gateway: GatewayServer, market: Market
) -> None:
    """The newest voucher of a channel is what the payer acknowledged, exactly what a refund is asked for with,
    and no secret (an epoch's claim publishes it; ECDSA signatures are deterministic, so the payer's own refund
    voucher is the same bytes). A stranger holding it can ask for the victim's refund: the refund goes to the
    victim, and once made there is nothing left to refund until the victim deposits again, so a replay is
    refused at once, without blocking the channel or asking the operator for anything."""
    victim = fresh_payer(market)
    payer, _ = x402_payer(market, victim)

    async def stream() -> tuple[int, dict[str, Any], str]:
        async with x402HttpxClient(payer, timeout=120) as http:
            return await ask(http, gateway.url, chat_body("streamed", max_tokens=3, stream=True))

    status, payment, text = asyncio.run(stream())
    assert status == 200, text
    row = channel_row(gateway, payment["extra"]["channelId"])
    payload = {
        "type": "refund",
        "channelConfig": config_json(row.config),
        "voucher": {"channelId": row.id, "maxClaimableAmount": str(row.voucher_amount),
                    "signature": row.voucher_signature},
    }  # fmt: skip
    offer = {"scheme": "batch-settlement", "network": NETWORK, "asset": market.contracts.token.address}
    header = encode_header({"x402Version": 2, "accepted": offer, "payload": payload})
    held = market.contracts.token.balance_of(victim.address)
    with operator_worker(gateway.gateway.settings.database_url, market):
        first = httpx.get(gateway.url + REFUND, headers={PAYMENT_SIGNATURE: header}, timeout=60)
    assert first.status_code == 200, first.text
    assert market.contracts.token.balance_of(victim.address) > held  # the victim's own money, back to it
    for _ in range(3):
        again = httpx.get(gateway.url + REFUND, headers={PAYMENT_SIGNATURE: header}, timeout=60)
        assert again.status_code == 402 and again.json()["error"]["code"] == REFUND_NO_BALANCE, again.text
    assert channel_row(gateway, row.id).refunding is None  # the channel takes payments, no operator asked
