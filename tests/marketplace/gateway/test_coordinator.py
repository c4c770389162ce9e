"""The coordinator's failover decisions, on fake providers (tests/marketplace/gateway/test_failover.py kills
real ones): whom it blames, where it goes next, what it replays, and what each attempt is paid."""

from __future__ import annotations

import asyncio
import os

import pytest

from marketplace.gateway.coordinator import JobSpec, Outcome
from settlement.db.schema import HopStatus
from settlement.pricing import hop_charge
from tests.marketplace.gateway.fakes import MODEL_ROOT, FakeTransport, book_with, coordinator

PROMPT = [1, 2, 3, 4]
# Providers 1, 2, 3 cover 0:2, 2:4, 4:6; 4 is a spare for 2:4 at the same price, posted later; 5 a dearer one.
ROUTE = [(1, 0, 2, 1_000_000), (2, 2, 4, 1_000_000), (3, 4, 6, 1_000_000)]
SPARE = (4, 2, 4, 1_000_000)
DEAR_SPARE = (5, 2, 4, 3_000_000)


def spec(max_tokens: int = 6, budget: int | None = 10_000) -> JobSpec:
    return JobSpec(os.urandom(32), MODEL_ROOT, 6, 1_000, PROMPT, max_tokens, {}, frozenset(), budget)


def run(asks: list[tuple[int, int, int, int]], transport_for, job: JobSpec, **settings: object):  # type: ignore[no-untyped-def]
    book, posted = book_with(asks)
    transport = transport_for(posted)
    runner = coordinator(book, transport, **settings)
    emitted: list[int] = []

    async def emit(_choice: int, token: int, _logprobs: object) -> bool:
        emitted.append(token)
        return True

    route = book.match(MODEL_ROOT, 6)
    assert route is not None
    outcome: Outcome = asyncio.run(runner.run(job, route, emit))
    return outcome, emitted, transport, book, posted


def test_a_clean_run_bills_every_hop_its_token_layers() -> None:
    outcome, emitted, transport, _, posted = run(ROUTE, FakeTransport, spec())
    assert outcome.finish == "length" and outcome.failovers == 0
    assert emitted == outcome.tokens and len(outcome.tokens) == 6
    positions = len(PROMPT) + 5  # the last token is sampled, never sent back through the route
    assert [hop.status for hop in outcome.hops] == [HopStatus.BILLED] * 3
    assert outcome.charged == sum(hop_charge(positions, 2, 1_000_000) for _ in range(3))
    assert all(ask.in_use == 0 for ask in posted)  # capacity released
    assert transport.closed == 1


def test_a_failed_provider_is_replaced_and_the_job_replayed_with_the_same_output() -> None:
    clean, _, _, _, _ = run([*ROUTE, SPARE], FakeTransport, spec())

    def failing(posted):  # type: ignore[no-untyped-def]
        b = posted[1]  # provider 2 fails from step 3 on
        return FakeTransport(posted, fail={b.endpoint: (3, "own")})

    outcome, emitted, transport, book, posted = run([*ROUTE, SPARE], failing, spec())
    assert outcome.finish == "length" and outcome.failovers == 1
    assert outcome.tokens == clean.tokens  # deterministic sampling: the same answer as without the failure
    assert emitted == outcome.tokens
    # The second provider's own authenticated error: it is blamed, the others are not.
    first, second = outcome.hops[:3], outcome.hops[3:]
    assert [hop.status for hop in first] == [HopStatus.ABANDONED, HopStatus.FAILED, HopStatus.ABANDONED]
    assert [hop.ask.provider for hop in second] == [
        posted[0].provider,
        posted[3].provider,
        posted[2].provider,
    ]
    assert [hop.status for hop in second] == [HopStatus.BILLED] * 3
    # Nothing is paid for the abandoned attempt; the client pays what the final route alone costs.
    assert sum(hop.amount for hop in first) == 0
    assert outcome.charged == clean.charged
    # The new route's prefill is the prompt and every token generated so far, in one step.
    replay = [ids for endpoint, step, ids in transport.log if endpoint == posted[0].endpoint and step == 0]
    assert replay[-1] == [*PROMPT, *outcome.tokens[:3]]
    assert book.matchable(posted[1].provider) is False  # suspended for a while
    assert all(ask.in_use == 0 for ask in posted)


def test_a_broken_link_leaves_both_hops_out_and_suspends_neither() -> None:
    def broken(posted):  # type: ignore[no-untyped-def]
        return FakeTransport(posted, fail={posted[2].endpoint: (1, "link")})

    outcome, _, _, book, posted = run([*ROUTE, (6, 2, 4, 1_000_000), (7, 4, 6, 1_000_000)], broken, spec())
    assert outcome.failovers == 1 and outcome.finish == "length"
    statuses = [hop.status for hop in outcome.hops[:3]]
    assert statuses == [HopStatus.ABANDONED, HopStatus.SUSPECT, HopStatus.SUSPECT]
    assert all(book.matchable(ask.provider) for ask in posted)  # either may be lying: nobody suspended
    assert {hop.ask.provider for hop in outcome.hops[3:]}.isdisjoint({posted[1].provider, posted[2].provider})


def test_a_report_that_does_not_verify_blames_its_relayer() -> None:
    def forged(posted):  # type: ignore[no-untyped-def]
        return FakeTransport(posted, fail={posted[2].endpoint: (1, "relayed")})

    outcome, _, _, book, posted = run([*ROUTE, SPARE], forged, spec())
    statuses = [hop.status for hop in outcome.hops[:3]]
    assert statuses == [HopStatus.ABANDONED, HopStatus.FAILED, HopStatus.ABANDONED]
    assert not book.matchable(posted[1].provider) and book.matchable(posted[2].provider)


def test_a_silent_route_is_left_whole_but_nobody_is_suspended() -> None:
    def silent(posted):  # type: ignore[no-untyped-def]
        return FakeTransport(posted, fail={posted[0].endpoint: (2, "timeout")})

    outcome, _, _, book, posted = run(ROUTE, silent, spec())
    assert outcome.finish is None and outcome.error_code == "route_failed"
    assert all(hop.status == HopStatus.SUSPECT for hop in outcome.hops)
    assert outcome.charged == 0  # every hop a suspect: none is paid, so the tokens streamed cost nothing
    assert all(book.matchable(ask.provider) for ask in posted)  # a timeout may be anyone's: no suspension


def test_a_spare_above_the_budget_is_not_taken() -> None:
    def failing(posted):  # type: ignore[no-untyped-def]
        return FakeTransport(posted, fail={posted[1].endpoint: (2, "own")})

    budget = hop_charge(len(PROMPT) + 6, 6, 1_000_000)  # exactly the cheap route's quote
    outcome, emitted, _, _, posted = run([*ROUTE, DEAR_SPARE], failing, spec(budget=budget))
    assert outcome.error_code == "route_failed"
    assert emitted == outcome.tokens and len(emitted) == 2  # what was streamed before the failure
    assert all(ask.in_use == 0 for ask in posted)
    # What was delivered is paid for, on the receipts of the hops not at fault; the failing hop gets nothing.
    billed = [hop for hop in outcome.hops if hop.status == HopStatus.BILLED]
    assert {hop.position for hop in billed} <= {0, 2} and billed
    assert outcome.hops[1].status == HopStatus.FAILED
    assert 0 < outcome.charged == sum(hop.amount for hop in billed) <= budget


@pytest.mark.parametrize("max_failovers", [0, 1])
def test_failovers_stop_at_the_limit(max_failovers: int) -> None:
    spares = [(10 + i, 2, 4, 1_000_000) for i in range(3)]

    def everyone_fails(posted):  # type: ignore[no-untyped-def]
        middle = [ask for ask in posted if ask.start == 2]
        return FakeTransport(posted, fail={ask.endpoint: (1, "own") for ask in middle})

    outcome, *_ = run([*ROUTE, *spares], everyone_fails, spec(), max_failovers=max_failovers)
    assert outcome.error_code == "route_failed"
    assert outcome.failovers == max_failovers
    assert len({hop.attempt for hop in outcome.hops}) == max_failovers + 1


@pytest.mark.parametrize("ring", [True, False])
def test_each_decode_step_teaches_the_book_its_hops_step_times(ring: bool) -> None:
    """The prefill tells nothing of load; every decode step's round trip is attributed to the route's hops."""
    outcome, _, _, book, posted = run(ROUTE, FakeTransport, spec(), ring=ring)
    assert outcome.finish == "length"
    for ask in posted:
        learned = book.providers[ask.provider].ms_per_layer
        assert learned is not None and learned >= 0
