"""The order book: providers' asks per model, and routing a request through the best chain of them.

A route covers a model's layers ``[0, L)`` with asks whose spans meet end to start. What the client is quoted and
billed for a route is always its real price, Σ layers × price per token (settlement.pricing). What matching
minimises is that price weighed by each ask's load and measured speed, so that sessions spread over asks as they
fill instead of piling onto the cheapest one:

    edge cost of an ask = layers × price × (1 + α × utilisation)  +  β × R × step_ms

- ``layers × price``: the ask's real price per token, base units per million tokens.
- ``utilisation = in_use ÷ capacity``: the sessions this gateway started on the ask and still holds, over the
  sessions the provider signed it batches at once. α = ``load_weight`` (default 1): a full ask costs twice its
  price, a half-full one 1.5 times. So a cheaper ask at price p with utilisation u loses to a dearer idle one at
  price q (same span) exactly when p × (1 + α u) > q.
- ``step_ms = layers × ms_per_layer``: the provider's measured step time for the span. ``ms_per_layer`` is an
  exponentially weighted average (weight ``ewma_weight`` on the newest, default 0.1) of the milliseconds per
  layer the gateway attributed to the provider's hops (:meth:`OrderBook.observe`, :meth:`OrderBook.observe_step`).
  A provider with no measurement, or none within ``latency_memory_s``, is assumed at the median ms per layer of
  the model's measured asks; when none is measured the term is 0 for all.
- ``R = median price ÷ median ms_per_layer`` over the model's live asks whose providers are measured: the
  market's price for one millisecond of a hop's compute, so step time is counted in the same price units as the
  price. β = ``latency_weight`` (default 1): a millisecond of step time costs what the median ask charges for
  a millisecond of compute. Every route covers every layer, so the term ranks routes by their summed step time;
  an ask at the median speed pays what every route pays and only deviations from it decide.

Edge costs are integers (``COST_SCALE`` units per base unit per million tokens: the price part exactly, the load
and latency parts rounded per edge), so sums along a route are exact. Finding the best route is a shortest path
over the layer boundaries 0..L, where each matchable ask is an edge from its start to its end. Boundaries only
grow along an edge, so the graph is acyclic and one pass over the boundaries in order settles it: O(L + asks).

Price-time priority: among routes of equal cost (equal prices, loads and speeds), the one whose newest ask was
posted earliest wins. Each ask's ``seq`` is its posting order (the database id), a route's time is the largest
``seq`` on it, and comparing ``(cost, time)`` keeps the shortest-path pass exact, because extending two routes by
the same ask never reverses their order.

A budget (``route(..., budget=Budget(tokens, amount))``): the load-weighed route when its real quote fits,
else the route with the smallest real quote (a second pass whose edge cost is each hop's rounded charge,
exact), else None. So a route is found whenever any route fits, and load never makes a client pay more than it
agreed to. (The best load-weighed route under a price cap is a constrained shortest path, NP-hard in general.)

An ask is matchable while it is live, unexpired and has free capacity (``in_use < capacity``; capacity 0 never
matches, and a posted ask of capacity 0 withdraws its span, see marketplace.gateway.market), and its provider is
active in StakeManager, heartbeated within the TTL and not suspended after a failure. Matching reserves one
session of capacity on every ask of the route; the caller releases it when the job ends. Matching and reserving
happen in one synchronous call (:meth:`OrderBook.match`), so concurrent admissions on the gateway's event loop
never take an ask past its capacity.

What a hostile provider can do about it. Capacity is the provider's signed word, at most ``MAX_CAPACITY`` (4096)
at the gateway; utilisation counts only sessions this gateway started, so announcing a huge capacity only makes
the provider look idle, never its rivals busy. What bounds it: its runtime refuses sessions past its
``max_sessions`` (the job fails over and the provider is suspended), and the sessions it overcommits slow its
steps, which the latency term prices. Being fast on its first steps only does not last: the average weighs the
newest step by ``ewma_weight``, so after n slow steps a fast start counts (1 − weight)^n. A hop's time is the
gateway's own measurement where it has one; where only a route's round trip is measured, each hop is attributed
the round trip less what the *other* hops report (:meth:`OrderBook.observe_step`), so under-reporting its own
compute never makes a provider look faster.

The book lives in the gateway's memory and is rebuilt from the database on start; loads and step times start
afresh.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from settlement.pricing import hop_charge, route_charge

COST_SCALE = (
    1024  # edge-cost units per base unit per million tokens: load and latency keep 10 bits of fraction
)


@dataclass(eq=False)
class BookAsk:
    id: int  # also its time priority: ids grow in posting order
    provider: str
    model_root: str
    start: int
    end: int
    price_per_million: int  # base units per million token-layers
    capacity: int  # concurrent sessions the provider batches, as the ask signs
    endpoint: str
    tls_fingerprint: bytes  # of the certificate the endpoint proved it holds; pinned by whoever connects
    expires_at: float  # unix s
    retention_s: int = 0  # how long its provider keeps a session's steps for validators, as the ask signs
    in_use: int = 0  # sessions this gateway started on it and still holds
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
    ms_per_layer: float | None = (
        None  # EWMA of the step ms per layer attributed to its hops; None: unmeasured
    )
    observed_at: float = 0.0  # unix s of the last observation


class Budget(NamedTuple):
    """The most a route may be quoted for ``tokens`` positions, in base units."""

    tokens: int
    amount: int


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
    def __init__(
        self,
        *,
        heartbeat_ttl_s: float = 30.0,
        load_weight: float = 1.0,  # α: how much a full ask costs over its price, as a multiple of it
        latency_weight: float = 1.0,  # β: a step's milliseconds at this multiple of the market's price for them
        ewma_weight: float = 0.1,  # of the newest observation in a provider's step-time average
        latency_memory_s: float = 600.0,  # a step time older than this is forgotten: the provider is unmeasured
        clock: Callable[[], float] = time.time,
    ) -> None:
        if load_weight < 0 or latency_weight < 0 or not 0 < ewma_weight <= 1:
            raise ValueError("weights must not be negative, and ewma_weight must be in (0, 1]")
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.load_weight = load_weight
        self.latency_weight = latency_weight
        self.ewma_weight = ewma_weight
        self.latency_memory_s = latency_memory_s
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

    # -- load ----------------------------------------------------------------------------------------------

    def observe(self, provider: str, step_ms: float, layers: int) -> None:
        """Records that one step of ``provider``'s hop over ``layers`` layers took ``step_ms``: folds its ms per
        layer into the provider's average (the first observation, or the first after ``latency_memory_s``
        without one, sets it)."""
        if layers <= 0 or not step_ms >= 0 or step_ms == float("inf"):
            return  # nothing to learn from a malformed measurement (NaN fails the comparison)
        state = self.providers.get(provider)
        if state is None:
            return  # not a provider of this book: nothing would read it
        now = self.clock()
        sample = step_ms / layers
        if state.ms_per_layer is None or now - state.observed_at > self.latency_memory_s:
            state.ms_per_layer = sample
        else:
            state.ms_per_layer += self.ewma_weight * (sample - state.ms_per_layer)
        state.observed_at = now

    def observe_step(self, route: Route, round_trip_ms: float, reported_ms: Sequence[float | None]) -> None:
        """Records one decode step of ``route``, whose round trip the gateway measured as ``round_trip_ms`` and
        whose hops reported ``reported_ms`` of compute each (unsigned telemetry; None where a hop said nothing).
        Each hop is attributed the round trip less what the other hops reported, within ``[0, round_trip_ms]``:
        a provider's own report never lowers its own time, so under-reporting gains it nothing."""
        if len(reported_ms) != len(route.asks) or not round_trip_ms >= 0:
            return
        reported = [min(max(r, 0.0), round_trip_ms) if r is not None and r == r else 0.0 for r in reported_ms]
        total = sum(reported)
        for ask, own in zip(route.asks, reported, strict=True):
            attributed = min(max(round_trip_ms - (total - own), 0.0), round_trip_ms)
            self.observe(ask.provider, attributed, ask.layers)

    def _speed(self, asks: Iterable[BookAsk], now: float) -> tuple[float, float]:
        """(R, median ms per layer) over ``asks`` whose providers are measured: R = median price ÷ median ms per
        layer, in base units per million token-layers per ms per layer; (0, 0) when none is measured."""
        prices: list[int] = []
        speeds: list[float] = []
        for ask in asks:
            state = self.providers.get(ask.provider)
            if (
                state is not None
                and state.ms_per_layer is not None
                and now - state.observed_at <= self.latency_memory_s
            ):
                prices.append(ask.price_per_million)
                speeds.append(state.ms_per_layer)
        if not speeds:
            return 0.0, 0.0
        median_ms = statistics.median(speeds)
        if median_ms <= 0:
            return 0.0, 0.0
        return statistics.median(prices) / median_ms, median_ms

    def cost(self, ask: BookAsk, now: float | None = None) -> int:
        """The ask's edge cost in ``COST_SCALE`` units, as routing weighs it now (see the module's docstring)."""
        now = self.clock() if now is None else now
        rate, median_ms = self._speed(self._model_asks(ask.model_root), now)
        return self._edge(ask, rate, median_ms, now)

    def _edge(self, ask: BookAsk, rate: float, median_ms: float, now: float) -> int:
        price = ask.layers * ask.price_per_million
        extra = 0.0
        if ask.in_use > 0 and ask.capacity > 0:
            extra = price * self.load_weight * ask.in_use / ask.capacity
        if rate > 0:
            state = self.providers.get(ask.provider)
            ms = median_ms
            if (
                state is not None
                and state.ms_per_layer is not None
                and now - state.observed_at <= self.latency_memory_s
            ):
                ms = state.ms_per_layer
            extra += self.latency_weight * rate * ask.layers * ms
        return price * COST_SCALE + round(extra * COST_SCALE)

    def _model_asks(self, model_root: str) -> list[BookAsk]:
        by_start = self._by_start.get(model_root)
        return [ask for bucket in by_start.values() for ask in bucket] if by_start else []

    # -- routing -------------------------------------------------------------------------------------------

    def route(
        self,
        model_root: str,
        num_layers: int,
        *,
        exclude: Iterable[str] = (),
        budget: Budget | None = None,
    ) -> Route | None:
        """The matchable chain of asks covering ``[0, num_layers)`` of least cost (price, load and speed; see the
        module's docstring), or None. Within ``budget`` when given: that route if its quote fits, else the
        cheapest-quoted route if it fits, else None. Reserves nothing."""
        by_start = self._by_start.get(model_root)
        if not by_start:
            return None
        now = self.clock()
        excluded = frozenset(exclude)
        route = self._shortest(model_root, by_start, num_layers, now, excluded, None)
        if route is None or budget is None or route.quote(budget.tokens) <= budget.amount:
            return route
        cheapest = self._shortest(model_root, by_start, num_layers, now, excluded, budget.tokens)
        if cheapest is None or cheapest.quote(budget.tokens) > budget.amount:
            return None
        return cheapest

    def _shortest(
        self,
        model_root: str,
        by_start: dict[int, list[BookAsk]],
        num_layers: int,
        now: float,
        excluded: frozenset[str],
        quote_tokens: int | None,  # None: edges weigh price, load and speed; else each hop's rounded charge
    ) -> Route | None:
        rate, median_ms = 0.0, 0.0
        if quote_tokens is None and self.latency_weight > 0:
            rate, median_ms = self._speed((a for bucket in by_start.values() for a in bucket), now)
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
                if quote_tokens is not None:
                    edge = hop_charge(quote_tokens, end - boundary, ask.price_per_million)
                elif ask.in_use == 0 and rate == 0:
                    edge = (end - boundary) * ask.price_per_million * COST_SCALE
                else:
                    edge = self._edge(ask, rate, median_ms, now)
                total = here + edge
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

    def match(
        self,
        model_root: str,
        num_layers: int,
        *,
        exclude: Iterable[str] = (),
        budget: Budget | None = None,
    ) -> Route | None:
        """Routes and reserves in one go; nothing can take the capacity in between."""
        route = self.route(model_root, num_layers, exclude=exclude, budget=budget)
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
