"""Tokens on a ring, against hop servers running in this process over TLS: the same tokens, logits and receipts
as the chain, many sessions in flight on one link and inside ``_compute`` at once, the ring stopping by itself at
the step limit and after a stop token, a close naming the steps the gateway took billing exactly those, and every
attack on the ring (a last hop that feeds the first another token than it reported, a middle hop that drops or
alters the reports before it, replays, floods from the previous peer and from strangers) blamed where it belongs.
Failover and cancellation through the gateway's coordinator are in tests/marketplace/gateway/test_ring_failover.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from eth_account import Account

from marketplace.devnet.process import free_port
from marketplace.gateway.coordinator import Coordinator, JobSpec, Outcome, plan_route
from marketplace.gateway.orderbook import BookAsk, OrderBook
from marketplace.testing.hops import DOMAIN, VALIDATOR_ACCOUNT, checks, gateway_keys
from settlement.db.schema import HopStatus
from settlement.tickets import KeyRing
from worker.client import HopPlan, PeerLink, Peers, RouteClient
from worker.errors import StepFailed, WorkerError
from worker.messages import Account as AccountRequest
from worker.messages import HopEntry, Push, Report, checked
from worker.runtime import SpanRuntime
from worker.server import HopServer, ServerLimits
from worker.shard import load_shard
from worker.testing.tiny import BOS
from worker.tls import TlsIdentity
from worker.transcript import receipt_bills, sampling_hash, transcript_root
from worker.trust import ReceiptFields

PROMPT = [BOS, *b"Round and round. "]
NEW_TOKENS = 8
SPANS = [(0, 2), (2, 4), (4, 6)]


class Ring:
    """Hop servers for ``spans`` of a tiny model, each its own key, started in this event loop."""

    def __init__(
        self, model: Path, tmp: Path, spans: list[tuple[int, int]], kinds: dict[int, type[HopServer]]
    ):
        self.servers: list[HopServer] = []
        self.asks: list[BookAsk] = []
        for i, (start, end) in enumerate(spans):
            account = Account.from_key(bytes([0x30 + i]) * 32)
            shard = load_shard(model, f"{start}:{end}", device=torch.device("cpu"))
            server = kinds.get(i, HopServer)(
                SpanRuntime(shard),
                keys=KeyRing(account, DOMAIN),
                checks=checks(),
                gateways={gateway_keys().address},
                validators={VALIDATOR_ACCOUNT.address},
                tls=TlsIdentity.load_or_create(tmp / f"tls-{i}"),
                limits=ServerLimits(max_refused_pushes=8),
            )
            port = free_port()
            self.servers.append(server)
            self.asks.append(
                BookAsk(
                    i + 1,
                    account.address,
                    shard.root,
                    start,
                    end,
                    1_000_000,
                    8,
                    f"127.0.0.1:{port}",
                    server.fingerprint,
                    time.time() + 600,
                )
            )
        self.root = self.servers[0].runtime.shard.root
        self.vocab = self.servers[0].runtime.shard.vocab_size

    async def start(self) -> None:
        for server, ask in zip(self.servers, self.asks, strict=True):
            await server.start("127.0.0.1", int(ask.endpoint.rsplit(":", 1)[1]))

    async def close(self) -> None:
        for server in self.servers:
            await server.close()

    def plans(self, *, ring: bool = True, max_positions: int = 256) -> list[HopPlan]:
        return plan_route(
            gateway_keys(), self.asks, job_id=os.urandom(32), model_root=bytes.fromhex(self.root[2:]),
            max_positions=max_positions, expires_at=int(time.time()) + 120, ring=ring,
        )  # fmt: skip

    def client(self, peers: Peers, plans: list[HopPlan], step_timeout_s: float = 5.0) -> RouteClient:
        return RouteClient(
            plans, peers, checks=checks(), vocab_size=self.vocab, step_timeout_s=step_timeout_s
        )


@contextlib.asynccontextmanager
async def ring_of(
    model: Path,
    tmp: Path,
    spans: list[tuple[int, int]] = SPANS,
    kinds: dict[int, type[HopServer]] | None = None,
) -> AsyncIterator[tuple[Ring, Peers]]:
    ring = Ring(model, tmp, spans, kinds or {})
    await ring.start()
    peers = Peers(gateway_keys())
    try:
        yield ring, peers
    finally:
        await peers.close()
        await ring.close()


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# -- honest rings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spans", [SPANS, [(0, 6)]], ids=["three-hops", "one-hop"])
def test_the_ring_generates_the_chains_tokens_logits_and_receipts(
    tiny_models: dict[str, Path], tmp_path: Path, spans: list[tuple[int, int]]
) -> None:
    async def go() -> None:
        async with ring_of(tiny_models["llama"], tmp_path, spans) as (ring, peers):
            chain = ring.client(peers, ring.plans(ring=False))
            expected, chain_steps = await chain.generate(PROMPT, max_tokens=NEW_TOKENS, logits=True)
            await chain.close()
            plans = ring.plans()
            client = ring.client(peers, plans)
            assert client.is_ring
            tokens, steps = await client.generate(PROMPT, max_tokens=NEW_TOKENS, logits=True)
            assert tokens == expected and len(steps) == NEW_TOKENS
            for ours, theirs in zip(steps, chain_steps, strict=True):
                assert ours.logits is not None and theirs.logits is not None
                torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=1e-5)
            receipts = await client.close(len(steps))
            for position, (plan, receipt) in enumerate(zip(plans, receipts, strict=True)):
                assert receipt is not None
                hashes = [step.hops[position] for step in steps]
                last = position == len(plans) - 1
                expected_fields = ReceiptFields(
                    plan.ticket.job_id, plan.ticket.session, gateway_keys().address, plan.provider,
                    plan.ticket.model_root, plan.ticket.layer_start, plan.ticket.layer_end,
                    sum(h.positions for h in hashes), transcript_root(hashes),
                    sampling_hash({}) if last else sampling_hash(None),
                )  # fmt: skip
                assert receipt_bills(receipt, expected_fields, checks().receipt) is None
            # The ring stopped by itself after its last step: the first hop never got a step past it.
            first = ring.servers[0]._sessions[plans[0].ticket.session]
            assert first.accepted == NEW_TOKENS

    run(go())


def test_the_ring_stops_after_a_stop_token(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    async def go() -> None:
        async with ring_of(tiny_models["llama"], tmp_path) as (ring, peers):
            chain = ring.client(peers, ring.plans(ring=False))
            expected, _ = await chain.generate(PROMPT, max_tokens=NEW_TOKENS)
            await chain.close()
            stop = expected[3]
            plans = ring.plans()
            client = ring.client(peers, plans)
            tokens, _ = await client.generate(PROMPT, max_tokens=NEW_TOKENS, stop_token_ids=frozenset({stop}))
            assert tokens == expected[: expected.index(stop) + 1]
            await asyncio.sleep(0.2)
            assert ring.servers[0]._sessions[plans[0].ticket.session].accepted == len(tokens)
            await client.close(len(tokens))

    run(go())


def test_a_close_naming_the_steps_taken_stops_the_ring_and_bills_only_those(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """A stop the gateway decides (a stop string, a client gone) arrives after the ring went on: the close stops
    it at every hop, and each receipt bills exactly the steps the gateway took, not the ones computed past them."""

    async def go() -> None:
        async with ring_of(tiny_models["llama"], tmp_path) as (ring, peers):
            plans = ring.plans()
            client = ring.client(peers, plans)
            await client.open({}, steps=200)
            taken = []
            prompt = torch.tensor([PROMPT])
            async with contextlib.aclosing(client.ring(prompt, steps=200)) as stream:
                async for result in stream:
                    taken.append(result)
                    if len(taken) == 3:
                        break
            await asyncio.sleep(0.1)  # the ring runs ahead meanwhile
            receipts = await client.close(len(taken))
            session = plans[0].ticket.session
            accepted = ring.servers[0]._sessions[session].accepted
            assert accepted > len(taken)  # it did run ahead
            await asyncio.sleep(0.3)
            assert all(server._sessions[session].closed for server in ring.servers)
            assert ring.servers[0]._sessions[session].accepted == accepted  # and stopped at the close
            for position, receipt in enumerate(receipts):
                assert receipt is not None
                hashes = [step.hops[position] for step in taken]
                assert receipt.transcript_root == transcript_root(hashes)
                assert receipt.positions == len(PROMPT) + 2

    run(go())


class Counting(HopServer):
    """Counts how many steps are inside ``_compute`` at once (the batcher's seam)."""

    inside = 0
    most = 0

    async def _compute(self, *args: Any) -> Any:
        Counting.inside += 1
        Counting.most = max(Counting.most, Counting.inside)
        try:
            await asyncio.sleep(0.02)  # a forward pass long enough for others to arrive
            return await super()._compute(*args)
        finally:
            Counting.inside -= 1


def test_many_sessions_are_in_flight_on_one_link_and_inside_compute_at_once(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    async def go() -> None:
        kinds: dict[int, type[HopServer]] = {1: Counting}
        async with ring_of(tiny_models["llama"], tmp_path, kinds=kinds) as (ring, peers):
            chain = ring.client(peers, ring.plans(ring=False))
            expected, _ = await chain.generate(PROMPT, max_tokens=NEW_TOKENS)
            await chain.close()
            Counting.most = 0
            clients = [ring.client(peers, ring.plans()) for _ in range(6)]
            outputs = await asyncio.gather(*(c.generate(PROMPT, max_tokens=NEW_TOKENS) for c in clients))
            assert all(tokens == expected for tokens, _ in outputs)
            assert Counting.most >= 3  # sessions' steps overlapped in the middle hop's compute
            links = ring.servers[0].peers._links
            assert len(links) == 1  # all of them over one link from the first hop to the second

    run(go())


# -- attacks ------------------------------------------------------------------------------------------------


class FeedsAnotherToken(HopServer):
    """(last) Pushes the first hop another token than the one it reports to the gateway, signing for it."""

    async def _push(self, ticket: Any, push: Push, tensor: torch.Tensor, sha256: bytes | None) -> Any:
        if self.runtime.shard.span.last and push.report is not None and push.step >= 2:
            report = Report.from_json(push.report)
            token = ((report.entry.token or 0) + 1) % self.runtime.shard.vocab_size
            entry = replace(report.entry, token=token)
            forged = Report(
                entry, self.keys.hop_report(*Report.digests(entry, None, report.below)), below=report.below
            )
            push = replace(push, report=forged.to_json())
            tensor = torch.tensor([[token]], dtype=torch.int64)
        return await super()._push(ticket, push, tensor, sha256)


class FeedsUnsignedToken(HopServer):
    """(last) Pushes the first hop another token than the one its (honest) signed report names."""

    async def _push(self, ticket: Any, push: Push, tensor: torch.Tensor, sha256: bytes | None) -> Any:
        if self.runtime.shard.span.last and push.step >= 2:
            tensor = (tensor + 1) % self.runtime.shard.vocab_size
        return await super()._push(ticket, push, tensor, sha256)


class DropsEntries(HopServer):
    """(middle) Pushes the step on signing over nothing: the reports before it dropped."""

    async def _push(self, ticket: Any, push: Push, tensor: torch.Tensor, sha256: bytes | None) -> Any:
        if push.report is not None and push.step >= 1:
            mine = Report.from_json(push.report)
            push = replace(push, report=Report.signed(self.keys.hop_report, mine.entry).to_json())
        return await super()._push(ticket, push, tensor, sha256)


class AltersEntries(HopServer):
    """(middle) Relays the first hop's entry with its input hash changed, its signature kept."""

    async def _push(self, ticket: Any, push: Push, tensor: torch.Tensor, sha256: bytes | None) -> Any:
        if push.report is not None and push.step >= 1:
            mine = Report.from_json(push.report)
            below = Report.from_json(mine.downstream)
            altered = replace(below, entry=replace(below.entry, input=bytes(32))).to_json()
            push = replace(push, report=Report.signed(self.keys.hop_report, mine.entry, altered).to_json())
        return await super()._push(ticket, push, tensor, sha256)


class StopsForwarding(HopServer):
    """(middle) From step 2 on, computes each step and sends it nowhere, while its account says it sent it."""

    async def _push(self, ticket: Any, push: Push, tensor: torch.Tensor, sha256: bytes | None) -> Any:
        if push.step >= 2:
            return None
        return await super()._push(ticket, push, tensor, sha256)


class Replays(HopServer):
    """(last) Pushes every step to the first twice, and an old step and a future one besides: all signed."""

    async def _push(self, ticket: Any, push: Push, tensor: torch.Tensor, sha256: bytes | None) -> Any:
        failure = await super()._push(ticket, push, tensor, sha256)
        if self.runtime.shard.span.last:
            await super()._push(ticket, push, tensor, sha256)  # the same step again
            if push.step >= 2:
                await super()._push(ticket, replace(push, step=push.step - 2), tensor, sha256)
            await super()._push(ticket, replace(push, step=push.step + 5), tensor, sha256)
        return failure


class AsksForLogits(HopServer):
    """(middle) Pushes every step on asking the last hop for logits the gateway never asked for."""

    async def _push(self, ticket: Any, push: Push, tensor: torch.Tensor, sha256: bytes | None) -> Any:
        return await super()._push(ticket, replace(push, logits=True), tensor, sha256)


def attacked(
    model: Path,
    tmp: Path,
    kind: type[HopServer],
    position: int,
    expect: Callable[[StepFailed | None, list[int]], None],
) -> None:
    async def go() -> None:
        async with ring_of(model, tmp, kinds={position: kind}) as (ring, peers):
            chain = ring.client(peers, ring.plans(ring=False))
            expected, _ = await chain.generate(PROMPT, max_tokens=NEW_TOKENS)
            await chain.close()
            client = ring.client(peers, ring.plans(), step_timeout_s=2.0)
            failure: StepFailed | None = None
            tokens: list[int] = []
            try:
                tokens, _ = await client.generate(PROMPT, max_tokens=NEW_TOKENS)
            except StepFailed as exc:
                failure = exc
            expect(failure, tokens if failure is None else expected)
            assert failure is not None or tokens == expected

    run(go())


def test_a_last_hop_feeding_the_first_another_token_than_it_reported_is_blamed(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Its two signed entries for one step disagree: proof against it alone."""

    def expect(failure: StepFailed | None, _: list[int]) -> None:
        assert failure is not None and failure.blame.positions == [2] and failure.blame.suspend

    attacked(tiny_models["llama"], tmp_path, FeedsAnotherToken, 2, expect)


def test_a_token_the_last_hop_did_not_sign_is_never_consumed(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """The first hop refuses it; its signed refusal stands against the last hop's word: both left out, neither
    suspended, and no token but one the last hop signed was ever computed on."""

    def expect(failure: StepFailed | None, _: list[int]) -> None:
        assert failure is not None and failure.blame.positions == [0, 2] and not failure.blame.suspend

    attacked(tiny_models["llama"], tmp_path, FeedsUnsignedToken, 2, expect)


@pytest.mark.parametrize("kind", [DropsEntries, AltersEntries], ids=["drops", "alters"])
def test_a_middle_hop_dropping_or_altering_the_entries_before_it_is_blamed(
    tiny_models: dict[str, Path], tmp_path: Path, kind: type[HopServer]
) -> None:
    """The last hop checks only its previous hop's signature; the gateway finds the first hop's entry missing or
    not verifying under the middle hop's signature over it."""

    def expect(failure: StepFailed | None, _: list[int]) -> None:
        assert failure is not None and failure.blame.positions == [1] and failure.blame.suspend

    attacked(tiny_models["llama"], tmp_path, kind, 1, expect)


def test_a_middle_hop_that_stops_forwarding_is_found_by_the_accounts(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """It says it sent the step on; the next hop says it never had it: word against word, both left out."""

    def expect(failure: StepFailed | None, _: list[int]) -> None:
        assert failure is not None and failure.blame.positions == [1, 2] and not failure.blame.suspend

    attacked(tiny_models["llama"], tmp_path, StopsForwarding, 1, expect)


def test_logits_nobody_asked_for_are_dropped_and_blame_nobody(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """The logits flag travels unsigned in each push: a middle hop that sets it has the honest last hop send
    logits on its stream. The gateway reads and drops them, rather than taking the stream for broken and leaving
    the last hop out while the hop that set the flag stays in."""

    def expect(failure: StepFailed | None, _: list[int]) -> None:
        assert failure is None

    attacked(tiny_models["llama"], tmp_path, AsksForLogits, 1, expect)


def test_replayed_old_and_future_steps_are_never_computed(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """The first hop takes each step once, in order: replays and skips are dropped unread by the runtime, the
    session's tokens are the honest ones, and a peer that keeps at it is hung up on (and reconnects)."""

    def expect(failure: StepFailed | None, _: list[int]) -> None:
        assert failure is None

    attacked(tiny_models["llama"], tmp_path, Replays, 2, expect)


def test_floods_of_pushes_are_dropped_and_strangers_hung_up_on(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """The previous hop floods the first with signed pushes out of turn: none is computed, and after
    ``max_refused_pushes`` its connection is closed. A stranger (no session's previous peer) is refused at the
    door. The session itself goes on undisturbed."""

    async def go() -> None:
        async with ring_of(tiny_models["llama"], tmp_path) as (ring, peers):
            plans = ring.plans()
            client = ring.client(peers, plans)
            tokens, steps = await client.generate(PROMPT, max_tokens=4)
            first = ring.servers[0]
            session = first._sessions[plans[0].ticket.session]
            before = session.accepted
            last_keys = ring.servers[2].keys
            flood = PeerLink(ring.asks[0].endpoint, first.fingerprint, last_keys, tls=True)
            tensor = torch.tensor([[tokens[0]]], dtype=torch.int64)
            for step in range(1, 10):  # one more than the 8 refusals it is allowed
                await flood.send(
                    Push(plans[0].ticket.session, step, 1, None).to_json(), tensor,
                    session=plans[0].ticket.session, step=step,
                )  # fmt: skip
            await asyncio.sleep(0.2)
            assert session.accepted == before  # nothing computed
            assert flood._reader is not None  # hung up on: what is left to read ends
            await asyncio.wait_for(flood._reader.read(), 2.0)
            assert flood._reader.at_eof()
            await flood.close()

            stranger = PeerLink(
                ring.asks[0].endpoint, first.fingerprint, KeyRing(Account.create(), DOMAIN), tls=True
            )
            with pytest.raises(Exception, match="nothing to ask"):
                await stranger.send(Push(plans[0].ticket.session, 5, 1).to_json(), tensor)
            await stranger.close()

            # The gateway's own account of the session is untouched by all of it.
            reply, _ = await peers.get(ring.asks[0].endpoint, first.fingerprint).request(
                AccountRequest(plans[0].ticket.session, 3).to_json()
            )
            entry = HopEntry.from_json(checked(reply)["report"]["entry"])
            assert entry.error is None and entry.input == steps[3].hops[0].input
            await client.close(4)

    run(go())


# -- through the gateway's coordinator ------------------------------------------------------------------------


async def coordinated(
    ring: Ring, *, emit_until: int | None = None, cheaper: int | None = None
) -> tuple[Outcome, OrderBook, list[int]]:
    """A job on ``ring``'s asks, routed by the gateway's coordinator on the ring (``cheaper``: the ask routing
    picks first for its span); ``emit_until``: the client goes away, or a stop string matches, once that many
    tokens were emitted."""
    book = OrderBook(heartbeat_ttl_s=3600, clock=time.time)
    for number, ask in enumerate(ring.asks):
        ask.in_use, ask.live = 0, True
        ask.price_per_million = 500_000 if number == cheaper else 1_000_000
        book.post(ask)
        book.set_active(ask.provider, True)
        book.heartbeat(ask.provider, time.time())
    coordinator = Coordinator(
        book, gateway_keys(), check_receipt=checks().receipt, clock=time.time, step_timeout_s=2.0, ring=True
    )
    spec = JobSpec(os.urandom(32), ring.root, 6, ring.vocab, PROMPT, NEW_TOKENS, {}, frozenset(), None)
    route = book.match(ring.root, 6)
    assert route is not None
    emitted: list[int] = []

    async def emit(_choice: int, token: int, _logprobs: object) -> bool:
        emitted.append(token)
        return emit_until is None or len(emitted) < emit_until

    return await coordinator.run(spec, route, emit), book, emitted


async def reference(ring: Ring, peers: Peers, route: tuple[int, ...] = (0, 1, 2)) -> list[int]:
    """The tokens of a chain over ``route``'s asks of ``ring``."""
    plans = plan_route(
        gateway_keys(), [ring.asks[i] for i in route], job_id=os.urandom(32),
        model_root=bytes.fromhex(ring.root[2:]), max_positions=256, expires_at=int(time.time()) + 120,
    )  # fmt: skip
    chain = ring.client(peers, plans)
    tokens, _ = await chain.generate(PROMPT, max_tokens=NEW_TOKENS)
    await chain.close()
    return tokens


def test_a_job_on_the_ring_bills_every_hop_and_stops_at_max_tokens(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    async def go() -> None:
        async with ring_of(tiny_models["llama"], tmp_path) as (ring, peers):
            expected = await reference(ring, peers)
            outcome, _, emitted = await coordinated(ring)
            assert outcome.finish == "length" and outcome.tokens == expected == emitted
            assert [hop.status for hop in outcome.hops] == [HopStatus.BILLED] * 3
            assert all(hop.tokens == len(PROMPT) + NEW_TOKENS - 1 for hop in outcome.hops)
            session = outcome.hops[0].session
            assert ring.servers[0]._sessions[session].accepted == NEW_TOKENS  # it ran no step past the last

    run(go())


def test_a_client_gone_mid_stream_stops_the_ring_and_pays_for_the_steps_taken(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """The client goes away (a stop string ends a choice the same way: emit says no more) after 3 tokens, while
    the ring runs ahead: every session is closed at once, and every hop bills exactly the 3 steps taken."""

    async def go() -> None:
        async with ring_of(tiny_models["llama"], tmp_path) as (ring, peers):
            expected = await reference(ring, peers)
            started = time.monotonic()
            outcome, _, emitted = await coordinated(ring, emit_until=3)
            assert time.monotonic() - started < 5.0
            assert outcome.finish == "halted" and emitted == expected[:3] == outcome.tokens
            assert [hop.status for hop in outcome.hops] == [HopStatus.BILLED] * 3
            assert all(hop.tokens == len(PROMPT) + 2 for hop in outcome.hops)
            session = outcome.hops[0].session
            assert all(server._sessions[session].closed for server in ring.servers)
            accepted = ring.servers[0]._sessions[session].accepted
            await asyncio.sleep(0.3)
            assert ring.servers[0]._sessions[session].accepted == accepted  # stopped

    run(go())


def test_a_provider_that_stops_forwarding_mid_stream_is_routed_around(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """The middle hop stops pushing steps on after step 2 and says it sent them: it and the next hop stand word
    against word, so both are left out (neither suspended), and the job finishes on the spares with the answer an
    honest route gives, paying only the final route."""

    async def go() -> None:
        spans = [(0, 2), (2, 4), (4, 6), (2, 4), (4, 6)]
        async with ring_of(tiny_models["llama"], tmp_path, spans, kinds={1: StopsForwarding}) as (
            ring,
            peers,
        ):
            expected = await reference(ring, peers)
            outcome, book, emitted = await coordinated(ring, cheaper=1)
            assert outcome.finish == "length" and outcome.failovers == 1
            assert outcome.tokens == expected == emitted
            first = [(hop.ask.provider, hop.status) for hop in outcome.hops if hop.attempt == 0]
            a, rogue, c, spare_b, spare_c = (ask.provider for ask in ring.asks)
            assert first == [(a, HopStatus.ABANDONED), (rogue, HopStatus.SUSPECT), (c, HopStatus.SUSPECT)]
            final = [(hop.ask.provider, hop.status) for hop in outcome.hops if hop.attempt == 1]
            assert final == [(a, HopStatus.BILLED), (spare_b, HopStatus.BILLED), (spare_c, HopStatus.BILLED)]
            assert sum(hop.amount for hop in outcome.hops if hop.attempt == 0) == 0
            assert all(book.matchable(ask.provider) for ask in ring.asks)

    run(go())


class Crashes(HopServer):
    """(middle) From step 3 on, every step fails in its compute, as a provider whose accelerator died would."""

    async def _compute(self, session: bytes, step: int, *args: Any) -> Any:
        if step >= 3:
            raise WorkerError("the accelerator is gone")
        return await super()._compute(session, step, *args)


def test_a_provider_erroring_mid_stream_is_blamed_and_replaced(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Its own signed account says it failed: it alone is blamed and suspended, and the job finishes on a spare."""

    async def go() -> None:
        spans = [(0, 2), (2, 4), (4, 6), (2, 4)]
        async with ring_of(tiny_models["llama"], tmp_path, spans, kinds={1: Crashes}) as (ring, peers):
            expected = await reference(ring, peers, (0, 3, 2))
            outcome, book, emitted = await coordinated(ring, cheaper=1)
            assert (
                outcome.finish == "length"
                and outcome.failovers == 1
                and outcome.tokens == expected == emitted
            )
            statuses = [hop.status for hop in outcome.hops]
            assert statuses[:3] == [HopStatus.ABANDONED, HopStatus.FAILED, HopStatus.ABANDONED]
            assert statuses[3:] == [HopStatus.BILLED] * 3
            assert not book.matchable(ring.asks[1].provider)

    run(go())
