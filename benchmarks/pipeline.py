"""Pipeline decode speed: three provider processes on loopback against the same model in one process.

Builds a Llama-style model of about 300M parameters (hidden 1024, 24 layers) locally, starts three providers
serving layers 0:8, 8:16 and 16:24, and generates the same 64 greedy tokens from the same prompt three ways,
taking turns so that machine noise falls on all alike:

- the pipeline: the three providers, stepped by a route client as the gateway steps them;
- the runtime in one process: the whole model as one span, stepped through the providers' own runtime, KV
  cache and sampler. This is the limit the pipeline can reach, and the reference of the headline ratio;
- ``generate()`` in one process: transformers' own loop over the same checkpoint. Its per-token overhead
  moves with every transformers release, so it is reported beside the ratio, not as its reference.

    ratio_tokens_per_s              pipeline tokens/s ÷ one-process runtime tokens/s (target ≥ 0.95)
    ratio_to_generate_tokens_per_s  pipeline tokens/s ÷ generate() tokens/s
    hop_overhead_ms_p50             per decode step, (step latency seen by the caller − Σ the providers'
                                    compute) ÷ the number of hops, median over steps (target ≤ 1.0)

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
from eth_account import Account
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from marketplace.devnet.process import free_port
from marketplace.devnet.providers import ProviderLaunch, ProviderProcess
from settlement.tickets import issue_ticket
from worker.client import ConnectionPool, RouteClient
from worker.identity import MANIFEST_FILE, Manifest
from worker.runtime import SpanRuntime
from worker.sampling import Sampler, SamplingParams
from worker.shard import load_shard
from worker.testing.tiny import BOS, write_tiny_checkpoint
from worker.wire import FrameLimits

GATEWAY = Account.from_key(b"\x42" * 32)
SPANS = ("0:8", "8:16", "16:24")
PROMPT = [BOS, *b"The marketplace routes each request through the cheapest chain of providers. "]
# Three providers and the caller share this machine's cores. Idle OpenMP threads that spin-wait after a step
# steal the core the next provider computes on, so providers here let theirs sleep at once.
PROVIDER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def start_providers(model: Path, logs: Path) -> list[ProviderProcess]:
    launches = [ProviderLaunch(model, span, free_port(), trust_gateway=GATEWAY.address) for span in SPANS]
    providers = [
        ProviderProcess.start(
            launch,
            key=(index + 1).to_bytes(32, "big").hex(),
            log=logs / f"provider-{index}.log",
            env={**os.environ, **PROVIDER_ENV},
            threads=torch.get_num_threads(),
        )
        for index, launch in enumerate(launches)
    ]
    for provider in providers:
        provider.wait_ready()
    return providers


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


async def pipeline(client: RouteClient, new_tokens: int) -> tuple[list[int], float, list[float], list[float]]:
    """Returns the tokens, the elapsed seconds, and per decode step the per-hop overhead and the compute (ms)."""
    session = os.urandom(16)
    started = time.perf_counter()
    step = await client.step(session, 0, torch.tensor([PROMPT]), {})
    tokens, overheads, computes = [step.token], [], []
    while len(tokens) < new_tokens:
        sent = time.perf_counter()
        step = await client.step(session, len(tokens), torch.tensor([[tokens[-1]]]))
        latency_ms = (time.perf_counter() - sent) * 1e3
        compute_ms = sum(hop["compute_ms"] for hop in step.transcript)
        overheads.append((latency_ms - compute_ms) / len(step.transcript))
        computes.append(compute_ms)
        tokens.append(step.token)
    elapsed = time.perf_counter() - started
    await client.close(session)
    return tokens, elapsed, overheads, computes


async def main_async(rounds: int, new_tokens: int, workdir: Path) -> dict[str, object]:
    model_dir = workdir / "llama-300m"
    if not (model_dir / "config.json").exists():
        write_tiny_checkpoint(model_dir, arch="llama", layers=24, hidden=1024)
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    parameters = sum(p.numel() for p in reference.parameters())
    runtime = SpanRuntime(load_shard(model_dir, "0:24", device=torch.device("cpu")))
    providers = start_providers(model_dir, workdir)
    endpoints = [provider.endpoint for provider in providers]
    root = bytes.fromhex(Manifest.load(model_dir / MANIFEST_FILE).root[2:])
    pool = ConnectionPool(FrameLimits())
    client = RouteClient(
        endpoints,
        issue_ticket(
            GATEWAY,
            job_id=os.urandom(32),
            model_root=root,
            expires_at=int(time.time()) + 3600,
            chain_id=31337,
        ),
        pool,
    )
    runtime_times, generate_times, pipeline_times, overheads, computes = [], [], [], [], []
    try:
        # Warm-up: connections, the allocator, first-call paths everywhere.
        await pipeline(client, 4)
        one_process_runtime(runtime, 4)
        generate(reference, 4)
        for _ in range(rounds):
            expected, seconds = generate(reference, new_tokens)
            generate_times.append(seconds)
            tokens, seconds = one_process_runtime(runtime, new_tokens)
            runtime_times.append(seconds)
            if tokens != expected:
                raise RuntimeError("the one-process runtime's tokens differ from generate()'s")
            tokens, seconds, step_overheads, step_computes = await pipeline(client, new_tokens)
            pipeline_times.append(seconds)
            overheads += step_overheads
            computes += step_computes
            if tokens != expected:
                raise RuntimeError("the pipeline's tokens differ from generate()'s")
    finally:
        await pool.close()
        for provider in providers:
            provider.stop()
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
