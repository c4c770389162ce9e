"""The adversarial suite: every attack the hop protocol and the market must defeat, each run against real
provider processes (honest ones, and rogues from worker.testing.rogue), the gateway's real coordinator and app,
and a real chain, and judged on two counts:

    succeeded      the attack got what it was after (its data accepted, an honest party blamed, a cheat hidden)
    honest_harmed  an honest party was blamed alone or suspended, went unpaid for work on a route that
                   completed, or had its steps slowed past twice their normal time

Work on an abandoned attempt is paid to nobody (marketplace.gateway.coordinator says why), and a hop whose
signed word stands against another's is left out of that job's later attempts with it, neither suspended
(HopStatus.SUSPECT): that is the design, not harm. An attack "succeeds" when it gets what it was after, or when
the rogue stays in the job's later attempts. tests/marketplace/test_adversary.py asserts every verdict;
benchmarks/adversary.py counts them.

Jobs run on the token ring, the way the gateway runs them by default (``HOP_RING``): the prefill pushed to the
first provider, each step pushed on hop to hop, the last provider's reports read from its follow stream, a step
that does not come back accounted for by every hop's signed account, receipts billing the steps the gateway took.
Each rogue attacks the ring in its ring form (worker.testing.rogue), and the ring-only rogues attack what only
the ring has: the token pushed from the last hop to the first, the accounts, the logits flag a push carries. The
request/reply chain (``HOP_RING=false``) keeps the attacks on its relayed reports, which the ring does not have:
the ``chain-…`` attacks.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import statistics
import struct
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, aclosing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from eth_account import Account
from eth_account.signers.local import LocalAccount

from marketplace.devnet.anvil import Anvil
from marketplace.gateway.config import GatewaySettings
from marketplace.gateway.coordinator import Coordinator, JobSpec, Outcome
from marketplace.gateway.orderbook import BookAsk, OrderBook
from marketplace.provider.announce import DEFAULT_RETENTION_S, Announcer, Offer
from marketplace.provider.staking import bond
from marketplace.testing.gateway import GatewayServer
from marketplace.testing.hops import Served, launch, plan, running
from settlement.chain import Chain
from settlement.db.schema import HopStatus
from settlement.deploy import ONE_TOKEN, Contracts, DeployParams, deploy
from settlement.tickets import KeyRing, SignatureChecks
from settlement.validation import WRONG_TOKEN, ReferenceSpan, judge_span
from worker.client import PeerLink, Peers, RouteClient, fetch_retained
from worker.errors import WorkerError
from worker.grammar import json_grammar
from worker.messages import Auth, Hello, Open, Step, checked
from worker.protocol import read_control, write_message
from worker.shard import load_shard, model_root
from worker.testing.tiny import BOS, write_tiny_checkpoint
from worker.tls import client_context
from worker.transcript import receipt_bills, sampling_hash, transcript_root
from worker.trust import ReceiptFields
from worker.wire import FrameLimits

PROMPT = [BOS, *b"Strangers on a route. "]
NEW_TOKENS = 6
VOCAB = 259
MIN_STAKE = 100 * ONE_TOKEN
SPANS = {"a": (0, 2), "b": (2, 4), "c": (4, 6), "spare-a": (0, 2), "spare": (2, 4), "spare-c": (4, 6)}
STEP_TIMEOUT_S = 5.0  # the coordinator's: what a silent hop costs a job
ROGUES = {  # misbehaviour: the span it serves, cheaper than the honest one so that routing picks it first
    "alter-downstream": (2, 4),
    "forge-error": (2, 4),
    "blame-next": (2, 4),
    "substitute-token": (4, 6),
    "ignore-constraints": (4, 6),
    "close-others": (0, 2),
    "inject-step": (0, 2),
    "replay-step": (0, 2),
    "garbage-report": (4, 6),
    "stall": (4, 6),
    "silent-close": (0, 2),
    "inflate-receipt": (2, 4),
    "inflate-positions": (0, 2),
    "split-token": (4, 6),
    "withhold-token": (4, 6),
    "lie-account": (2, 4),
    "unasked-logits": (2, 4),
}


@dataclass(frozen=True)
class Verdict:
    attack: str
    succeeded: bool
    honest_harmed: bool
    detail: str


@dataclass
class Arena:
    """A chain with two deployments of the contracts (for replays across deployments), a gateway app on the first,
    honest providers a 0:2, b 2:4, c 4:6 and a spare for each span, and one rogue per misbehaviour, all staked,
    on TLS."""

    workdir: Path
    model: Path
    root: str
    contracts: Contracts
    other: Contracts  # the second deployment on the same chain
    gateway_account: LocalAccount
    validator: LocalAccount
    honest: dict[str, Served]
    rogues: dict[str, Served]
    gateway: GatewayServer
    reference: list[int]  # the tokens an honest route generates
    baseline_step_ms: float  # an honest decode step's median time, unattacked

    @property
    def keys(self) -> KeyRing:
        return KeyRing(self.gateway_account, self.contracts.protocol_domain())

    @property
    def checks(self) -> SignatureChecks:
        return SignatureChecks(self.contracts.protocol_domain())


@contextmanager
def arena(workdir: Path) -> Iterator[Arena]:
    """Starts everything the attacks need and stops it afterwards."""
    with ExitStack() as stack:
        anvil = stack.enter_context(Anvil(accounts=4 + len(SPANS) + len(ROGUES)))
        accounts = anvil.accounts
        chain = Chain(anvil.url, receipt_timeout_s=30)
        admin, operator, treasury, validator = accounts[:4]
        gateway_account = Account.from_key(b"\x42" * 32)
        chain.w3.provider.make_request("anvil_setBalance", [gateway_account.address, hex(10**21)])  # type: ignore[arg-type]
        params = DeployParams(min_stake=MIN_STAKE, unbonding_period_s=3600)
        contracts, other = (
            deploy(
                chain, admin, operator=operator.address, treasury=treasury.address, slasher=validator.address,
                params=params,
            )
            for _ in range(2)
        )  # fmt: skip
        deployment = workdir / "deployment.json"
        contracts.deployment.save(deployment)

        model = write_tiny_checkpoint(workdir / "tiny", arch="llama", layers=6, hidden=128, seed=3)
        root = model_root(model)
        accounts_by_name = dict(zip([*SPANS, *ROGUES], accounts[4:], strict=False))
        for account in accounts_by_name.values():
            contracts.token.mint(admin, to=account.address, amount=10_000 * ONE_TOKEN)
            bond(contracts, account, MIN_STAKE)

        def start(name: str, span: tuple[int, int], extra: tuple[str, ...] = ()) -> Served:
            account = accounts_by_name[name]
            served = launch(
                model, span, seed=int.from_bytes(account.key, "big"), root=root, workdir=workdir,
                deployment=deployment, gateway=gateway_account.address, extra=extra,
            )  # fmt: skip
            return served

        honest = {name: start(name, span) for name, span in SPANS.items()}
        rogues: dict[str, Served] = {}
        for kind, span in ROGUES.items():
            extra: tuple[str, ...] = ("--misbehave", kind)
            if kind in ("close-others", "inject-step"):
                c = honest["c"]
                extra += ("--misbehave-target", f"{c.endpoint}@{c.node.fingerprint.hex()}")
            rogues[kind] = start(kind, span, extra)
        stack.enter_context(running([*honest.values(), *rogues.values()]))
        for served in rogues.values():  # cheaper than the honest ask of its span: routing picks it first
            served.ask.price_per_million = 500_000

        settings = GatewaySettings(
            rpc_url=anvil.url, deployment_file=deployment, database_url=f"sqlite:///{workdir / 'gateway.db'}",
            gateway_key=gateway_account.key.hex(), models=[f"tiny={model}"], heartbeat_ttl_s=3600,
            _env_file=None,
        )  # type: ignore[call-arg]  # fmt: skip
        gateway = GatewayServer(settings).start()
        stack.callback(gateway.stop)
        built = Arena(
            workdir,
            model,
            root,
            contracts,
            other,
            gateway_account,
            validator,
            honest,
            rogues,
            gateway,
            [],
            0.0,
        )
        built.reference, built.baseline_step_ms = asyncio.run(_honest_run(built))
        yield built


async def _honest_run(arena: Arena) -> tuple[list[int], float]:
    """The honest route's tokens and its median decode step, each measured a few times."""
    route = [arena.honest[name] for name in ("a", "b", "c")]
    times: list[float] = []
    tokens: list[int] = []
    for _ in range(3):
        tokens, step_times = await _timed_job(arena, route)
        times += step_times
    return tokens, statistics.median(times)


async def _timed_job(arena: Arena, route: list[Served]) -> tuple[list[int], list[float]]:
    """A ring job's tokens, and the time from each token to the next (a decode step around the ring)."""
    peers = Peers(arena.keys)
    client = RouteClient(
        plan(route, root=arena.root, keys=arena.keys, ring=True), peers, checks=arena.checks, vocab_size=VOCAB
    )
    try:
        await client.open({}, steps=NEW_TOKENS)
        tokens: list[int] = []
        times: list[float] = []
        arrived = 0.0
        ring = client.ring(torch.tensor([PROMPT]), steps=NEW_TOKENS)
        async with aclosing(ring):
            async for result in ring:
                now = time.perf_counter()
                if tokens:
                    times.append((now - arrived) * 1e3)
                tokens.append(result.token)
                arrived = now
        await client.close(len(tokens))
        return tokens, times
    finally:
        await peers.close()


# -- attacks on a route, through the gateway's coordinator --------------------------------------------------


async def _coordinated(arena: Arena, asks: list[BookAsk], *, ring: bool = True) -> tuple[Outcome, OrderBook]:
    """A job routed by the gateway's own coordinator over ``asks`` (the cheapest route is tried first), on the
    token ring as production runs it, or (``ring=False``) on the request/reply chain."""
    book = OrderBook(heartbeat_ttl_s=3600, clock=time.time)
    for number, ask in enumerate(asks, start=1):
        ask.id, ask.in_use, ask.live = number, 0, True
        book.post(ask)
        book.set_active(ask.provider, True)
        book.heartbeat(ask.provider, time.time())
    coordinator = Coordinator(
        book, arena.keys, check_receipt=arena.checks.receipt, clock=time.time, step_timeout_s=STEP_TIMEOUT_S,
        ring=ring,
    )  # fmt: skip
    spec = JobSpec(os.urandom(32), arena.root, 6, VOCAB, PROMPT, NEW_TOKENS, {}, frozenset(), None)
    route = book.match(arena.root, 6)
    assert route is not None

    async def emit(_choice: int, _token: int, _logprobs: object) -> bool:
        return True

    return await coordinator.run(spec, route, emit), book


def _route_attack(arena: Arena, kind: str, *, suspended: bool = True, ring: bool = True) -> Verdict:
    """A job through the coordinator with ``kind``'s rogue cheapest for its span. The job must complete with
    the honest answer, the rogue left out after it struck (``suspended``: blamed alone, or left out with the
    hop it disputes) and paid nothing; no honest provider blamed alone or suspended, and every honest hop of the
    final route billed."""
    rogue = arena.rogues[kind]
    asks = [served.ask for served in (*arena.honest.values(), rogue)]
    started = time.monotonic()
    outcome, book = asyncio.run(_coordinated(arena, asks, ring=ring))
    seconds = time.monotonic() - started
    honest = {served.account.address for served in arena.honest.values()}
    rogue_hops = [hop for hop in outcome.hops if hop.ask.provider == rogue.account.address]
    final = [hop for hop in outcome.hops if hop.attempt == outcome.failovers]
    left_out = HopStatus.FAILED if suspended else HopStatus.SUSPECT
    succeeded = (
        outcome.finish is None
        or outcome.tokens != arena.reference
        or any(hop.status != left_out for hop in rogue_hops if hop.attempt < outcome.failovers)
        or any(hop.amount for hop in rogue_hops)
        or seconds > 4 * STEP_TIMEOUT_S
    )
    harmed = (
        any(hop.status == HopStatus.FAILED and hop.ask.provider in honest for hop in outcome.hops)
        or any(not book.matchable(address) for address in honest)
        or any(hop.status != HopStatus.BILLED for hop in final if hop.ask.provider in honest)
    )
    statuses = [(hop.attempt, hop.ask.provider[:8], hop.status) for hop in outcome.hops]
    return Verdict(
        kind, succeeded, harmed, f"failovers {outcome.failovers} in {seconds:.1f} s, hops {statuses}"
    )


def _harmless_attack(arena: Arena, kind: str) -> Verdict:
    """A job through the coordinator with ``kind``'s rogue cheapest for its span, whose deviation the protocol
    makes idle: the job completes on its first route with the honest answer, every hop (the rogue's honest work
    too) billed on a receipt that is exactly the gateway's record, nobody left out or suspended."""
    rogue = arena.rogues[kind]
    asks = [served.ask for served in (*arena.honest.values(), rogue)]
    started = time.monotonic()
    outcome, book = asyncio.run(_coordinated(arena, asks))
    seconds = time.monotonic() - started
    honest = {served.account.address for served in arena.honest.values()}
    expected = len(PROMPT) + NEW_TOKENS - 1
    succeeded = (
        outcome.finish is None
        or outcome.tokens != arena.reference
        or outcome.failovers > 0
        or rogue.account.address not in {hop.ask.provider for hop in outcome.hops}
        or any(hop.tokens != expected for hop in outcome.hops)
        or seconds > 4 * STEP_TIMEOUT_S
    )
    harmed = any(hop.status != HopStatus.BILLED for hop in outcome.hops if hop.ask.provider in honest) or any(
        not book.matchable(address) for address in honest
    )
    statuses = [(hop.attempt, hop.ask.provider[:8], hop.status, hop.tokens) for hop in outcome.hops]
    return Verdict(
        kind, succeeded, harmed, f"failovers {outcome.failovers} in {seconds:.1f} s, hops {statuses}"
    )


def alter_downstream_report(arena: Arena) -> Verdict:
    """A middle provider passes the first hop's signed entry on with its output hash changed, the signature kept,
    and signs its own over it: the gateway, reading the step from the last hop down, finds the first hop's entry
    not verifying under the middle hop's signature over it, and blames the middle hop alone."""
    return _route_attack(arena, "alter-downstream")


def forge_error_report(arena: Arena) -> Verdict:
    """A middle provider sends the step nowhere and gives, as its account of it, an error in the next hop's name
    that the next hop never sent: an account that is not its own signed word blames it alone."""
    return _route_attack(arena, "forge-error")


def false_unreachable_report(arena: Arena) -> Verdict:
    """A middle provider sends the step nowhere and its signed account says the next hop could not be reached, to
    get it suspended. The gateway reaches the next hop itself: the two hops' words stand against each other, and
    both are left out, neither suspended."""
    return _route_attack(arena, "blame-next", suspended=False)


def replay_a_step(arena: Arena) -> Verdict:
    """The first provider pushes each step on twice, and the step before again: the next hop takes each step
    once, in order, and drops the others unread; nothing is computed twice, billed twice, or blamed."""
    return _harmless_attack(arena, "replay-step")


def garbage_report(arena: Arena) -> Verdict:
    """The last provider streams the gateway, and pushes the first hop, reports whose signature is nobody's: the
    report of the step the gateway reads is the last hop's own to vouch for, and it alone is blamed."""
    return _route_attack(arena, "garbage-report")


def stall_a_step(arena: Arena) -> Verdict:
    """The last provider takes step 2 and never finishes it: the step does not come back in the step timeout, the
    gateway asks every hop for its account, and the last hop's own says it still holds the step."""
    return _route_attack(arena, "stall")


def inflate_positions_to_frame_the_next_hops(arena: Arena) -> Verdict:
    """The first provider pushes each decode step on with twice the positions, signing for what it sent, so that
    the hops after it would sign receipts for more positions than the gateway sent, and be taken for liars. Every
    hop signs the positions it received at every step: the next hop's word against the first's, both are left
    out of the job at once, neither suspended, and no receipt is ever asked of that route."""
    return _route_attack(arena, "inflate-positions", suspended=False)


def never_answer_the_close(arena: Arena) -> Verdict:
    """The first provider of a route that completed never answers its close: the others' receipts do not wait
    for it, the job ends in bounded time, and it alone is unpaid."""
    return _route_attack(arena, "silent-close")


def split_the_token(arena: Arena) -> Verdict:
    """From step 2 on, the last provider pushes the first hop another token than the one it streams the gateway,
    signing for each: the first hop's entry nests the one it was handed, and the gateway holds two entries for
    one step signed by the last hop, proof against it alone."""
    return _route_attack(arena, "split-token")


def withhold_the_token(arena: Arena) -> Verdict:
    """From step 2 on, the last provider streams the gateway each step's report but pushes no token on, and its
    account says it did: the first hop's account says it never had the next step. Word against word: both left
    out, neither suspended, and the job goes on on the spares."""
    return _route_attack(arena, "withhold-token", suspended=False)


def lie_in_the_account(arena: Arena) -> Verdict:
    """From step 2 on, a middle provider pushes nothing on and its signed account says the step never reached it,
    framing the first hop, whose account says it sent it: both left out, neither suspended."""
    return _route_attack(arena, "lie-account", suspended=False)


def ask_for_unasked_logits(arena: Arena) -> Verdict:
    """A middle provider pushes every step on asking the last hop for logits the gateway never asked for, hoping
    the gateway takes the frames on the last hop's stream for a broken stream and blames the last hop (which
    would leave the honest last hop out and keep the rogue in). The gateway reads and drops logits it did not ask
    for: nothing fails."""
    return _harmless_attack(arena, "unasked-logits")


def _on_the_chain(kind: str, *, suspended: bool = True) -> Callable[[Arena], Verdict]:
    """``kind``'s attack on the request/reply chain (the gateway's ``HOP_RING=false``), where reports travel back
    hop by hop and each relay checks the one it signs over."""

    def attack(arena: Arena) -> Verdict:
        return _route_attack(arena, kind, suspended=suspended, ring=False)

    attack.__doc__ = f"{kind} on the request/reply chain."
    return attack


def inflate_a_receipt(arena: Arena) -> Verdict:
    """The middle provider serves honestly, then signs a receipt for half as many positions again as it served.
    The job is the client's all the same; the false receipt bills nothing, its provider is suspended, and the
    gateway keeps the receipt as evidence."""
    rogue = arena.rogues["inflate-receipt"]
    asks = [served.ask for served in (*arena.honest.values(), rogue)]
    outcome, book = asyncio.run(_coordinated(arena, asks))
    (hop,) = [hop for hop in outcome.hops if hop.ask.provider == rogue.account.address]
    succeeded = (
        outcome.tokens != arena.reference
        or hop.status != HopStatus.FALSE_RECEIPT
        or hop.amount != 0
        or book.matchable(rogue.account.address)
    )
    honest = [h for h in outcome.hops if h is not hop]
    harmed = any(h.status != HopStatus.BILLED for h in honest) or not all(
        book.matchable(served.account.address) for served in arena.honest.values()
    )
    return Verdict("inflate-receipt", succeeded, harmed, f"{hop.status}: {hop.refusal}")


def _interference(arena: Arena, kind: str) -> Verdict:
    """The rogue serves the first span honestly and attacks the last provider's session on the side: the job
    completes as if it had not, every hop is billed on its own receipt, and the victim refused every attempt."""
    rogue = arena.rogues[kind]
    asks = [served.ask for served in (*arena.honest.values(), rogue)]
    outcome, book = asyncio.run(_coordinated(arena, asks))
    log = rogue.node.log.read_text(errors="replace")
    attempts = [line for line in log.splitlines() if f"{kind} against" in line]
    refused = bool(attempts) and all("not_authorised" in line for line in attempts)
    succeeded = (
        outcome.finish is None or outcome.tokens != arena.reference or outcome.failovers > 0 or not refused
    )
    harmed = any(hop.status != HopStatus.BILLED for hop in outcome.hops) or not all(
        book.matchable(served.account.address) for served in arena.honest.values()
    )
    return Verdict(kind, succeeded, harmed, f"{len(attempts)} attempts, all refused: {refused}")


def close_another_providers_session(arena: Arena) -> Verdict:
    """The first provider tries to close the last provider's session with every step."""
    return _interference(arena, "close-others")


def inject_a_step(arena: Arena) -> Verdict:
    """The first provider sends steps of its own into the last provider's session."""
    return _interference(arena, "inject-step")


def substitute_the_emitted_token(arena: Arena) -> Verdict:
    """The last provider emits other tokens than it sampled, to the gateway and to the first hop alike, keeping
    its logits honest, greedy and under a seeded sampler: the job completes and bills (the gateway cannot tell),
    but its signed transcript commits to what it emitted, and the validator, judging its retained steps as the
    validation task does, fails the hop."""
    samplings = {"greedy": {"temperature": 0.0, "seed": 1}, "sampled": SAMPLED}
    return _judged_tokens(arena, "substitute-token", samplings)


def sample_outside_the_grammar_and_the_bias(arena: Arena) -> Verdict:
    """The last provider ignores the grammar and the logit_bias it was opened with (cheaper: no mask to compute),
    greedy and sampled: its receipt commits to them, and the validator's replay of them fails the hop."""
    constraints = {"grammar": json_grammar({"type": "object"}), "logit_bias": {"32": -100.0, "65": 5.0}}
    samplings = {
        "greedy": {"temperature": 0.0, "seed": 1, **constraints},
        "sampled": {**SAMPLED, **constraints},
    }
    return _judged_tokens(arena, "ignore-constraints", samplings)


SAMPLED = {"temperature": 0.8, "top_p": 0.95, "top_k": 20, "seed": 7}


def _judged_tokens(
    arena: Arena, kind: str, samplings: dict[str, dict[str, Any]], *, ring: bool = True
) -> Verdict:
    """Runs the rogue last provider ``kind`` under each of ``samplings``, on the ring (or the chain): the attack
    fails when every run bills (the gateway cannot tell) and the validator's judgement of the rogue's retained
    steps is WRONG_TOKEN."""
    rogue = arena.rogues[kind]
    route = [arena.honest["a"], arena.honest["b"], rogue]
    reference = ReferenceSpan(
        lambda dtype: load_shard(arena.model, "4:6", device=torch.device("cpu"), dtype=dtype)
    )

    async def run(sampling: dict[str, Any]) -> tuple[str | None, bool]:
        peers = Peers(arena.keys)
        plans = plan(route, root=arena.root, keys=arena.keys, ring=ring)
        client = RouteClient(plans, peers, checks=arena.checks, vocab_size=VOCAB)
        try:
            _, results = await client.generate(PROMPT, max_tokens=NEW_TOKENS, sampling=sampling)
            transcript = [result.hops[-1] for result in results]
            receipts = await client.close(len(results))
        finally:
            await peers.close()
        validator = KeyRing(arena.validator, arena.contracts.protocol_domain())
        ticket = validator.fetch_ticket(
            job_id=plans[-1].ticket.job_id, session=client.session, provider=rogue.account.address,
            expires_at=int(time.time()) + 60,
        )  # fmt: skip
        link = PeerLink(rogue.endpoint, rogue.node.fingerprint, validator, tls=True)
        try:
            limits = FrameLimits(max_payload_bytes=64 * VOCAB * 4, max_elements=64 * VOCAB)
            retained = await fetch_retained(link, ticket, max_steps=NEW_TOKENS, limits=limits)
        finally:
            await link.close()
        expected = ReceiptFields(
            plans[-1].ticket.job_id, client.session, arena.keys.address, rogue.account.address,
            plans[-1].ticket.model_root, 4, 6, len(PROMPT) + NEW_TOKENS - 1, transcript_root(transcript),
            sampling_hash(sampling),
        )  # fmt: skip
        receipt = receipts[-1]
        billed = receipt is not None and receipt_bills(receipt, expected, arena.checks.receipt) is None
        return judge_span(reference, retained, transcript, sampling=sampling).reason, billed

    verdicts = [asyncio.run(run(sampling)) for sampling in samplings.values()]
    caught = all(reason == WRONG_TOKEN and billed for reason, billed in verdicts)
    detail = ", ".join(
        f"{name}: billed {billed}, judged {reason}"
        for name, (reason, billed) in zip(samplings, verdicts, strict=True)
    )
    return Verdict(kind, not caught, False, detail)


def withhold_downstream_receipts(arena: Arena) -> Verdict:
    """The first provider of a ring that completed goes away before the close: in the old protocol every
    receipt came back through it. Each provider now hands its own to the gateway: the others are billed."""
    first = launch(
        arena.model, (0, 2), seed=777_001, root=arena.root, workdir=arena.workdir,
        deployment=arena.workdir / "deployment.json", gateway=arena.gateway_account.address,
    )  # fmt: skip
    route = [first, arena.honest["b"], arena.honest["c"]]

    async def run() -> list[str | None]:
        peers = Peers(arena.keys)
        client = RouteClient(
            plan(route, root=arena.root, keys=arena.keys, ring=True),
            peers,
            checks=arena.checks,
            vocab_size=VOCAB,
        )
        try:
            tokens, _ = await client.generate(PROMPT, max_tokens=3)
            first.node.kill()
            receipts = await client.close(len(tokens))
        finally:
            await peers.close()
        return [None if r is None else r.provider for r in receipts]

    with running([first]):
        receipts = asyncio.run(run())
    billed_others = receipts[1:] == [route[1].account.address, route[2].account.address]
    return Verdict("withhold-receipts", not billed_others, not billed_others, f"receipts from {receipts}")


# -- attacks by strangers on a provider ---------------------------------------------------------------------


async def _hang_up(writer: asyncio.StreamWriter) -> None:
    """Closes a connection and waits for it to be closed: a transport still closing when its event loop ends is
    never finalized, and warns (an error, under pytest) wherever the garbage collector happens to find it."""
    writer.close()
    with suppress(OSError, ssl.SSLError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 5)


async def _raw_tls(served: Served) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Hello]:
    host, port = served.endpoint.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), ssl=client_context(), server_hostname="")
    hello = Hello.from_json(await read_control(reader))
    await reader.readexactly(8)
    return reader, writer, hello


async def _authenticated(
    served: Served, keys: KeyRing
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]]:
    reader, writer, hello = await _raw_tls(served)
    signature = keys.peer_auth(hello.challenge, hello.fingerprint)
    write_message(writer, Auth(keys.address, signature).to_json())
    await writer.drain()
    reply = await read_control(reader)
    await reader.readexactly(8)
    return reader, writer, reply


def replay_tickets(arena: Arena) -> Verdict:
    """The gateway's own tickets, sent where they were not meant for: another provider, another span, a
    session opened once already, after expiry. And a ticket seen on the wire, by someone with another key."""
    a, b = arena.honest["a"], arena.honest["b"]

    async def run() -> list[str]:
        codes = []
        peers = Peers(arena.keys)
        try:
            hop = plan([a, b], root=arena.root, keys=arena.keys)[0]
            link_b = peers.get(b.endpoint, b.node.fingerprint)
            link_a = peers.get(a.endpoint, a.node.fingerprint)
            for link, ticket in (
                (link_b, hop.ticket),  # a's ticket at b: another provider, another span
                (
                    link_a,
                    plan([a, b], root=arena.root, keys=arena.keys, expires_in_s=-5)[0].ticket,
                ),  # expired
            ):
                reply, _ = await link.request(Open(ticket).to_json())
                codes.append(str(reply.get("error", {}).get("code")))
            checked((await link_a.request(Open(hop.ticket).to_json()))[0])
            reply, _ = await link_a.request(Open(hop.ticket).to_json())  # the same session again
            codes.append(str(reply.get("error", {}).get("code")))
        finally:
            await peers.close()
        thief = KeyRing(Account.from_key(os.urandom(32)), arena.contracts.protocol_domain())
        _, writer, reply = await _authenticated(a, thief)
        await _hang_up(writer)
        codes.append(str(reply.get("error", {}).get("code")))  # a stranger is turned away before it can open
        return codes

    codes = asyncio.run(run())
    expected = ["ticket_refused", "ticket_refused", "session_exists", "not_authorised"]
    return Verdict("replay-tickets", codes != expected, False, f"refusals {codes}")


def route_to_an_unnamed_address(arena: Arena) -> Verdict:
    """A step that names where to go next (the old protocol's route field) is not a step: a provider sends on
    only to the peer its ticket names."""
    a = arena.honest["a"]

    async def run() -> str:
        reader, writer, _ = await _authenticated(a, arena.keys)
        control = {**Step(os.urandom(16), 0, 1).to_json(), "route": ["127.0.0.1:9"]}
        write_message(writer, control)
        await writer.drain()
        reply = await read_control(reader)
        await _hang_up(writer)
        return str(reply.get("error", {}).get("code"))

    code = asyncio.run(run())
    return Verdict("route-elsewhere", code != "bad_hop_message", False, f"refused with {code}")


def oversized_frame_without_a_ticket(arena: Arena) -> Verdict:
    """A peer with business at the provider (the gateway's key) announces a 256 MiB frame for a session it
    never opened; a stranger announces a 256 MiB control part. Both are refused from the lengths alone."""
    a = arena.honest["a"]

    async def run() -> tuple[str, float, bool]:
        reader, writer, _ = await _authenticated(a, arena.keys)
        started = time.perf_counter()
        body = Step(os.urandom(16), 0, 1).to_json()
        write_message(writer, body)
        writer.write(struct.pack("<Q", 256 * 2**20))  # the frame it would send
        await writer.drain()
        reply = await asyncio.wait_for(read_control(reader), 5)
        refused_in = time.perf_counter() - started
        await _hang_up(writer)
        reader, writer, _ = await _raw_tls(a)
        writer.write(struct.pack("<I", 256 * 2**20))
        await writer.drain()
        try:
            await asyncio.wait_for(reader.read(), 5)  # its refusal, then the end of the stream
            hung_up = True
        except TimeoutError:
            hung_up = False
        await _hang_up(writer)
        return str(reply.get("error", {}).get("code")), refused_in, hung_up

    code, refused_in, hung_up = asyncio.run(run())
    return Verdict(
        "oversized-frame",
        code != "not_authorised" or refused_in > 2 or not hung_up,
        False,
        f"refused with {code} in {refused_in * 1e3:.0f} ms",
    )


def _under_load(arena: Arena, load: list[str]) -> tuple[float, str]:
    """Honest jobs' median decode step while an attacker process runs ``load`` (this module's command line)
    against its providers: the attacker is a machine of its own, as it would be, not a task in the honest
    client's event loop. The attacker says ``ready`` once its load is on, and its result last."""

    async def run() -> tuple[float, str]:
        attacker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "marketplace.testing.adversary", *load, stdout=asyncio.subprocess.PIPE
        )
        assert attacker.stdout is not None
        await asyncio.wait_for(attacker.stdout.readline(), 120)  # ready
        # As many jobs as the baseline's: a ring's decode step is a few milliseconds, and one job's few steps
        # would measure whatever else the machine did in them.
        times: list[float] = []
        for _ in range(3):
            times += (await _timed_job(arena, [arena.honest[name] for name in ("a", "b", "c")]))[1]
        result = (await asyncio.wait_for(attacker.stdout.read(), 120)).decode().strip()
        await attacker.wait()
        return statistics.median(times), result

    return asyncio.run(run())


async def _hold_idle(endpoint: str, count: int) -> int:
    """Opens ``count`` TLS connections and says nothing on them; returns how many the server dropped."""
    host, port = endpoint.rsplit(":", 1)
    opened = []
    for _ in range(count):
        with suppress(OSError, ssl.SSLError):
            opened.append(
                await asyncio.open_connection(host, int(port), ssl=client_context(), server_hostname="")
            )
    print("ready", flush=True)
    await asyncio.sleep(8)  # held past the provider's 5 s handshake timeout
    dropped = 0
    for reader, writer in opened:
        try:
            await asyncio.wait_for(reader.read(), 1)  # Hello, then the end of the stream
            dropped += reader.at_eof()
        except (OSError, TimeoutError, ssl.SSLError):
            dropped += 1
        writer.close()
    return dropped


async def _flood(endpoints: list[str], chain_id: int, stake_manager: str, seconds: float) -> int:
    """Connects to each endpoint again and again with a fresh key, for ``seconds``; returns how many were
    turned away."""
    from settlement.eip712 import protocol_domain

    domain = protocol_domain(chain_id, stake_manager)
    refused = 0
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for endpoint in endpoints:
            stranger = KeyRing(Account.from_key(os.urandom(32)), domain)
            host, port = endpoint.rsplit(":", 1)
            try:
                reader, writer = await asyncio.open_connection(
                    host, int(port), ssl=client_context(), server_hostname=""
                )
                hello = Hello.from_json(await read_control(reader))
                await reader.readexactly(8)
                write_message(
                    writer,
                    Auth(stranger.address, stranger.peer_auth(hello.challenge, hello.fingerprint)).to_json(),
                )
                await writer.drain()
                reply = await read_control(reader)
                writer.close()
                refused += reply.get("ok") is not True
            except (OSError, ssl.SSLError, WorkerError, asyncio.IncompleteReadError):
                refused += 1
    return refused


def idle_connections(arena: Arena) -> Verdict:
    """1,000 connections to an honest provider that finish TLS and then say nothing, held while an honest job
    runs: they are dropped at the handshake timeout, and the job is not slowed."""
    step_ms, result = _under_load(arena, ["idle", arena.honest["b"].endpoint, "1000"])
    dropped = int(result or 0)
    slowed = step_ms > 2 * arena.baseline_step_ms
    return Verdict(
        "idle-connections",
        dropped < 900,
        slowed,
        f"{dropped} of 1000 dropped; honest step {step_ms:.1f} ms (baseline {arena.baseline_step_ms:.1f} ms)",
    )


def fetch_flood(arena: Arena) -> Verdict:
    """While an honest job runs, strangers connect to its providers again and again, each with a key of its own
    making, to ask for retained data: each is turned away at the handshake, and the job is not slowed."""
    endpoints = [arena.honest[name].endpoint for name in ("a", "b", "c")]
    chain = str(arena.contracts.deployment.chain_id)
    step_ms, result = _under_load(arena, ["flood", chain, arena.contracts.stake.address, "6", *endpoints])
    refused = int(result or 0)
    slowed = step_ms > 2 * arena.baseline_step_ms
    return Verdict(
        "fetch-flood",
        refused == 0,
        slowed,
        f"{refused} strangers refused; honest step {step_ms:.1f} ms (baseline {arena.baseline_step_ms:.1f} ms)",
    )


# -- attacks on the market -------------------------------------------------------------------------------------


def _post_ask(arena: Arena, announcer: Announcer) -> httpx.Response:
    announcer.gateway = arena.gateway_account.address
    return httpx.post(arena.gateway.url + "/v1/asks", json=announcer.signed_ask(), timeout=30)


def ask_with_someone_elses_endpoint(arena: Arena) -> Verdict:
    """A staked provider posts an ask naming an honest provider's endpoint, with the honest certificate or with
    its own: the endpoint proves to be someone else's, or not to hold the certificate, and the ask never enters
    the book."""
    victim, attacker = arena.honest["b"], arena.rogues["blame-next"]
    codes = []
    for fingerprint in (victim.node.fingerprint, attacker.node.fingerprint):
        offer = Offer(arena.root, 2, 4, 1, 8, victim.endpoint, fingerprint, DEFAULT_RETENTION_S)
        announcer = Announcer(
            arena.gateway.url, attacker.account, offer, domain=arena.contracts.protocol_domain(), trusted=None
        )
        response = _post_ask(arena, announcer)
        codes.append(str(response.json().get("error", {}).get("code")))
    booked = httpx.get(arena.gateway.url + "/v1/asks", params={"provider": attacker.account.address}).json()
    succeeded = codes != ["endpoint_not_proven", "endpoint_not_proven"] or bool(booked["data"])
    return Verdict("foreign-endpoint", succeeded, False, f"refused with {codes}")


def replay_across_deployments(arena: Arena) -> Verdict:
    """Another deployment of the contracts on the same chain, run by the same gateway key: an ask signed for one
    is refused by a gateway of the other, and a ticket signed under the other is refused by a provider of this
    one."""
    honest = arena.honest["b"]
    offer = Offer(
        arena.root, 2, 4, 1_000_000, 8, honest.endpoint, honest.node.fingerprint, DEFAULT_RETENTION_S
    )
    other_domain = arena.other.protocol_domain()
    # An ask signed under the other deployment, posted here.
    announcer = Announcer(arena.gateway.url, honest.account, offer, domain=other_domain, trusted=None)
    ask_code = str(_post_ask(arena, announcer).json().get("error", {}).get("code"))

    async def link_and_ticket_codes() -> tuple[str, str]:
        other_keys = KeyRing(arena.gateway_account, other_domain)  # the same key, the other deployment
        _, writer, reply = await _authenticated(honest, other_keys)
        await _hang_up(writer)
        link = str(reply.get("error", {}).get("code")) if reply.get("ok") is not True else "authenticated"
        # Over a link authenticated for this deployment, a ticket signed for the other.
        peers = Peers(arena.keys)
        try:
            hop = plan([honest, arena.honest["c"]], root=arena.root, keys=other_keys)[0]
            opened, _ = await peers.get(honest.endpoint, honest.node.fingerprint).request(
                Open(hop.ticket).to_json()
            )
        finally:
            await peers.close()
        return link, str(opened.get("error", {}).get("code"))

    link, ticket = asyncio.run(link_and_ticket_codes())
    succeeded = ask_code != "invalid_signature" or link != "unauthenticated" or ticket != "ticket_refused"
    detail = f"ask refused with {ask_code}, link with {link}, ticket with {ticket}"
    return Verdict("cross-deployment", succeeded, False, detail)


def man_in_the_middle(arena: Arena) -> Verdict:
    """A relay with a certificate of its own sits in front of an honest provider: the gateway, pinning the
    certificate the provider's ask named, refuses to talk through it, and nobody is blamed for it."""
    victim = arena.honest["b"]

    async def run() -> str:
        proxy, relays = await _tls_proxy(victim.endpoint)
        port = proxy.sockets[0].getsockname()[1]
        peers = Peers(arena.keys)
        try:
            link = peers.get(f"127.0.0.1:{port}", victim.node.fingerprint)
            try:
                await link.request(Open(plan([victim], root=arena.root, keys=arena.keys)[0].ticket).to_json())
            except WorkerError as exc:
                return exc.code
            return "talked through the relay"
        finally:
            await peers.close()
            proxy.close()
            if relays:  # each ends once the gateway's side hangs up
                await asyncio.wait(relays, timeout=5)

    code = asyncio.run(run())
    return Verdict("man-in-the-middle", code != "certificate_mismatch", False, f"the gateway's link: {code}")


async def _tls_proxy(upstream: str) -> tuple[asyncio.Server, set[asyncio.Task[None]]]:
    """A TLS server with a certificate of its own, relaying bytes to ``upstream`` over TLS; with the tasks that
    relay each connection."""
    from worker.tls import TlsIdentity

    identity = TlsIdentity.load_or_create(Path(os.environ.get("TMPDIR", "/tmp")) / f"mitm-{os.getpid()}")
    host, port = upstream.rsplit(":", 1)

    relays: set[asyncio.Task[None]] = set()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        relays.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            up_reader, up_writer = await asyncio.open_connection(
                host, int(port), ssl=client_context(), server_hostname=""
            )
        except OSError:
            await _hang_up(writer)
            return

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with suppress(OSError, ssl.SSLError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            await _hang_up(sink)

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    return await asyncio.start_server(relay, "127.0.0.1", 0, ssl=identity.server_context()), relays


ATTACKS: dict[str, Callable[[Arena], Verdict]] = {
    "alter-downstream-report": alter_downstream_report,
    "forge-error-report": forge_error_report,
    "false-unreachable-report": false_unreachable_report,
    "replay-a-step": replay_a_step,
    "garbage-report": garbage_report,
    "stall-a-step": stall_a_step,
    "never-answer-the-close": never_answer_the_close,
    "split-the-token": split_the_token,
    "withhold-the-token": withhold_the_token,
    "lie-in-the-account": lie_in_the_account,
    "ask-for-unasked-logits": ask_for_unasked_logits,
    "close-another-providers-session": close_another_providers_session,
    "inject-a-step": inject_a_step,
    "substitute-the-emitted-token": substitute_the_emitted_token,
    "sample-outside-the-grammar-and-the-bias": sample_outside_the_grammar_and_the_bias,
    "withhold-downstream-receipts": withhold_downstream_receipts,
    "inflate-a-receipt": inflate_a_receipt,
    "inflate-positions-to-frame-the-next-hops": inflate_positions_to_frame_the_next_hops,
    # The request/reply chain (HOP_RING=false) where its defences differ from the ring's: reports relayed back,
    # each relay checking what it signs over.
    "chain-alter-downstream-report": _on_the_chain("alter-downstream"),
    "chain-forge-error-report": _on_the_chain("forge-error"),
    "chain-replay-a-step-to-frame-the-next-hop": _on_the_chain("replay-step", suspended=False),
    "chain-garbage-report-to-frame-the-relayer": _on_the_chain("garbage-report", suspended=False),
    "replay-tickets": replay_tickets,
    "route-to-an-unnamed-address": route_to_an_unnamed_address,
    "oversized-frame-without-a-ticket": oversized_frame_without_a_ticket,
    "idle-connections": idle_connections,
    "fetch-flood": fetch_flood,
    "ask-with-someone-elses-endpoint": ask_with_someone_elses_endpoint,
    "replay-across-deployments": replay_across_deployments,
    "man-in-the-middle": man_in_the_middle,
}


# The attacks that run jobs through providers, by the way the jobs run: the rest attack a provider's door or the
# market, which are the same whichever way jobs run.
ON_THE_CHAIN = frozenset(name for name in ATTACKS if name.startswith("chain-"))
ON_THE_RING = frozenset(
    {
        "alter-downstream-report", "forge-error-report", "false-unreachable-report", "replay-a-step",
        "garbage-report", "stall-a-step", "never-answer-the-close", "split-the-token", "withhold-the-token",
        "lie-in-the-account", "ask-for-unasked-logits", "close-another-providers-session", "inject-a-step",
        "substitute-the-emitted-token", "sample-outside-the-grammar-and-the-bias", "withhold-downstream-receipts",
        "inflate-a-receipt", "inflate-positions-to-frame-the-next-hops", "idle-connections", "fetch-flood",
    }
)  # fmt: skip


def main(argv: list[str]) -> None:
    """The attacker's side of the load attacks, as a process of its own: ``idle ENDPOINT COUNT`` or
    ``flood CHAIN_ID STAKE_MANAGER SECONDS ENDPOINT...``.

    It runs at the lowest CPU priority: a real attacker is another machine, and on a machine this small its own
    handshakes and signatures would otherwise take the cores the honest providers need, and the measured
    slowdown would be the attacker's CPU rather than what the attack costs them."""
    os.nice(19)
    if argv[0] == "idle":
        print(asyncio.run(_hold_idle(argv[1], int(argv[2]))))
    elif argv[0] == "flood":
        print(asyncio.run(_flood(argv[4:], int(argv[1]), argv[2], float(argv[3]))))
    else:
        raise SystemExit(f"unknown load {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])


__all__ = ["ATTACKS", "ON_THE_CHAIN", "ON_THE_RING", "Arena", "Verdict", "arena"]
