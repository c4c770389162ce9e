"""Pipeline decode speed: three provider processes on loopback against the same model in one process.

Builds a Llama-style model of about 300M parameters (hidden 1024, 24 layers) locally, starts three providers
serving layers 0:8, 8:16 and 16:24, and generates the same 64 greedy tokens from the same prompt three ways,
taking turns so that machine noise falls on all alike:

- the pipeline: the three providers over TLS, each job opened, stepped and closed as the gateway runs one
  (per-hop tickets, authenticated reports, receipts collected directly); and the same over plain TCP, to
  say what TLS costs;
- the runtime in one process: the whole model as one span, stepped through the providers' own runtime, KV
  cache and sampler. This is the limit the pipeline can reach, and the reference of the headline ratio;
- ``generate()`` in one process: transformers' own loop over the same checkpoint. Its per-token overhead
  moves with every transformers release, so it is reported beside the ratio, not as its reference.

    ratio_tokens_per_s              pipeline tokens/s ÷ one-process runtime tokens/s (target ≥ 0.95)
    ratio_to_generate_tokens_per_s  pipeline tokens/s ÷ generate() tokens/s
    hop_overhead_ms_p50             per decode step, (step latency seen by the caller − Σ the providers'
                                    compute) ÷ the number of hops, median over steps (target ≤ 1.0), on TLS
    tls_cost_ms_per_hop             the same overhead on TLS minus on plain TCP
    report_signature_us_per_hop     signing one hop's report, and recovering its signer twice (the hop before,
                                    the gateway), in microseconds

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from marketplace.testing.hops import Served, checks, gateway_keys, launch, plan, running, write_deployment
from worker.client import Peers, RouteClient
from worker.messages import HopEntry, Report
from worker.runtime import SpanRuntime
from worker.sampling import Sampler, SamplingParams
from worker.shard import load_shard, model_root
from worker.testing.tiny import BOS, write_tiny_checkpoint

SPANS = ((0, 8), (8, 16), (16, 24))
PROMPT = [BOS, *b"The marketplace routes each request through the cheapest chain of providers. "]
# Three providers and the caller share this machine's cores. Idle OpenMP threads that spin-wait after a step
# steal the core the next provider computes on, so providers here let theirs sleep at once.
PROVIDER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def start_providers(model: Path, workdir: Path, deployment: Path, *, plaintext: bool) -> list[Served]:
    root = model_root(model)
    return [
        launch(
            model, span, seed=(100 if plaintext else 0) + index + 1, root=root, workdir=workdir,
            deployment=deployment, plaintext=plaintext, threads=torch.get_num_threads(),
            env={**os.environ, **PROVIDER_ENV},
        )
        for index, span in enumerate(SPANS)
    ]  # fmt: skip


def generate(model: torch.nn.Module, new_tokens: int) -> tuple[list[int], float]:
    prompt = torch.tensor([PROMPT])
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(  # type: ignore[operator]
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=258
        )
    return output[0, len(PROMPT) :].tolist(), time.perf_counter() - started


def one_process_runtime(runtime: SpanRuntime, new_tokens: int) -> tuple[list[int], float]:
    """The whole model as one span: what a provider's runtime does per token, with no hop in between."""
    session = os.urandom(16)
    sampler = Sampler(SamplingParams())  # greedy, as in the pipeline
    started = time.perf_counter()
    runtime.open(session)
    logits, _ = runtime.step(session, 0, torch.tensor([PROMPT]))
    tokens = [sampler.next_token(logits[:, -1, :])]
    while len(tokens) < new_tokens:
        logits, _ = runtime.step(session, len(tokens), torch.tensor([[tokens[-1]]]))
        tokens.append(sampler.next_token(logits[:, -1, :]))
    elapsed = time.perf_counter() - started
    runtime.close(session)
    return tokens, elapsed


async def pipeline(
    peers: Peers, route: list[Served], root: str, vocab: int, new_tokens: int
) -> tuple[list[int], float, list[float], list[float]]:
    """One job on the route as the gateway runs one (tickets, open, steps, direct closes). Returns the tokens,
    the elapsed seconds, and per decode step the per-hop overhead and the compute (ms)."""
    started = time.perf_counter()
    client = RouteClient(
        plan(route, root=root, max_positions=len(PROMPT) + new_tokens),
        peers,
        checks=checks(),
        vocab_size=vocab,
    )
    await client.open({})
    step = await client.step(0, torch.tensor([PROMPT]))
    tokens, overheads, computes = [step.token], [], []
    while len(tokens) < new_tokens:
        sent = time.perf_counter()
        step = await client.step(len(tokens), torch.tensor([[tokens[-1]]]))
        latency_ms = (time.perf_counter() - sent) * 1e3
        compute_ms = sum(ms or 0.0 for ms in step.compute_ms)
        overheads.append((latency_ms - compute_ms) / len(step.hops))
        computes.append(compute_ms)
        tokens.append(step.token)
    await client.close()
    return tokens, time.perf_counter() - started, overheads, computes


def report_cost_us() -> float:
    """What signing one hop's report costs: signed by the hop, its signer recovered by the hop before it and by
    the gateway (microseconds)."""
    keys, recover = gateway_keys(), checks().hop_report
    entry = HopEntry(keys.address, os.urandom(16), 7, os.urandom(32), os.urandom(32), 42, positions=1)
    rounds = 2_000
    started = time.perf_counter()
    for _ in range(rounds):
        report = Report.from_json(Report.signed(keys.hop_report, entry).to_json())
        assert report.signer(recover) == keys.address
        assert report.signer(recover) == keys.address
    return (time.perf_counter() - started) / rounds * 1e6


async def main_async(rounds: int, new_tokens: int, workdir: Path) -> dict[str, object]:
    model_dir = workdir / "llama-300m"
    if not (model_dir / "config.json").exists():
        write_tiny_checkpoint(model_dir, arch="llama", layers=24, hidden=1024)
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    parameters = sum(p.numel() for p in reference.parameters())
    runtime = SpanRuntime(load_shard(model_dir, "0:24", device=torch.device("cpu")))
    root, vocab = model_root(model_dir), int(reference.config.vocab_size)
    deployment = write_deployment(workdir / "deployment.json")
    tls_route = start_providers(model_dir, workdir, deployment, plaintext=False)
    plain_route = start_providers(model_dir, workdir, deployment, plaintext=True)
    runtime_times, generate_times, pipeline_times, plain_times = [], [], [], []
    overheads, plain_overheads, computes = [], [], []
    peers = Peers(gateway_keys(), allow_plaintext=True)
    try:
        with running([*tls_route, *plain_route]):
            # Warm-up: connections, the allocator, first-call paths everywhere.
            await pipeline(peers, tls_route, root, vocab, 4)
            await pipeline(peers, plain_route, root, vocab, 4)
            one_process_runtime(runtime, 4)
            generate(reference, 4)
            for _ in range(rounds):
                expected, seconds = generate(reference, new_tokens)
                generate_times.append(seconds)
                tokens, seconds = one_process_runtime(runtime, new_tokens)
                runtime_times.append(seconds)
                if tokens != expected:
                    raise RuntimeError("the one-process runtime's tokens differ from generate()'s")
                tokens, seconds, step_overheads, step_computes = await pipeline(
                    peers, tls_route, root, vocab, new_tokens
                )
                pipeline_times.append(seconds)
                overheads += step_overheads
                computes += step_computes
                if tokens != expected:
                    raise RuntimeError("the pipeline's tokens differ from generate()'s")
                tokens, seconds, step_overheads, _ = await pipeline(
                    peers, plain_route, root, vocab, new_tokens
                )
                plain_times.append(seconds)
                plain_overheads += step_overheads
    finally:
        await peers.close()
    runtime_tps = new_tokens / statistics.median(runtime_times)
    generate_tps = new_tokens / statistics.median(generate_times)
    pipeline_tps = new_tokens / statistics.median(pipeline_times)
    return {
        "parameters": parameters,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "runtime_tokens_per_s": round(runtime_tps, 2),
        "generate_tokens_per_s": round(generate_tps, 2),
        "pipeline_tokens_per_s": round(pipeline_tps, 2),
        "ratio_tokens_per_s": round(pipeline_tps / runtime_tps, 3),
        "ratio_to_generate_tokens_per_s": round(pipeline_tps / generate_tps, 3),
        "hop_overhead_ms_p50": round(statistics.median(overheads), 3),
        "plaintext_tokens_per_s": round(new_tokens / statistics.median(plain_times), 2),
        "plaintext_hop_overhead_ms_p50": round(statistics.median(plain_overheads), 3),
        # What TLS adds per hop (both runs authenticate every hop's report the same way), and what that costs.
        "tls_cost_ms_per_hop": round(statistics.median(overheads) - statistics.median(plain_overheads), 3),
        "report_signature_us_per_hop": round(report_cost_us(), 1),
        "hop_overhead_ms_p90": round(statistics.quantiles(overheads, n=10)[-1], 3),
        # Where a pipeline token's time goes: the providers' compute, summed over hops, against one process's
        # whole token through the same runtime, and through generate().
        "pipeline_compute_ms_per_token_p50": round(statistics.median(computes), 2),
        "runtime_ms_per_token": round(1e3 / runtime_tps, 2),
        "generate_ms_per_token": round(1e3 / generate_tps, 2),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the model here between runs")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(main_async(args.rounds, args.new_tokens, args.workdir))
    else:
        with tempfile.TemporaryDirectory() as workdir:
            result = asyncio.run(main_async(args.rounds, args.new_tokens, Path(workdir)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
