"""The order book's routing against brute force, its priority rule, and what makes an ask matchable."""

from __future__ import annotations

import random

import pytest

from marketplace.gateway.orderbook import BookAsk, OrderBook, Route
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
