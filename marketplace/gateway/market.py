"""Providers' side of the book: signed asks and heartbeats, checked, persisted, and put in the order book.

An ask is accepted when its EIP-712 signature is the provider's, its model is one this gateway serves, its span
lies within the model, its nonce is above every ask the provider posted before (so an old ask cannot be
replayed over a newer one), and the provider is active in StakeManager. A new ask for the same provider,
model and span replaces the old one and takes a new place in time priority; an ask with capacity 0 withdraws
the span. A heartbeat is a signed timestamp within ``heartbeat_skew_s`` of the gateway's clock and newer than
the provider's last; a provider stays matchable for ``heartbeat_ttl_s`` after one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from eth_utils.address import is_address, to_checksum_address
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from marketplace.gateway.catalog import Catalog
from marketplace.gateway.chainwatch import ChainWatcher
from marketplace.gateway.errors import Conflict, Forbidden, InvalidRequest, NotFound
from marketplace.gateway.orderbook import BookAsk, OrderBook
from settlement.db.schema import Ask, Provider, utcnow
from settlement.eip712 import Ask as SignedAsk
from settlement.eip712 import Heartbeat, protocol_domain
from worker.client import parse_endpoint
from worker.errors import ProtocolError

MAX_PRICE_PER_MILLION = 10**12  # a million dollars of a 6-decimal token per million token-layers
MAX_CAPACITY = 4096
MAX_ASK_LIFETIME_S = 30 * 24 * 3600
UINT64_MAX = 2**64 - 1


@dataclass(frozen=True)
class AskInput:
    provider: str
    model_root: str
    layer_start: int
    layer_end: int
    price_per_million: int
    capacity: int
    endpoint: str
    nonce: int
    expires_at: int
    signature: str


def _signature(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text.removeprefix("0x"))
    except ValueError as exc:
        raise InvalidRequest("invalid_request", "signature is not hex") from exc
    if len(raw) != 65:
        raise InvalidRequest("invalid_request", f"signature must be 65 bytes, got {len(raw)}")
    return raw


def _address(text: str, what: str) -> str:
    if not is_address(text):
        raise InvalidRequest("invalid_request", f"{what} {text!r} is not an address")
    return to_checksum_address(text)


class Market:
    def __init__(
        self,
        *,
        book: OrderBook,
        catalog: Catalog,
        watcher: ChainWatcher,
        sessions: async_sessionmaker[AsyncSession],
        chain_id: int,
        heartbeat_skew_s: int,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.book = book
        self.catalog = catalog
        self.watcher = watcher
        self.sessions = sessions
        self.domain = protocol_domain(chain_id)
        self.heartbeat_skew_s = heartbeat_skew_s
        self.on_change = on_change
        self.clock = clock
        self._lock = asyncio.Lock()  # one ask or heartbeat of a provider at a time: nonces must not race

    async def load(self) -> None:
        """Rebuilds the book from the database: live asks, heartbeats, and each provider's stake."""
        now = self.clock()
        async with self.sessions() as session:
            providers = (await session.scalars(select(Provider))).all()
            asks = (
                await session.scalars(
                    select(Ask).where(Ask.withdrawn_at.is_(None), Ask.expires_at > now).order_by(Ask.id)
                )
            ).all()
        for provider in providers:
            if provider.last_heartbeat_at is not None:
                self.book.heartbeat(provider.address, provider.last_heartbeat_at.timestamp())
        for ask in asks:
            self.book.post(_book_ask(ask))
        for address in {ask.provider for ask in asks}:
            await self.watcher.is_active(address)

    # -- asks ----------------------------------------------------------------------------------------------

    async def post_ask(self, data: AskInput) -> BookAsk | None:
        """Checks, records and books an ask; returns the booked ask (None when it withdrew a span)."""
        provider = _address(data.provider, "provider")
        model = self.catalog.by_root(data.model_root)
        if model is None:
            raise NotFound("unknown_model", f"this gateway serves no model {data.model_root}")
        if not 0 <= data.layer_start < data.layer_end <= model.num_layers:
            raise InvalidRequest(
                "bad_span", f"span {data.layer_start}:{data.layer_end} is not within 0:{model.num_layers}"
            )
        if not 0 < data.price_per_million <= MAX_PRICE_PER_MILLION:
            raise InvalidRequest(
                "bad_price", f"price must be in 1..{MAX_PRICE_PER_MILLION} per million token-layers"
            )
        if not 0 <= data.capacity <= MAX_CAPACITY:
            raise InvalidRequest("bad_capacity", f"capacity must be in 0..{MAX_CAPACITY}")
        try:
            parse_endpoint(data.endpoint)
        except ProtocolError as exc:
            raise InvalidRequest("bad_endpoint", str(exc)) from exc
        now = int(self.clock())
        if not now < data.expires_at <= now + MAX_ASK_LIFETIME_S:
            raise InvalidRequest("bad_expiry", f"expiresAt must be within {MAX_ASK_LIFETIME_S} s from now")
        if not 0 < data.nonce <= UINT64_MAX:
            raise InvalidRequest("invalid_request", "nonce must be a positive uint64")
        signed = SignedAsk(
            provider,
            bytes.fromhex(model.root.removeprefix("0x")),
            data.layer_start,
            data.layer_end,
            data.price_per_million,
            data.capacity,
            data.endpoint,
            data.nonce,
            data.expires_at,
        )
        signature = _signature(data.signature)
        if signed.signer(signature, self.domain) != provider:
            raise Forbidden("invalid_signature", f"the ask is not signed by {provider}")
        if not await self.watcher.is_active(provider, fresh=True):
            raise Forbidden("provider_not_staked", f"{provider} is not active in StakeManager: stake first")

        async with self._lock, self.sessions() as session, session.begin():
            row = await self._provider_row(session, provider)
            if data.nonce <= row.ask_nonce:
                raise Conflict(
                    "stale_nonce", f"nonce {data.nonce} is not above {row.ask_nonce}: post a newer ask"
                )
            row.ask_nonce = data.nonce
            await session.execute(
                update(Ask)
                .where(
                    Ask.provider == provider,
                    Ask.model_root == model.root,
                    Ask.layer_start == data.layer_start,
                    Ask.layer_end == data.layer_end,
                    Ask.withdrawn_at.is_(None),
                )
                .values(withdrawn_at=utcnow())
            )
            ask = None
            if data.capacity > 0:
                ask = Ask(
                    provider=provider,
                    model_root=model.root,
                    layer_start=data.layer_start,
                    layer_end=data.layer_end,
                    price_per_million=data.price_per_million,
                    capacity=data.capacity,
                    endpoint=data.endpoint,
                    nonce=data.nonce,
                    expires_at=data.expires_at,
                    signature="0x" + signature.hex(),
                )
                session.add(ask)
                await session.flush()
        if ask is None:
            self.book.withdraw(provider, model.root, data.layer_start, data.layer_end)
            return None
        booked = _book_ask(ask)
        self.book.post(booked)
        self.on_change()
        return booked

    async def _provider_row(self, session: AsyncSession, address: str) -> Provider:
        row = await session.get(Provider, address)
        if row is None:
            row = Provider(address=address, heartbeat_timestamp=0, ask_nonce=0, first_seen_at=utcnow())
            session.add(row)
        return row

    # -- heartbeats ----------------------------------------------------------------------------------------

    async def heartbeat(self, provider: str, timestamp: int, signature: str) -> float:
        """Records a signed heartbeat; returns the time the provider stays matchable until."""
        provider = _address(provider, "provider")
        now = self.clock()
        if not 0 <= timestamp <= UINT64_MAX or abs(timestamp - now) > self.heartbeat_skew_s:
            raise InvalidRequest(
                "bad_timestamp",
                f"timestamp {timestamp} is more than {self.heartbeat_skew_s} s from {int(now)}",
            )
        if Heartbeat(provider, timestamp).signer(_signature(signature), self.domain) != provider:
            raise Forbidden("invalid_signature", f"the heartbeat is not signed by {provider}")
        async with self._lock, self.sessions() as session, session.begin():
            row = await session.get(Provider, provider)
            if row is None:
                raise NotFound("unknown_provider", f"{provider} has posted no ask")
            if timestamp <= row.heartbeat_timestamp:
                raise Conflict(
                    "stale_heartbeat", f"timestamp {timestamp} is not above {row.heartbeat_timestamp}"
                )
            row.heartbeat_timestamp = timestamp
            row.last_heartbeat_at = datetime.fromtimestamp(now, UTC)
        self.book.heartbeat(provider, now)
        self.on_change()
        return now + self.book.heartbeat_ttl_s


def _book_ask(ask: Ask) -> BookAsk:
    return BookAsk(
        id=ask.id,
        provider=ask.provider,
        model_root=ask.model_root,
        start=ask.layer_start,
        end=ask.layer_end,
        price_per_million=ask.price_per_million,
        capacity=ask.capacity,
        endpoint=ask.endpoint,
        expires_at=float(ask.expires_at),
    )
