"""Judging a hop: honest providers pass in fp32 and bf16, every kind of cheat fails on every span it applies to,
and tensors that are not the ones the transcript signs fail before anything is re-executed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers.utils import logging as hf_logging

from settlement.validation import (
    OUTPUT_MISMATCH,
    TOKEN_MISMATCH,
    TRANSCRIPT_MISMATCH,
    ReferenceSpan,
    Verdict,
    judge_span,
)
from worker.client import RetainedStep
from worker.runtime import SpanRuntime
from worker.shard import Shard, load_shard
from worker.testing.cheats import CHEATS, make_cheater
from worker.testing.tiny import write_tiny_checkpoint

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


def serve(shards: list[Shard], prompt: list[int], decode_steps: int) -> list[SpanRuntime]:
    """One job through one runtime per span, greedy; returns the runtimes holding its retained steps."""
    runtimes = [SpanRuntime(shard) for shard in shards]
    session = b"s" * 16
    for runtime in runtimes:
        runtime.open(session, b"j" * 32)
    inputs = torch.tensor([prompt])
    for step in range(decode_steps + 1):
        x = inputs
        for runtime in runtimes:
            x, _ = runtime.step(session, step, x)
        inputs = torch.tensor([[int(x[0, -1].float().argmax())]])
    for runtime in runtimes:
        runtime.close(session)
    return runtimes


def judged(reference: ReferenceSpan, runtime: SpanRuntime, tamper: bool = False) -> Verdict:
    records = runtime.retained(b"s" * 16)
    steps = [RetainedStep(r.step, r.input, r.output, r.input_hash, r.output_hash) for r in records]
    transcript = [(r.step, r.input_hash, r.output_hash) for r in records]
    if tamper:
        changed = steps[1].output.clone()
        changed.view(-1)[0] += 1
        steps[1] = RetainedStep(1, steps[1].input, changed, steps[1].input_hash, steps[1].output_hash)
    return judge_span(reference, steps, transcript)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_honest_providers_pass(model: Path, references: dict[str, ReferenceSpan], dtype: torch.dtype) -> None:
    shards = [load_shard(model, span, device=CPU, dtype=dtype) for span in SPANS]
    for trial in range(3):
        prompt = list(os.urandom(5 + 9 * trial))
        for span, runtime in zip(SPANS, serve(shards, prompt, decode_steps=6), strict=True):
            verdict = judged(references[span], runtime)
            assert verdict.passed, (span, verdict.detail, verdict.metrics.get("meanRelErr"))
            assert verdict.metrics["dtype"] == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("kind", CHEATS)
def test_every_cheat_fails_on_every_span(
    model: Path, references: dict[str, ReferenceSpan], kind: str
) -> None:
    for position, span in enumerate(SPANS):
        if kind == "copy-input" and position != 1:
            continue
        for dtype in (torch.float32, torch.bfloat16):
            shards = [load_shard(model, s, device=CPU, dtype=torch.float32) for s in SPANS]
            shards[position] = make_cheater(
                load_shard(model, span, device=CPU, dtype=dtype), kind, seed=position
            )
            runtimes = serve(shards, list(os.urandom(12)), decode_steps=6)
            verdict = judged(references[span], runtimes[position])
            assert not verdict.passed, (kind, span, dtype, verdict.metrics.get("meanRelErr"))
            assert verdict.reason in (OUTPUT_MISMATCH, TOKEN_MISMATCH)


def test_tensors_that_are_not_the_signed_ones_fail(model: Path, references: dict[str, ReferenceSpan]) -> None:
    shards = [load_shard(model, span, device=CPU) for span in SPANS]
    runtimes = serve(shards, [1, 2, 3, 4], decode_steps=3)
    verdict = judged(references["2:4"], runtimes[1], tamper=True)
    assert (verdict.passed, verdict.reason) == (False, TRANSCRIPT_MISMATCH)
    assert "step 1's output" in verdict.detail


def test_cheats_refuse_spans_they_cannot_apply_to(model: Path) -> None:
    with pytest.raises(ValueError, match="copy-input"):
        make_cheater(load_shard(model, "0:2", device=CPU), "copy-input")
    with pytest.raises(ValueError, match="unknown cheat"):
        make_cheater(load_shard(model, "0:2", device=CPU), "bribe")
