"""Validator detection and cost: every kind of cheat on every span, and honest fp32 and bf16 providers, each hop
judged by an fp32 validator exactly as the validation task judges a sampled one.

Builds a Llama-style model (hidden 256, 6 layers) locally and serves it as three spans, 0:2, 2:4 and 4:6, each
provider a real SpanRuntime (KV cache, retention, transcript hashes). A job is a prompt of 4 to 48 tokens and 8
to 16 decode steps through one provider per span, greedy or sampled under a seed (half each). Honest jobs draw
each span's provider from fp32 and bf16 ones, and every hop of every honest job is judged. Cheating jobs put one
cheater (worker.testing.cheats) on one span, serving in fp32 or in bf16, between honest fp32 providers, and its
hop is judged. Token cheats (token-greedy, token-sampled) are honest last spans that commit to one token other
than the one their own logits give, at a random step.

    min_detection_rate       the lowest, over every (cheat, span, dtype), of cheating hops failed ÷ judged
                             (target ≥ 0.99)
    honest_false_positives   honest hops failed (target 0, over ≥ 1,000 hops)
    validation_cost_ratio    median over honest fp32 hops of the validator's time (hash checks, one prefill
                             over every position, comparison) ÷ the provider's compute time for the same hop

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
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
from transformers.utils import logging as hf_logging

from settlement.validation import ReferenceSpan, judge_span
from worker.client import RetainedStep
from worker.runtime import SpanRuntime
from worker.sampling import Sampler, SamplingParams
from worker.shard import Shard, load_shard
from worker.testing.cheats import CHEATS, make_cheater
from worker.testing.tiny import write_tiny_checkpoint
from worker.transcript import StepHashes

SPANS = ("0:2", "2:4", "4:6")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU = torch.device("cpu")
GREEDY: dict[str, Any] = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0}
SAMPLED: dict[str, Any] = {"temperature": 0.8, "top_p": 0.95, "top_k": 50, "seed": 0}


class Provider:
    def __init__(self, name: str, shard: Shard) -> None:
        self.name = name
        self.runtime = SpanRuntime(shard)
        self.compute_s: dict[bytes, float] = defaultdict(float)


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


def judge(
    reference: ReferenceSpan, provider: Provider, job: Job, *, tokens: list[int] | None = None
) -> tuple[bool, float, float]:
    """(passed, mean relative error ÷ its bound, validator seconds) for the provider's hop of ``job``, its last
    span's transcript committing to ``tokens`` (default: the ones it emitted)."""
    records = provider.runtime.retained(job.session)
    started = time.perf_counter()
    steps = [RetainedStep(r.step, r.input, r.output, r.input_hash, r.output_hash) for r in records]
    last = provider.runtime.shard.span.last
    committed = job.tokens if tokens is None else tokens
    transcript = [
        StepHashes(r.step, r.input_hash, r.output_hash, token if last else None)
        for r, token in zip(records, committed, strict=True)
    ]
    verdict = judge_span(reference, steps, transcript, sampling=job.sampling)
    elapsed = time.perf_counter() - started
    metrics = verdict.metrics
    return verdict.passed, metrics.get("meanRelErr", float("inf")) / metrics.get("meanBound", 1.0), elapsed


@dataclass(frozen=True)
class Job:
    session: bytes
    sampling: dict[str, Any]
    tokens: list[int]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--honest-jobs", type=int, default=340, help="3 judged hops each")
    parser.add_argument("--cheat-jobs", type=int, default=25, help="per cheat, span and dtype")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(
        1
    )  # the machines are small; one thread keeps provider and validator timings comparable
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_checkpoint(Path(tmp) / "model", layers=6, hidden=256, seed=args.seed)
        reference = {
            span: ReferenceSpan(lambda dtype, span=span: load_shard(model, span, device=CPU, dtype=dtype))
            for span in SPANS
        }
        honest = {
            (span, dtype): Provider(
                f"honest {dtype} {span}", load_shard(model, span, device=CPU, dtype=DTYPES[dtype])
            )
            for span in SPANS
            for dtype in DTYPES
        }
        # Honest bf16 on other kernels, as another machine would run it: eager attention instead of SDPA. The
        # validator's own bf16 run uses SDPA, so these hops' rounding differs from what it measures.
        for span in SPANS:
            shard = load_shard(model, span, device=CPU, dtype=torch.bfloat16)
            shard.model.set_attn_implementation("eager")
            honest[(span, "bf16-eager")] = Provider(f"honest bf16-eager {span}", shard)

        def job(route: list[Provider], sampling: dict[str, Any] | None = None) -> Job:
            session = rng.randbytes(16)
            prompt = [rng.randrange(256) for _ in range(rng.randint(4, 48))]
            if sampling is None:  # half greedy, half sampled under a seed, as the gateway fixes one
                sampling = rng.choice((GREEDY, {**SAMPLED, "seed": rng.randrange(1 << 62)}))
            tokens = run_job(route, prompt, rng.randint(8, 16), session, sampling)
            return Job(session, sampling, tokens)

        honest_failed = 0
        honest_hops = 0
        cost_ratios: list[float] = []
        worst_honest: dict[str, float] = defaultdict(float)
        for _ in range(args.honest_jobs):
            route = [honest[(span, rng.choice(("fp32", "bf16", "bf16-eager")))] for span in SPANS]
            done = job(route)
            for span, provider in zip(SPANS, route, strict=True):
                passed, mean_error, seconds = judge(reference[span], provider, done)
                honest_hops += 1
                honest_failed += not passed
                dtype = provider.name.split()[1]
                worst_honest[dtype] = max(worst_honest[dtype], mean_error)
                if dtype == "fp32":
                    cost_ratios.append(seconds / provider.compute_s[done.session])

        detection: dict[tuple[str, str, str], float] = {}
        least_cheat: dict[tuple[str, str], float] = defaultdict(lambda: float("inf"))
        cheat_hops = 0
        for kind in CHEATS:
            for position, span in enumerate(SPANS):
                if kind == "copy-input" and position != 1:
                    continue  # the first span takes token ids and the last gives logits: nothing to copy
                for dtype in DTYPES:
                    shard = load_shard(model, span, device=CPU, dtype=DTYPES[dtype])
                    cheater = Provider(
                        f"{kind} {dtype} {span}", make_cheater(shard, kind, seed=rng.randrange(1 << 30))
                    )
                    route = [honest[(s, "fp32")] for s in SPANS]
                    route[position] = cheater
                    caught = 0
                    for _ in range(args.cheat_jobs):
                        passed, mean_error, _ = judge(reference[span], cheater, job(route))
                        caught += not passed
                        least_cheat[(kind, dtype)] = min(least_cheat[(kind, dtype)], mean_error)
                    cheat_hops += args.cheat_jobs
                    detection[(kind, span, dtype)] = caught / args.cheat_jobs

        # Token cheats: honest logits on the last span, one emitted token (at a random step) not the one they
        # give, greedy or under the committed seed.
        last = SPANS[-1]
        for kind, sampling in (("token-greedy", GREEDY), ("token-sampled", SAMPLED)):
            for dtype in DTYPES:
                route = [honest[(s, "fp32")] for s in SPANS[:-1]] + [honest[(last, dtype)]]
                caught = 0
                for _ in range(args.cheat_jobs):
                    done = job(route, {**sampling, "seed": rng.randrange(1 << 62)})
                    cheated = list(done.tokens)
                    at = rng.randrange(len(cheated))
                    cheated[at] = (cheated[at] + rng.randrange(1, 256)) % 256
                    passed, _, _ = judge(reference[last], route[-1], done, tokens=cheated)
                    caught += not passed
                cheat_hops += args.cheat_jobs
                detection[(kind, last, dtype)] = caught / args.cheat_jobs

    print("detection rate per span; the least mean relative error ÷ its bound (1 = at the bound)")
    print(
        f"{'cheat':<14} {'dtype':<5} " + " ".join(f"{span:>6}" for span in SPANS) + "   least error ÷ bound"
    )
    for kind in (*CHEATS, "token-greedy", "token-sampled"):
        for dtype in DTYPES:
            rates = [detection.get((kind, span, dtype)) for span in SPANS]
            cells = " ".join("     -" if rate is None else f"{rate:6.2f}" for rate in rates)
            least = least_cheat.get((kind, dtype))
            print(f"{kind:<14} {dtype:<5} {cells}   {'-' if least is None else f'{least:.3g}'}")
    print(
        f"honest: {honest_failed} of {honest_hops} hops failed; largest mean relative error ÷ bound "
        + ", ".join(f"{dtype} {value:.3g}" for dtype, value in sorted(worst_honest.items()))
    )
    print(
        f"cheating hops judged: {cheat_hops}; validator ÷ provider compute, fp32 hops: "
        f"median {statistics.median(cost_ratios):.3f}"
    )
    print(
        json.dumps(
            {
                "min_detection_rate": round(min(detection.values()), 4),
                "honest_false_positives": honest_failed,
                "honest_hops": honest_hops,
                "validation_cost_ratio": round(statistics.median(cost_ratios), 3),
                "cheat_hops": cheat_hops,
                "honest_largest_error_to_bound": {
                    k: float(f"{v:.3g}") for k, v in sorted(worst_honest.items())
                },
                "int8_least_error_to_bound": {
                    dtype: float(f"{least_cheat[('int8', dtype)]:.3g}") for dtype in DTYPES
                },
            }
        )
    )


if __name__ == "__main__":
    main()
