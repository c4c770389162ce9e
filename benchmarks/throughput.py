"""Throughput under concurrency: many streaming clients paying one gateway over three provider processes.

Builds a Llama-style model of about 300M parameters (hidden 1024, 24 layers, fp32) locally and measures it three
ways in one run:

1. Compute, in this process, before anything else starts (so nothing competes for the cores). The same prompt, 64
   greedy tokens, batch of one, ``--rounds`` times, taking turns:
   - transformers' ``generate()`` with its KV cache over the whole checkpoint, each decode step timed by a
     streamer (the gap between two tokens it is handed);
   - the project's runtime, ``SpanRuntime`` over ``load_shard(model, "0:24")``, stepped one token at a time;
   - the three spans 0:8, 8:16 and 16:24, each its own ``SpanRuntime``, stepped in turn, the hidden state handed
     from one to the next in memory: what the providers compute per token between them, without any link.
   Step times are medians over the decode steps (the prefill is left out); the runtime's and the spans' include
   sampling, as ``generate()``'s do. Their sessions reserve the KV room a gateway's ticket would, prompt + new
   tokens.
2. Concurrency. An anvil with the contracts, three ``strata provider serve`` processes on TLS (one per span, one
   torch thread each, OpenMP threads sleeping when idle), and ``strata gateway serve`` with
   payments on, which the providers' asks are announced to. Each client is the SDK's ``StrataClient`` paying
   from a channel of its own (a funded VoucherEscrow deposit, one account per client: clients are different
   people, and one wallet serialises its own requests' payments). After a warm-up in which every client streams
   one short answer, each level of ``--clients`` runs that many clients at once, each streaming
   ``--requests`` chat completions back to back: greedy (temperature 0), ``--tokens`` new tokens, with
   ``logit_bias`` keeping the answer to ASCII and off the end-of-sequence token, so that every request yields
   exactly ``--tokens`` tokens and every token reaches the client in a chunk of its own (a random model's greedy
   bytes are mostly parts of multi-byte characters, which the gateway holds back until the character is whole).
3. Distance. A ``DelayProxy`` (``marketplace.testing.latency``) of 20 ms each way in front of every provider, and
   asks announcing the proxies' endpoints, so that every gateway-to-provider and provider-to-provider link (the
   ring's last-to-first link too) crosses one; a fresh gateway serves one client streaming one request at a
   time, with the token ring off and then on (``ring_setting`` below is the one place that knows the switch).

Figures (the last line is one JSON object):

    aggregate_tps_N       level N: tokens streamed ÷ the level's wall time (first request sent → last stream
                          ended; payment, admission and prefill included)
    itl_p50_ms_N, _p90_   level N: inter-token latency, the gaps between successive tokens' arrival at the
                          client, over every request of the level, ms
    ttft_p50_ms_N         level N: request sent → first token, median, ms
    cores_gateway_N, cores_providers_N, cores_clients_N
                          level N: CPU seconds the gateway, the three providers together and this process (the
                          clients) used ÷ the level's wall time, from /proc: what kept the cores busy
    aggregate_ratio_16    aggregate_tps_16 ÷ aggregate_tps_1 (target ≥ 8)
    latency_ratio_16      itl_p50_ms_16 ÷ itl_p50_ms_1 (target ≤ 2.5)
    single_stream_tps     the 1-client level's decode rate: tokens after the first ÷ first → last token, median
                          over its requests
    generate_step_ms      ``generate()``'s decode step, median, ms
    runtime_step_ms       the one-process runtime's decode step (whole model, one span), median, ms
    reference_step_ms     the faster of the two: one process's decode step through the fastest path found
    spans_compute_ms_per_token
                          Σ over the three spans of their decode step, median over tokens, ms
    compute_ratio         spans_compute_ms_per_token ÷ reference_step_ms (target ≤ 1.0)
    tps_20ms_no_ring, tps_20ms_ring
                          decode rate of one stream with 20 ms on every link, without and with the ring
    ring_speedup_20ms     tps_20ms_ring ÷ tps_20ms_no_ring (target ≥ 1.6); null, with ring_note saying why,
                          while the gateway has no ring setting or under ``--skip-ring``
    ring_in_levels        whether the levels above ran on the ring: the gateway's default (null while it has no
                          ring setting)

What may still limit concurrency besides the providers. The gateway is one uvicorn process (one event loop, one
core's worth of Python) that verifies a voucher, tokenizes, reserves, matches, and for every token of every job
receives the token and each hop's signed report (off the ring it also sends every step), then writes each
job's outcome to SQLite, whose one writer at a time makes concurrent reservations and outcomes wait on each
other (on a loaded machine a 32-client level has failed with "database is locked": a 500, nothing charged;
PostgreSQL is the gateway's database for scale); its per-address and per-payer rate limits are turned off here, its
tokenizing queue is sized past the largest level, its ration of chain reads of channels it has not seen yet
(every client's, at the warm-up) is raised past it, and the asks offer twice the largest level's sessions (the
providers open as many), so neither a 429, a 503 nor a job resting for capacity should occur (a request
that fails at all stops the run). The clients themselves are coroutines in this process, sharing the two cores
with the gateway, the providers and anvil; each payment is one more round trip (the 402) before a stream, and
while a stream's headers are awaited the SDK polls the channel (to release its wallet's lock early).

Options: ``--clients 1,4,16,32``, ``--tokens 64``, ``--requests`` per client per level, ``--hidden``/``--layers``
for a smaller model while developing, ``--rounds`` of the in-process compute, ``--skip-ring``, ``--keep`` (keep the
work directory and print it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from eth_account.signers.local import LocalAccount
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

from benchmarks.gateway import wait_healthy
from marketplace.client import ChannelWallet, StrataClient, fund_channel, stream_chunks
from marketplace.devnet.anvil import Anvil
from marketplace.devnet.process import free_port
from marketplace.devnet.providers import ProviderLaunch, ProviderProcess
from marketplace.gateway.catalog import load_model
from marketplace.gateway.config import GatewaySettings
from marketplace.provider.announce import DEFAULT_RETENTION_S, Announcer, Offer
from marketplace.provider.staking import bond
from marketplace.testing.hops import GATEWAY_ACCOUNT
from marketplace.testing.latency import DelayProxy
from settlement.chain import Chain
from settlement.contracts import random_channel_id
from settlement.deploy import ONE_TOKEN, Contracts, DeployParams, deploy
from worker.runtime import SpanRuntime
from worker.sampling import Sampler, SamplingParams
from worker.shard import load_shard, model_root
from worker.testing.tiny import BOS, VOCAB_SIZE, write_tiny_checkpoint

STRATA = str(Path(sys.executable).with_name("strata"))
MODEL = "llama"  # the name the gateway serves the checkpoint under
PROMPT = [BOS, *b"The marketplace routes each request through the cheapest chain of providers. "]
PRICE = 1_000_000  # base units per million token-layers
LINK_DELAY_S = 0.020
# Every byte above ASCII, and the special tokens (end of sequence among them), pushed far below any logit: the
# answer is greedy over what is left, always --tokens long, and each token is a whole character.
ASCII_ONLY = {str(token): -100 for token in range(128, VOCAB_SIZE)}
# Providers, gateway and clients share this machine's cores: OpenMP threads that spin after a step would steal the
# core the next process computes on.
QUIET_THREADS = {"OMP_WAIT_POLICY": "PASSIVE"}
# Torch threads per provider. Three providers share two cores here, and a pass reads weights at memory speed: a
# second thread made no pass faster (16 rows of an 8-layer span: 34 ms on one thread, 40 on two, under load),
# while every extra thread competes with the other providers' passes.
PROVIDER_THREADS = 1
# Set this to the GatewaySettings field that switches the token ring, if it is ever named so that ring_setting
# cannot find it; None looks for a boolean field named "ring" or "..._ring_..." alone.
RING_SETTING: str | None = None


def ring_setting() -> str | None:
    """The gateway's setting that turns the token ring on and off, or None while it has none."""
    fields = GatewaySettings.model_fields
    if RING_SETTING is not None:
        return RING_SETTING if RING_SETTING in fields else None
    named = [
        name
        for name, info in fields.items()
        if re.search(r"(^|_)ring(_|$)", name) and info.annotation in (bool, "bool")
    ]
    return named[0] if len(named) == 1 else None


def spans(layers: int) -> list[tuple[int, int]]:
    """Three contiguous spans as even as ``layers`` allows (0:8, 8:16, 16:24 for 24)."""
    cuts = [round(layers * i / 3) for i in range(4)]
    return [(cuts[i], cuts[i + 1]) for i in range(3)]


# -- 1. compute, in this process ------------------------------------------------------------------------------


class StepClock(BaseStreamer):
    """Stamps every call ``generate()`` makes to its streamer: the prompt first, then each new token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: Any) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def generate_steps(model: torch.nn.Module, tokens: int) -> list[float]:
    """``generate()``'s decode steps, ms: the gaps between successive new tokens (the prefill left out)."""
    clock = StepClock()
    with torch.inference_mode():
        model.generate(  # type: ignore[operator]
            torch.tensor([PROMPT]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
            pad_token_id=258, streamer=clock,
        )  # fmt: skip
    new = clock.stamps[1:]  # the first stamp is the prompt, handed over before the prefill
    return [(b - a) * 1e3 for a, b in itertools.pairwise(new)]


def runtime_steps(runtimes: Sequence[SpanRuntime], tokens: int) -> tuple[list[int], list[list[float]]]:
    """One token at a time through ``runtimes`` in order (one span covering the model, or the route's spans in
    memory); returns the tokens and, per decode step, each span's ms (the last span's includes sampling)."""
    sessions = [os.urandom(16) for _ in runtimes]
    for runtime, session in zip(runtimes, sessions, strict=True):
        # Sized as a gateway's ticket sizes a provider's session: the KV room it reserves is what the job needs.
        runtime.open(session, max_positions=len(PROMPT) + tokens)
    sampler = Sampler(SamplingParams())  # greedy

    def step(index: int, inputs: torch.Tensor) -> tuple[int, list[float]]:
        times = []
        for runtime, session in zip(runtimes, sessions, strict=True):
            started = time.perf_counter()
            inputs, _ = runtime.step(session, index, inputs)
            if runtime is runtimes[-1]:
                token = sampler.next_token(inputs[:, -1, :])
            times.append((time.perf_counter() - started) * 1e3)
        return token, times

    token, _ = step(0, torch.tensor([PROMPT]))
    out, per_step = [token], []
    while len(out) < tokens:
        token, times = step(len(out), torch.tensor([[out[-1]]]))
        out.append(token)
        per_step.append(times)
    for runtime, session in zip(runtimes, sessions, strict=True):
        runtime.close(session)
    return out, per_step


def measure_compute(model_dir: Path, layers: int, tokens: int, rounds: int) -> dict[str, float]:
    cpu = torch.device("cpu")
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    whole = [SpanRuntime(load_shard(model_dir, f"0:{layers}", device=cpu))]
    route = [SpanRuntime(load_shard(model_dir, f"{a}:{b}", device=cpu)) for a, b in spans(layers)]
    generate_ms: list[float] = []
    runtime_ms: list[float] = []
    spans_ms: list[list[float]] = []
    # Warm-up: the allocator and first-call paths of each.
    generate_steps(reference, 4)
    runtime_steps(whole, 4)
    runtime_steps(route, 4)
    for _ in range(rounds):
        generate_ms += generate_steps(reference, tokens)
        one, steps = runtime_steps(whole, tokens)
        runtime_ms += [sum(times) for times in steps]
        split, steps = runtime_steps(route, tokens)
        spans_ms += steps
        if split != one:
            raise RuntimeError("the three spans' tokens differ from the whole model's in one span")
    del reference, whole, route
    gc.collect()
    per_span = [statistics.median(times[i] for times in spans_ms) for i in range(3)]
    return {
        "generate_step_ms": statistics.median(generate_ms),
        "runtime_step_ms": statistics.median(runtime_ms),
        "spans_compute_ms_per_token": statistics.median(sum(times) for times in spans_ms),
        **{f"span_{i}_step_ms": ms for i, ms in enumerate(per_span)},
    }


# -- 2. the market: chain, providers, clients, gateways -------------------------------------------------------


@dataclass
class Provider:
    account: LocalAccount  # staked
    span: tuple[int, int]
    node: ProviderProcess


@dataclass
class Market:
    anvil: Anvil
    contracts: Contracts
    deployment: Path
    model_dir: Path
    root: str
    providers: list[Provider]
    clients: list[tuple[LocalAccount, bytes]]  # (account, funded channel)
    workdir: Path
    capacity: int


@contextlib.contextmanager
def market(model_dir: Path, layers: int, clients: int, workdir: Path) -> Iterator[Market]:
    """Anvil with the contracts, three staked providers serving the model's spans, and ``clients`` accounts each
    with a funded channel. Everything it started is stopped on the way out."""
    anvil = Anvil(accounts=7 + clients).start()
    providers: list[Provider] = []
    try:
        accounts = anvil.accounts
        chain = Chain(anvil.url, receipt_timeout_s=30)
        contracts = deploy(
            chain, accounts[0], operator=accounts[1].address, treasury=accounts[2].address,
            slasher=accounts[3].address, params=DeployParams(min_stake=100 * ONE_TOKEN),
        )  # fmt: skip
        staked, payers = accounts[4:7], accounts[7 : 7 + clients]
        for account in [*staked, *payers]:
            contracts.token.mint(accounts[0], to=account.address, amount=10_000 * ONE_TOKEN)
        for account in staked:
            bond(contracts, account, 100 * ONE_TOKEN)
        deployment = workdir / "deployment.json"
        contracts.deployment.save(deployment)
        root = model_root(model_dir)
        capacity = 2 * clients  # sessions offered (and opened) per provider: never what turns a client away
        for index, (account, (first, last)) in enumerate(zip(staked, spans(layers), strict=True)):
            command = ProviderLaunch(
                model_dir, f"{first}:{last}", free_port(), trust_gateway=GATEWAY_ACCOUNT.address,
                deployment=deployment, tls_dir=workdir / f"tls-{index}", retained_dir=workdir / f"retained-{index}",
                extra=("--max-sessions", str(max(64, capacity))),
            )  # fmt: skip
            node = ProviderProcess.start(
                command, key=account.key.hex(), log=workdir / f"provider-{index}.log",
                env={**os.environ, **QUIET_THREADS}, threads=PROVIDER_THREADS,
            )  # fmt: skip
            providers.append(Provider(account, (first, last), node))
        channels = []
        for payer in payers:
            channel = random_channel_id(payer.address)
            asyncio.run(fund_channel(contracts, payer, channel, 1_000 * ONE_TOKEN))
            channels.append((payer, channel))
        for provider in providers:
            provider.node.wait_ready(600)
        yield Market(anvil, contracts, deployment, model_dir, root, providers, channels, workdir, capacity)
    finally:
        for provider in providers:
            provider.node.stop()
        anvil.stop()


def gateway_env(market: Market, database: Path, clients: int, ring: bool | None) -> dict[str, str]:
    """The gateway's settings: payments on, and room enough that the gateway turns no client away."""
    env = {
        "RPC_URL": market.anvil.url,
        "DEPLOYMENT_FILE": str(market.deployment),
        "DATABASE_URL": f"sqlite:///{database}",
        "GATEWAY_KEY": GATEWAY_ACCOUNT.key.hex(),
        "MODELS": json.dumps([f"{MODEL}={market.model_dir}"]),
        "PAYMENTS_ENABLED": "true",
        "HEARTBEAT_TTL_S": "3600",  # one heartbeat keeps the asks live for the whole run
        "RATE_LIMIT_IP_PER_S": "0",  # every client is 127.0.0.1
        "RATE_LIMIT_PAYER_PER_S": "0",
        "TOKENIZE_QUEUE": str(max(32, 4 * clients)),  # each request is tokenized twice: its 402, then paid
        # Every client's channel was funded before this gateway started, so its first read of each is a "cold" one,
        # rationed (10 a second by default, all callers together; past it 503 chain_unavailable, which the SDK
        # does not retry): the warm-up reads them all in the same second.
        "CHAIN_COLD_READS_PER_S": str(max(10, 4 * clients)),
        "JOB_SWEEP_S": "0.2",
        "STEP_TIMEOUT_S": "120",
        "OMP_NUM_THREADS": "1",
        **QUIET_THREADS,
    }
    setting = ring_setting()
    if ring is not None and setting is not None:
        env[setting.upper()] = str(ring).lower()
    return env


@contextlib.contextmanager
def gateway(
    market: Market, name: str, endpoints: Sequence[str], *, clients: int, ring: bool | None = None
) -> Iterator[tuple[str, int]]:
    """``strata gateway serve`` on a database of its own, the providers' asks announced to it at ``endpoints``
    (theirs, or proxies in front of them); yields its URL and process id, and stops it on the way out."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = market.workdir / f"gateway-{name}.log"
    env = gateway_env(market, market.workdir / f"gateway-{name}.db", clients, ring)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [STRATA, "gateway", "serve", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=market.workdir,
        )  # fmt: skip
    try:
        wait_healthy(url, process, log)
        domain = market.contracts.protocol_domain()
        for provider, endpoint in zip(market.providers, endpoints, strict=True):
            offer = Offer(
                market.root, provider.span[0], provider.span[1], PRICE, market.capacity, endpoint,
                provider.node.fingerprint, DEFAULT_RETENTION_S,
            )  # fmt: skip
            asyncio.run(_announce(url, provider.account, offer, domain))
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


async def _announce(url: str, provider: LocalAccount, offer: Offer, domain: Any) -> None:
    announcer = Announcer(url, provider, offer, domain=domain, trusted=[GATEWAY_ACCOUNT.address])
    try:
        await announcer.post_ask()
        await announcer.heartbeat()
    finally:
        await announcer.aclose()


class CpuMeter:
    """CPU seconds (user + system, all threads) used by named processes, read from /proc (Linux): where a level's
    time went, on a machine whose cores everyone shares. A name may stand for several processes, summed."""

    def __init__(self, processes: dict[str, int | list[int]]) -> None:
        self.processes = {
            name: pids if isinstance(pids, list) else [pids] for name, pids in processes.items()
        }

    def read(self) -> dict[str, float]:
        return {name: sum(_cpu_seconds(pid) for pid in pids) for name, pids in self.processes.items()}

    def since(self, before: dict[str, float]) -> dict[str, float]:
        return {name: seconds - before[name] for name, seconds in self.read().items()}


def _cpu_seconds(pid: int) -> float:
    try:
        # Fields after the command's closing parenthesis: state is the first, utime the 12th, stime the 13th.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")  # not Linux, or the process is gone
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- streaming clients ----------------------------------------------------------------------------------------


@dataclass
class Stream:
    """One streamed request as its client saw it."""

    sent: float
    arrivals: list[float] = field(default_factory=list)  # one per token (each token its own character)
    ended: float = 0.0

    @property
    def gaps_ms(self) -> list[float]:
        return [(b - a) * 1e3 for a, b in itertools.pairwise(self.arrivals)]

    @property
    def decode_tps(self) -> float:
        return (len(self.arrivals) - 1) / (self.arrivals[-1] - self.arrivals[0])


def body(client: int, request: int, tokens: int) -> dict[str, Any]:
    content = f"Client {client}, request {request}: how does the marketplace route a request?"
    return {
        "model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": tokens,
        "temperature": 0, "logit_bias": ASCII_ONLY, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip


async def stream_one(client: StrataClient, request: dict[str, Any]) -> Stream:
    stream = Stream(time.perf_counter())
    completion_tokens = None
    async with client.http.stream("POST", "/v1/chat/completions", json=request) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"a request failed: HTTP {response.status_code} {response.text[:300]}")
        async for chunk in stream_chunks(response):
            now = time.perf_counter()
            for choice in chunk.get("choices", []):
                text = (choice.get("delta") or {}).get("content") or ""
                stream.arrivals += [now] * len(text)  # ASCII only: one character is one token
            if chunk.get("usage"):
                completion_tokens = int(chunk["usage"]["completion_tokens"])
    stream.ended = time.perf_counter()
    if completion_tokens != request["max_tokens"] or len(stream.arrivals) != completion_tokens:
        raise RuntimeError(
            f"asked for {request['max_tokens']} tokens, the gateway counted {completion_tokens} and "
            f"{len(stream.arrivals)} arrived"
        )
    return stream


@contextlib.asynccontextmanager
async def paying_clients(url: str, market: Market, count: int) -> Any:
    """``count`` SDK clients, each paying from its own channel."""
    escrow = market.contracts.escrow.address
    clients = [
        StrataClient(
            url,
            ChannelWallet(
                account,
                channel,
                escrow=escrow,
                chain_id=31337,
                deposit=market.contracts.escrow.channel(channel).deposit,
            ),
            timeout_s=600,
        )
        for account, channel in market.clients[:count]
    ]
    try:
        yield clients
    finally:
        for client in clients:
            await client.http.aclose()


@dataclass
class Level:
    clients: int
    streams: list[Stream]
    wall_s: float
    cores: dict[str, float] = field(default_factory=dict)  # CPU seconds each party used ÷ wall_s

    @property
    def tokens(self) -> int:
        return sum(len(s.arrivals) for s in self.streams)

    @property
    def aggregate_tps(self) -> float:
        return self.tokens / self.wall_s

    @property
    def gaps_ms(self) -> list[float]:
        return [gap for s in self.streams for gap in s.gaps_ms]

    def itl_ms(self, q: int) -> float:
        """The q-th percentile of the inter-token gaps."""
        return statistics.quantiles(self.gaps_ms, n=100, method="inclusive")[q - 1]

    @property
    def ttft_ms(self) -> float:
        return statistics.median((s.arrivals[0] - s.sent) * 1e3 for s in self.streams)

    @property
    def decode_tps(self) -> float:
        return statistics.median(s.decode_tps for s in self.streams)


async def run_level(clients: Sequence[StrataClient], requests: int, tokens: int, tag: int) -> Level:
    async def one_client(index: int, client: StrataClient) -> list[Stream]:
        return [await stream_one(client, body(index, tag * 1000 + r, tokens)) for r in range(requests)]

    started = time.perf_counter()
    results = await asyncio.gather(*(one_client(i, c) for i, c in enumerate(clients)))
    wall = time.perf_counter() - started
    return Level(len(clients), [s for streams in results for s in streams], wall)


async def concurrency(
    url: str, market: Market, levels: Sequence[int], requests: int, tokens: int, meter: CpuMeter
) -> list[Level]:
    async with paying_clients(url, market, max(levels)) as clients:
        # Warm-up: every client's first payment (its wallet reads its channel), connections everywhere, the
        # providers' first sessions and first-call paths.
        await run_level(clients, 1, min(tokens, 8), tag=0)
        print(f"{'clients':>7} {'tokens':>6} {'wall s':>7} {'agg tok/s':>9} {'ITL p50':>8} {'ITL p90':>8} "
              f"{'TTFT p50':>9} {'decode tok/s':>12}  cores busy: gateway, providers, clients", flush=True)  # fmt: skip
        measured = []
        for tag, count in enumerate(levels, start=1):
            before = meter.read()
            level = await run_level(clients[:count], requests, tokens, tag)
            level.cores = {name: cpu / level.wall_s for name, cpu in meter.since(before).items()}
            busy = ", ".join(f"{cores:.2f}" for cores in level.cores.values())
            print(
                f"{count:>7} {level.tokens:>6} {level.wall_s:>7.2f} {level.aggregate_tps:>9.2f} "
                f"{level.itl_ms(50):>8.1f} {level.itl_ms(90):>8.1f} {level.ttft_ms:>9.1f} {level.decode_tps:>12.2f}"
                f"  {busy}",
                flush=True,
            )
            measured.append(level)
        return measured


async def single_stream(url: str, market: Market, requests: int, tokens: int) -> float:
    """Decode rate of one client streaming ``requests`` requests one after another, median."""
    async with paying_clients(url, market, 1) as (client,):
        await stream_one(client, body(0, 0, min(tokens, 8)))  # warm-up: links through the proxies, payment
        streams = [await stream_one(client, body(0, r + 1, tokens)) for r in range(requests)]
    return statistics.median(s.decode_tps for s in streams)


# -- 3. distance: 20 ms on every link, without and with the ring ----------------------------------------------


def ring_figures(market: Market, requests: int, tokens: int, clients: int) -> dict[str, Any]:
    setting = ring_setting()
    with contextlib.ExitStack() as stack:
        proxies = [stack.enter_context(DelayProxy(p.node.endpoint, LINK_DELAY_S)) for p in market.providers]
        endpoints = [proxy.endpoint for proxy in proxies]
        with gateway(market, "20ms-no-ring", endpoints, clients=clients, ring=False) as (url, _):
            without = asyncio.run(single_stream(url, market, requests, tokens))
        print(f"20 ms a link, without the ring: {without:.2f} tokens/s", flush=True)
        if setting is None:
            return {
                "tps_20ms_no_ring": round(without, 2), "tps_20ms_ring": None, "ring_speedup_20ms": None,
                "ring_note": "the gateway has no ring setting yet (GatewaySettings has no boolean field named "
                "'ring' or '..._ring_...'; set RING_SETTING in benchmarks/throughput.py if it is named otherwise)",
            }  # fmt: skip
        with gateway(market, "20ms-ring", endpoints, clients=clients, ring=True) as (url, _):
            ring = asyncio.run(single_stream(url, market, requests, tokens))
        print(f"20 ms a link, with the ring ({setting}): {ring:.2f} tokens/s", flush=True)
    return {
        "tps_20ms_no_ring": round(without, 2), "tps_20ms_ring": round(ring, 2),
        "ring_speedup_20ms": round(ring / without, 3), "ring_note": f"switched by the gateway's {setting}",
    }  # fmt: skip


# -- the run --------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    levels = sorted(set(args.clients))
    model_dir = workdir / f"llama-{args.layers}x{args.hidden}"
    if not (model_dir / "config.json").exists():
        write_tiny_checkpoint(model_dir, arch="llama", layers=args.layers, hidden=args.hidden)
    load_model(model_dir)  # writes the manifest once, before several processes would race to
    print(f"model: llama, {args.layers} layers, hidden {args.hidden}, fp32; spans {spans(args.layers)}; "
          f"{torch.get_num_threads()} torch threads; {os.cpu_count()} cores", flush=True)  # fmt: skip
    compute = measure_compute(model_dir, args.layers, args.tokens, args.rounds)
    reference = min(compute["generate_step_ms"], compute["runtime_step_ms"])
    per_span = " + ".join(f"{compute[f'span_{i}_step_ms']:.2f}" for i in range(3))
    print(
        f"decode step, one process: generate() {compute['generate_step_ms']:.2f} ms, runtime "
        f"{compute['runtime_step_ms']:.2f} ms; the spans in memory: {per_span} = "
        f"{compute['spans_compute_ms_per_token']:.2f} ms a token",
        flush=True,
    )
    result: dict[str, Any] = {}
    with market(model_dir, args.layers, max(levels), workdir) as started:
        endpoints = [p.node.endpoint for p in started.providers]
        with gateway(started, "direct", endpoints, clients=max(levels)) as (url, pid):
            meter = CpuMeter(
                {
                    "gateway": pid,
                    "providers": [p.node.process.pid for p in started.providers],
                    "clients": os.getpid(),
                }
            )
            measured = asyncio.run(concurrency(url, started, levels, args.requests, args.tokens, meter))
        by_count = {level.clients: level for level in measured}
        for level in measured:
            n = level.clients
            result[f"aggregate_tps_{n}"] = round(level.aggregate_tps, 2)
            result[f"itl_p50_ms_{n}"] = round(level.itl_ms(50), 2)
            result[f"itl_p90_ms_{n}"] = round(level.itl_ms(90), 2)
            result[f"ttft_p50_ms_{n}"] = round(level.ttft_ms, 1)
            for name, cores in level.cores.items():
                result[f"cores_{name}_{n}"] = round(cores, 2)
        if args.skip_ring:
            ring = {"tps_20ms_no_ring": None, "tps_20ms_ring": None, "ring_speedup_20ms": None,
                    "ring_note": "skipped (--skip-ring)"}  # fmt: skip
        else:
            ring = ring_figures(started, args.ring_requests, args.tokens, max(levels))
    one, sixteen = by_count.get(1), by_count.get(16)
    headline = {
        "aggregate_ratio_16": round(sixteen.aggregate_tps / one.aggregate_tps, 3)
        if one and sixteen
        else None,
        "latency_ratio_16": round(sixteen.itl_ms(50) / one.itl_ms(50), 3) if one and sixteen else None,
        "compute_ratio": round(compute["spans_compute_ms_per_token"] / reference, 3),
        "ring_speedup_20ms": ring.pop("ring_speedup_20ms"),
    }
    return {
        **headline,
        **result,
        "single_stream_tps": round(one.decode_tps, 2) if one else None,
        "generate_step_ms": round(compute["generate_step_ms"], 2),
        "runtime_step_ms": round(compute["runtime_step_ms"], 2),
        "reference_step_ms": round(reference, 2),
        "spans_compute_ms_per_token": round(compute["spans_compute_ms_per_token"], 2),
        **ring,
        # What the levels ran with: the gateway's default for the ring (None while it has no such setting).
        "ring_in_levels": GatewaySettings.model_fields[setting].default
        if (setting := ring_setting())
        else None,
        "clients": levels,
        "tokens": args.tokens,
        "requests_per_client": args.requests,
        "layers": args.layers,
        "hidden": args.hidden,
        "torch_threads": torch.get_num_threads(),
    }


def client_counts(value: str) -> list[int]:
    counts = [int(part) for part in value.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a list of positive client counts")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--clients", type=client_counts, default=[1, 4, 16, 32], help="levels, e.g. 1,4,16,32"
    )
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--requests", type=int, default=2, help="requests each client streams per level")
    parser.add_argument("--ring-requests", type=int, default=2, help="requests at 20 ms, each way")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the in-process compute")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--skip-ring", action="store_true", help="leave out the 20 ms runs")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (model, logs, databases)"
    )
    args = parser.parse_args()
    if args.layers < 3:
        parser.error("--layers must be at least 3: one span for each of three providers")
    hf_logging.disable_progress_bar()
    workdir = Path(tempfile.mkdtemp(prefix="strata-throughput-"))
    try:
        result = run(args, workdir)
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
