"""The order book's routing against brute force, its priority rule, and what makes an ask matchable."""

from __future__ import annotations

import asyncio
import random

import pytest

from marketplace.gateway.orderbook import COST_SCALE, BookAsk, Budget, OrderBook, Route
from settlement.pricing import hop_charge

NOW = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def ask(
    id: int, start: int, end: int, price: int, *, provider: str | None = None, capacity: int = 1,
    root: str = "m", expires_at: float = NOW + 600,
) -> BookAsk:  # fmt: skip
    return BookAsk(
        id,
        provider or f"p{id}",
        root,
        start,
        end,
        price,
        capacity,
        f"127.0.0.1:{1000 + id}",
        bytes(32),
        expires_at,
    )


def live_book(asks: list[BookAsk], clock: Clock | None = None) -> OrderBook:
    book = OrderBook(heartbeat_ttl_s=30, clock=clock or Clock())
    for a in asks:
        book.post(a)
        book.set_active(a.provider, True)
        book.heartbeat(a.provider, NOW)
    return book


def brute_force(asks: list[BookAsk], layers: int) -> tuple[float, int] | None:
    """(cost, newest seq) of the best route by trying every chain from layer 0."""
    best: tuple[float, int] | None = None

    def walk(boundary: int, cost: int, newest: int) -> None:
        nonlocal best
        if boundary == layers:
            if best is None or (cost, newest) < best:
                best = (cost, newest)
            return
        for a in asks:
            if a.start == boundary and a.end <= layers and a.free > 0:
                walk(a.end, cost + a.layers * a.price_per_million, max(newest, a.id))

    walk(0, 0, -1)
    return best


def key(route: Route) -> tuple[int, int]:
    return route.price_per_token, max(a.id for a in route.asks)


@pytest.mark.parametrize("seed", range(40))
def test_routing_finds_what_brute_force_finds(seed: int) -> None:
    rng = random.Random(seed)
    layers = rng.randint(2, 9)
    asks = []
    for i in range(rng.randint(1, 14)):
        start = rng.randrange(layers)
        end = rng.randint(start + 1, layers)
        # Few distinct prices, so equal-cost routes are common and priority decides.
        asks.append(ask(i, start, end, rng.choice([1, 2, 3]) * 100, capacity=rng.choice([0, 1, 2])))
    book = live_book(asks)
    expected = brute_force(asks, layers)
    route = book.route("m", layers)
    if expected is None:
        assert route is None
        return
    assert route is not None and key(route) == expected
    assert route.asks[0].start == 0 and route.asks[-1].end == layers
    assert all(a.end == b.start for a, b in zip(route.asks, route.asks[1:], strict=False))


def test_the_earlier_ask_wins_a_tie_and_a_cheaper_one_beats_both() -> None:
    book = live_book([ask(1, 0, 4, 100), ask(2, 0, 4, 100)])
    route = book.route("m", 4)
    assert route is not None and [a.id for a in route.asks] == [1]
    book.post(ask(3, 0, 2, 90))
    book.set_active("p3", True)
    book.heartbeat("p3", NOW)
    book.post(ask(4, 2, 4, 100))
    book.set_active("p4", True)
    book.heartbeat("p4", NOW)
    route = book.route("m", 4)
    assert route is not None and [a.id for a in route.asks] == [3, 4]
    assert route.price_per_token == 2 * 90 + 2 * 100


def test_matching_reserves_capacity_and_release_returns_it() -> None:
    book = live_book([ask(1, 0, 2, 100, capacity=1), ask(2, 0, 2, 200, capacity=1)])
    first = book.match("m", 2)
    second = book.match("m", 2)
    assert first is not None and second is not None
    assert [first.asks[0].id, second.asks[0].id] == [1, 2]
    assert book.match("m", 2) is None
    book.release(first)
    again = book.match("m", 2)
    assert again is not None and again.asks[0].id == 1


def test_only_active_fresh_unsuspended_providers_with_live_asks_are_matched() -> None:
    clock = Clock()
    book = live_book([ask(1, 0, 2, 100), ask(2, 0, 2, 200, expires_at=NOW + 10)], clock)
    book.set_active("p1", False)  # unstaked
    route = book.route("m", 2)
    assert route is not None and route.asks[0].id == 2
    assert book.route("m", 2, exclude=["p2"]) is None
    book.set_active("p1", True)
    book.suspend("p1", 5)
    assert book.route("m", 2).asks[0].id == 2  # type: ignore[union-attr]
    clock.now += 6
    assert book.route("m", 2).asks[0].id == 1  # type: ignore[union-attr]
    clock.now += 5  # p2's ask has expired; p1's heartbeat is 11 s old, within the TTL
    assert [a.id for a in book.expire()] == [2]
    clock.now += 30
    assert book.route("m", 2) is None  # p1's last heartbeat is past the TTL
    book.heartbeat("p1", clock.now)
    assert book.route("m", 2) is not None
    assert book.route("other", 2) is None
    assert book.route("m", 3) is None  # no ask covers layer 2


def test_a_new_ask_replaces_the_same_span_and_withdraw_removes_it() -> None:
    book = live_book([ask(1, 0, 2, 100, provider="p")])
    held = book.match("m", 2)
    assert held is not None
    replaced = book.post(ask(2, 0, 2, 50, provider="p"))
    assert replaced is not None and replaced.id == 1 and not replaced.live
    assert [a.id for a in book.asks("m")] == [2]
    book.release(held)  # the job that held the old ask releases into it, not into the new one
    assert book.get(2).in_use == 0  # type: ignore[union-attr]
    assert book.withdraw("p", "m", 0, 2) is not None
    assert book.route("m", 2) is None and book.asks() == []


def test_depth_groups_matchable_asks_by_span_and_price() -> None:
    book = live_book(
        [ask(1, 0, 2, 100, capacity=2), ask(2, 0, 2, 100, capacity=3), ask(3, 0, 2, 90), ask(4, 2, 4, 70)]
    )
    book.match("m", 2)  # takes one session of ask 3, the cheapest
    book.set_active("p4", False)
    (depth,) = book.depth("m")
    assert (depth.start, depth.end) == (0, 2)
    assert [(lv.price_per_million, lv.asks, lv.capacity, lv.free) for lv in depth.levels] == [
        (90, 1, 1, 0),
        (100, 2, 5, 5),
    ]


def test_a_quote_prices_each_hop_rounded_up() -> None:
    route = Route("m", (ask(1, 0, 3, 333_333), ask(2, 3, 4, 1_500_001)))
    # 6.99999 and 10.500007 base units.
    assert route.quote(7) == hop_charge(7, 3, 333_333) + hop_charge(7, 1, 1_500_001) == 7 + 11
    assert route.quote(0) == 0


def test_no_request_is_free() -> None:
    """One token through one layer at the lowest price an ask may have still costs a base unit a hop."""
    cheapest = Route("m", (ask(1, 0, 1, 1), ask(2, 1, 2, 1)))
    assert cheapest.quote(1) == 2
    assert hop_charge(1, 1, 1) == 1 and hop_charge(1_000_000, 1, 1) == 1 and hop_charge(1_000_001, 1, 1) == 2
    with pytest.raises(ValueError):
        hop_charge(-1, 1, 1)


# -- load and speed ------------------------------------------------------------------------------------------


def brute_force_cost(book: OrderBook, asks: list[BookAsk], layers: int) -> tuple[int, int] | None:
    """(cost, newest seq) of the best route by trying every chain, each ask weighed by ``book.cost``."""
    best: tuple[int, int] | None = None

    def walk(boundary: int, cost: int, newest: int) -> None:
        nonlocal best
        if boundary == layers:
            if best is None or (cost, newest) < best:
                best = (cost, newest)
            return
        for a in asks:
            if a.start == boundary and a.end <= layers and a.free > 0:
                walk(a.end, cost + book.cost(a), max(newest, a.id))

    walk(0, 0, -1)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_routing_under_load_and_measured_speed_finds_what_brute_force_finds(seed: int) -> None:
    rng = random.Random(1000 + seed)
    layers = rng.randint(2, 9)
    asks = []
    for i in range(rng.randint(1, 14)):
        start = rng.randrange(layers)
        end = rng.randint(start + 1, layers)
        a = ask(i, start, end, rng.choice([1, 2, 3]) * 100, capacity=rng.choice([0, 2, 4]))
        a.in_use = rng.randint(0, max(0, a.capacity - 1)) if rng.random() < 0.5 else 0
        asks.append(a)
    book = live_book(asks)
    for a in asks:
        if rng.random() < 0.6:  # some providers measured, the rest assumed at the median
            book.observe(a.provider, rng.choice([5.0, 10.0, 20.0]) * a.layers, a.layers)
    expected = brute_force_cost(book, asks, layers)
    route = book.route("m", layers)
    if expected is None:
        assert route is None
        return
    assert route is not None
    assert (sum(book.cost(a) for a in route.asks), max(a.id for a in route.asks)) == expected


def test_sessions_spread_over_equally_priced_asks_as_they_fill() -> None:
    book = live_book([ask(1, 0, 2, 100, capacity=4), ask(2, 0, 2, 100, capacity=4)])
    chosen = []
    for _ in range(8):
        route = book.match("m", 2)
        assert route is not None
        chosen.append(route.asks[0].id)
    # Equal load: the earlier ask wins the tie; a session on it makes the other the cheaper.
    assert chosen == [1, 2, 1, 2, 1, 2, 1, 2]
    assert book.match("m", 2) is None  # both full


@pytest.mark.parametrize(("dearer", "winner"), [(124, 2), (125, 1), (126, 1)])
def test_a_cheaper_loaded_ask_loses_to_a_dearer_idle_one_exactly_by_the_rule(
    dearer: int, winner: int
) -> None:
    cheap, idle = ask(1, 0, 2, 100, capacity=4), ask(2, 0, 2, dearer, capacity=4)
    book = live_book([cheap, idle])
    assert book.route("m", 2).asks[0].id == 1  # type: ignore[union-attr]
    cheap.in_use = 1  # utilisation 1/4: 100 × (1 + 1 × 0.25) = 125 per layer against `dearer` per layer
    assert book.cost(cheap) == 2 * 125 * COST_SCALE and book.cost(idle) == 2 * dearer * COST_SCALE
    route = book.route("m", 2)
    assert route is not None and route.asks[0].id == winner  # at 125 each, the earlier ask wins the tie
    # What the client pays is the route's real price, whatever chose it.
    assert route.price_per_token == 2 * (100 if winner == 1 else dearer)
    assert route.quote(1_000_000) == route.price_per_token


def test_the_load_weight_scales_the_load_term() -> None:
    cheap, dear = ask(1, 0, 2, 100, capacity=4), ask(2, 0, 2, 140, capacity=4)
    cheap.in_use = 2  # half full
    book = live_book([cheap, dear])
    assert book.route("m", 2).asks[0].id == 2  # type: ignore[union-attr]  # 150 > 140
    book.load_weight = 0.5  # 125 < 140
    assert book.route("m", 2).asks[0].id == 1  # type: ignore[union-attr]
    book.load_weight = 0.0  # price alone
    assert book.cost(cheap) == 2 * 100 * COST_SCALE


def test_a_slow_provider_is_chosen_less() -> None:
    slow, fast = ask(1, 0, 2, 100, capacity=8), ask(2, 0, 2, 100, capacity=8)
    book = live_book([slow, fast])
    book.observe("p1", 2 * 30.0, 2)  # 30 ms a layer
    book.observe("p2", 2 * 10.0, 2)  # 10 ms a layer
    # R = median price ÷ median ms per layer = 100 ÷ 20 = 5 base units per million token-layers per ms a layer.
    assert book.cost(slow) == (2 * 100 + 5 * 2 * 30) * COST_SCALE
    assert book.cost(fast) == (2 * 100 + 5 * 2 * 10) * COST_SCALE
    counts = {1: 0, 2: 0}
    for _ in range(8):
        route = book.match("m", 2)
        assert route is not None
        counts[route.asks[0].id] += 1
    # The fast ask costs 200 × (1 + k/8) + 100 with k sessions, the idle slow one 500: the load term would have to
    # pass 200, which it reaches only when full. So the fast one takes every session it has room for.
    assert counts == {1: 0, 2: 8}
    assert book.match("m", 2).asks[0].id == 1  # type: ignore[union-attr]  # the fast one is full


def test_a_provider_nobody_measured_is_assumed_at_the_median() -> None:
    asks = [ask(1, 0, 2, 100), ask(2, 0, 2, 100), ask(3, 0, 2, 100), ask(4, 0, 2, 100)]
    book = live_book(asks)
    assert book.cost(asks[3]) == 2 * 100 * COST_SCALE  # nobody measured: no latency term at all
    for provider, ms in (("p1", 10.0), ("p2", 20.0), ("p3", 60.0)):
        book.observe(provider, 2 * ms, 2)
    # Median 20 ms a layer, R = 100 ÷ 20 = 5: the fresh ask pays what the median one does.
    assert book.cost(asks[3]) == book.cost(asks[1]) == (200 + 5 * 2 * 20) * COST_SCALE
    assert book.route("m", 2).asks[0].id == 1  # type: ignore[union-attr]


def test_a_step_time_is_forgotten_after_the_memory() -> None:
    clock = Clock()
    slow, other = ask(1, 0, 2, 100), ask(2, 0, 2, 100)
    book = live_book([slow, other], clock)
    book.latency_memory_s = 60.0  # within the asks' and heartbeats' lifetimes
    book.observe("p1", 2 * 50.0, 2)
    book.observe("p2", 2 * 10.0, 2)
    assert book.route("m", 2).asks[0].id == 2  # type: ignore[union-attr]
    clock.now += book.latency_memory_s / 2
    book.heartbeat("p1", clock.now)
    book.heartbeat("p2", clock.now)
    book.observe("p2", 2 * 10.0, 2)
    clock.now += book.latency_memory_s / 2 + 1  # p1's only measurement is now past the memory; p2's is not
    book.heartbeat("p1", clock.now)
    book.heartbeat("p2", clock.now)
    assert book.cost(slow) == book.cost(other)  # p1 at the median, which is p2's alone
    assert book.route("m", 2).asks[0].id == 1  # type: ignore[union-attr]
    book.observe("p1", 2 * 50.0, 2)  # a fresh measurement sets the average again
    assert book.providers["p1"].ms_per_layer == 50.0


def test_full_capacity_is_never_exceeded_under_concurrent_admissions() -> None:
    asks = [ask(1, 0, 2, 100, capacity=3), ask(2, 0, 2, 110, capacity=2), ask(3, 2, 4, 100, capacity=4)]
    book = live_book(asks)
    peak = {a.id: 0 for a in asks}
    admitted = refused = 0

    async def admission(rng: random.Random) -> None:
        nonlocal admitted, refused
        await asyncio.sleep(rng.random() / 1000)
        route = book.match("m", 4)
        if route is None:
            refused += 1
            return
        admitted += 1
        for a in asks:
            assert a.in_use <= a.capacity
            peak[a.id] = max(peak[a.id], a.in_use)
        await asyncio.sleep(rng.random() / 200)  # the job runs
        book.release(route)

    async def main() -> None:
        rng = random.Random(5)
        await asyncio.gather(*(admission(rng) for _ in range(200)))

    asyncio.run(main())
    # The second span's 4 sessions bound the route; the first span's asks share them by load.
    assert peak[3] == 4 and peak[1] + peak[2] <= 4 and peak[1] <= 3 and peak[2] <= 2
    assert admitted + refused == 200 and refused > 0
    assert all(a.in_use == 0 for a in asks)


def test_capacity_zero_is_never_matched() -> None:
    book = live_book([ask(1, 0, 2, 1, capacity=0), ask(2, 0, 2, 100, capacity=1)])
    assert book.match("m", 2).asks[0].id == 2  # type: ignore[union-attr]
    assert book.match("m", 2) is None
    assert book.cost(book.get(1)) == 2 * COST_SCALE  # type: ignore[arg-type]  # no division by its capacity


def test_a_huge_announced_capacity_only_makes_its_provider_look_idle_and_its_slowness_still_counts() -> None:
    hostile = ask(1, 0, 2, 99, capacity=4096)
    honest = ask(2, 0, 2, 100, capacity=4)
    book = live_book([hostile, honest])
    taken = [book.match("m", 2) for _ in range(3)]
    assert all(r is not None and r.asks[0].id == 1 for r in taken)
    # Utilisation counts only the sessions this gateway started: 3 / 4096 on the hostile ask, and the honest
    # ask's load is its own, untouched by what the hostile one announced.
    assert hostile.in_use == 3 and honest.in_use == 0
    # Sessions it cannot really batch slow its steps, and the gateway's measurement prices them.
    for _ in range(5):
        book.observe("p1", 2 * 40.0, 2)
        book.observe("p2", 2 * 10.0, 2)
    assert book.match("m", 2).asks[0].id == 2  # type: ignore[union-attr]


def test_being_fast_on_the_first_steps_only_does_not_last() -> None:
    gamer, honest = ask(1, 0, 2, 100, capacity=16), ask(2, 0, 2, 100, capacity=16)
    book = live_book([gamer, honest])
    for _ in range(20):
        book.observe("p1", 2 * 5.0, 2)  # fast while it is being judged
        book.observe("p2", 2 * 20.0, 2)
    assert book.route("m", 2).asks[0].id == 1  # type: ignore[union-attr]
    slow_steps = 0
    while book.route("m", 2).asks[0].id == 1:  # type: ignore[union-attr]
        book.observe("p1", 2 * 60.0, 2)  # then slow
        book.observe("p2", 2 * 20.0, 2)
        slow_steps += 1
    # The average after n slow steps is 60 − 55 × 0.9ⁿ ms a layer: 19.9 at n = 3, above the honest 20 from n = 4.
    assert slow_steps == 4
    assert book.providers["p1"].ms_per_layer == pytest.approx(60 - 55 * 0.9**4)


def test_a_hop_that_under_reports_its_compute_does_not_look_faster() -> None:
    route = Route("m", (ask(1, 0, 2, 100), ask(2, 2, 4, 100), ask(3, 4, 6, 100)))
    book = live_book(list(route.asks))
    # True compute 10, 30, 10 ms; 2 ms of links. The middle hop claims 1 ms.
    book.observe_step(route, 52.0, [10.0, 1.0, 10.0])
    assert book.providers["p2"].ms_per_layer == (52 - 20) / 2  # its own time and the links, not its word
    assert book.providers["p1"].ms_per_layer == (52 - 11) / 2  # the lie lands on the others, never on itself
    book.observe_step(route, 52.0, [None, None, None])  # nobody reports: each is blamed for the whole step
    assert book.providers["p3"].ms_per_layer == pytest.approx((52 - 11) / 2 + 0.1 * (52 / 2 - (52 - 11) / 2))
    book.observe_step(route, 52.0, [10.0])  # malformed: not one report per hop
    book.observe("p3", float("nan"), 2)
    assert book.providers["p3"].ms_per_layer == pytest.approx((52 - 11) / 2 + 0.1 * (52 / 2 - (52 - 11) / 2))


def test_a_budget_falls_back_to_the_cheapest_route_and_refuses_past_it() -> None:
    cheap, dear = ask(1, 0, 2, 100, capacity=2), ask(2, 0, 2, 120, capacity=2)
    book = live_book([cheap, dear])
    cheap.in_use = 1  # 150 a layer weighed: the dearer idle ask is chosen
    assert book.route("m", 2).asks[0].id == 2  # type: ignore[union-attr]
    tokens = 1_000_000
    assert book.route("m", 2, budget=Budget(tokens, 240)).asks[0].id == 2  # type: ignore[union-attr]
    within = book.match("m", 2, budget=Budget(tokens, 239))  # only the cheaper one fits
    assert within is not None and within.asks[0].id == 1 and within.quote(tokens) == 200
    assert cheap.in_use == 2
    assert book.route("m", 2, budget=Budget(tokens, 239)) is None  # the cheaper one is full
    assert book.route("m", 2, budget=Budget(tokens, 199)) is None
