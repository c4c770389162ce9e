"""Two ways a gateway serves without taking money: with payment checks off, and when the database refuses a
finished job's outcome (the client is told, and a restart releases what it reserved)."""

from __future__ import annotations

from pathlib import Path

import httpx
import psycopg
from sqlalchemy import create_engine, select, text

from settlement.db.engine import sync_url
from settlement.db.schema import Hop, Job
from settlement.deploy import ONE_TOKEN
from tests.marketplace.harness import (
    GatewayServer,
    Market,
    ProviderProcess,
    announce,
    channel_state,
    chat_body,
    database,
    gateway_settings,
    open_channel,
    post,
    requirement,
    rows,
    voucher_header,
)

CHAT = "/v1/chat/completions"


def serve(
    market: Market, url: str, model_dir: Path, providers: dict[str, ProviderProcess], **settings: object
):  # type: ignore[no-untyped-def]
    server = GatewayServer(gateway_settings(market, url, {"tiny": model_dir}, **settings)).start()
    root = server.gateway.catalog.get("tiny").root
    for name in ("a", "b", "c"):
        announce(server.url, providers[name], root)
    return server


def test_without_payment_checks_requests_run_unpaid_and_charge_nobody(
    market: Market, model_dir: Path, providers: dict[str, ProviderProcess], tmp_path: Path
) -> None:
    with database("sqlite", tmp_path) as url:
        server = serve(market, url, model_dir, providers, payments_enabled=False)
        try:
            response = post(server.url, CHAT, chat_body("free", max_tokens=6))
            assert response.status_code == 200, response.text
            assert "PAYMENT-RESPONSE" not in response.headers
            job_id = "0x" + response.json()["id"].removeprefix("chatcmpl-")
            (job,) = rows(server, select(Job).where(Job.id == job_id))
            assert (job.status, job.scheme, job.charged, job.payer) == ("completed", "none", 0, None)
            # The providers' work is still metered, hop by hop.
            hops = rows(server, select(Hop).where(Hop.job_id == job_id))
            assert len(hops) == 3 and all(h.status == "billed" and h.tokens > 0 for h in hops)
        finally:
            server.stop()


def _refuse_hops(backend: str, url: str) -> None:
    """Makes the database refuse every new hop row, as a full disk or a lost connection would refuse it."""
    if backend == "sqlite":
        engine = create_engine(sync_url(url))
        with engine.begin() as connection:
            connection.execute(
                text("CREATE TRIGGER no_hops BEFORE INSERT ON hops BEGIN SELECT RAISE(ABORT, 'refused'); END")
            )
        engine.dispose()
    else:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("ALTER TABLE hops ADD CONSTRAINT no_hops CHECK (false) NOT VALID")


def _allow_hops(backend: str, url: str) -> None:
    statement = "DROP TRIGGER no_hops" if backend == "sqlite" else "ALTER TABLE hops DROP CONSTRAINT no_hops"
    if backend == "sqlite":
        engine = create_engine(sync_url(url))
        with engine.begin() as connection:
            connection.execute(text(statement))
        engine.dispose()
    else:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(statement)


def test_an_outcome_the_database_refuses_is_reported_and_released_at_restart(
    backend: str, market: Market, model_dir: Path, providers: dict[str, ProviderProcess], tmp_path: Path
) -> None:
    client = market.clients[2]
    channel = open_channel(market, client, ONE_TOKEN)
    with database(backend, tmp_path) as url:
        server = serve(market, url, model_dir, providers)
        try:
            body = chat_body("unrecorded", max_tokens=6)
            offer = requirement(post(server.url, CHAT, body), "voucher")
            quote = int(offer["amount"])
            _refuse_hops(backend, url)
            response = post(server.url, CHAT, body, voucher_header(client, channel, quote, offer))
            assert response.status_code == 500
            assert response.json()["error"]["code"] == "internal_error"
            assert "PAYMENT-RESPONSE" not in response.headers
            streamed = httpx.post(
                server.url + CHAT,
                json={**body, "stream": True},
                headers={"PAYMENT-SIGNATURE": voucher_header(client, channel, 2 * quote, offer)},
                timeout=60,
            )
            assert '"code":"internal_error"' in streamed.text and streamed.text.endswith("data: [DONE]\n\n")
            # Both jobs still hold their reservations: the gateway could not record what they cost.
            assert channel_state(server.url, channel)["reserved"] == str(2 * quote)
        finally:
            server.stop()
        _allow_hops(backend, url)
        server = GatewayServer(gateway_settings(market, url, {"tiny": model_dir})).start()
        try:
            state = channel_state(server.url, channel)
            assert (state["charged"], state["reserved"]) == ("0", "0")
            jobs = rows(server, select(Job.status, Job.error_code, Job.charged))
            assert sorted(jobs) == [("failed", "gateway_restarted", 0)] * 2
        finally:
            server.stop()
