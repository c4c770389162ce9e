"""Validator detection and cost: every kind of cheat on every span, honest providers of dense and mixture-of-
experts models in fp32 and bf16 on two attention kernels, and an honest network under stress; each hop judged by
an fp32 validator exactly as the validation task judges a sampled one.

Builds Llama, Mixtral and Qwen2-MoE style models (hidden 256, 6 layers) locally and serves each as three spans,
0:2, 2:4 and 4:6, each provider a real SpanRuntime (KV cache, retention on disk, transcript hashes). A job is a
prompt of 4 to 48 tokens and 12 to 16 decode steps through one provider per span, greedy or sampled under a
seed (half each). Honest jobs draw each span's provider from fp32, bf16 and bf16 with eager attention (another
kernel than the validator's default), and every hop of every honest job is judged. Cheating jobs put one cheater
(worker.testing.cheats) on one span of the Llama, serving in fp32 or in bf16, between honest fp32 providers, and
its hop is judged. Token cheats (token-greedy, token-sampled) are honest last spans that commit to one token
other than the one their own logits give, at a random step. Noise is then swept over levels in bf16.

The stress run: a Llama-style model with a 32,000-token vocabulary and hidden size 1,024, three spans (the middle
one in bf16), 16 sessions of 1,000 decode steps interleaved on every provider, retained on disk; the middle
provider restarted after they end; the validator back 5 minutes later by the providers' clocks; then every hop
fetched through its provider's hop server over TLS with 50 ms added each way (a delay proxy), and judged. (A
validator without the model's weights at first is tested against real processes in tests/marketplace/gateway/
test_validation.py.)

    min_detection_rate       the lowest, over every (cheat, span, dtype), of cheating hops failed ÷ judged, the
                             cheats within bf16's own rounding (kv-int8, noise-0.2) in fp32 only (target ≥ 0.99)
    honest_false_positives   honest hops failed (target 0, over ≥ 1,000 hops, mixtures of experts included)
    stress_honest_hops, stress_false_slashes
                             the stress run's hops and those that would have been slashed (target 0)
    int8_margin_bf16, noise05_margin_bf16
                             the least hop mean ÷ its bound of the int8-weights and 0.5%-noise cheats in bf16
                             (targets ≥ 2.0 and ≥ 1.5)
    min_noise_detected_bf16  the smallest noise level (of each position's RMS) caught in ≥ 99% of bf16 hops
    validation_cost_ratio    median over honest fp32 hops of the validator's time (hash checks, one prefill
                             over every position, comparison) ÷ the provider's compute time for the same hop

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from eth_account import Account
from transformers.utils import logging as hf_logging

from marketplace.devnet.process import free_port
from marketplace.testing.hops import DOMAIN, VALIDATOR_ACCOUNT, checks
from marketplace.testing.latency import DelayProxy
from settlement.tickets import KeyRing
from settlement.validation import ReferenceSpan, judge_span
from worker.client import PeerLink, RetainedStep, fetch_retained
from worker.runtime import RuntimeLimits, SpanRuntime
from worker.sampling import Sampler, SamplingParams
from worker.server import HopServer
from worker.shard import Shard, load_shard
from worker.testing.cheats import CHEATS, WITHIN_BF16_ROUNDING, make_cheater
from worker.testing.tiny import write_tiny_checkpoint
from worker.tls import TlsIdentity
from worker.transcript import StepHashes
from worker.wire import FrameLimits

SPANS = ("0:2", "2:4", "4:6")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ARCHES = ("llama", "mixtral", "qwen2_moe")
CPU = torch.device("cpu")
GREEDY: dict[str, Any] = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0}
SAMPLED: dict[str, Any] = {"temperature": 0.8, "top_p": 0.95, "top_k": 50, "seed": 0}
NOISE_LEVELS = (0.002, 0.005, 0.01, 0.02)
PROVIDER = Account.from_key(b"\x01" * 32)


class Provider:
    def __init__(self, name: str, shard: Shard) -> None:
        self.name = name
        self.runtime = SpanRuntime(shard)
        self.compute_s: dict[bytes, float] = defaultdict(float)


@dataclass(frozen=True)
class Job:
    session: bytes
    sampling: dict[str, Any]
    tokens: list[int]


def run_job(
    route: list[Provider], prompt: list[int], decode_steps: int, session: bytes, sampling: dict[str, Any]
) -> list[int]:
    """The job's tokens, picked as the last provider's hop server picks them."""
    for provider in route:
        provider.runtime.open(session, job=session * 2)
    sampler = Sampler(SamplingParams.from_dict(sampling))
    inputs: torch.Tensor = torch.tensor([prompt], dtype=torch.int64)
    tokens = []
    for step in range(decode_steps + 1):
        x = inputs
        for provider in route:
            started = time.perf_counter()
            x, _ = provider.runtime.step(session, step, x)
            provider.compute_s[session] += time.perf_counter() - started
        tokens.append(sampler.next_token(x[:, -1, :]))
        inputs = torch.tensor([[tokens[-1]]], dtype=torch.int64)
    for provider in route:
        provider.runtime.close(session)
    return tokens


def transcript_of(steps: list[RetainedStep], tokens: list[int], last: bool) -> list[StepHashes]:
    return [
        StepHashes(
            s.step, s.input_hash, s.output_hash, token if last else None, positions=int(s.input.shape[1])
        )
        for s, token in zip(steps, tokens, strict=True)
    ]


def judge(
    reference: ReferenceSpan, provider: Provider, job: Job, *, tokens: list[int] | None = None
) -> tuple[bool, float, float]:
    """(passed, hop mean ÷ its bound, validator seconds) for the provider's hop of ``job``, its last span's
    transcript committing to ``tokens`` (default: the ones it emitted)."""
    records = provider.runtime.retained(job.session)
    started = time.perf_counter()
    steps = [RetainedStep(r.step, r.input, r.output, r.input_hash, r.output_hash) for r in records]
    last = provider.runtime.shard.span.last
    transcript = transcript_of(steps, job.tokens if tokens is None else tokens, last)
    verdict = judge_span(reference, steps, transcript, sampling=job.sampling)
    elapsed = time.perf_counter() - started
    metrics = verdict.metrics
    return verdict.passed, metrics.get("meanRelErr", float("inf")) / metrics.get("meanBound", 1.0), elapsed


class Bench:
    def __init__(self, root: Path, rng: random.Random) -> None:
        self.rng = rng
        self.models = {
            arch: write_tiny_checkpoint(root / arch, arch=arch, layers=6, hidden=256, seed=7)
            for arch in ARCHES
        }
        self.references = {
            (arch, span): ReferenceSpan(
                lambda dtype, model=model, span=span: load_shard(model, span, device=CPU, dtype=dtype)
            )
            for arch, model in self.models.items()
            for span in SPANS
        }

    def provider(self, arch: str, span: str, kind: str) -> Provider:
        """An honest provider: fp32, bf16, or bf16 on eager attention (another kernel than the validator's)."""
        shard = load_shard(
            self.models[arch], span, device=CPU, dtype=torch.float32 if kind == "fp32" else torch.bfloat16
        )
        if kind == "bf16-eager":
            shard.model.set_attn_implementation("eager")
        return Provider(f"{arch} {kind} {span}", shard)

    def job(self, route: list[Provider], sampling: dict[str, Any] | None = None) -> Job:
        rng = self.rng
        session = rng.randbytes(16)
        prompt = [rng.randrange(256) for _ in range(rng.randint(4, 48))]
        if sampling is None:  # half greedy, half sampled under a seed, as the gateway fixes one
            sampling = rng.choice((GREEDY, {**SAMPLED, "seed": rng.randrange(1 << 62)}))
        tokens = run_job(route, prompt, rng.randint(12, 16), session, sampling)
        return Job(session, sampling, tokens)


def honest(bench: Bench, jobs: dict[str, int]) -> dict[str, Any]:
    kinds = ("fp32", "bf16", "bf16-eager")
    failed, hops, cost_ratios = 0, 0, []
    worst: dict[str, float] = defaultdict(float)
    for arch, count in jobs.items():
        providers = {(span, kind): bench.provider(arch, span, kind) for span in SPANS for kind in kinds}
        for _ in range(count):
            route = [providers[(span, bench.rng.choice(kinds))] for span in SPANS]
            done = bench.job(route)
            for span, provider in zip(SPANS, route, strict=True):
                passed, ratio, seconds = judge(bench.references[(arch, span)], provider, done)
                hops += 1
                failed += not passed
                kind = provider.name.split()[1]
                worst[f"{arch} {kind}"] = max(worst[f"{arch} {kind}"], ratio)
                if kind == "fp32" and arch == "llama":
                    cost_ratios.append(seconds / provider.compute_s[done.session])
    return {"failed": failed, "hops": hops, "worst": dict(worst), "cost": statistics.median(cost_ratios)}


def cheats(
    bench: Bench, jobs: int
) -> tuple[dict[tuple[str, str, str], float], dict[tuple[str, str], float], int]:
    """Detection per (cheat, span, dtype) on the Llama, and each (cheat, dtype)'s least hop mean ÷ bound."""
    detection: dict[tuple[str, str, str], float] = {}
    least: dict[tuple[str, str], float] = defaultdict(lambda: float("inf"))
    judged = 0
    fp32 = {span: bench.provider("llama", span, "fp32") for span in SPANS}
    for kind in CHEATS:
        for position, span in enumerate(SPANS):
            if kind == "copy-input" and position != 1:
                continue  # the first span takes token ids and the last gives logits: nothing to copy
            for dtype in DTYPES:
                shard = load_shard(bench.models["llama"], span, device=CPU, dtype=DTYPES[dtype])
                cheater = Provider(
                    f"{kind} {dtype} {span}", make_cheater(shard, kind, seed=bench.rng.randrange(1 << 30))
                )
                route = [fp32[s] for s in SPANS]
                route[position] = cheater
                caught = 0
                for _ in range(jobs):
                    passed, ratio, _ = judge(bench.references[("llama", span)], cheater, bench.job(route))
                    caught += not passed
                    least[(kind, dtype)] = min(least[(kind, dtype)], ratio)
                judged += jobs
                detection[(kind, span, dtype)] = caught / jobs

    # Token cheats: honest logits on the last span, one emitted token (at a random step) not the one they
    # give, greedy or under the committed seed.
    last = SPANS[-1]
    for kind, sampling in (("token-greedy", GREEDY), ("token-sampled", SAMPLED)):
        for dtype in DTYPES:
            route = [fp32[s] for s in SPANS[:-1]] + [bench.provider("llama", last, dtype)]
            caught = 0
            for _ in range(jobs):
                done = bench.job(route, {**sampling, "seed": bench.rng.randrange(1 << 62)})
                cheated = list(done.tokens)
                at = bench.rng.randrange(len(cheated))
                cheated[at] = (cheated[at] + bench.rng.randrange(1, 256)) % 256
                passed, _, _ = judge(bench.references[("llama", last)], route[-1], done, tokens=cheated)
                caught += not passed
            judged += jobs
            detection[(kind, last, dtype)] = caught / jobs
    return detection, dict(least), judged


def noise_sweep(bench: Bench, jobs: int) -> dict[float, float]:
    """The share of bf16 hops caught with noise at each level, on the middle span."""
    caught: dict[float, float] = {}
    span = SPANS[1]
    fp32 = {s: bench.provider("llama", s, "fp32") for s in SPANS}
    for level in NOISE_LEVELS:
        shard = load_shard(bench.models["llama"], span, device=CPU, dtype=torch.bfloat16)
        cheater = make_cheater(shard, "noise", seed=bench.rng.randrange(1 << 30), noise=level)
        provider = Provider(f"noise {level} {span}", cheater)
        route = [fp32[SPANS[0]], provider, fp32[SPANS[2]]]
        failed = sum(
            not judge(bench.references[("llama", span)], provider, bench.job(route))[0] for _ in range(jobs)
        )
        caught[level] = failed / jobs
    return caught


# -- stress ---------------------------------------------------------------------------------------------------


class Clock:
    """The providers' wall clock, which the stress run moves forward to stand for time passing."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def stress(root: Path, rng: random.Random, sessions: int, decode_steps: int) -> dict[str, Any]:
    model = write_tiny_checkpoint(root / "stress", arch="llama", layers=3, hidden=1024, vocab=32_000, seed=5)
    spans = ("0:1", "1:2", "2:3")
    dtypes = (torch.float32, torch.bfloat16, torch.float32)
    clock = Clock()
    limits = RuntimeLimits(
        max_session_tokens=decode_steps + 64, max_cached_tokens=sessions * (decode_steps + 64)
    )

    def runtime(index: int) -> SpanRuntime:
        shard = load_shard(model, spans[index], device=CPU, dtype=dtypes[index])
        return SpanRuntime(shard, limits, clock, retained=root / f"retained-{index}")

    runtimes = [runtime(i) for i in range(3)]
    ids = [rng.randbytes(16) for _ in range(sessions)]
    job = b"j" * 32
    samplers = [Sampler(SamplingParams.from_dict(GREEDY)) for _ in ids]
    tokens: list[list[int]] = [[] for _ in ids]
    started = time.perf_counter()
    for session in ids:
        for r in runtimes:
            r.open(session, job)
    for step in range(decode_steps + 1):  # every session's step, then the next: all of them open at once
        for index, session in enumerate(ids):
            x = torch.tensor(
                [[rng.randrange(256) for _ in range(16)]] if step == 0 else [[tokens[index][-1]]]
            )
            for r in runtimes:
                x, _ = r.step(session, step, x)
            tokens[index].append(samplers[index].next_token(x[:, -1, :]))
    for session in ids:
        for r in runtimes:
            r.close(session)
    served_s = time.perf_counter() - started
    retained_bytes = sum(r.store.used_bytes for r in runtimes)

    del runtimes[1]  # the middle provider restarts: its steps are read back from disk
    runtimes.insert(1, runtime(1))
    clock.offset += 300  # the validator comes back five minutes later
    references = {
        span: ReferenceSpan(lambda dtype, span=span: load_shard(model, span, device=CPU, dtype=dtype))
        for span in spans
    }

    async def fetch_all() -> list[tuple[int, bytes, list[RetainedStep]]]:
        validator = KeyRing(VALIDATOR_ACCOUNT, DOMAIN)
        fetched = []
        for index, r in enumerate(runtimes):
            server = HopServer(
                r, keys=KeyRing(PROVIDER, DOMAIN), checks=checks(), gateways=set(),
                validators={VALIDATOR_ACCOUNT.address}, tls=TlsIdentity.load_or_create(root / f"tls-{index}"),
            )  # fmt: skip
            port = free_port()
            await server.start("127.0.0.1", port)
            try:
                with DelayProxy(f"127.0.0.1:{port}", 0.05) as slow:
                    link = PeerLink(
                        slow.endpoint, server.fingerprint, validator, tls=True, request_timeout_s=120
                    )
                    try:
                        for session in ids:
                            ticket = validator.fetch_ticket(
                                job_id=job,
                                session=session,
                                provider=PROVIDER.address,
                                expires_at=int(time.time()) + 600,
                            )
                            limits = FrameLimits(max_payload_bytes=1 << 31, max_elements=1 << 29)
                            steps = await fetch_retained(
                                link, ticket, max_steps=decode_steps + 1, limits=limits
                            )
                            fetched.append((index, session, steps))
                    finally:
                        await link.close()
            finally:
                await server.close()
        return fetched

    started = time.perf_counter()
    fetched = asyncio.run(fetch_all())
    fetch_s = time.perf_counter() - started
    slashed = 0
    worst = 0.0
    by_session = dict(zip(ids, tokens, strict=True))
    for index, session, steps in fetched:
        verdict = judge_span(
            references[spans[index]],
            steps,
            transcript_of(steps, by_session[session], index == 2),
            sampling=GREEDY,
        )
        slashed += not verdict.passed
        worst = max(worst, verdict.metrics.get("meanRelErr", 0.0) / verdict.metrics.get("meanBound", 1.0))
    return {
        "hops": len(fetched),
        "false_slashes": slashed + (len(ids) * len(spans) - len(fetched)),
        "served_s": served_s,
        "fetch_s": fetch_s,
        "retained_gib": retained_bytes / 2**30,
        "worst": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--honest-jobs", type=int, default=240, help="Llama jobs, 3 judged hops each")
    parser.add_argument("--moe-jobs", type=int, default=60, help="per mixture-of-experts model, 3 hops each")
    parser.add_argument("--cheat-jobs", type=int, default=25, help="per cheat, span and dtype")
    parser.add_argument("--noise-jobs", type=int, default=100, help="per noise level")
    parser.add_argument("--stress-sessions", type=int, default=16)
    parser.add_argument("--stress-steps", type=int, default=1000, help="decode steps per stress session")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The machines are small; one thread keeps provider and validator timings comparable.
    torch.set_num_threads(1)
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp), rng)
        honest_run = honest(
            bench, {"llama": args.honest_jobs, "mixtral": args.moe_jobs, "qwen2_moe": args.moe_jobs}
        )
        detection, least, cheat_hops = cheats(bench, args.cheat_jobs)
        swept = noise_sweep(bench, args.noise_jobs)
        stressed = stress(Path(tmp), rng, args.stress_sessions, args.stress_steps)

    print("detection rate per span; the least hop mean ÷ its bound (1 = at the bound)")
    print(f"{'cheat':<14} {'dtype':<5} " + " ".join(f"{span:>6}" for span in SPANS) + "   least mean ÷ bound")
    for kind in (*CHEATS, "token-greedy", "token-sampled"):
        for dtype in DTYPES:
            rates = [detection.get((kind, span, dtype)) for span in SPANS]
            cells = " ".join("     -" if rate is None else f"{rate:6.2f}" for rate in rates)
            low = least.get((kind, dtype))
            print(f"{kind:<14} {dtype:<5} {cells}   {'-' if low is None else f'{low:.3g}'}")
    print(
        f"honest: {honest_run['failed']} of {honest_run['hops']} hops failed; largest hop mean ÷ bound "
        + ", ".join(f"{name} {value:.3g}" for name, value in sorted(honest_run["worst"].items()))
    )
    print(
        "noise in bf16, share caught: "
        + ", ".join(f"{level:.1%} {rate:.2f}" for level, rate in swept.items())
    )
    print(
        f"stress: {stressed['hops']} hops of {args.stress_sessions} sessions × {args.stress_steps} steps served in "
        f"{stressed['served_s']:.0f} s ({stressed['retained_gib']:.2f} GiB retained), fetched over 50 ms in "
        f"{stressed['fetch_s']:.0f} s; largest hop mean ÷ bound "
        f"{stressed['worst']:.3g}"
    )
    print(
        f"cheating hops judged: {cheat_hops}; validator ÷ provider compute, fp32 hops: median {honest_run['cost']:.3f}"
    )
    counted = {
        key: rate
        for key, rate in detection.items()
        if not (key[0] in WITHIN_BF16_ROUNDING and key[2] == "bf16")
    }
    caught_levels = [level for level, rate in swept.items() if rate >= 0.99]
    print(
        json.dumps(
            {
                "min_detection_rate": round(min(counted.values()), 4),
                "honest_false_positives": honest_run["failed"],
                "honest_hops": honest_run["hops"],
                "stress_honest_hops": stressed["hops"],
                "stress_false_slashes": stressed["false_slashes"],
                "int8_margin_bf16": float(f"{least[('int8', 'bf16')]:.3g}"),
                "noise05_margin_bf16": float(f"{least[('noise-0.5', 'bf16')]:.3g}"),
                "min_noise_detected_bf16": min(caught_levels) if caught_levels else None,
                "validation_cost_ratio": round(honest_run["cost"], 3),
                "cheat_hops": cheat_hops,
            }
        )
    )


if __name__ == "__main__":
    main()
