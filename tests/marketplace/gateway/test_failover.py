"""A provider killed in the middle of a streamed answer: the job moves to a fresh route (dearer, within the
quote's failover margin), replays its prefix, and the client gets the answer a run without the failure gives,
paying for the final route only; with no spare left, the job fails and pays for the tokens it delivered."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from settlement.db.schema import Hop, Job
from settlement.deploy import ONE_TOKEN
from settlement.pricing import hop_charge
from tests.marketplace.harness import (
    PRICE,
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
    settled,
    start_provider,
    stop_providers,
    voucher_header,
    wait_ready,
    wait_until,
)

CHAT = "/v1/chat/completions"
MAX_TOKENS = 800


@pytest.fixture
def failing_market(
    request: pytest.FixtureRequest,
    market: Market,
    model_dir: Path,
    providers: dict[str, ProviderProcess],
    tmp_path: Path,
) -> Iterator[tuple[GatewayServer, ProviderProcess]]:
    """A gateway of its own whose best route runs through X, a provider that announces itself with
    `provider serve --gateway`; the backup serves X's span, posted after it, at X's price or at the price the
    test asks for (``indirect`` parametrization: the spare's price, or None for no spare at all)."""
    spare_price = getattr(request, "param", PRICE)
    with market_through_x(market, model_dir, providers, tmp_path, spare_price) as made:
        yield made


@contextmanager
def market_through_x(
    market: Market,
    model_dir: Path,
    providers: dict[str, ProviderProcess],
    tmp_path: Path,
    spare_price: int | None,
) -> Iterator[tuple[GatewayServer, ProviderProcess]]:
    with database("sqlite", tmp_path) as url:
        server = GatewayServer(
            gateway_settings(market, url, {"tiny": model_dir}, failure_suspend_s=600)
        ).start()
        root = server.gateway.catalog.get("tiny").root
        x = start_provider(
            model_dir, market.providers[4], (2, 4), market,
            ["--gateway", server.url, "--price", str(PRICE), "--capacity", "4"], log_dir=tmp_path,
        )  # fmt: skip
        try:
            wait_ready(x)
            for name in ("a", "c"):
                announce(server.url, providers[name], root)
            wait_until(
                lambda: any(
                    ask["provider"] == x.account.address
                    for ask in httpx.get(server.url + "/v1/asks", params={"model": "tiny"}).json()["data"]
                )
            )
            if spare_price is not None:
                announce(server.url, providers["backup"], root, price=spare_price)
            yield server, x
        finally:
            stop_providers([x])
            server.stop()


def stream_killing(
    server: GatewayServer, body: dict[str, object], header: str, x: ProviderProcess
) -> list[dict[str, object]]:
    """Streams a paid answer, killing X once three chunks have arrived; returns every chunk."""
    chunks: list[dict[str, object]] = []
    with (
        httpx.Client(timeout=120) as http,
        http.stream(
            "POST", server.url + CHAT, json={**body, "stream": True}, headers={"PAYMENT-SIGNATURE": header}
        ) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                chunks.append(json.loads(line[5:]))
                if len(chunks) == 3:
                    x.kill()
    return chunks


DEARER = PRICE * 105 // 100  # within the default failover margin of 10%


@pytest.mark.parametrize("failing_market", [PRICE, DEARER], ids=["spare-at-the-same-price", "dearer-spare"],
                         indirect=True)  # fmt: skip
def test_a_provider_killed_mid_stream_is_replaced_and_the_answer_is_unchanged(
    failing_market: tuple[GatewayServer, ProviderProcess],
    market: Market,
    providers: dict[str, ProviderProcess],
) -> None:
    """Routing picks the cheapest route, so the spare left when a provider dies is usually dearer: the quote's
    failover margin pays for it, and the job finishes there instead of failing."""
    server, x = failing_market
    client = market.clients[1]
    channel = open_channel(market, client, 10 * ONE_TOKEN)
    body = chat_body("tell me everything", max_tokens=MAX_TOKENS)
    offer = requirement(post(server.url, CHAT, body), "voucher")
    quote = int(offer["amount"])
    assert [hop["provider"] for hop in offer["extra"]["route"]][1] == x.account.address

    # The answer without a failure, on the route through X.
    baseline = post(server.url, CHAT, body, voucher_header(client, channel, quote, offer))
    assert baseline.status_code == 200, baseline.text
    expected = baseline.json()
    # A failure can only land mid-answer if the answer is long: greedy decoding runs to the token limit.
    assert expected["choices"][0]["finish_reason"] == "length"
    baseline_charge = int(settled(baseline)["amount"])

    header = voucher_header(client, channel, baseline_charge + quote, offer)
    chunks = stream_killing(server, body, header, x)
    pieces = [choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"]]

    assert "".join(pieces) == expected["choices"][0]["message"]["content"]
    final = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])  # type: ignore[index]
    assert final["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
    amount = int(final["payment"]["amount"])  # type: ignore[index]

    job_id = "0x" + str(chunks[0]["id"]).removeprefix("chatcmpl-")
    hops = rows(server, select(Hop).where(Hop.job_id == job_id).order_by(Hop.attempt, Hop.position))
    first = [(h.provider, h.status) for h in hops if h.attempt == 0]
    second = [(h.provider, h.status) for h in hops if h.attempt == 1]
    a, backup, c = (providers[n].account.address for n in ("a", "backup", "c"))
    assert first == [(a, "abandoned"), (x.account.address, "failed"), (c, "abandoned")]
    assert second == [(a, "billed"), (backup, "billed"), (c, "billed")]
    assert max(h.attempt for h in hops) == 1
    # Billed as a run on the final route alone: the same tokens through the same layers, at its prices.
    final_route = [h for h in hops if h.attempt == 1]
    assert amount == sum(
        hop_charge(h.tokens, h.layer_end - h.layer_start, h.price_per_million) for h in final_route
    )
    spare_price = final_route[1].price_per_million
    assert amount == baseline_charge if spare_price == PRICE else baseline_charge < amount <= quote

    state = channel_state(server.url, channel)
    assert (state["charged"], state["reserved"]) == (str(baseline_charge + amount), "0")
    # The provider at fault is out of matching, and the next request goes around it.
    assert not httpx.get(f"{server.url}/v1/providers/{x.account.address}").json()["matchable"]
    again = requirement(post(server.url, CHAT, body), "voucher")
    assert [hop["provider"] for hop in again["extra"]["route"]] == [a, backup, c]


@pytest.mark.parametrize("failing_market", [None], ids=["no-spare"], indirect=True)
def test_a_job_that_fails_after_streaming_is_charged_for_what_it_delivered(
    failing_market: tuple[GatewayServer, ProviderProcess],
    market: Market,
    providers: dict[str, ProviderProcess],
) -> None:
    """X dies mid-answer and no spare serves its span: the job fails, but the tokens already streamed were
    delivered, so they are paid for, on the receipts of the hops that back them. Nobody honest is blamed."""
    server, x = failing_market
    client = market.clients[2]
    channel = open_channel(market, client, 10 * ONE_TOKEN)
    body = chat_body("tell me everything", max_tokens=MAX_TOKENS)
    offer = requirement(post(server.url, CHAT, body), "voucher")
    quote = int(offer["amount"])
    header = voucher_header(client, channel, quote, offer)
    stream_killing(server, body, header, x)

    (job,) = rows(server, select(Job).where(Job.channel_id == "0x" + channel.hex()))
    assert (job.status, job.error_code) == ("failed", "route_failed")
    assert job.completion_tokens >= 3
    hops = {h.provider: h for h in rows(server, select(Hop).where(Hop.job_id == job.id))}
    a, c = (providers[n].account.address for n in ("a", "c"))
    assert hops[x.account.address].status == "failed"
    billed = {provider for provider, hop in hops.items() if hop.status == "billed"}
    # The hop after X never saw the step that died with it: its receipt is exactly the record, and it is paid.
    # The hop before X computed that step too, so its receipt may say one step more: unpaid, not blamed.
    assert c in billed and x.account.address not in billed and billed <= {a, c}
    assert all(hop.status != "false_receipt" for hop in hops.values())
    expected = sum(
        hop_charge(hops[p].tokens, hops[p].layer_end - hops[p].layer_start, hops[p].price_per_million)
        for p in billed
    )
    assert 0 < job.charged == expected <= quote
    state = channel_state(server.url, channel)
    assert (state["charged"], state["reserved"]) == (str(expected), "0")
    assert httpx.get(f"{server.url}/v1/providers/{a}").json()["matchable"]
