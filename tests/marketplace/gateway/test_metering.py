"""What the gateway records is enough for settlement: real jobs through real providers meter to exactly their
charge, and the payout API reports what the ledger and the chain say."""

from __future__ import annotations

import httpx
from sqlalchemy import select

from settlement.db.engine import blocking_sessions, create_blocking_engine
from settlement.db.schema import Charge, LedgerEntry
from settlement.deploy import ONE_TOKEN
from settlement.ledger import meter_job
from tests.marketplace.harness import (
    GatewayServer,
    Market,
    ProviderProcess,
    chat_body,
    open_channel,
    post,
    requirement,
    voucher_header,
)

CHAT = "/v1/chat/completions"


def test_a_paid_job_meters_to_exactly_its_charge(
    gateway: GatewayServer, market: Market, providers: dict[str, ProviderProcess]
) -> None:
    client = market.clients[1]
    channel = open_channel(market, client, 10 * ONE_TOKEN)
    offer = requirement(post(gateway.url, CHAT, chat_body("meter me", max_tokens=10)), "voucher")
    paid = post(
        gateway.url,
        CHAT,
        chat_body("meter me", max_tokens=10),
        voucher_header(client, channel, int(offer["amount"]), offer),
    )
    assert paid.status_code == 200, paid.text
    job_id = "0x" + paid.json()["id"].removeprefix("chatcmpl-")
    provider = providers["a"].account.address
    earned_before = int(httpx.get(f"{gateway.url}/v1/payouts/{provider}").json()["earned"])

    engine = create_blocking_engine(gateway.gateway.settings.database_url)
    try:
        sessions = blocking_sessions(engine)
        with sessions.begin() as session:
            metered = meter_job(session, job_id, domain=market.contracts.protocol_domain())
        with sessions() as session:
            charge = session.scalar(select(Charge).where(Charge.job_id == job_id))
            entries = session.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id)).all()
    finally:
        engine.dispose()

    assert metered is not None and metered.refused == {}
    assert charge is not None and charge.amount > 0
    assert metered.charge == charge.metered == charge.amount == sum(e.charge for e in entries)
    assert [e.provider for e in entries] == [providers[n].account.address for n in ("a", "b", "c")]
    assert all(e.provider_share + e.platform_fee == e.charge for e in entries)

    payout = httpx.get(f"{gateway.url}/v1/payouts/{provider.lower()}").json()
    assert payout["provider"] == provider
    assert int(payout["earned"]) - earned_before == entries[0].provider_share
    # Not settled yet: nothing in a root, nothing to claim.
    assert (payout["claimed"], payout["claimable"], payout["proof"]) == ("0", "0", [])


def test_payouts_refuse_what_is_not_an_address(gateway: GatewayServer) -> None:
    for bad in ("nope", "0x1234", "0x" + "zz" * 20):
        response = httpx.get(f"{gateway.url}/v1/payouts/{bad}")
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_address"
    nobody = httpx.get(f"{gateway.url}/v1/payouts/0x{'12' * 20}").json()
    assert (nobody["earned"], nobody["settled"], nobody["epoch"], nobody["root"]) == ("0", "0", None, None)
