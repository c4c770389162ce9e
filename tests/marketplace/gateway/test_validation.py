"""Checking providers against real provider processes: validation of honest providers through trouble (the
validator without the model's weights, a provider restarted inside the window, 50 ms on every fetch), where
nobody honest is failed and the validator's own trouble shows in ``/health`` until it is over; and a provider
that signs a false receipt."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_utils.crypto import keccak
from sqlalchemy import select, update

from marketplace.devnet.providers import ProviderProcess as NodeProcess
from marketplace.testing.latency import DelayProxy
from settlement.db.engine import blocking_sessions, create_blocking_engine
from settlement.db.schema import Ask, Hop, HopStatus, Job, Receipt, Validation, ValidationStatus
from settlement.deploy import ONE_TOKEN
from settlement.ledger import meter_job
from settlement.validator import ReferenceModels, Validator
from tests.marketplace.harness import (
    PRICE,
    GatewayServer,
    Market,
    ProviderProcess,
    announce,
    chat_body,
    open_channel,
    post,
    requirement,
    rows,
    start_provider,
    voucher_header,
    wait_ready,
)

CHAT = "/v1/chat/completions"


def paid_chat(gateway: GatewayServer, market: Market, body: dict[str, Any]) -> tuple[str, int]:
    """A chat request paid from a fresh channel: its job id, and the quote it paid against."""
    client = market.clients[1]
    channel = open_channel(market, client, 10 * ONE_TOKEN)
    offer = requirement(post(gateway.url, CHAT, body), "voucher")
    paid = post(gateway.url, CHAT, body, voucher_header(client, channel, int(offer["amount"]), offer))
    assert paid.status_code == 200, paid.text
    return "0x" + paid.json()["id"].removeprefix("chatcmpl-"), int(offer["amount"])


def test_honest_hops_pass_through_the_validators_trouble_a_restart_and_a_slow_link(
    gateway: GatewayServer,
    market: Market,
    model_dir: Path,
    providers: dict[str, ProviderProcess],
    tmp_path: Path,
) -> None:
    job_id, _ = paid_chat(gateway, market, chat_body("validate me", max_tokens=16))

    engine = create_blocking_engine(gateway.gateway.settings.database_url)
    sessions = blocking_sessions(engine)
    try:
        with sessions.begin() as session:
            metered = meter_job(session, job_id, domain=market.contracts.protocol_domain(), sample_rate=1.0)
        assert metered is not None and len(metered.sampled) == 3  # every hop drawn

        def validator(references: ReferenceModels) -> Validator:
            # The deployment's slasher: providers trust it to fetch their steps unless told otherwise.
            return Validator(sessions, market.contracts, market.anvil.accounts[3], references, retry_s=1.0)

        # The validator's own trouble: no weights for the model. Nothing counts against the providers; /health says
        # so, and the hops are tried again soon.
        outcomes = [validator(ReferenceModels([])).validate(v) for v in metered.sampled]
        assert {(o.status, o.reason) for o in outcomes} == {(ValidationStatus.PENDING, "validator_trouble")}
        assert all(o.retry_in_s is not None and o.retry_in_s <= 30 for o in outcomes)
        health = httpx.get(gateway.url + "/health").json()["validation"]
        assert (health["status"], health["troubled"], health["pending"]) == ("behind", 3, 3)
        assert 'strata_validations{state="troubled"} 3.0' in httpx.get(gateway.url + "/metrics").text

        # The middle provider restarts (killed, as a crash would) inside the window, and every fetch crosses 50 ms.
        middle = providers["b"]
        middle.node.kill()
        middle.node.process.wait(timeout=30)
        middle.node = NodeProcess.start(
            middle.node.launch, key=middle.account.key.hex(), log=tmp_path / "b-again.log"
        )
        wait_ready(middle)
        with sessions() as session:
            asks = {
                hop.ask_id: session.get(Ask, hop.ask_id).endpoint  # type: ignore[union-attr]
                for hop in session.scalars(select(Hop).where(Hop.job_id == job_id))
            }
        try:
            with ExitStack() as stack:
                for ask_id, endpoint in asks.items():
                    proxy = stack.enter_context(DelayProxy(endpoint, 0.05))
                    with sessions.begin() as session:
                        session.execute(update(Ask).where(Ask.id == ask_id).values(endpoint=proxy.endpoint))
                references = ReferenceModels([str(model_dir)])
                outcomes = [validator(references).validate(v) for v in metered.sampled]
        finally:
            with sessions.begin() as session:
                for ask_id, endpoint in asks.items():
                    session.execute(update(Ask).where(Ask.id == ask_id).values(endpoint=endpoint))

        assert [o.status for o in outcomes] == [ValidationStatus.PASSED] * 3, outcomes
        with sessions() as session:
            decided = session.scalars(select(Validation).where(Validation.job_id == job_id)).all()
        assert all(v.trouble is None and v.slash_status is None for v in decided)
        health = httpx.get(gateway.url + "/health").json()["validation"]
        assert (health["status"], health["troubled"], health["pending"]) == ("ok", 0, 0)

    finally:
        engine.dispose()  # its pooled connections, on PostgreSQL


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_honest_hops_pass_under_every_sampling_parameter_and_several_choices(
    gateway: GatewayServer, market: Market, model_dir: Path
) -> None:
    """Penalties over prompt and output, a bias, min-p and a JSON schema's grammar, sampled, two choices: every
    hop is billed on its receipt and passes its validation, the last spans judged under the sampling each of
    their sessions was opened with (each choice its own seed)."""
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    body = chat_body(
        "validate me under everything",
        max_tokens=24,
        temperature=0.9,
        seed=17,
        n=2,
        presence_penalty=0.8,
        frequency_penalty=0.3,
        repetition_penalty=1.2,
        min_p=0.05,
        logit_bias={"123": 3.0},
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )
    job_id, _ = paid_chat(gateway, market, body)
    engine = create_blocking_engine(gateway.gateway.settings.database_url)
    sessions = blocking_sessions(engine)
    try:
        with sessions.begin() as session:
            hops = session.scalars(select(Hop).where(Hop.job_id == job_id).order_by(Hop.attempt)).all()
            last = [hop for hop in hops if hop.layer_end == 6]
            assert [hop.sampling["seed"] for hop in last if hop.sampling] == [17, 18]
            assert all(hop.status == HopStatus.BILLED for hop in hops) and len(hops) == 6
            metered = meter_job(session, job_id, domain=market.contracts.protocol_domain(), sample_rate=1.0)
        assert metered is not None and len(metered.sampled) == 6
        validator = Validator(
            sessions,
            market.contracts,
            market.anvil.accounts[3],
            ReferenceModels([str(model_dir)]),
            retry_s=1.0,
        )
        outcomes = [validator.validate(v) for v in metered.sampled]
        assert [o.status for o in outcomes] == [ValidationStatus.PASSED] * 6, outcomes
    finally:
        engine.dispose()


def test_a_false_receipt_bills_nothing_suspends_its_provider_and_is_kept_as_evidence(
    gateway: GatewayServer, market: Market, model_dir: Path, tmp_path: Path
) -> None:
    """A provider serves the middle span honestly, then signs a receipt for half as many positions again. The
    client is charged only the honest hops; the liar is out of matching, and its receipt is served as evidence."""
    liar = start_provider(
        model_dir, market.providers[4], (2, 4), market, ("--misbehave", "inflate-receipt"), log_dir=tmp_path
    )
    try:
        wait_ready(liar)
        root = gateway.gateway.catalog.get("tiny").root
        announce(gateway.url, liar, root, price=PRICE // 2)  # cheaper than B: routing picks it
        body = chat_body("lie to me", max_tokens=8)
        job_id, quote = paid_chat(gateway, market, body)
        hops = rows(gateway, select(Hop).where(Hop.job_id == job_id).order_by(Hop.position))
        assert [h.status for h in hops] == [HopStatus.BILLED, HopStatus.FALSE_RECEIPT, HopStatus.BILLED]
        assert hops[1].provider == liar.account.address
        receipts = {r.provider: r for r in rows(gateway, select(Receipt).where(Receipt.job_id == job_id))}
        assert receipts[liar.account.address].amount == 0
        (job,) = rows(gateway, select(Job).where(Job.id == job_id))
        assert job.charged == sum(r.amount for r in receipts.values()) > 0

        (listed,) = httpx.get(gateway.url + "/v1/slashes", params={"provider": liar.account.address}).json()[
            "data"
        ]
        assert (listed["reason"], listed["status"], listed["job"]) == ("false_receipt", "suspended", job_id)
        served = httpx.get(gateway.url + f"/v1/slashes/{listed['id']}").json()
        assert "0x" + keccak(served["evidence"].encode()).hex() == listed["id"]
        evidence = json.loads(served["evidence"])
        assert evidence["receipt"]["positions"] == hops[1].tokens * 3 // 2
        assert evidence["recorded"]["positions"] == hops[1].tokens
        assert not gateway.gateway.book.matchable(liar.account.address)
        # The next request is routed around it, through B at the full price.
        assert int(requirement(post(gateway.url, CHAT, body), "voucher")["amount"]) > quote
    finally:
        liar.node.stop()
