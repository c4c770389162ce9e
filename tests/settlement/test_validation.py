"""Judging a hop: honest providers pass in fp32 and bf16, every kind of cheat fails on every span it applies to,
tensors that are not the ones the transcript signs fail before anything is re-executed, and so does a last span
that emitted a token other than the one its own logits and committed sampling give."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.utils import logging as hf_logging

from settlement.errors import CannotJudge
from settlement.validation import (
    BAD_TENSORS,
    EXCESS_ERROR,
    OUTPUT_MISMATCH,
    TOKEN_MISMATCH,
    TRANSCRIPT_MISMATCH,
    WRONG_TOKEN,
    ReferenceSpan,
    Verdict,
    judge_span,
)
from worker.client import RetainedStep
from worker.grammar import json_grammar
from worker.runtime import PendingStep, RuntimeLimits, SpanRuntime
from worker.sampling import Sampler, SamplingParams, session_sampling
from worker.shard import Shard, load_shard
from worker.testing.cheats import CHEATS, WITHIN_BF16_ROUNDING, make_cheater
from worker.testing.tiny import write_tiny_checkpoint
from worker.transcript import StepHashes
from worker.wire import payload_sha256

SPANS = ("0:2", "2:4", "4:6")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hf_logging.disable_progress_bar()
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("validation") / "tiny", layers=6, hidden=128, seed=11
    )


@pytest.fixture(scope="module")
def references(model: Path) -> dict[str, ReferenceSpan]:
    return {
        span: ReferenceSpan(lambda dtype, span=span: load_shard(model, span, device=CPU, dtype=dtype))
        for span in SPANS
    }


def serve(
    shards: list[Shard], prompt: list[int], decode_steps: int, sampling: dict[str, Any] | None = None
) -> tuple[list[SpanRuntime], list[int]]:
    """One job through one runtime per span, the last span's tokens picked as a hop server picks them; returns
    the runtimes holding its retained steps, and the tokens."""
    runtimes = [SpanRuntime(shard) for shard in shards]
    params = SamplingParams.from_dict(session_sampling(sampling or {}, prompt, []))
    sampler = Sampler(params, shards[-1].vocabulary() if params.grammar is not None else None)
    session = b"s" * 16
    for runtime in runtimes:
        runtime.open(session, b"j" * 32)
    inputs, tokens = torch.tensor([prompt]), []
    for step in range(decode_steps + 1):
        x = inputs
        for runtime in runtimes:
            x, _ = runtime.step(session, step, x)
        tokens.append(sampler.next_token(x[:, -1, :]))
        inputs = torch.tensor([[tokens[-1]]])
    for runtime in runtimes:
        runtime.close(session)
    return runtimes, tokens


def judged(
    reference: ReferenceSpan,
    runtime: SpanRuntime,
    tokens: list[int],
    *,
    tamper: bool = False,
    sampling: dict[str, Any] | None = None,
    session: bytes = b"s" * 16,
) -> Verdict:
    records = runtime.retained(session)
    steps = [RetainedStep(r.step, r.input, r.output, r.input_hash, r.output_hash) for r in records]
    last = runtime.shard.span.last
    transcript = [
        StepHashes(
            r.step, r.input_hash, r.output_hash, token if last else None, positions=int(r.input.shape[1])
        )
        for r, token in zip(records, tokens, strict=True)
    ]
    if tamper:
        changed = steps[1].output.clone()
        changed.view(-1)[0] += 1
        steps[1] = RetainedStep(1, steps[1].input, changed, steps[1].input_hash, steps[1].output_hash)
    return judge_span(reference, steps, transcript, sampling=sampling)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_honest_providers_pass(model: Path, references: dict[str, ReferenceSpan], dtype: torch.dtype) -> None:
    shards = [load_shard(model, span, device=CPU, dtype=dtype) for span in SPANS]
    for trial in range(3):
        prompt = list(os.urandom(5 + 9 * trial))
        runtimes, tokens = serve(shards, prompt, decode_steps=6)
        for span, runtime in zip(SPANS, runtimes, strict=True):
            verdict = judged(references[span], runtime, tokens)
            assert verdict.passed, (span, verdict.detail, verdict.metrics.get("meanRelErr"))
            assert verdict.metrics["dtype"] == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_honest_providers_pass_whoever_shared_their_batches(
    tmp_path: Path, arch: str, dtype: torch.dtype
) -> None:
    """Six jobs' steps packed into shared forward passes (prefills chunked beside decodes) on every span: each
    job's every hop passes the validator's unbatched re-execution."""
    checkpoint = write_tiny_checkpoint(tmp_path / arch, arch=arch, layers=6, hidden=128, seed=5)
    shards = [load_shard(checkpoint, span, device=CPU, dtype=dtype) for span in SPANS]
    references = {
        span: ReferenceSpan(lambda dtype, span=span: load_shard(checkpoint, span, device=CPU, dtype=dtype))
        for span in SPANS
    }
    runtimes = [SpanRuntime(shard, RuntimeLimits(max_batch_positions=24)) for shard in shards]
    jobs = [bytes([65 + i]) * 16 for i in range(6)]
    for runtime in runtimes:
        for job in jobs:
            runtime.open(job, b"j" * 32)
    inputs = {
        job: torch.tensor([[random.Random(i).randrange(256) for _ in range(3 + 7 * i)]])
        for i, job in enumerate(jobs)
    }
    tokens: dict[bytes, list[int]] = {job: [] for job in jobs}
    for step in range(8):
        x = dict(inputs)
        for runtime in runtimes:
            pending = [PendingStep(job, step, x[job]) for job in jobs]
            while not all(item.done for item in pending):
                runtime.run_batch(pending)
            for item in pending:
                assert item.result is not None, item.error
                x[item.session] = item.result[0]
        for job in jobs:
            tokens[job].append(int(x[job][0, -1].argmax()))
            inputs[job] = torch.tensor([[tokens[job][-1]]])
    for job in jobs:
        for span, runtime in zip(SPANS, runtimes, strict=True):
            verdict = judged(references[span], runtime, tokens[job], session=job)
            assert verdict.passed, (span, verdict.reason, verdict.detail)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_honest_mixtures_of_experts_pass_with_either_attention_kernel(
    tmp_path: Path, arch: str, dtype: torch.dtype
) -> None:
    """Below fp32 a router's choice flips at single positions, differently in each kernel's run; honest hops
    pass all the same, whichever kernel the provider ran."""
    checkpoint = write_tiny_checkpoint(tmp_path / arch, arch=arch, layers=6, hidden=256, seed=7)
    references = {
        span: ReferenceSpan(lambda dtype, span=span: load_shard(checkpoint, span, device=CPU, dtype=dtype))
        for span in SPANS
    }
    worst = 0.0
    for kernel in ("sdpa", "eager"):
        shards = [load_shard(checkpoint, span, device=CPU, dtype=dtype) for span in SPANS]
        for shard in shards:
            shard.model.set_attn_implementation(kernel)
        for trial in range(4):
            prompt = [random.Random(trial).randrange(256) for _ in range(4 + 11 * trial)]
            runtimes, tokens = serve(shards, prompt, decode_steps=10)
            for span, runtime in zip(SPANS, runtimes, strict=True):
                verdict = judged(references[span], runtime, tokens)
                assert verdict.passed, (kernel, span, verdict.reason, verdict.detail)
                assert verdict.metrics["moe"] is True
                worst = max(worst, verdict.metrics["meanRelErr"] / verdict.metrics["meanBound"])
    assert worst > 0


@pytest.mark.parametrize("kind", CHEATS)
def test_every_cheat_fails_on_every_span(
    model: Path, references: dict[str, ReferenceSpan], kind: str
) -> None:
    """In fp32 and bf16, except the cheats within bf16's own rounding, which only fp32 shows."""
    dtypes = (torch.float32,) if kind in WITHIN_BF16_ROUNDING else (torch.float32, torch.bfloat16)
    for position, span in enumerate(SPANS):
        if kind == "copy-input" and position != 1:
            continue
        for dtype in dtypes:
            shards = [load_shard(model, s, device=CPU, dtype=torch.float32) for s in SPANS]
            shards[position] = make_cheater(
                load_shard(model, span, device=CPU, dtype=dtype), kind, seed=position
            )
            runtimes, tokens = serve(shards, list(os.urandom(12)), decode_steps=12)  # late-garbage: 11 and 12
            verdict = judged(references[span], runtimes[position], tokens)
            assert not verdict.passed, (kind, span, dtype, verdict.metrics.get("meanRelErr"))
            assert verdict.reason in (OUTPUT_MISMATCH, TOKEN_MISMATCH, EXCESS_ERROR)


def test_tensors_that_are_not_the_signed_ones_fail(model: Path, references: dict[str, ReferenceSpan]) -> None:
    shards = [load_shard(model, span, device=CPU) for span in SPANS]
    runtimes, tokens = serve(shards, [1, 2, 3, 4], decode_steps=3)
    verdict = judged(references["2:4"], runtimes[1], tokens, tamper=True)
    assert (verdict.passed, verdict.reason) == (False, TRANSCRIPT_MISMATCH)
    assert "step 1's output" in verdict.detail


def test_cheats_refuse_spans_they_cannot_apply_to(model: Path) -> None:
    with pytest.raises(ValueError, match="copy-input"):
        make_cheater(load_shard(model, "0:2", device=CPU), "copy-input")
    with pytest.raises(ValueError, match="unknown cheat"):
        make_cheater(load_shard(model, "0:2", device=CPU), "bribe")


SAMPLED = {"temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 1234}


@pytest.mark.parametrize("sampling", [None, SAMPLED], ids=["greedy", "sampled"])
def test_a_last_span_that_emits_another_token_fails(
    model: Path, references: dict[str, ReferenceSpan], sampling: dict[str, Any] | None
) -> None:
    """Honest logits, honest tokens but one: the substituted token is caught whatever the logits say, greedy or
    sampled, and honest sampled tokens pass."""
    shards = [load_shard(model, span, device=CPU) for span in SPANS]
    runtimes, tokens = serve(shards, [1, 2, 3, 4], decode_steps=12, sampling=sampling)
    assert judged(references["4:6"], runtimes[2], tokens, sampling=sampling).passed
    vocab = shards[2].vocab_size
    for step in (0, 11):  # the prefill's token, and one late in the decode
        cheated = list(tokens)
        cheated[step] = (cheated[step] + 1) % vocab
        verdict = judged(references["4:6"], runtimes[2], cheated, sampling=sampling)
        assert (verdict.passed, verdict.reason) == (False, WRONG_TOKEN), verdict.detail
        assert f"steps {step} " in verdict.detail


def test_tokens_drawn_under_another_seed_than_committed_fail(
    model: Path, references: dict[str, ReferenceSpan]
) -> None:
    shards = [load_shard(model, span, device=CPU) for span in SPANS]
    runtimes, tokens = serve(shards, [5, 6, 7], decode_steps=12, sampling={**SAMPLED, "seed": 99})
    verdict = judged(references["4:6"], runtimes[2], tokens, sampling=SAMPLED)
    assert (verdict.passed, verdict.reason) == (False, WRONG_TOKEN)


def test_without_a_committed_seed_a_token_must_be_one_the_parameters_allow(
    model: Path, references: dict[str, ReferenceSpan]
) -> None:
    """Jobs from before the gateway fixed seeds: the draws cannot be replayed, but a token outside the top-k is
    still a token no honest sampler emits."""
    unseeded = {**SAMPLED, "seed": None, "top_k": 1}
    shards = [load_shard(model, span, device=CPU) for span in SPANS]
    runtimes, tokens = serve(shards, [5, 6, 7], decode_steps=6, sampling=unseeded)
    assert judged(references["4:6"], runtimes[2], tokens, sampling=unseeded).passed
    cheated = [(token + 1) % shards[2].vocab_size for token in tokens]
    verdict = judged(references["4:6"], runtimes[2], cheated, sampling=unseeded)
    assert (verdict.passed, verdict.reason) == (False, WRONG_TOKEN)


# The parameters whose choice depends on what came before (penalties, a grammar) and those that do not, greedy
# and seeded: an honest last span passes under each, and one token changed anywhere fails.
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}
HISTORY_SAMPLING = {
    "penalties": {
        "temperature": 0.0,
        "presence_penalty": 1.5,
        "frequency_penalty": 0.5,
        "repetition_penalty": 1.3,
    },
    "bias": {"temperature": 0.0, "logit_bias": {"65": 8.0, "66": -100.0}},
    "min_p": {"temperature": 1.0, "min_p": 0.1, "seed": 5},
    "grammar": {"temperature": 0.0, "grammar": json_grammar(SCHEMA)},
    "grammar_sampled": {
        "temperature": 1.0,
        "seed": 8,
        "grammar": json_grammar(None),
        "presence_penalty": 0.5,
    },
}


@pytest.mark.parametrize("name", sorted(HISTORY_SAMPLING))
def test_honest_tokens_pass_and_a_changed_one_fails_under_every_parameter(
    model: Path, references: dict[str, ReferenceSpan], name: str
) -> None:
    sampling = HISTORY_SAMPLING[name]
    prompt = [65, 66, 65, 67]
    shards = [load_shard(model, span, device=CPU) for span in SPANS]
    runtimes, tokens = serve(shards, prompt, decode_steps=10, sampling=sampling)
    committed = session_sampling(sampling, prompt, [])
    verdict = judged(references["4:6"], runtimes[2], tokens, sampling=committed)
    assert verdict.passed, verdict.detail
    cheated = list(tokens)
    cheated[3] = (cheated[3] + 1) % shards[2].vocab_size
    verdict = judged(references["4:6"], runtimes[2], cheated, sampling=committed)
    assert (verdict.passed, verdict.reason) == (False, WRONG_TOKEN), verdict.detail
    assert "steps 3" in verdict.detail


def test_a_token_the_grammar_forbids_fails_even_where_draws_cannot_be_replayed(
    model: Path, references: dict[str, ReferenceSpan]
) -> None:
    """Unseeded: only the mask is checked, and a token outside it (a letter where JSON must open) is caught."""
    sampling = {"temperature": 1.0, "seed": None, "grammar": json_grammar(SCHEMA)}
    shards = [load_shard(model, span, device=CPU) for span in SPANS]
    runtimes, tokens = serve(shards, [1, 2, 3], decode_steps=6, sampling={**sampling, "seed": 3})
    assert judged(references["4:6"], runtimes[2], tokens, sampling=sampling).passed
    assert tokens[0] == ord("{")
    verdict = judged(references["4:6"], runtimes[2], [ord("z"), *tokens[1:]], sampling=sampling)
    assert (verdict.passed, verdict.reason) == (False, WRONG_TOKEN), verdict.detail


def test_a_last_span_transcript_without_tokens_fails(
    model: Path, references: dict[str, ReferenceSpan]
) -> None:
    shards = [load_shard(model, span, device=CPU) for span in SPANS]
    runtimes, _ = serve(shards, [1, 2, 3], decode_steps=2)
    records = runtimes[2].retained(b"s" * 16)
    steps = [RetainedStep(r.step, r.input, r.output, r.input_hash, r.output_hash) for r in records]
    transcript = [
        StepHashes(r.step, r.input_hash, r.output_hash, positions=int(r.input.shape[1])) for r in records
    ]
    verdict = judge_span(references["4:6"], steps, transcript)
    assert (verdict.passed, verdict.reason) == (False, TRANSCRIPT_MISMATCH)


@pytest.mark.parametrize("change", ["float64", "nan", "posinf"])
def test_last_span_outputs_no_sampler_takes_are_bad_tensors(
    model: Path, references: dict[str, ReferenceSpan], change: str
) -> None:
    """Logits retained in a dtype no sampler reads, or not finite: a verdict (bad_tensors), never a validator
    that fails to decide."""
    shards = [load_shard(model, span, device=CPU) for span in SPANS]
    runtimes, tokens = serve(shards, [1, 2, 3], decode_steps=2)
    records = runtimes[2].retained(b"s" * 16)
    steps, transcript = [], []
    for record, token in zip(records, tokens, strict=True):
        output = record.output.to(torch.float64) if change == "float64" else record.output.clone()
        if change != "float64":
            output.view(-1)[3] = float("nan") if change == "nan" else float("inf")
        digest = payload_sha256(output)
        steps.append(RetainedStep(record.step, record.input, output, record.input_hash, digest))
        transcript.append(
            StepHashes(record.step, record.input_hash, digest, token, positions=int(record.input.shape[1]))
        )
    verdict = judge_span(references["4:6"], steps, transcript)
    assert (verdict.passed, verdict.reason) == (False, BAD_TENSORS), verdict.detail


def test_sampling_parameters_the_validator_does_not_take_blame_nobody(
    model: Path, references: dict[str, ReferenceSpan]
) -> None:
    shards = [load_shard(model, span, device=CPU) for span in SPANS]
    runtimes, tokens = serve(shards, [1, 2, 3], decode_steps=2)
    with pytest.raises(CannotJudge):
        judged(references["4:6"], runtimes[2], tokens, sampling={"temperature": 0.5, "mirostat": 2})


def test_a_mixture_of_experts_router_allowance_is_no_licence_to_cheat(tmp_path: Path) -> None:
    """On tiny Mixtral in bf16: a last span that raises a token of its choosing to the top at one step, within
    the outlier allowance's error, fails; so does a middle span whose every output is 1% off, though the float64
    second opinion cannot run on grouped experts."""
    checkpoint = write_tiny_checkpoint(tmp_path / "mixtral", arch="mixtral", layers=6, hidden=256, seed=7)
    references = {
        span: ReferenceSpan(lambda dtype, span=span: load_shard(checkpoint, span, device=CPU, dtype=dtype))
        for span in SPANS
    }
    shards = [load_shard(checkpoint, span, device=CPU, dtype=torch.bfloat16) for span in SPANS]
    runtimes, tokens = serve(shards, [random.Random(5).randrange(256) for _ in range(20)], decode_steps=10)

    records = runtimes[2].retained(b"s" * 16)
    steps = [RetainedStep(r.step, r.input, r.output, r.input_hash, r.output_hash) for r in records]
    logits = steps[-1].output.clone()
    chosen = int(logits.flatten().float().argsort(descending=True)[50])
    logits.view(-1)[chosen] = logits.max() + 0.25
    steps[-1] = RetainedStep(
        steps[-1].step, steps[-1].input, logits, steps[-1].input_hash, payload_sha256(logits)
    )
    forged = [*tokens[:-1], chosen]
    transcript = [
        StepHashes(s.step, s.input_hash, s.output_hash, t, positions=int(s.input.shape[1]))
        for s, t in zip(steps, forged, strict=True)
    ]
    verdict = judge_span(references[SPANS[2]], steps, transcript, sampling={})
    assert not verdict.passed and verdict.reason in (TOKEN_MISMATCH, OUTPUT_MISMATCH), verdict.detail

    records = runtimes[1].retained(b"s" * 16)
    steps = [
        RetainedStep(r.step, r.input, (r.output.float() * 1.01).to(r.output.dtype), b"", b"") for r in records
    ]
    steps = [
        RetainedStep(s.step, s.input, s.output, payload_sha256(s.input), payload_sha256(s.output))
        for s in steps
    ]
    transcript = [
        StepHashes(s.step, s.input_hash, s.output_hash, positions=int(s.input.shape[1])) for s in steps
    ]
    verdict = judge_span(references[SPANS[1]], steps, transcript)
    assert not verdict.passed and verdict.reason in (OUTPUT_MISMATCH, EXCESS_ERROR), verdict.detail
