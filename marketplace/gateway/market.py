"""Providers' side of the book: signed asks and heartbeats, checked, persisted, and put in the order book.

An ask is accepted when its EIP-712 signature is the provider's, it is for this gateway (asks and heartbeats
name the gateway, under a domain that names the deployment, so neither replays elsewhere), its model is one this
gateway serves, its span lies within the model, its nonce is above every ask the provider posted before (so an
old ask cannot be replayed over a newer one), the provider is active in StakeManager, and its endpoint proves to
be the provider's: the gateway connects there pinning the certificate the ask names and has the provider sign a
fresh challenge with its staked key (``prove``). An ask naming someone else's endpoint never enters the book.
An ask that names no certificate (plain TCP) is taken only by a gateway that allows plaintext hops.

An ask's capacity is the number of concurrent sessions its provider batches (1..``MAX_CAPACITY``): the book
counts the sessions this gateway started there against it and spreads sessions by load and measured step time
(marketplace.gateway.orderbook). A new ask for the same provider, model and span replaces the old one and takes a
new place in time priority (the sessions the old one holds release into it); an ask with capacity 0 withdraws
the span. A heartbeat is a signed timestamp within ``heartbeat_skew_s`` of the
gateway's clock and newer than the provider's last; a provider stays matchable for ``heartbeat_ttl_s`` after
one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from eth_utils.address import is_address, to_checksum_address
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from marketplace.gateway.catalog import Catalog
from marketplace.gateway.chainwatch import ChainWatcher
from marketplace.gateway.coordinator import FALSE_RECEIPT_SUSPEND_S
from marketplace.gateway.errors import Conflict, Forbidden, InvalidRequest, NotFound
from marketplace.gateway.orderbook import BookAsk, OrderBook
from settlement.db import validations
from settlement.db.schema import Ask, Provider, Validation, utcnow
from settlement.eip712 import Ask as SignedAsk
from settlement.eip712 import Domain, Heartbeat
from worker.client import PeerLink, parse_endpoint
from worker.errors import ProtocolError, WorkerError
from worker.messages import Prove, checked
from worker.tls import NO_FINGERPRINT
from worker.trust import Checks, Keys

log = logging.getLogger(__name__)

MAX_PRICE_PER_MILLION = 10**12  # a million dollars of a 6-decimal token per million token-layers
MAX_CAPACITY = 4096
MAX_ASK_LIFETIME_S = 30 * 24 * 3600
UINT64_MAX = 2**64 - 1


class EndpointProver(Protocol):
    async def __call__(self, provider: str, endpoint: str, fingerprint: bytes) -> None:
        """Returns when the endpoint answered as ``provider`` with the certificate ``fingerprint``; raises
        Forbidden (``endpoint_not_proven``) when it did not."""
        ...


@dataclass(frozen=True)
class AskInput:
    provider: str
    gateway: str
    tls_fingerprint: str
    model_root: str
    layer_start: int
    layer_end: int
    price_per_million: int
    capacity: int
    retention_s: int
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


class LinkProver:
    """Proves an ask's endpoint: connects there pinning the certificate the ask names, authenticated as this
    gateway, and has the provider sign a fresh challenge with its staked key. What it proved it remembers for
    ``remember_s``, so a provider re-posting its ask every day is not asked again each time."""

    def __init__(
        self,
        keys: Keys,
        checks: Checks,
        *,
        timeout_s: float = 10.0,
        remember_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keys = keys
        self.checks = checks
        self.timeout_s = timeout_s
        self.remember_s = remember_s
        self.clock = clock
        self._proven: dict[tuple[str, str, bytes], float] = {}

    async def __call__(self, provider: str, endpoint: str, fingerprint: bytes) -> None:
        key = (provider, endpoint, fingerprint)
        if self.clock() - self._proven.get(key, -self.remember_s) < self.remember_s:
            return
        link = PeerLink(endpoint, fingerprint, self.keys, tls=fingerprint != NO_FINGERPRINT, expect=provider)
        challenge = os.urandom(32)
        try:
            reply, _ = await asyncio.wait_for(
                link.request(Prove(challenge, endpoint).to_json()), self.timeout_s
            )
            signature = bytes.fromhex(str(checked(reply).get("signature", "")).removeprefix("0x"))
            signer = await asyncio.to_thread(
                self.checks.endpoint_proof, challenge, provider, endpoint, fingerprint, signature
            )
        except (WorkerError, OSError, TimeoutError, ValueError) as exc:
            raise Forbidden(
                "endpoint_not_proven",
                f"{endpoint} did not prove to be {provider}'s, with that certificate: {exc}",
            ) from exc
        finally:
            await link.close()
        if signer != provider:
            raise Forbidden("endpoint_not_proven", f"{endpoint} answered for {signer}, not {provider}")
        self._proven[key] = self.clock()


def _hash(text: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(text.removeprefix("0x"))
    except ValueError as exc:
        raise InvalidRequest("invalid_request", f"{what} is not hex") from exc
    if len(raw) != 32:
        raise InvalidRequest("invalid_request", f"{what} must be 32 bytes, got {len(raw)}")
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
        domain: Domain,
        gateway: str,  # this gateway's address: the asks and heartbeats it takes name it
        prove_endpoint: EndpointProver,
        allow_plaintext: bool,
        heartbeat_skew_s: int,
        min_retention_s: int,  # the validation window and a margin: what an ask must keep steps for
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.book = book
        self.catalog = catalog
        self.watcher = watcher
        self.sessions = sessions
        self.domain = domain
        self.gateway = gateway
        self.prove_endpoint = prove_endpoint
        self.allow_plaintext = allow_plaintext
        self.heartbeat_skew_s = heartbeat_skew_s
        self.min_retention_s = min_retention_s
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
            since = datetime.fromtimestamp(now - FALSE_RECEIPT_SUSPEND_S, UTC)
            false_receipts = (
                await session.execute(
                    select(Validation.provider, func.max(Validation.decided_at))
                    .where(Validation.reason == validations.FALSE_RECEIPT, Validation.decided_at > since)
                    .group_by(Validation.provider)
                )
            ).all()
        for provider in providers:
            if provider.last_heartbeat_at is not None:
                self.book.heartbeat(provider.address, provider.last_heartbeat_at.timestamp())
        for address, decided_at in false_receipts:  # suspensions outlive a restart
            assert decided_at is not None  # the query takes only decided ones
            self.book.suspend(address, FALSE_RECEIPT_SUSPEND_S - (now - decided_at.timestamp()))
        for ask in asks:
            if ask.retention_s < self.min_retention_s:  # posted under a shorter window, or before asks said
                log.info(
                    "ask %d keeps steps %d s, under %d s: not booked",
                    ask.id,
                    ask.retention_s,
                    self.min_retention_s,
                )
                continue
            self.book.post(_book_ask(ask))
        for address in {ask.provider for ask in asks}:
            await self.watcher.is_active(address)

    # -- asks ----------------------------------------------------------------------------------------------

    async def post_ask(self, data: AskInput) -> BookAsk | None:
        """Checks, records and books an ask; returns the booked ask (None when it withdrew a span)."""
        provider = _address(data.provider, "provider")
        if _address(data.gateway, "gateway") != self.gateway:
            raise Forbidden("wrong_gateway", f"the ask is for gateway {data.gateway}; this is {self.gateway}")
        fingerprint = _hash(data.tls_fingerprint, "tlsFingerprint")
        if fingerprint == NO_FINGERPRINT and not self.allow_plaintext and data.capacity > 0:
            raise InvalidRequest(
                "plaintext_endpoint", "the ask names no TLS certificate; this gateway needs one"
            )
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
        if data.capacity > 0 and data.retention_s < self.min_retention_s:
            # Data gone before the validator may ask for it is the provider's fault, and costs it its stake:
            # better refused here, where it costs nothing.
            raise InvalidRequest(
                "short_retention",
                f"the ask keeps steps {data.retention_s} s; this gateway's validators may fetch them up to "
                f"{self.min_retention_s} s after a session ends",
            )
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
            self.gateway,
            bytes.fromhex(model.root.removeprefix("0x")),
            data.layer_start,
            data.layer_end,
            data.price_per_million,
            data.capacity,
            data.retention_s,
            data.endpoint,
            fingerprint,
            data.nonce,
            data.expires_at,
        )
        signature = _signature(data.signature)
        if signed.signer(signature, self.domain) != provider:
            raise Forbidden("invalid_signature", f"the ask is not signed by {provider}")
        if not await self.watcher.is_active(provider, fresh=True):
            raise Forbidden("provider_not_staked", f"{provider} is not active in StakeManager: stake first")
        if data.capacity > 0:
            await self.prove_endpoint(provider, data.endpoint, fingerprint)

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
                    retention_s=data.retention_s,
                    endpoint=data.endpoint,
                    tls_fingerprint="0x" + fingerprint.hex(),
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

    async def heartbeat(self, provider: str, gateway: str, timestamp: int, signature: str) -> float:
        """Records a signed heartbeat; returns the time the provider stays matchable until."""
        provider = _address(provider, "provider")
        if _address(gateway, "gateway") != self.gateway:
            raise Forbidden(
                "wrong_gateway", f"the heartbeat is for gateway {gateway}; this is {self.gateway}"
            )
        now = self.clock()
        if not 0 <= timestamp <= UINT64_MAX or abs(timestamp - now) > self.heartbeat_skew_s:
            raise InvalidRequest(
                "bad_timestamp",
                f"timestamp {timestamp} is more than {self.heartbeat_skew_s} s from {int(now)}",
            )
        if (
            Heartbeat(provider, self.gateway, timestamp).signer(_signature(signature), self.domain)
            != provider
        ):
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
        tls_fingerprint=bytes.fromhex(ask.tls_fingerprint.removeprefix("0x")),
        expires_at=float(ask.expires_at),
        retention_s=ask.retention_s,
    )
