"""The order book: providers' asks per model, and routing a request through the cheapest chain of them.

A route covers a model's layers ``[0, L)`` with asks whose spans meet end to start. Its cost per token is
Σ layers × price over its asks, so finding the cheapest route is a shortest path over the layer boundaries
0..L, where each matchable ask is an edge from its start to its end. Boundaries only grow along an edge, so the
graph is acyclic and one pass over the boundaries in order settles it: O(L + asks).

Price-time priority: among routes of equal cost, the one whose newest ask was posted earliest wins. Each ask's
``seq`` is its posting order (the database id), a route's time is the largest ``seq`` on it, and comparing
``(cost, time)`` keeps the shortest-path pass exact, because extending two routes by the same ask never
reverses their order.

An ask is matchable while it is live, unexpired and has free capacity, and its provider is active in
StakeManager, heartbeated within the TTL and not suspended after a failure. Matching reserves one session of
capacity on every ask of the route; the caller releases it when the job ends.

The book lives in the gateway's memory and is rebuilt from the database on start. Capacity counts sessions
started by this gateway process.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from settlement.pricing import route_charge


@dataclass(eq=False)
class BookAsk:
    id: int  # also its time priority: ids grow in posting order
    provider: str
    model_root: str
    start: int
    end: int
    price_per_million: int  # base units per million token-layers
    capacity: int  # sessions at once
    endpoint: str
    tls_fingerprint: bytes  # of the certificate the endpoint proved it holds; pinned by whoever connects
    expires_at: float  # unix s
    retention_s: int = 0  # how long its provider keeps a session's steps for validators, as the ask signs
    in_use: int = 0
    live: bool = True  # false once replaced, withdrawn or expired; jobs holding it still release into it

    @property
    def layers(self) -> int:
        return self.end - self.start

    @property
    def free(self) -> int:
        return self.capacity - self.in_use


@dataclass(frozen=True)
class Route:
    model_root: str
    asks: tuple[BookAsk, ...]

    @property
    def hops(self) -> list[tuple[int, int]]:
        """(layers, price per million) of each ask, in route order."""
        return [(ask.layers, ask.price_per_million) for ask in self.asks]

    @property
    def endpoints(self) -> list[str]:
        return [ask.endpoint for ask in self.asks]

    @property
    def providers(self) -> list[str]:
        return [ask.provider for ask in self.asks]

    @property
    def price_per_token(self) -> int:
        """Σ layers × price: base units per million tokens through the whole route."""
        return sum(ask.layers * ask.price_per_million for ask in self.asks)

    def quote(self, tokens: int) -> int:
        """The most ``tokens`` positions can cost on this route (see settlement.pricing)."""
        return route_charge(tokens, self.hops)


@dataclass
class ProviderState:
    address: str
    active: bool = False  # bonded at least the minimum stake in StakeManager
    last_heartbeat: float = 0.0  # unix s
    suspended_until: float = 0.0  # unix s; set when the provider fails a job


@dataclass(frozen=True)
class PriceLevel:
    price_per_million: int
    asks: int
    capacity: int
    free: int


@dataclass(frozen=True)
class SpanDepth:
    start: int
    end: int
    levels: list[PriceLevel] = field(default_factory=list)


class OrderBook:
    def __init__(self, *, heartbeat_ttl_s: float = 30.0, clock: Callable[[], float] = time.time) -> None:
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.clock = clock
        self.providers: dict[str, ProviderState] = {}
        self._asks: dict[int, BookAsk] = {}
        # model root → start layer → asks starting there: what the routing pass walks.
        self._by_start: dict[str, dict[int, list[BookAsk]]] = defaultdict(lambda: defaultdict(list))
        # (provider, model root, start, end) → the live ask for that span: a new ask replaces it.
        self._by_key: dict[tuple[str, str, int, int], BookAsk] = {}

    # -- asks ----------------------------------------------------------------------------------------------

    def post(self, ask: BookAsk) -> BookAsk | None:
        """Adds ``ask``; returns the ask it replaced for the same provider, model and span, if any."""
        key = (ask.provider, ask.model_root, ask.start, ask.end)
        replaced = self._by_key.get(key)
        if replaced is not None:
            self._remove(replaced)
        self._asks[ask.id] = ask
        self._by_key[key] = ask
        self._by_start[ask.model_root][ask.start].append(ask)
        self.providers.setdefault(ask.provider, ProviderState(ask.provider))
        return replaced

    def withdraw(self, provider: str, model_root: str, start: int, end: int) -> BookAsk | None:
        ask = self._by_key.get((provider, model_root, start, end))
        if ask is not None:
            self._remove(ask)
        return ask

    def pull(self, provider: str) -> list[BookAsk]:
        """Removes every ask of ``provider`` (a validator slashed it); returns them."""
        pulled = [ask for ask in self._asks.values() if ask.provider == provider]
        for ask in pulled:
            self._remove(ask)
        return pulled

    def _remove(self, ask: BookAsk) -> None:
        ask.live = False
        self._asks.pop(ask.id, None)
        self._by_key.pop((ask.provider, ask.model_root, ask.start, ask.end), None)
        bucket = self._by_start[ask.model_root][ask.start]
        bucket.remove(ask)

    def expire(self) -> list[BookAsk]:
        """Removes asks past their expiry; returns them."""
        now = self.clock()
        gone = [ask for ask in self._asks.values() if ask.expires_at <= now]
        for ask in gone:
            self._remove(ask)
        return gone

    def get(self, ask_id: int) -> BookAsk | None:
        return self._asks.get(ask_id)

    def asks(self, model_root: str | None = None, provider: str | None = None) -> list[BookAsk]:
        return sorted(
            (
                ask
                for ask in self._asks.values()
                if (model_root is None or ask.model_root == model_root)
                and (provider is None or ask.provider == provider)
            ),
            key=lambda ask: ask.id,
        )

    # -- providers -----------------------------------------------------------------------------------------

    def provider(self, address: str) -> ProviderState:
        state = self.providers.get(address)
        if state is None:
            state = self.providers[address] = ProviderState(address)
        return state

    def set_active(self, address: str, active: bool) -> None:
        self.provider(address).active = active

    def heartbeat(self, address: str, at: float) -> None:
        state = self.provider(address)
        state.last_heartbeat = max(state.last_heartbeat, at)

    def suspend(self, address: str, seconds: float) -> None:
        state = self.provider(address)
        state.suspended_until = max(state.suspended_until, self.clock() + seconds)

    def matchable(self, address: str, now: float | None = None) -> bool:
        state = self.providers.get(address)
        now = self.clock() if now is None else now
        return (
            state is not None
            and state.active
            and now - state.last_heartbeat <= self.heartbeat_ttl_s
            and now >= state.suspended_until
        )

    # -- routing -------------------------------------------------------------------------------------------

    def route(self, model_root: str, num_layers: int, *, exclude: Iterable[str] = ()) -> Route | None:
        """The cheapest matchable chain of asks covering ``[0, num_layers)``, or None. Reserves nothing."""
        by_start = self._by_start.get(model_root)
        if not by_start:
            return None
        now = self.clock()
        excluded = frozenset(exclude)
        eligible: dict[str, bool] = {}
        inf = float("inf")
        cost: list[float] = [inf] * (num_layers + 1)
        newest: list[int] = [-1] * (num_layers + 1)
        via: list[BookAsk | None] = [None] * (num_layers + 1)
        cost[0] = 0
        for boundary in range(num_layers):
            here = cost[boundary]
            if here == inf:
                continue
            for ask in by_start.get(boundary, ()):
                end = ask.end
                if end > num_layers or ask.in_use >= ask.capacity or ask.expires_at <= now:
                    continue
                ok = eligible.get(ask.provider)
                if ok is None:
                    ok = eligible[ask.provider] = ask.provider not in excluded and self.matchable(
                        ask.provider, now
                    )
                if not ok:
                    continue
                total = here + (end - boundary) * ask.price_per_million
                time_key = newest[boundary] if newest[boundary] > ask.id else ask.id
                if total < cost[end] or (total == cost[end] and time_key < newest[end]):
                    cost[end], newest[end], via[end] = total, time_key, ask
        if cost[num_layers] == inf:
            return None
        chain: list[BookAsk] = []
        boundary = num_layers
        while boundary > 0:
            last = via[boundary]
            assert last is not None
            chain.append(last)
            boundary = last.start
        return Route(model_root, tuple(reversed(chain)))

    def reserve(self, route: Route) -> None:
        for ask in route.asks:
            ask.in_use += 1

    def release(self, route: Route) -> None:
        for ask in route.asks:
            ask.in_use = max(0, ask.in_use - 1)

    def match(self, model_root: str, num_layers: int, *, exclude: Iterable[str] = ()) -> Route | None:
        """Routes and reserves in one go; nothing can take the capacity in between."""
        route = self.route(model_root, num_layers, exclude=exclude)
        if route is not None:
            self.reserve(route)
        return route

    # -- depth ---------------------------------------------------------------------------------------------

    def depth(self, model_root: str) -> list[SpanDepth]:
        """Live asks grouped by span, each span's price levels cheapest first. Only matchable providers count."""
        now = self.clock()
        spans: dict[tuple[int, int], dict[int, list[BookAsk]]] = defaultdict(lambda: defaultdict(list))
        for ask in self._asks.values():
            if ask.model_root == model_root and ask.expires_at > now and self.matchable(ask.provider, now):
                spans[(ask.start, ask.end)][ask.price_per_million].append(ask)
        return [
            SpanDepth(
                start,
                end,
                [
                    PriceLevel(
                        price,
                        len(asks),
                        sum(a.capacity for a in asks),
                        sum(max(0, a.free) for a in asks),
                    )
                    for price, asks in sorted(levels.items())
                ],
            )
            for (start, end), levels in sorted(spans.items())
        ]
