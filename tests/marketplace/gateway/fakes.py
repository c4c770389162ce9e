"""Fakes for the gateway's seams, for unit tests: a chain to read, providers to step, and the small pieces
(terms, a model, a book with a route) that the payment gate and the job runner are built from. The
integration tests beside these run the same code against anvil, provider processes and real databases."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from eth_account import Account
from eth_account.signers.local import LocalAccount

from marketplace.gateway.chainwatch import ChainEvent, ChannelView
from marketplace.gateway.coordinator import Coordinator
from marketplace.gateway.orderbook import BookAsk, OrderBook
from marketplace.gateway.payments.gate import BatchTerms, Terms
from settlement.contracts import (
    BATCH_SETTLEMENT_ADDRESS,
    ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
    MIN_WITHDRAW_DELAY_S,
)
from settlement.eip712 import BATCH_SETTLEMENT_DOMAIN_NAME, Domain, protocol_domain, voucher_domain
from settlement.errors import ChainUnavailable
from settlement.tickets import KeyRing, SignatureChecks
from worker.client import HopPlan, StepResult, blame
from worker.errors import StepFailed
from worker.messages import SignedReceipt
from worker.transcript import StepHashes, sampling_hash, transcript_root
from worker.trust import ReceiptFields
from worker.wire import payload_sha256

CHAIN_ID = 31337
TOKEN = "0x" + "11" * 20
ESCROW = "0x" + "22" * 20
OPERATOR = "0x" + "33" * 20
MODEL_ROOT = "0x" + hashlib.sha256(b"fake model").hexdigest()
GATEWAY = Account.from_key(b"\x42" * 32)
DOMAIN = protocol_domain(CHAIN_ID, "0x5a5A5a5a5A5a5a5A5a5a5A5A5a5a5A5A5A5a5a5A")


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
        batch=BatchTerms(
            domain=Domain(BATCH_SETTLEMENT_DOMAIN_NAME, "1", CHAIN_ID, BATCH_SETTLEMENT_ADDRESS),
            collector=ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
            receiver=Account.from_key(b"\x44" * 32).address,
            receiver_authorizer=Account.from_key(b"\x33" * 32).address,
            withdraw_delay_s=MIN_WITHDRAW_DELAY_S,
        ),
    )


def model(layers: int = 6) -> Any:
    """What the runner needs of a served model: its name, root and depth."""
    return SimpleNamespace(
        name="fake", root=MODEL_ROOT, num_layers=layers, vocab_size=1_000, directory=Path(".")
    )


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
            bytes(32),
            clock() + 3600,
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
    errors: list[Exception] = field(default_factory=list)  # raised by the next reads of the block number
    max_range: int | None = None  # logs of more blocks than this at once are refused, as endpoints cap them
    reads: list[str] = field(default_factory=list)  # what was read, in order
    down: bool = False  # every channel read fails as an unreachable endpoint's does

    def emit(self, name: str, **args: Any) -> None:
        self.block += 1
        self.logged.append((self.block, ChainEvent(name, args)))

    def block_number(self) -> int:
        if self.errors:
            raise self.errors.pop(0)
        return self.block

    def events(self, first: int, last: int) -> list[ChainEvent]:
        self.reads.append(f"events {first}-{last}")
        if self.max_range is not None and last - first + 1 > self.max_range:
            raise ValueError(f"query exceeds max block range {self.max_range}")  # as web3 raises an RPC error
        return [event for block, event in self.logged if first <= block <= last]

    def channel(self, channel_id: bytes) -> ChannelView:
        self.reads.append(f"channel {channel_id.hex()[:8]}")
        if self.down:
            raise ChainUnavailable("the endpoint does not answer")
        return self.channels.get(channel_id, ChannelView(0, 0))

    def batch_channel(self, channel_id: bytes) -> ChannelView:
        return self.channel(channel_id)

    def is_active(self, provider: str) -> bool:
        self.reads.append(f"stake {provider}")
        return self.active.get(provider, False)


class FakeRoute:
    """A route of fake providers that compute nothing: each hop's output is a hash of its input, the last one
    samples ``token_of(positions, step)``, and each signs a real receipt over what it reported. ``fail`` maps an
    endpoint to the step from which it fails and how the route client would blame it:

        own      the hop's own authenticated error: it is blamed and suspended
        relayed  a report that does not verify: the hop before it is blamed and suspended
        link     its input is not the previous hop's output: both are left out, neither suspended
        timeout  the route says nothing: the caller's timeout fires
    """

    def __init__(
        self,
        plans: list[HopPlan],
        *,
        fail: dict[str, tuple[int, str]],
        token_of: Callable[[int, int], int],
        log: list[tuple[str, int, list[int]]],
        hold: asyncio.Event | None = None,
    ) -> None:
        self.plans = plans
        self.endpoints = [plan.endpoint for plan in plans]
        self.fail = fail
        self.token_of = token_of
        self.log = log  # (route's first endpoint, step, token ids sent)
        self.hold = hold
        self.steps: list[list[StepHashes]] = [[] for _ in plans]
        self.positions = 0
        self.opened_with: dict[str, Any] | None = None

    async def open(self, sampling: dict[str, Any] | None, **_ring: Any) -> None:
        self.opened_with = sampling

    async def ring(
        self,
        prefill: torch.Tensor,
        *,
        steps: int,
        stop_token_ids: frozenset[int] = frozenset(),
        logits: bool = False,
    ) -> AsyncGenerator[StepResult, None]:
        """The ring, as the coordinator sees it: the same steps as step() would take, yielded as they come."""
        inputs = prefill
        for step in range(steps):
            result = await self.step(step, inputs)
            yield result
            if result.token in stop_token_ids:
                return
            inputs = torch.tensor([[result.token]], dtype=torch.int64)

    async def step(self, step: int, inputs: torch.Tensor, *, logits: bool = False) -> StepResult:
        if self.hold is not None:
            await self.hold.wait()
        ids = [int(x) for x in inputs[0]]
        self.log.append((self.endpoints[0], step, ids))
        for position, endpoint in enumerate(self.endpoints):
            failure = self.fail.get(endpoint)
            if failure is None or step < failure[0]:
                continue
            kind = failure[1]
            if kind == "timeout":
                raise TimeoutError
            positions = {
                "own": [position],
                "relayed": [max(position - 1, 0)],
                "link": [position - 1, position],
            }
            raise StepFailed(f"hop {position}: {kind}", blame(positions[kind], suspend=kind != "link"))
        hops = []
        hashed = payload_sha256(inputs)
        self.positions += len(ids)
        token = self.token_of(self.positions, step)
        for position, endpoint in enumerate(self.endpoints):
            output = hashlib.sha256(hashed + endpoint.encode()).digest()
            last = position == len(self.endpoints) - 1
            hops.append(StepHashes(step, hashed, output, token if last else None, positions=len(ids)))
            self.steps[position].append(hops[-1])
            hashed = output
        return StepResult(token, hops, [None] * len(hops))

    async def close(self, steps: int | None = None) -> list[SignedReceipt | None]:
        receipts: list[SignedReceipt | None] = []
        for position, plan in enumerate(self.plans):
            ticket = plan.ticket
            last = position == len(self.plans) - 1
            receipts.append(
                KeyRing(_key_of(ticket.provider), DOMAIN).receipt(
                    ReceiptFields(
                        ticket.job_id, ticket.session, GATEWAY.address, ticket.provider, ticket.model_root,
                        ticket.layer_start, ticket.layer_end, self.positions, transcript_root(self.steps[position]),
                        sampling_hash(self.opened_with) if last else sampling_hash(None),
                    )
                )
            )  # fmt: skip
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
        fail: dict[str, tuple[int, str]] | None = None,
        token_of: Callable[[int, int], int] = lambda positions, step: 100 + positions,
        hold: asyncio.Event | None = None,  # steps wait for it to be set
    ) -> None:
        self.hold = hold
        self.fail = fail or {}
        self.token_of = token_of
        self.routes: list[FakeRoute] = []
        self.log: list[tuple[str, int, list[int]]] = []
        self.closed = 0

    def route(self, hops: list[HopPlan], *, vocab_size: int) -> FakeRoute:
        route = FakeRoute(hops, fail=self.fail, token_of=self.token_of, log=self.log, hold=self.hold)
        self.routes.append(route)
        return route

    async def aclose(self) -> None:
        self.closed += 1


def coordinator(book: OrderBook, transport: FakeTransport, **settings: Any) -> Coordinator:
    """The gateway's coordinator, its providers fakes."""
    return Coordinator(
        book,
        KeyRing(GATEWAY, DOMAIN),
        check_receipt=SignatureChecks(DOMAIN).receipt,
        transport=lambda: transport,
        clock=lambda: 1_000.0,
        **settings,
    )
