"""What token-layers cost: the one formula the gateway quotes and charges with and settlement meters with.

A hop that ran ``tokens`` positions through ``layers`` layers at ``price_per_million`` base units per million
token-layers costs ``tokens × layers × price_per_million ÷ 1,000,000`` base units, **rounded up per hop**. Up,
because no work is free: rounding down let a short request on cheap asks quote and pay 0, and a request that
costs nothing costs an attacker nothing to repeat (asks are priced at least 1, so every hop that ran costs at
least one base unit). A client overpays by less than one base unit a hop. Positions only shrink from quote to
charge, so every hop's charge is at most its share of the quote, and the sum is too.
"""

from __future__ import annotations

TOKEN_LAYERS_PER_PRICE_UNIT = 1_000_000


def hop_charge(tokens: int, layers: int, price_per_million: int) -> int:
    if tokens < 0 or layers < 0 or price_per_million < 0:
        raise ValueError("tokens, layers and price must not be negative")
    return -(-tokens * layers * price_per_million // TOKEN_LAYERS_PER_PRICE_UNIT)


def route_charge(tokens: int, hops: list[tuple[int, int]]) -> int:
    """The cost of ``tokens`` positions through every ``(layers, price_per_million)`` hop of a route."""
    return sum(hop_charge(tokens, layers, price) for layers, price in hops)
