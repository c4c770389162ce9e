"""Driving one job across its chain of providers: tickets, prefill, decode, reports, receipts, and failover.

For each attempt the gateway signs one ticket per hop (its provider, span, session, the peer before it and the
one after it with that peer's certificate, a position cap and a short expiry) and opens the session on every
provider directly, handing each a key for its reports. Every hop's authenticated account of every step reaches
the gateway, which the route client verifies (worker.client.RouteClient): every entry by its own hop's key, the
chain linking hop to hop, the emitted token in the vocabulary.

The token ring (``ring=True``, the gateway's ``HOP_RING`` setting, on by default). The tickets close the route
into a ring: the first hop's previous peer is the last provider, and the last hop's next is the first. The gateway
pushes the prefill to the first provider and follows the last provider's stream of step reports; the last provider
samples each token and pushes it straight to the first as the next step's input, so a token costs n link
crossings instead of 2n, and the gateway is off its path. The ring stops by itself at ``max_tokens`` and after a
stop token (the last provider's open says when); a stop string, or a client gone away, is decided here, after
the ring has already gone on: the sessions are closed at once (which stops the ring at every hop), and each close
names the steps the gateway took, so every receipt bills exactly those. The steps the ring computed past them are
billed to nobody, a cost of at most about one ring's round trip that the providers bear for the speed (see
worker.messages). With ``ring=False`` every step goes to the first provider and waits for the reports to come
back through the chain: "without the ring", kept for routes where it suits, and to measure the ring's gain.

At the end the gateway closes every session directly and bills each provider on its own
signed receipt, checked against what that provider reported as the route ran (worker.transcript): a provider
that gives no receipt, or a wrong one, goes unpaid, and the others are paid all the same.

False receipts. A receipt its provider signed for this very session that says other than what the gateway
recorded (more positions than it served, another transcript, other sampling parameters) is its own false word:
the gateway records only what every hop signed at every step (its positions, hashes and token), and checked
then, so the receipt contradicts the provider's own reports. Besides going unpaid, the provider is suspended
from matching for ``FALSE_RECEIPT_SUSPEND_S``, and the receipt and the gateway's record of the hop are kept as
evidence (``marketplace.gateway.jobs``), served with the slashes'. It is not slashed: the gateway holds no
slasher key, and its record is not the signed step reports themselves.

Failover: when a step does not come back whole (a provider unreachable, an error it reports, a report that
does not verify, a broken link, a step that times out) the route is abandoned and the job moves to the cheapest
fresh route that leaves out the providers at fault and whose cost for the whole request still fits what the
client reserved. Who is at fault is decided from what is authenticated (worker.client.Blame): a provider whose
own entry reports its failure, the provider that relayed a report that does not verify, of two providers whose
hashes disagree both (neither suspended). Those surely at fault are also left out of matching for a while. The
new route is prefilled with the prompt and every token generated so far, in one step, and decoding goes on
from there. With greedy decoding the new route samples exactly the token the old one would have.

Several choices (``n``) are generated one after another on the route the job holds, each in sessions of its own
(its own prefill, billed as computed) and with its own seed: the job's seed plus the choice's index. Attempts are
numbered across the job, so each attempt is still one route of one choice.

What an abandoned route is paid: nothing. Its sessions are closed without collecting receipts, so nobody on it
bills that attempt; the replay repeats their work on the new route, which bills it instead. The client
therefore pays exactly what a run without the failure on the final route would cost, never more than its quote.
A job that fails for good after tokens reached the client pays for them: the last attempt's hops not at fault
are closed for their receipts and billed where the receipt is exactly the gateway's record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from marketplace.gateway.orderbook import BookAsk, Budget, OrderBook, Route
from settlement.db.schema import HopStatus
from settlement.pricing import hop_charge
from settlement.tickets import KeyRing, SignatureChecks
from worker.client import Blame, HopPlan, Peers, RouteClient, StepResult
from worker.errors import StepFailed
from worker.messages import ZERO_ADDRESS, HopTicket, SignedReceipt
from worker.sampling import MAX_SEED, TokenLogprobs, session_sampling
from worker.transcript import (
    ReceiptChecker,
    StepHashes,
    receipt_bills,
    receipt_is_false,
    sampling_hash,
    transcript_root,
)
from worker.trust import ReceiptFields

log = logging.getLogger(__name__)

FALSE_RECEIPT_SUSPEND_S = 24 * 3600.0

Finish = Literal["stop", "length", "halted"]
# (choice, token, its log probabilities when asked for) -> whether to go on with that choice
Emit = Callable[[int, int, TokenLogprobs | None], Awaitable[bool]]
ChoiceEmit = Callable[[int, TokenLogprobs | None], Awaitable[bool]]


@dataclass(frozen=True)
class JobSpec:
    job_id: bytes  # 32 bytes: every ticket's and receipt's jobId
    model_root: str
    num_layers: int
    vocab_size: int  # the gateway refuses any token id outside it
    prompt: list[int]
    max_tokens: int
    sampling: dict[str, Any]  # worker.sampling.SamplingParams' fields: what the last provider samples with
    stop_token_ids: frozenset[int]
    budget: int | None  # the most the final route may charge; None when unpaid
    choices: int = 1  # generations of the prompt, each in sessions of its own

    @property
    def session_positions(self) -> int:
        """The most positions one choice's session carries: the prompt and every token generated."""
        return len(self.prompt) + self.max_tokens

    @property
    def quote_tokens(self) -> int:
        return self.choices * self.session_positions

    def choice_sampling(self, choice: int) -> dict[str, Any]:
        """Choice ``choice``'s parameters: the job's, with a seed of its own."""
        if choice == 0 or self.sampling.get("seed") is None:
            return self.sampling
        return {**self.sampling, "seed": (int(self.sampling["seed"]) + choice) % (MAX_SEED + 1)}


@dataclass
class HopRecord:
    """One provider's session in one attempt, as the coordinator saw it."""

    attempt: int
    position: int
    ask: BookAsk
    session: bytes  # the attempt's session id, by which validators fetch the provider's retained steps
    steps: list[StepHashes] = field(default_factory=list)  # what this hop authenticated, step by step
    tokens: int = 0  # positions sent through this hop
    receipt: SignedReceipt | None = None
    sampling: dict[str, Any] | None = None  # on the last span, the parameters its session was opened with
    verified: bool = False
    refusal: str | None = None  # why a false receipt does not bill it
    amount: int = 0  # what it bills; 0 unless its receipt verified
    status: str = HopStatus.RUNNING
    recorded_at: float | None = None  # perf_counter when the gateway last recorded a step of it

    @property
    def transcript_root(self) -> bytes:
        return transcript_root(self.steps)


@dataclass
class Outcome:
    tokens: list[int]  # every choice's, in order
    finish: Finish | None  # the last choice's; None when the job failed
    hops: list[HopRecord]
    failovers: int
    error_code: str | None = None
    error_message: str | None = None
    finishes: list[Finish] = field(default_factory=list)  # each finished choice's

    @property
    def charged(self) -> int:
        return sum(hop.amount for hop in self.hops)


class RouteSession(Protocol):
    """One job's attempt on one route, as the coordinator drives it: step by step through the chain, or as a
    ring (when its tickets make one) that yields each step's result as the last provider reports it."""

    async def open(
        self,
        sampling: dict[str, Any] | None,
        *,
        steps: int | None = None,
        stop_token_ids: frozenset[int] = frozenset(),
    ) -> None: ...

    async def step(self, step: int, inputs: torch.Tensor, *, logits: bool = False) -> StepResult: ...

    def ring(
        self,
        prefill: torch.Tensor,
        *,
        steps: int,
        stop_token_ids: frozenset[int] = frozenset(),
        logits: bool = False,
    ) -> AsyncGenerator[StepResult, None]: ...

    async def close(self, steps: int | None = None) -> list[SignedReceipt | None]:
        """Each hop's own signed receipt, asked of it directly, billing the first ``steps`` steps; None for a hop
        that gave none."""
        ...


class HopTransport(Protocol):
    """How the coordinator reaches providers: a narrow seam, so that its failover decisions can be tested on a
    fake. One per job; closed when the job ends."""

    def route(self, hops: list[HopPlan], *, vocab_size: int) -> RouteSession: ...

    async def aclose(self) -> None: ...


class LinkedTransport:
    """Providers over authenticated links (TLS pinned to each provider's certificate), shared by a job's
    attempts."""

    def __init__(self, keys: KeyRing, *, allow_plaintext: bool, step_timeout_s: float) -> None:
        self.peers = Peers(keys, allow_plaintext=allow_plaintext)
        self.checks = SignatureChecks(keys.domain)
        self.step_timeout_s = step_timeout_s

    def route(self, hops: list[HopPlan], *, vocab_size: int) -> RouteSession:
        return RouteClient(
            hops, self.peers, checks=self.checks, vocab_size=vocab_size, step_timeout_s=self.step_timeout_s
        )

    async def aclose(self) -> None:
        await self.peers.close()


class Coordinator:
    def __init__(
        self,
        book: OrderBook,
        keys: KeyRing,  # the gateway's: signs tickets, proves the gateway on every link
        *,
        check_receipt: ReceiptChecker,
        transport: Callable[[], HopTransport] | None = None,  # default: LinkedTransport(keys)
        allow_plaintext: bool = False,
        step_timeout_s: float = 60.0,
        ticket_ttl_s: int = 120,
        max_failovers: int = 3,
        failure_suspend_s: float = 30.0,
        ring: bool = True,  # tokens on a ring (see the module's docstring); False: the request/reply chain
        clock: Callable[[], float],
    ) -> None:
        self.book = book
        self.keys = keys
        self.check_receipt = check_receipt
        self.transport = transport or (
            lambda: LinkedTransport(keys, allow_plaintext=allow_plaintext, step_timeout_s=step_timeout_s)
        )
        self.step_timeout_s = step_timeout_s
        self.ticket_ttl_s = ticket_ttl_s
        self.max_failovers = max_failovers
        self.failure_suspend_s = failure_suspend_s
        self.ring = ring
        self.clock = clock
        self._cleanup: set[asyncio.Task[None]] = set()

    async def run(
        self, spec: JobSpec, route: Route, emit: Emit, *, halted: Callable[[], bool] = lambda: False
    ) -> Outcome:
        """Generates ``spec.choices`` choices on ``route`` (already reserved; released here) and on fresh routes
        after failures.

        ``emit`` gets each choice's new tokens except stop tokens, with their log probabilities when the sampling
        asks for them, and returns False to end that choice there. Once ``halted()`` (the client went away), no
        further choice starts.
        """
        tokens: list[int] = []
        finishes: list[Finish] = []
        hops: list[HopRecord] = []
        excluded: set[str] = set()
        attempt = failovers = 0
        held: Route | None = route  # the route whose capacity this job holds, released exactly once
        transport = self.transport()
        try:
            for choice in range(spec.choices):
                if choice and halted():
                    break
                generated: list[int] = []
                sampling = spec.choice_sampling(choice)

                async def emit_choice(
                    token: int, logprobs: TokenLogprobs | None, choice: int = choice
                ) -> bool:
                    return await emit(choice, token, logprobs)

                while True:
                    plans = self._plans(spec, route)
                    session = plans[0].ticket.session
                    records = [HopRecord(attempt, i, ask, session) for i, ask in enumerate(route.asks)]
                    hops += records
                    client = transport.route(plans, vocab_size=spec.vocab_size)
                    # After a failover the new last span starts from what was generated: its sampler must know it.
                    records[-1].sampling = session_sampling(sampling, spec.prompt, generated)
                    try:
                        opening = client.open(
                            records[-1].sampling,
                            steps=spec.max_tokens - len(generated),
                            stop_token_ids=spec.stop_token_ids,
                        )
                        await asyncio.wait_for(opening, self.step_timeout_s)
                        finish = await self._generate(spec, client, records, generated, emit_choice)
                    except (StepFailed, TimeoutError) as exc:
                        for record in records:
                            record.status = HopStatus.ABANDONED
                        self.book.release(route)
                        held = None
                        log.warning("job 0x%s: route attempt %d failed: %s", spec.job_id.hex(), attempt, exc)
                        blame = exc.blame if isinstance(exc, StepFailed) else None
                        # A silent route may be anyone's doing: leave all of it out, suspend none.
                        positions = blame.positions if blame is not None else list(range(len(records)))
                        suspend = blame is not None and blame.suspend
                        for position in positions:
                            records[position].status = HopStatus.FAILED if suspend else HopStatus.SUSPECT
                            excluded.add(route.asks[position].provider)
                            if suspend:
                                self.book.suspend(route.asks[position].provider, self.failure_suspend_s)
                        fresh = self._reroute(spec, excluded) if failovers < self.max_failovers else None
                        if fresh is None:
                            if generated:
                                await self._bill_delivered(spec, plans, records, client)
                            else:
                                self._close_quietly(plans, spec.vocab_size)
                            message = f"providers failed and no route is left: {exc}"
                            tokens += generated
                            return Outcome(tokens, None, hops, failovers, "route_failed", message, finishes)
                        self._close_quietly(plans, spec.vocab_size)
                        route, held, attempt, failovers = fresh, fresh, attempt + 1, failovers + 1
                        continue
                    receipts = await client.close(len(records[0].steps))
                    self._bill(spec, plans, records, receipts)
                    break
                tokens += generated
                finishes.append(finish)
                attempt += 1  # the next choice's sessions are a route attempt of their own
            return Outcome(tokens, finishes[-1], hops, failovers, finishes=finishes)
        finally:
            if held is not None:
                self.book.release(held)
            await transport.aclose()

    def _plans(self, spec: JobSpec, route: Route) -> list[HopPlan]:
        return plan_route(
            self.keys,
            route.asks,
            job_id=spec.job_id,
            model_root=bytes.fromhex(spec.model_root.removeprefix("0x")),
            max_positions=spec.session_positions,
            expires_at=int(self.clock()) + self.ticket_ttl_s,
            ring=self.ring,
        )

    def _reroute(self, spec: JobSpec, excluded: set[str]) -> Route | None:
        budget = None if spec.budget is None else Budget(spec.quote_tokens, spec.budget)
        route = self.book.route(spec.model_root, spec.num_layers, exclude=excluded, budget=budget)
        if route is None:
            return None
        self.book.reserve(route)
        return route

    async def _generate(
        self,
        spec: JobSpec,
        client: RouteSession,
        records: list[HopRecord],
        tokens: list[int],
        emit: ChoiceEmit,
    ) -> Finish:
        if self.ring:
            return await self._generate_ring(spec, client, records, tokens, emit)
        # Step 0 is the prefill: the prompt, and after a failover every token generated so far as well.
        result = await self._step(client, records, 0, [*spec.prompt, *tokens])
        step = 1
        while (finish := await self._take(spec, result, tokens, emit)) is None:
            result = await self._step(client, records, step, [result.token])
            step += 1
        return finish

    async def _generate_ring(
        self,
        spec: JobSpec,
        client: RouteSession,
        records: list[HopRecord],
        tokens: list[int],
        emit: ChoiceEmit,
    ) -> Finish:
        """The ring runs the steps; each result is recorded as it comes. Leaving early (a stop string, a client
        gone) leaves the ring to be stopped by the close, which bills only the steps recorded here."""
        prefill = torch.tensor([[*spec.prompt, *tokens]], dtype=torch.int64)
        ring = client.ring(prefill, steps=spec.max_tokens - len(tokens), stop_token_ids=spec.stop_token_ids)
        async with contextlib.aclosing(ring):
            async for result in ring:
                self._record(records, result)
                if (finish := await self._take(spec, result, tokens, emit)) is not None:
                    return finish
        raise StepFailed("the ring ended before its last step", Blame([len(records) - 1], suspend=False))

    @staticmethod
    async def _take(spec: JobSpec, result: StepResult, tokens: list[int], emit: ChoiceEmit) -> Finish | None:
        """Takes a step's token: how the choice finishes with it, or None to go on."""
        tokens.append(result.token)
        if result.token in spec.stop_token_ids:
            return "stop"
        if not await emit(result.token, result.logprobs):
            return "halted"
        if len(tokens) >= spec.max_tokens:
            return "length"
        return None

    async def _step(
        self, client: RouteSession, records: list[HopRecord], step: int, ids: list[int]
    ) -> StepResult:
        inputs = torch.tensor([ids], dtype=torch.int64)
        # The route gives up on its own at step_timeout_s, saying on whom; this is for one that does not.
        result = await asyncio.wait_for(client.step(step, inputs), self.step_timeout_s + 5.0)
        self._record(records, result)
        return result

    def _record(self, records: list[HopRecord], result: StepResult) -> None:
        """What every hop authenticated of a step the gateway took: the steps it bills."""
        now = time.perf_counter()
        for record, hashes in zip(records, result.hops, strict=True):
            record.steps.append(hashes)
            record.tokens += hashes.positions
        first = records[0]
        if first.recorded_at is not None and len(first.steps) >= 2:
            # A decode step's round trip: one result to the next (the ring's lap, or the chain's request and
            # reply). The book attributes it to the hops, each's own unsigned account of its compute counting
            # only towards the others' time (marketplace.gateway.orderbook). The prefill tells nothing of load.
            route = Route(records[0].ask.model_root, tuple(record.ask for record in records))
            self.book.observe_step(route, (now - first.recorded_at) * 1e3, result.compute_ms)
        first.recorded_at = now

    def _bill(
        self,
        spec: JobSpec,
        plans: list[HopPlan],
        records: list[HopRecord],
        receipts: list[SignedReceipt | None],
    ) -> None:
        """Each hop billed on its own receipt, whatever the others' say."""
        for plan, record, receipt in zip(plans, records, receipts, strict=True):
            record.receipt = receipt
            expected = self._expected(spec, plan, record)
            refused = (
                "no receipt" if receipt is None else receipt_bills(receipt, expected, self.check_receipt)
            )
            record.verified = refused is None
            record.status = HopStatus.BILLED if record.verified else HopStatus.UNVERIFIED
            if record.verified:
                record.amount = hop_charge(record.tokens, record.ask.layers, record.ask.price_per_million)
                continue
            log.warning("job 0x%s: %s not billed: %s", spec.job_id.hex(), record.ask.provider, refused)
            if receipt is not None and receipt_is_false(receipt, expected, self.check_receipt):
                record.status = HopStatus.FALSE_RECEIPT
                record.refusal = refused
                self.book.suspend(record.ask.provider, FALSE_RECEIPT_SUSPEND_S)

    def _expected(self, spec: JobSpec, plan: HopPlan, record: HopRecord) -> ReceiptFields:
        """The receipt a hop owes for what the gateway recorded of it."""
        return ReceiptFields(
            job_id=spec.job_id,
            session=plan.ticket.session,
            gateway=self.keys.address,
            provider=record.ask.provider,
            model_root=plan.ticket.model_root,
            layer_start=record.ask.start,
            layer_end=record.ask.end,
            positions=record.tokens,
            transcript_root=record.transcript_root,
            sampling_hash=sampling_hash(record.sampling),  # None, so NO_SAMPLING, but on the last span
        )

    async def _bill_delivered(
        self, spec: JobSpec, plans: list[HopPlan], records: list[HopRecord], client: RouteSession
    ) -> None:
        """The job failed for good after tokens reached the client: what was delivered is paid for, on the
        receipts of the attempt that produced it. Each hop neither at fault nor a suspect is closed for its
        receipt and billed if the receipt is exactly the gateway's record of it. A hop before the failure may
        have computed the step that never came back whole, so its receipt can honestly say one step more: it
        goes unpaid, and is not taken for a false receipt."""
        receipts = await client.close(len(records[0].steps))
        for plan, record, receipt in zip(plans, records, receipts, strict=True):
            if record.status != HopStatus.ABANDONED or receipt is None or not record.steps:
                continue  # at fault, or a suspect of it: unpaid, as on a route abandoned for a spare
            refused = receipt_bills(receipt, self._expected(spec, plan, record), self.check_receipt)
            if refused is None:
                record.receipt, record.verified, record.status = receipt, True, HopStatus.BILLED
                record.amount = hop_charge(record.tokens, record.ask.layers, record.ask.price_per_million)

    def _close_quietly(self, plans: list[HopPlan], vocab_size: int) -> None:
        """Frees the abandoned sessions' KV caches where the providers still answer; receipts are not wanted."""

        async def close() -> None:
            transport = self.transport()
            try:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        transport.route(plans, vocab_size=vocab_size).close(), self.step_timeout_s
                    )
            finally:
                await transport.aclose()

        task = asyncio.create_task(close())
        self._cleanup.add(task)
        task.add_done_callback(self._cleanup.discard)


def plan_route(
    keys: KeyRing,
    asks: Sequence[BookAsk],
    *,
    job_id: bytes,
    model_root: bytes,
    max_positions: int,
    expires_at: int,
    ring: bool = False,
) -> list[HopPlan]:
    """One ticket per hop of a route, signed by the gateway's ``keys``, for a fresh session: each names its
    provider and span, the peer before it (the gateway, for the first; on a ``ring``, the last provider), and the
    peer after it with the endpoint and certificate its ask proved (nobody, for the last; on a ring, the first)."""
    session = os.urandom(16)
    plans = []
    for i, ask in enumerate(asks):
        following = asks[i + 1] if i + 1 < len(asks) else (asks[0] if ring else None)
        unsigned = HopTicket(
            job_id=job_id,
            session=session,
            provider=ask.provider,
            model_root=model_root,
            layer_start=ask.start,
            layer_end=ask.end,
            previous=asks[i - 1].provider if i > 0 else (asks[-1].provider if ring else keys.address),
            next=following.provider if following is not None else ZERO_ADDRESS,
            next_endpoint=following.endpoint if following is not None else "",
            next_fingerprint=following.tls_fingerprint if following is not None else bytes(32),
            max_positions=max_positions,
            expires_at=expires_at,
            signature=b"",
        )
        plans.append(HopPlan(ask.endpoint, ask.tls_fingerprint, keys.hop_ticket(unsigned)))
    return plans
