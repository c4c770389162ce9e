"""Batched steps: many sessions' positions packed into one forward pass give each session its unbatched result
(greedy tokens identical, hidden states within float rounding) on every family; prefills are chunked beside
running decodes; one session's bad step costs the others nothing; the scheduler batches what arrives together."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from worker.errors import BadStepInput, ProviderBusy, StepOutOfOrder, UnknownSession
from worker.runtime import PendingStep, RuntimeLimits, SpanRuntime
from worker.scheduler import StepScheduler
from worker.shard import Shard, load_shard
from worker.testing.tiny import ARCHITECTURES

CPU = torch.device("cpu")
# Packed and stock runs multiply the same rows in other groupings; fp32 sums then differ in the last bits.
TOLERANCE = 1e-4


def _inputs(shard: Shard, generator: torch.Generator, positions: int) -> torch.Tensor:
    if shard.span.first:
        return torch.randint(0, shard.vocab_size, (1, positions), generator=generator)
    return torch.randn((1, positions, shard.hidden_size), generator=generator)


def _stock(shard: Shard, cache: object, inputs: torch.Tensor) -> torch.Tensor:
    key = "input_ids" if shard.span.first else "hidden"
    return shard.forward(cache=cache, **{key: inputs})  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("span", ["0:3", "3:6", "0:6"])
def test_packed_sessions_match_each_session_alone(tiny_models: dict[str, Path], arch: str, span: str) -> None:
    """Prompts of different lengths (one past gemma2's sliding window), a prefill in two chunks, then decode
    steps of all of them in one pass at a time, against each session run alone on the model's own attention."""
    shard = load_shard(tiny_models[arch], span, device=CPU)
    generator = torch.Generator().manual_seed(3)
    prompts = [_inputs(shard, generator, n) for n in (1, 7, 23)]
    caches = [shard.new_cache() for _ in prompts]
    buffers = [shard.new_kv(64) for _ in prompts]
    expected = [_stock(shard, cache, prompt) for cache, prompt in zip(caches, prompts, strict=True)]
    # The longest prompt arrives in two chunks: the second attends causally to the first from an offset.
    got = shard.forward_packed([(buffers[0], 0, prompts[0]), (buffers[1], 0, prompts[1])])
    first_chunk = shard.forward_packed([(buffers[2], 0, prompts[2][:, :10])])[0]
    rest = shard.forward_packed([(buffers[2], 10, prompts[2][:, 10:])])[0]
    got.append(rest if shard.span.last else torch.cat([first_chunk, rest], dim=1))
    worst = max(float((a - b).abs().max()) for a, b in zip(expected, got, strict=True))
    pasts = [int(p.shape[1]) for p in prompts]
    for _ in range(12):
        steps = [_inputs(shard, generator, 1) for _ in prompts]
        expected = [_stock(shard, cache, step) for cache, step in zip(caches, steps, strict=True)]
        got = shard.forward_packed(list(zip(buffers, pasts, steps, strict=True)))
        worst = max(worst, *(float((a - b).abs().max()) for a, b in zip(expected, got, strict=True)))
        if shard.span.last:
            assert [int(a.argmax()) for a in expected] == [int(b.argmax()) for b in got]
        pasts = [past + 1 for past in pasts]
    assert worst < TOLERANCE, worst


def _count_batches(runtime: SpanRuntime) -> list[int]:
    """The sizes of the batches ``runtime`` runs from now on, as it runs them."""
    batches: list[int] = []
    run_batch = runtime.run_batch

    def counted(pending: list[PendingStep]) -> None:
        batches.append(len(pending))
        run_batch(pending)

    runtime.run_batch = counted  # type: ignore[method-assign]
    return batches


def _greedy_alone(runtime: SpanRuntime, session: bytes, prompt: torch.Tensor, tokens: int) -> list[int]:
    runtime.open(session)
    out, _ = runtime.step(session, 0, prompt)
    emitted = [int(out[0, -1].argmax())]
    for step in range(1, tokens):
        out, _ = runtime.step(session, step, torch.tensor([[emitted[-1]]]))
        emitted.append(int(out[0, -1].argmax()))
    return emitted


def test_sessions_batched_together_emit_their_tokens_alone(tiny_models: dict[str, Path]) -> None:
    """Eight sessions through one runtime, a pass at a time over all of them, prefills chunked by a small
    ``max_batch_positions``: each emits exactly the greedy tokens it emits alone."""
    shard = load_shard(tiny_models["llama"], "0:6", device=CPU)
    prompts = [
        torch.randint(0, 250, (1, 3 + 5 * i), generator=torch.Generator().manual_seed(i)) for i in range(8)
    ]
    alone = [_greedy_alone(SpanRuntime(shard), b"a" * 16, prompt, 10) for prompt in prompts]

    runtime = SpanRuntime(shard, RuntimeLimits(max_batch_positions=16))
    sessions = [bytes([i]) * 16 for i in range(8)]
    for session in sessions:
        runtime.open(session)
    emitted: list[list[int]] = [[] for _ in sessions]
    pending = [PendingStep(s, 0, p) for s, p in zip(sessions, prompts, strict=True)]
    passes = 0
    while pending:
        runtime.run_batch(pending)
        passes += 1
        following = []
        for item in pending:
            if not item.done:
                following.append(item)
                continue
            assert item.error is None, item.error
            assert item.result is not None
            index = sessions.index(item.session)
            emitted[index].append(int(item.result[0][0, -1].argmax()))
            if len(emitted[index]) < 10:
                following.append(
                    PendingStep(item.session, item.step + 1, torch.tensor([[emitted[index][-1]]]))
                )
        pending = following
    assert emitted == alone
    # 80 steps (over 90 passes one at a time, chunked) in about 20: the prompts' 164 positions need 11 passes
    # of 16, decodes going first, and the last prompt's 9 decodes follow.
    assert passes <= 25, passes


def test_a_bad_step_in_a_batch_costs_the_others_nothing(tiny_models: dict[str, Path]) -> None:
    shard = load_shard(tiny_models["llama"], "3:6", device=CPU)
    runtime = SpanRuntime(shard)
    for name in (b"g", b"n", b"o"):
        runtime.open(name * 16)
    good = PendingStep(b"g" * 16, 0, torch.randn(1, 4, shard.hidden_size))
    nan = PendingStep(b"n" * 16, 0, torch.full((1, 4, shard.hidden_size), float("nan")))
    early = PendingStep(b"o" * 16, 1, torch.randn(1, 1, shard.hidden_size))
    stranger = PendingStep(b"x" * 16, 0, torch.randn(1, 1, shard.hidden_size))
    runtime.run_batch([good, nan, early, stranger])
    assert good.result is not None and good.error is None
    assert isinstance(nan.error, BadStepInput)
    assert isinstance(early.error, StepOutOfOrder)
    assert isinstance(stranger.error, UnknownSession)
    # The refused steps left their sessions as they were: each still takes its step 0.
    runtime.step(b"n" * 16, 0, torch.randn(1, 2, shard.hidden_size))
    runtime.step(b"o" * 16, 0, torch.randn(1, 2, shard.hidden_size))


def test_a_second_step_of_a_session_in_the_same_batch_is_out_of_order(tiny_models: dict[str, Path]) -> None:
    shard = load_shard(tiny_models["llama"], "0:3", device=CPU)
    runtime = SpanRuntime(shard)
    runtime.open(b"s" * 16)
    first = PendingStep(b"s" * 16, 0, torch.tensor([[1, 2, 3]]))
    again = PendingStep(b"s" * 16, 0, torch.tensor([[1, 2, 3]]))
    runtime.run_batch([first, again])
    assert first.result is not None
    assert isinstance(again.error, StepOutOfOrder)
    assert runtime.retained_session(b"s" * 16).steps[0].positions == 3


def test_a_session_closed_while_its_step_computes_records_nothing(tiny_models: dict[str, Path]) -> None:
    shard = load_shard(tiny_models["llama"], "0:3", device=CPU)
    runtime = SpanRuntime(shard)
    runtime.open(b"s" * 16)
    pending = PendingStep(b"s" * 16, 0, torch.tensor([[1, 2, 3]]))
    forward = shard.forward_packed

    def close_meanwhile(rows: list) -> list[torch.Tensor]:  # type: ignore[type-arg]
        runtime.close(b"s" * 16)
        return forward(rows)

    shard.forward_packed = close_meanwhile  # type: ignore[method-assign]
    runtime.run_batch([pending])
    assert isinstance(pending.error, UnknownSession)
    assert runtime.retained_session(b"s" * 16).steps == []


def test_the_scheduler_batches_steps_that_arrive_together(tiny_models: dict[str, Path]) -> None:
    shard = load_shard(tiny_models["llama"], "0:6", device=CPU)
    runtime = SpanRuntime(shard)
    batches = _count_batches(runtime)

    async def main() -> list[list[int]]:
        scheduler = StepScheduler(runtime)

        async def session(index: int) -> list[int]:
            name = bytes([index]) * 16
            runtime.open(name)
            out, _, _ = await scheduler.run(name, 0, torch.tensor([[index + 1, 2, 3]]), None)
            tokens = [int(out[0, -1].argmax())]
            for step in range(1, 6):
                out, _, ms = await scheduler.run(name, step, torch.tensor([[tokens[-1]]]), None)
                assert ms > 0
                tokens.append(int(out[0, -1].argmax()))
            return tokens

        try:
            return await asyncio.gather(*(session(i) for i in range(6)))
        finally:
            await scheduler.close()

    together = asyncio.run(main())
    alone = [_greedy_alone(SpanRuntime(shard), b"a" * 16, torch.tensor([[i + 1, 2, 3]]), 6) for i in range(6)]
    assert together == alone
    assert max(batches) > 1 and len(batches) < 36, batches


def test_a_batch_that_fails_is_refused_and_the_scheduler_serves_on(tiny_models: dict[str, Path]) -> None:
    shard = load_shard(tiny_models["llama"], "0:3", device=CPU)
    runtime = SpanRuntime(shard)
    run_batch = runtime.run_batch
    failures = [OSError("disk full")]

    def failing(pending: list[PendingStep]) -> None:
        if failures:
            raise failures.pop()
        run_batch(pending)

    runtime.run_batch = failing  # type: ignore[method-assign]

    async def main() -> None:
        scheduler = StepScheduler(runtime)
        runtime.open(b"s" * 16)
        try:
            with pytest.raises(ProviderBusy, match="disk full"):
                await scheduler.run(b"s" * 16, 0, torch.tensor([[1, 2]]), None)
            await scheduler.run(b"s" * 16, 0, torch.tensor([[1, 2]]), None)
        finally:
            await scheduler.close()

    asyncio.run(main())


def test_steps_of_sessions_on_their_way_wait_to_share_a_pass_and_a_lone_session_never_waits(
    tiny_models: dict[str, Path],
) -> None:
    shard = load_shard(tiny_models["llama"], "0:3", device=CPU)
    runtime = SpanRuntime(shard)
    batches = _count_batches(runtime)

    async def main() -> float:
        scheduler = StepScheduler(runtime)
        try:
            runtime.open(b"a" * 16)
            scheduler._pass_s = 5.0  # as if passes were slow: a lone session must still not wait for one
            started = time.perf_counter()
            await scheduler.run(b"a" * 16, 0, torch.tensor([[1, 2]]), None)
            alone_s = time.perf_counter() - started
            runtime.open(b"b" * 16)
            await scheduler.run(b"b" * 16, 0, torch.tensor([[3, 4]]), None)
            # Both stepped within the second: a's next step waits for b's, which comes 50 ms later.
            batches.clear()
            scheduler._pass_s = 5.0
            first = asyncio.ensure_future(scheduler.run(b"a" * 16, 1, torch.tensor([[5]]), None))
            await asyncio.sleep(0.05)
            await scheduler.run(b"b" * 16, 1, torch.tensor([[6]]), None)
            await first
            return alone_s
        finally:
            await scheduler.close()

    alone_s = asyncio.run(main())
    assert alone_s < 1.0
    assert batches == [2]


def test_a_second_copy_of_a_step_part_way_through_its_chunks_is_refused(tiny_models: dict[str, Path]) -> None:
    """Two senders (a gateway and a previous hop) may both send a session's step: while one copy is being computed,
    chunk by chunk, the other is out of order; a copy whose caller went away frees the session for another."""
    shard = load_shard(tiny_models["llama"], "0:3", device=CPU)
    prompt = torch.arange(1, 11).unsqueeze(0)
    reference = SpanRuntime(shard)
    reference.open(b"s" * 16)
    expected, _ = reference.step(b"s" * 16, 0, prompt)

    runtime = SpanRuntime(shard, RuntimeLimits(max_batch_positions=4))
    runtime.open(b"s" * 16)
    first = PendingStep(b"s" * 16, 0, prompt)
    runtime.run_batch([first])
    assert first.computed == 4 and not first.done
    copy = PendingStep(b"s" * 16, 0, prompt)
    runtime.run_batch([first, copy])
    assert isinstance(copy.error, StepOutOfOrder)
    while not first.done:
        runtime.run_batch([first])
    assert first.result is not None
    assert torch.allclose(first.result[0], expected, atol=TOLERANCE)

    runtime.open(b"t" * 16)
    gone = PendingStep(b"t" * 16, 0, prompt)
    runtime.run_batch([gone])
    runtime.abandon(gone)
    out, _ = runtime.step(b"t" * 16, 0, prompt)
    assert torch.allclose(out, expected, atol=TOLERANCE)
