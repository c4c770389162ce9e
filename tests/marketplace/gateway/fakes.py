"""Fakes for the gateway's seams, for unit tests: a chain to read, providers to step, and the small pieces
(terms, a model, a book with a route) that the payment gate and the job runner are built from. The
integration tests beside these run the same code against anvil, provider processes and real databases."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from eth_account import Account
from eth_account.signers.local import LocalAccount

from marketplace.gateway.chainwatch import ChainEvent, ChannelView
from marketplace.gateway.orderbook import BookAsk, OrderBook
from marketplace.gateway.payments.gate import Terms
from settlement.eip712 import Domain, voucher_domain
from settlement.errors import ChainUnavailable
from settlement.tickets import KeyReceiptSigner
from worker.client import StepResult
from worker.errors import HopFailed
from worker.receipts import ReceiptFields, transcript_root_of
from worker.wire import payload_sha256

CHAIN_ID = 31337
TOKEN = "0x" + "11" * 20
ESCROW = "0x" + "22" * 20
OPERATOR = "0x" + "33" * 20
MODEL_ROOT = "0x" + hashlib.sha256(b"fake model").hexdigest()


def terms() -> Terms:
    return Terms(
        chain_id=CHAIN_ID,
        token=Account.from_key(b"\x11" * 32).address,
        token_domain=Domain("Strata USD", "1", CHAIN_ID, TOKEN),
        escrow=Account.from_key(b"\x22" * 32).address,
        escrow_domain=voucher_domain(CHAIN_ID, Account.from_key(b"\x22" * 32).address),
        pay_to=Account.from_key(b"\x33" * 32).address,
        timeout_s=300,
        settle_margin_s=60,
    )


def model(layers: int = 6) -> Any:
    """What the runner needs of a served model: its name, root and depth."""
    return SimpleNamespace(name="fake", root=MODEL_ROOT, num_layers=layers, directory=Path("."))


def provider(index: int) -> LocalAccount:
    return Account.from_key((1000 + index).to_bytes(32, "big"))


def book_with(
    spans: list[tuple[int, int, int, int]], *, clock: Callable[[], float] = lambda: 1_000.0
) -> tuple[OrderBook, list[BookAsk]]:
    """A book holding one ask per (provider index, start, end, price per million), every provider staked and
    heartbeating, in posting order."""
    book = OrderBook(heartbeat_ttl_s=3600, clock=clock)
    asks = []
    for number, (index, start, end, price) in enumerate(spans, start=1):
        address = provider(index).address
        ask = BookAsk(
            number,
            address,
            MODEL_ROOT,
            start,
            end,
            price,
            4,
            f"10.0.0.{index}:7000",
            expires_at=clock() + 3600,
        )
        book.post(ask)
        book.set_active(address, True)
        book.heartbeat(address, clock())
        asks.append(ask)
    return book, asks


@dataclass
class FakeChainReader:
    """The chain the watcher reads: channels and stakes set by the test, events appended by the test."""

    block: int = 100
    channels: dict[bytes, ChannelView] = field(default_factory=dict)
    active: dict[str, bool] = field(default_factory=dict)
    logged: list[tuple[int, ChainEvent]] = field(default_factory=list)  # (block, event)
    failures: int = 0  # the next reads of the block number that fail as an unreachable endpoint would
    reads: list[str] = field(default_factory=list)  # what was read, in order

    def emit(self, name: str, **args: Any) -> None:
        self.block += 1
        self.logged.append((self.block, ChainEvent(name, args)))

    def block_number(self) -> int:
        if self.failures:
            self.failures -= 1
            raise ChainUnavailable("the endpoint does not answer")
        return self.block

    def events(self, first: int, last: int) -> list[ChainEvent]:
        self.reads.append(f"events {first}-{last}")
        return [event for block, event in self.logged if first <= block <= last]

    def channel(self, channel_id: bytes) -> ChannelView:
        self.reads.append(f"channel {channel_id.hex()[:8]}")
        return self.channels.get(channel_id, ChannelView(0, 0))

    def is_active(self, provider: str) -> bool:
        self.reads.append(f"stake {provider}")
        return self.active.get(provider, False)


class FakeRoute:
    """A route of fake providers that compute nothing: each hop's output is a hash of its input, the last one
    samples ``token_of(step)``, and each signs a real receipt over what it saw. ``fail`` says which hop fails
    and how, at which step."""

    def __init__(
        self,
        endpoints: list[str],
        ticket: dict[str, Any],
        asks: dict[str, BookAsk],
        *,
        fail: dict[str, tuple[int, Exception]],
        token_of: Callable[[int, int], int],
        log: list[tuple[str, int, list[int]]],
        hold: asyncio.Event | None = None,
    ) -> None:
        self.hold = hold
        self.endpoints = endpoints
        self.ticket = ticket
        self.asks = asks
        self.fail = fail
        self.token_of = token_of
        self.log = log  # (route's first endpoint, step, token ids sent)
        self.steps: dict[str, list[tuple[int, bytes, bytes]]] = {endpoint: [] for endpoint in endpoints}
        self.positions = 0

    async def step(
        self, session: bytes, step: int, inputs: torch.Tensor, sampling: dict[str, Any] | None = None
    ) -> StepResult:
        if self.hold is not None:
            await self.hold.wait()
        ids = [int(x) for x in inputs[0]]
        self.log.append((self.endpoints[0], step, ids))
        for endpoint in self.endpoints:
            failure = self.fail.get(endpoint)
            if failure is not None and failure[0] <= step:
                raise failure[1]
        transcript = []
        hashed = payload_sha256(inputs)
        for endpoint in self.endpoints:
            output = hashlib.sha256(hashed + endpoint.encode()).digest()
            ask = self.asks[endpoint]
            transcript.append(
                {
                    "provider": ask.provider,
                    "span": [ask.start, ask.end],
                    "in": hashed.hex(),
                    "out": output.hex(),
                }
            )
            self.steps[endpoint].append((step, hashed, output))
            hashed = output
        self.positions += len(ids)
        return StepResult(self.token_of(self.positions, step), transcript)

    async def close(self, session: bytes) -> list[dict[str, Any]]:
        receipts = []
        for endpoint in self.endpoints:
            ask = self.asks[endpoint]
            signer = KeyReceiptSigner(_key_of(ask.provider), chain_id=CHAIN_ID)
            fields = ReceiptFields(
                bytes.fromhex(str(self.ticket["jobId"]).removeprefix("0x")),
                ask.provider,
                bytes.fromhex(MODEL_ROOT[2:]),
                ask.start,
                ask.end,
                self.positions,
                transcript_root_of(self.steps[endpoint]),
            )
            receipts.append(
                {
                    "tokens": self.positions,
                    "span": [ask.start, ask.end],
                    "transcriptRoot": fields.transcript_root.hex(),
                    "signature": signer(fields).hex(),
                }
            )
        return receipts


_KEYS = {provider(index).address: provider(index) for index in range(20)}


def _key_of(address: str) -> LocalAccount:
    return _KEYS[address]


class FakeTransport:
    """Hands the coordinator FakeRoutes; every route it opened is kept for the test to look at."""

    def __init__(
        self,
        asks: list[BookAsk],
        *,
        fail: dict[str, tuple[int, Exception]] | None = None,
        token_of: Callable[[int, int], int] = lambda positions, step: 100 + positions,
        hold: asyncio.Event | None = None,  # steps wait for it to be set
    ) -> None:
        self.hold = hold
        self.asks = {ask.endpoint: ask for ask in asks}
        self.fail = fail or {}
        self.token_of = token_of
        self.routes: list[FakeRoute] = []
        self.log: list[tuple[str, int, list[int]]] = []
        self.closed = 0

    def route(self, endpoints: list[str], ticket: dict[str, Any]) -> FakeRoute:
        route = FakeRoute(endpoints, ticket, self.asks, fail=self.fail, token_of=self.token_of, log=self.log)
        self.routes.append(route)
        return route

    async def aclose(self) -> None:
        self.closed += 1


def unreachable(endpoint: str, reporter: str) -> HopFailed:
    """The error a provider at ``reporter`` sends back when it cannot reach ``endpoint``."""
    return HopFailed("hop_unreachable", f"cannot reach {endpoint}", hop=reporter)
