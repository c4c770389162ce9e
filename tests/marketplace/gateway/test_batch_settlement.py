"""x402's own batch-settlement client pays the gateway, unchanged: a deposit in the first payment, vouchers after,
streams and whole answers, the corrective 402, one request at a time per channel; then an epoch claims what was
charged from x402's BatchSettlement contract into the distributor, a provider claims its share and the payer
leaves with the rest."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import select
from x402 import x402Client, x402ClientSync
from x402.http import x402HTTPClientSync
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.batch_settlement.client.scheme import BatchSettlementEvmScheme
from x402.mechanisms.evm.batch_settlement.constants import BATCH_SETTLEMENT_ADDRESS
from x402.mechanisms.evm.signers import EthAccountSignerWithRPC

from marketplace.gateway.payments.x402 import (
    PAYMENT_REQUIRED,
    PAYMENT_RESPONSE,
    PAYMENT_SIGNATURE,
    decode_header,
    encode_header,
)
from settlement.db.engine import blocking_sessions, create_blocking_engine
from settlement.db.schema import Channel, Charge, Job
from settlement.epochs import EpochCloser
from settlement.refunds import refund_channel, refunds_asked
from settlement.report import ledger_and_chain
from tests.marketplace.harness import (
    GatewayServer,
    Market,
    ProviderProcess,
    announce,
    chain_clock_moved,
    chat_body,
    database,
    gateway_settings,
    post,
    requirement,
    rows,
    settled,
    start_market,
)

CHAT = "/v1/chat/completions"
NETWORK = "eip155:31337"
BUSY = "invalid_batch_settlement_evm_channel_busy"
MISMATCH = "invalid_batch_settlement_evm_cumulative_amount_mismatch"


@dataclass
class OwnMarket:
    market: Market
    gateway: GatewayServer
    database_url: str


@pytest.fixture(scope="module")
def own(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path, providers: dict[str, ProviderProcess]
) -> Iterator[OwnMarket]:
    """A chain and distributor of this module's own: an epoch posts a root, which another database's epochs
    would then disagree with."""
    tmp = tmp_path_factory.mktemp("batch-settlement")
    market = start_market(tmp)
    try:
        with database("sqlite", tmp) as url:
            server = GatewayServer(gateway_settings(market, url, {"tiny": model_dir})).start()
            try:
                root = server.gateway.catalog.get("tiny").root
                for name in ("a", "b", "c"):
                    announce(server.url, providers[name], root)
                yield OwnMarket(market, server, url)
            finally:
                server.stop()
    finally:
        market.anvil.stop()


def x402_payer(market: Market, account: LocalAccount) -> tuple[x402Client, BatchSettlementEvmScheme]:
    """x402's client with its batch-settlement scheme, as its documentation sets it up; the signer reads the
    chain (for a corrective 402's resynchronisation)."""
    scheme = BatchSettlementEvmScheme(EthAccountSignerWithRPC(account, market.anvil.url))
    payer = x402Client()
    payer.register(NETWORK, scheme)
    payer.set_spend_controls(
        {"allowed_assets": [{"network": NETWORK, "asset": market.contracts.token.address}]}
    )
    return payer, scheme


async def ask(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], str]:
    """One request through the paying client: its status, its PAYMENT-RESPONSE (or PAYMENT-REQUIRED on a
    402), and its text."""
    if not body.get("stream"):
        response = await http.post(url + CHAT, json=body)
        header = response.headers.get(PAYMENT_RESPONSE) or response.headers.get(PAYMENT_REQUIRED)
        return response.status_code, decode_header(header) if header else {}, response.text
    async with http.stream("POST", url + CHAT, json=body) as response:
        text = (await response.aread()).decode()
        header = response.headers.get(PAYMENT_RESPONSE) or response.headers.get(PAYMENT_REQUIRED)
        return response.status_code, decode_header(header) if header else {}, text


def final_payment(stream: str) -> dict[str, Any]:
    """The settled payment a stream's last chunk carries."""
    chunks = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
    payment: dict[str, Any] = next(chunk["payment"] for chunk in chunks if "payment" in chunk)
    return payment


def channel_row(server: GatewayServer, channel_id: str) -> Any:
    (row,) = rows(server, select(Channel).where(Channel.id == channel_id))
    return row


def test_fifty_requests_on_one_channel_then_an_epoch_pays_the_providers_and_the_payer_leaves_with_the_rest(
    own: OwnMarket,
) -> None:
    market, url = own.market, own.gateway.url
    token, batch = market.contracts.token, market.contracts.batch
    client = market.clients[0]
    payer, scheme = x402_payer(market, client)
    held = token.balance_of(client.address)
    answers: list[tuple[int, dict[str, Any], str]] = []

    async def fifty() -> None:
        async with x402HttpxClient(payer, timeout=120) as http:
            for index in range(50):
                body = chat_body(f"request {index}", max_tokens=4, stream=index % 2 == 1)
                answers.append(await ask(http, url, body))

    asyncio.run(fifty())
    assert [status for status, _, _ in answers] == [200] * 50, [text for _, _, text in answers][:3]
    first = answers[0][1]
    channel_id = first["extra"]["channelId"]
    assert first["extra"]["scheme"] == "batch-settlement" and first["transaction"].startswith(
        "0x"
    )  # the deposit

    # Each answer added its whole quote to the client's cumulative (a stream's headers, before anything was
    # metered, as its end does); what was metered, at most that, is what is charged.
    charged = told = 0
    for index, (_, payment, text) in enumerate(answers):
        extra = payment["extra"]
        if index % 2 == 1:
            assert extra["status"] == "reserved"
            settled = final_payment(text)["extra"]
            assert (
                settled["chargedAmount"] == extra["chargedAmount"]
            )  # the last chunk says what the headers did
        else:
            settled = extra
        assert extra["chargedAmount"] == extra["quote"] and int(settled["charged"]) <= int(extra["quote"])
        charged += int(settled["charged"])
        told += int(extra["chargedAmount"])
        assert extra["channelState"]["chargedCumulativeAmount"] == str(told)
    row = channel_row(own.gateway, channel_id)
    assert (row.scheme, row.charged, row.acknowledged, row.reserved) == ("batch-settlement", charged, told, 0)
    # The client's own record agrees with the gateway's, so its next voucher will too.
    assert scheme._storage.get(channel_id).charged_cumulative_amount == str(told)
    deposited = batch.channel(bytes.fromhex(channel_id[2:])).balance
    assert token.balance_of(client.address) == held - deposited

    engine = create_blocking_engine(own.database_url)
    try:
        report = EpochCloser(blocking_sessions(engine), market.contracts, market.operator).close()
        assert report.status == "posted" and report.settled == charged
        totals = ledger_and_chain(blocking_sessions(engine), market.contracts)
    finally:
        engine.dispose()
    assert totals.matches, totals.rows()
    assert totals.batch_charges == totals.batch_settled == charged
    state = batch.channel(bytes.fromhex(channel_id[2:]))
    assert (state.balance, state.total_claimed) == (deposited, charged)

    # A provider claims its share of the posted root.
    provider = market.providers[0]
    payout = httpx.get(f"{url}/v1/payouts/{provider.address}", timeout=30).json()
    owed = int(payout["claimable"])
    assert owed > 0
    before = token.balance_of(provider.address)
    market.contracts.distributor.claim(
        provider,
        provider=provider.address,
        cumulative_amount=int(payout["cumulativeAmount"]),
        proof=[bytes.fromhex(node[2:]) for node in payout["proof"]],
        expected_root=bytes.fromhex(payout["root"][2:]),
    )
    assert token.balance_of(provider.address) == before + owed

    # The payer leaves with everything not charged, once its channel's withdrawal delay has passed.
    config = scheme.build_channel_config(_requirement(url))
    batch.initiate_withdraw(client, config=config.to_dict(), amount=deposited - charged)
    with chain_clock_moved(market, config.withdraw_delay + 1):
        batch.finalize_withdraw(client, config=config.to_dict())
        assert token.balance_of(client.address) == held - charged
        assert batch.channel(bytes.fromhex(channel_id[2:])).balance == charged


@contextmanager
def operator_worker(database_url: str, market: Market) -> Iterator[None]:
    """The operator's worker as far as refunds go: what settlement.refund_channel does when the gateway's task
    reaches it, run against the gateway's database and chain (this gateway has no broker to send the task)."""
    engine = create_blocking_engine(database_url)
    sessions = blocking_sessions(engine)
    stop = threading.Event()

    def work() -> None:
        while not stop.wait(0.1):
            for channel_id in refunds_asked(sessions):
                refund_channel(sessions, market.contracts, market.operator, channel_id)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
        engine.dispose()


def test_a_cooperative_refund_gives_back_at_once_what_was_never_charged(own: OwnMarket) -> None:
    market, url = own.market, own.gateway.url
    token, batch = market.contracts.token, market.contracts.batch
    client = market.clients[1]
    payer, scheme = x402_payer(market, client)
    held = token.balance_of(client.address)

    async def pay(times: int) -> list[tuple[int, dict[str, Any], str]]:
        async with x402HttpxClient(payer, timeout=120) as http:
            return [await ask(http, url, chat_body(f"then leave {i}", max_tokens=4)) for i in range(times)]

    answers = asyncio.run(pay(3))
    assert [status for status, _, _ in answers] == [200] * 3
    channel_id = answers[0][1]["extra"]["channelId"]
    charged = sum(int(payment["extra"]["charged"]) for _, payment, _ in answers)
    channel = bytes.fromhex(channel_id[2:])
    deposited = batch.channel(channel).balance

    with operator_worker(own.database_url, market):
        made = scheme.refund(url + "/v1/batch-settlement/refund")
    assert made.success and made.transaction.startswith("0x")
    # Everything not charged went back; what was charged stays for the epoch to claim.
    assert batch.channel(channel).balance == charged
    assert token.balance_of(client.address) == held - charged
    row = channel_row(own.gateway, channel_id)
    assert (row.refunding, row.refund_tx) == (None, made.transaction)
    assert deposited > charged

    # The channel takes payments again: x402's client, its record gone, resynchronises and deposits anew.
    again = asyncio.run(pay(1))
    assert again[0][0] == 200, again[0][2]


def _requirement(url: str) -> Any:
    from x402.schemas import PaymentRequirements

    return PaymentRequirements.model_validate(requirement(post(url, CHAT, chat_body()), "batch-settlement"))


def test_concurrent_requests_on_one_channel_are_refused_busy_and_never_overspend(
    gateway: GatewayServer, market: Market
) -> None:
    client = market.clients[1]
    payer, _ = x402_payer(market, client)
    body = chat_body("one at a time", max_tokens=6)

    async def run() -> list[tuple[int, dict[str, Any], str]]:
        async with x402HttpxClient(payer, timeout=120) as http:
            opened = await ask(http, gateway.url, body)  # the deposit, alone
            assert opened[0] == 200, opened[2]
            return list(await asyncio.gather(*(ask(http, gateway.url, body) for _ in range(20))))

    answers = asyncio.run(run())
    served = [payment for status, payment, _ in answers if status == 200]
    refused = [json.loads(text)["error"]["code"] for status, _, text in answers if status != 200]
    assert served and len(served) + len(refused) == 20
    # Busy while another request runs on the channel, or (once it finished) a voucher signed before its charge
    # was known; or no capacity left on the route while the others hold it.
    assert set(refused) <= {BUSY, MISMATCH, "no_route"}, refused
    channel_id = served[0]["extra"]["channelId"]
    row = channel_row(gateway, channel_id)
    charges = rows(gateway, select(Charge.amount).where(Charge.channel_id == channel_id))
    assert row.reserved == 0 and row.charged == sum(amount for (amount,) in charges)
    # Never more than the payer signed for, nor than its channel holds.
    assert row.charged <= row.acknowledged <= row.voucher_amount
    assert row.charged <= market.contracts.batch.channel(bytes.fromhex(channel_id[2:])).balance
    jobs = rows(gateway, select(Job.id).where(Job.channel_id == channel_id))
    assert len(jobs) == 1 + len(served)


def test_a_client_that_lost_its_record_is_corrected_by_a_402_and_pays_on(
    gateway: GatewayServer, market: Market
) -> None:
    client = market.clients[2]
    body = chat_body("remember me", max_tokens=4)

    async def pay_once(payer: x402Client) -> tuple[int, dict[str, Any], str]:
        async with x402HttpxClient(payer, timeout=120) as http:
            return await ask(http, gateway.url, body)

    first, _ = x402_payer(market, client)
    assert asyncio.run(pay_once(first))[0] == 200
    deposits = market.contracts.batch.channel
    # A new process of the same payer: no record, so it signs a deposit and a voucher from zero. The gateway
    # answers with the corrective 402 before sending that deposit; x402's client resynchronises and pays.
    again, scheme = x402_payer(market, client)
    status, payment, text = asyncio.run(pay_once(again))
    assert status == 200, text
    channel_id = payment["extra"]["channelId"]
    assert payment["transaction"] == ""  # no second deposit was needed
    row = channel_row(gateway, channel_id)
    assert scheme._storage.get(channel_id).charged_cumulative_amount == str(row.acknowledged)
    assert deposits(bytes.fromhex(channel_id[2:])).balance >= row.charged


def test_a_voucher_seen_once_never_pays_again(gateway: GatewayServer, market: Market) -> None:
    """Every admitted request adds its whole quote to what the channel acknowledged, so each voucher is above all
    before it: one copied from a log or a proxy cannot pay for anyone's request, whatever its size."""
    payer = x402ClientSync()
    payer.register(
        NETWORK, BatchSettlementEvmScheme(EthAccountSignerWithRPC(market.clients[0], market.anvil.url))
    )
    payer.set_spend_controls(
        {"allowed_assets": [{"network": NETWORK, "asset": market.contracts.token.address}]}
    )
    http = x402HTTPClientSync(payer)
    body = chat_body("a request worth copying", max_tokens=12)
    required = http.get_payment_required_response(post(gateway.url, CHAT, body).headers.get, None)
    seen = []
    for _ in range(2):
        payload = payer.create_payment_payload(required)
        header = http.encode_payment_signature_header(payload)[PAYMENT_SIGNATURE]
        answer = post(gateway.url, CHAT, body, header)
        assert answer.status_code == 200, answer.text
        http.process_payment_result(payload, answer.headers.get, answer.status_code)
        seen.append((header, answer))
    channel_id = settled(seen[0][1])["extra"]["channelId"]
    before = channel_row(gateway, channel_id)
    for header, answer in seen:
        quote = int(settled(answer)["extra"]["quote"])
        for max_tokens in (12, 2, 1):  # the same request, and smaller ones a stranger could size
            replay = post(
                gateway.url, CHAT, chat_body("a request worth copying", max_tokens=max_tokens), header
            )
            assert replay.status_code == 402, replay.text
            assert replay.json()["error"]["code"] == MISMATCH, replay.text
        assert quote > 0
    after = channel_row(gateway, channel_id)
    assert (after.acknowledged, after.charged, after.voucher_amount) == (
        before.acknowledged,
        before.charged,
        before.voucher_amount,
    )


def test_batch_payments_not_for_this_gateway_are_refused_and_change_nothing(
    gateway: GatewayServer, market: Market
) -> None:
    client: LocalAccount = Account.create()
    scheme = BatchSettlementEvmScheme(client)
    offer = requirement(post(gateway.url, CHAT, chat_body()), "batch-settlement")
    assert offer["payTo"] == market.contracts.distributor.address
    assert offer["extra"]["receiverAuthorizer"] == market.operator.address

    def paid(accepted: dict[str, Any], payload: dict[str, Any]) -> httpx.Response:
        header = encode_header({"x402Version": 2, "accepted": accepted, "payload": payload})
        return post(gateway.url, CHAT, chat_body(), header)

    from x402.schemas import PaymentRequirements

    def voucher_payload(**extra_overrides: Any) -> dict[str, Any]:
        accepted = {**offer, "extra": {**offer["extra"], **extra_overrides}}
        payload: dict[str, Any] = (
            scheme._create_voucher_payload(  # a voucher-only payment, as its client signs one
                _channel(scheme, accepted),
                offer["amount"],
                NETWORK,
                scheme.build_channel_config(PaymentRequirements.model_validate(accepted)),
            )
        )
        return payload

    cases = {
        "wrong_receiver_authorizer": voucher_payload(receiverAuthorizer=client.address),
        "withdraw_delay_out_of_range": voucher_payload(withdrawDelay=900),
        "insufficient_deposit": voucher_payload(),  # a channel nothing was deposited in
    }
    tampered = voucher_payload()
    tampered["voucher"]["maxClaimableAmount"] = str(int(offer["amount"]) + 1)
    cases["invalid_signature"] = tampered
    moved = voucher_payload()
    moved["channelConfig"]["salt"] = "0x" + "11" * 32
    cases["channel_id_mismatch"] = moved
    for code, payload in cases.items():
        response = paid(offer, payload)
        assert response.status_code == 402 and response.json()["error"]["code"] == code, (code, response.text)
    assert rows(gateway, select(Channel.id)) == [] or all(
        row.acknowledged == 0 for row in rows(gateway, select(Channel).where(Channel.payer == client.address))
    )
    assert rows(gateway, select(Job.id).where(Job.payer == client.address)) == []
    assert market.contracts.batch.address == BATCH_SETTLEMENT_ADDRESS


def _channel(scheme: BatchSettlementEvmScheme, accepted: dict[str, Any]) -> str:
    from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id
    from x402.schemas import PaymentRequirements

    return compute_channel_id(
        scheme.build_channel_config(PaymentRequirements.model_validate(accepted)), NETWORK
    )
