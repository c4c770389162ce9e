"""Driving one job across its chain of providers: prefill, decode, transcripts, receipts, and failover.

Each step goes to the route's first provider and is forwarded provider to provider; its reply carries every
hop's (input hash, output hash). The coordinator checks as it goes that the chain links: the first hop's input
is the token ids it sent, and each hop's input is the previous hop's output. At the end it closes the sessions
and checks each provider's signed HopReceipt against what it saw: signer, span, positions, and the transcript
root it recomputes from the hashes it collected. Only a receipt that checks out bills its token-layers.

Failover: when a provider fails mid-job (unreachable, an error reply, a broken transcript, or a step that
times out) the route is abandoned and the job moves to the cheapest fresh route that avoids the provider at
fault and whose cost for the whole request still fits what the client reserved. The new route is prefilled
with the prompt and every token generated so far, in one step, and decoding goes on from there. With greedy
decoding the new route samples exactly the token the old one would have: the output is the same as a run
without the failure. (With temperature sampling the new last provider starts a fresh generator from the seed.)

What an abandoned route is paid: nothing. Its sessions are closed without collecting receipts, so neither the
provider that failed nor the others on its route bill that attempt; the replay repeats their work on the new
route, which bills it instead. The client therefore pays exactly what a run without the failure on the final
route would cost, never more than its quote. Providers carry the risk of a peer's failure in their prices, and
the one that failed is left out of matching for a while.

A failure while closing, after the last token, has no route to replay on: the job completes unbilled, since no
receipt backs its token-layers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from eth_utils.address import is_address, to_checksum_address

from marketplace.gateway.orderbook import BookAsk, OrderBook, Route
from settlement.db.schema import HopStatus
from settlement.pricing import hop_charge
from settlement.tickets import issue_ticket, receipt_signer
from worker.client import ConnectionPool, RouteClient, StepResult
from worker.errors import HopFailed, HopUnreachable, ProtocolError, WireError
from worker.receipts import ReceiptFields, transcript_root_of
from worker.wire import FrameLimits, payload_sha256

log = logging.getLogger(__name__)

Finish = Literal["stop", "length", "halted"]
_HOP_ERRORS = (HopFailed, HopUnreachable, ProtocolError, WireError, TimeoutError)


@dataclass(frozen=True)
class JobSpec:
    job_id: bytes  # 32 bytes: the ticket's and every receipt's jobId
    model_root: str
    num_layers: int
    prompt: list[int]
    max_tokens: int
    sampling: dict[str, Any]  # temperature, top_k, top_p, seed: what the last provider samples with
    stop_token_ids: frozenset[int]
    budget: int | None  # the most the final route may charge; None when unpaid

    @property
    def quote_tokens(self) -> int:
        return len(self.prompt) + self.max_tokens


@dataclass
class HopRecord:
    """One provider's session in one attempt, as the coordinator saw it."""

    attempt: int
    position: int
    ask: BookAsk
    session: bytes  # the attempt's session id, by which validators fetch the provider's retained steps
    steps: list[tuple[int, bytes, bytes]] = field(default_factory=list)  # (step, input hash, output hash)
    tokens: int = 0  # positions sent through this hop
    receipt: dict[str, Any] | None = None
    verified: bool = False
    amount: int = 0  # what it bills; 0 unless its receipt verified
    status: str = HopStatus.RUNNING

    @property
    def transcript_root(self) -> bytes:
        return transcript_root_of(self.steps)


@dataclass
class Outcome:
    tokens: list[int]
    finish: Finish | None  # None when the job failed
    hops: list[HopRecord]
    failovers: int
    error_code: str | None = None
    error_message: str | None = None

    @property
    def charged(self) -> int:
        return sum(hop.amount for hop in self.hops)


class BrokenTranscript(ProtocolError):
    """A step's transcript does not link hop to hop; ``position`` is the hop whose input does not match."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position


class RouteSession(Protocol):
    """One job's attempt on one route, as the coordinator drives it."""

    async def step(
        self, session: bytes, step: int, inputs: torch.Tensor, sampling: dict[str, Any] | None = None
    ) -> StepResult: ...

    async def close(self, session: bytes) -> list[dict[str, Any]]:
        """Ends the session on every hop; returns each hop's signed receipt."""
        ...


class HopTransport(Protocol):
    """How the coordinator reaches providers: a narrow seam, so that its failover decisions can be tested on a
    fake. One per job; closed when the job ends."""

    def route(self, endpoints: list[str], ticket: dict[str, Any]) -> RouteSession: ...

    async def aclose(self) -> None: ...


class PooledTransport:
    """Providers over persistent connections, one per endpoint, shared by the job's attempts."""

    def __init__(self, limits: FrameLimits) -> None:
        self.pool = ConnectionPool(limits)

    def route(self, endpoints: list[str], ticket: dict[str, Any]) -> RouteSession:
        return RouteClient(endpoints, ticket, self.pool)

    async def aclose(self) -> None:
        await self.pool.close()


class Coordinator:
    def __init__(
        self,
        book: OrderBook,
        gateway: Any,  # LocalAccount: signs job tickets
        *,
        chain_id: int,
        transport: Callable[[], HopTransport] | None = None,  # default: PooledTransport(limits)
        limits: FrameLimits | None = None,
        step_timeout_s: float = 60.0,
        ticket_ttl_s: int = 3600,
        max_failovers: int = 3,
        failure_suspend_s: float = 30.0,
        clock: Callable[[], float],
    ) -> None:
        self.book = book
        self.gateway = gateway
        self.chain_id = chain_id
        self.limits = limits or FrameLimits()
        self.transport = transport or (lambda: PooledTransport(self.limits))
        self.step_timeout_s = step_timeout_s
        self.ticket_ttl_s = ticket_ttl_s
        self.max_failovers = max_failovers
        self.failure_suspend_s = failure_suspend_s
        self.clock = clock
        self._cleanup: set[asyncio.Task[None]] = set()

    async def run(self, spec: JobSpec, route: Route, emit: Callable[[int], Awaitable[bool]]) -> Outcome:
        """Generates on ``route`` (already reserved; released here) and on fresh routes after failures.

        ``emit`` gets each new token except stop tokens and returns False to end the generation there.
        """
        ticket = issue_ticket(
            self.gateway,
            job_id=spec.job_id,
            model_root=bytes.fromhex(spec.model_root.removeprefix("0x")),
            expires_at=int(self.clock()) + self.ticket_ttl_s,
            chain_id=self.chain_id,
        )
        tokens: list[int] = []
        hops: list[HopRecord] = []
        excluded: set[str] = set()
        attempt = 0
        held: Route | None = route  # the route whose capacity this job holds, released exactly once
        transport = self.transport()
        try:
            while True:
                session = os.urandom(16)
                records = [HopRecord(attempt, i, ask, session) for i, ask in enumerate(route.asks)]
                hops += records
                client = transport.route(route.endpoints, ticket)
                try:
                    finish = await self._generate(spec, client, session, records, tokens, emit)
                except _HOP_ERRORS as exc:
                    for record in records:
                        record.status = HopStatus.ABANDONED
                    self.book.release(route)
                    held = None
                    log.warning("job 0x%s: route attempt %d failed: %r", spec.job_id.hex(), attempt, exc)
                    for position in self._blame(route, exc):
                        records[position].status = HopStatus.FAILED
                        excluded.add(route.asks[position].provider)
                        if not isinstance(exc, TimeoutError):
                            self.book.suspend(route.asks[position].provider, self.failure_suspend_s)
                    self._close_quietly(route, ticket, session)
                    fresh = self._reroute(spec, excluded) if attempt < self.max_failovers else None
                    if fresh is None:
                        message = f"providers failed and no route is left: {exc}"
                        return Outcome(tokens, None, hops, attempt, "route_failed", message)
                    route, held, attempt = fresh, fresh, attempt + 1
                    continue
                try:
                    receipts = await asyncio.wait_for(client.close(session), self.step_timeout_s)
                except _HOP_ERRORS as exc:
                    log.warning("job 0x%s: closing failed, nothing billed: %r", spec.job_id.hex(), exc)
                    for record in records:
                        record.status = HopStatus.UNVERIFIED
                else:
                    self._check_receipts(spec, records, receipts)
                return Outcome(tokens, finish, hops, attempt)
        finally:
            if held is not None:
                self.book.release(held)
            await transport.aclose()

    def _reroute(self, spec: JobSpec, excluded: set[str]) -> Route | None:
        route = self.book.route(spec.model_root, spec.num_layers, exclude=excluded)
        if route is None or (spec.budget is not None and route.quote(spec.quote_tokens) > spec.budget):
            return None
        self.book.reserve(route)
        return route

    async def _generate(
        self,
        spec: JobSpec,
        client: RouteSession,
        session: bytes,
        records: list[HopRecord],
        tokens: list[int],
        emit: Callable[[int], Awaitable[bool]],
    ) -> Finish:
        # Step 0 is the prefill: the prompt, and after a failover every token generated so far as well.
        result = await self._step(client, session, records, 0, [*spec.prompt, *tokens], spec.sampling)
        step = 1
        while True:
            token = result.token
            tokens.append(token)
            if token in spec.stop_token_ids:
                return "stop"
            if not await emit(token):
                return "halted"
            if len(tokens) >= spec.max_tokens:
                return "length"
            result = await self._step(client, session, records, step, [token], None)
            step += 1

    async def _step(
        self,
        client: RouteSession,
        session: bytes,
        records: list[HopRecord],
        step: int,
        ids: list[int],
        sampling: dict[str, Any] | None,
    ) -> StepResult:
        inputs = torch.tensor([ids], dtype=torch.int64)
        result = await asyncio.wait_for(client.step(session, step, inputs, sampling), self.step_timeout_s)
        self._record(records, step, payload_sha256(inputs), result.transcript)
        for record in records:
            record.tokens += len(ids)
        return result

    @staticmethod
    def _record(records: list[HopRecord], step: int, sent: bytes, transcript: list[dict[str, Any]]) -> None:
        if len(transcript) != len(records):
            raise BrokenTranscript(f"{len(transcript)} transcript entries for {len(records)} hops", 0)
        expected_input = sent
        parsed: list[tuple[bytes, bytes]] = []
        for position, (record, entry) in enumerate(zip(records, transcript, strict=True)):
            try:
                provider = entry["provider"]
                span = entry["span"]
                hashes = bytes.fromhex(entry["in"]), bytes.fromhex(entry["out"])
            except (KeyError, TypeError, ValueError) as exc:
                raise BrokenTranscript(f"hop {position} sent a malformed transcript entry", position) from exc
            if (
                not isinstance(provider, str)
                or not is_address(provider)
                or to_checksum_address(provider) != record.ask.provider
                or span != [record.ask.start, record.ask.end]
                or any(len(h) != 32 for h in hashes)
            ):
                raise BrokenTranscript(f"hop {position} is not {record.ask.provider} on its span", position)
            if hashes[0] != expected_input:
                raise BrokenTranscript(f"hop {position}'s input is not what reached it", position)
            parsed.append(hashes)
            expected_input = hashes[1]
        for record, (input_hash, output_hash) in zip(records, parsed, strict=True):
            record.steps.append((step, input_hash, output_hash))

    def _check_receipts(
        self, spec: JobSpec, records: list[HopRecord], receipts: list[dict[str, Any]]
    ) -> None:
        root = bytes.fromhex(spec.model_root.removeprefix("0x"))
        for position, record in enumerate(records):
            receipt = receipts[position] if position < len(receipts) else None
            record.receipt = receipt if isinstance(receipt, dict) else None
            record.verified = self._receipt_holds(spec.job_id, root, record)
            record.status = HopStatus.BILLED if record.verified else HopStatus.UNVERIFIED
            if record.verified:
                record.amount = hop_charge(record.tokens, record.ask.layers, record.ask.price_per_million)

    def _receipt_holds(self, job_id: bytes, model_root: bytes, record: HopRecord) -> bool:
        receipt = record.receipt
        if receipt is None:
            return False
        ask = record.ask
        fields = ReceiptFields(
            job_id, ask.provider, model_root, ask.start, ask.end, record.tokens, record.transcript_root
        )
        try:
            signature = bytes.fromhex(str(receipt["signature"]))
            signer = receipt_signer(fields, signature, chain_id=self.chain_id)
        except (KeyError, ValueError):
            return False
        return (
            receipt.get("tokens") == record.tokens
            and receipt.get("span") == [ask.start, ask.end]
            and receipt.get("transcriptRoot") == fields.transcript_root.hex()
            and signer == ask.provider
        )

    @staticmethod
    def _blame(route: Route, exc: BaseException) -> list[int]:
        """Positions on the route at fault for ``exc``."""
        endpoints = route.endpoints
        if isinstance(exc, BrokenTranscript):
            return [exc.position]
        if isinstance(exc, HopFailed) and exc.hop in endpoints:
            position = endpoints.index(exc.hop)
            # The provider that reports an unreachable next hop is fine; the next one is not.
            if exc.code == "hop_unreachable" and position + 1 < len(endpoints):
                position += 1
            return [position]
        if isinstance(exc, TimeoutError):
            return list(range(len(endpoints)))  # a silent route: any of them may hang
        return [0]  # the first provider could not be reached or answered nonsense

    def _close_quietly(self, route: Route, ticket: dict[str, Any], session: bytes) -> None:
        """Frees the abandoned sessions' KV caches where the providers still answer; receipts are not wanted."""

        async def close() -> None:
            transport = self.transport()
            try:
                with contextlib.suppress(*_HOP_ERRORS, OSError):
                    await asyncio.wait_for(
                        transport.route(route.endpoints, ticket).close(session), self.step_timeout_s
                    )
            finally:
                await transport.aclose()

        task = asyncio.create_task(close())
        self._cleanup.add(task)
        task.add_done_callback(self._cleanup.discard)
