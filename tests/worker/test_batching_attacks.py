"""Attacks on batched steps: what one session sends must not refuse, wedge or change another session that shares
its pass."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from worker.errors import ProviderBusy
from worker.runtime import PendingStep, RuntimeLimits, SpanRuntime
from worker.scheduler import StepScheduler
from worker.shard import load_shard

CPU = torch.device("cpu")


def test_a_step_past_learned_positions_costs_its_batch_mates_nothing(tiny_models: dict[str, Path]) -> None:
    """GPT-2's learned positions end at n_positions (1024 in the tiny model): a session allowed more positions
    makes the embedding fail on its step. The honest session decoding in the same pass must get its result (or
    at worst be refused once and take the step again), never be left with a step in progress forever."""
    shard = load_shard(tiny_models["gpt2"], "0:3", device=CPU)
    runtime = SpanRuntime(shard, RuntimeLimits(max_batch_positions=2048))
    honest, hostile = b"h" * 16, b"x" * 16
    runtime.open(honest)
    runtime.open(hostile, max_positions=1100)
    runtime.step(honest, 0, torch.tensor([[1, 2, 3]]))
    decode = PendingStep(honest, 1, torch.tensor([[4]]))
    overflow = PendingStep(hostile, 0, torch.randint(0, 250, (1, 1100)))
    runtime.run_batch([decode, overflow])
    assert overflow.error is not None and overflow.result is None
    assert decode.error is None and decode.result is not None
    runtime.step(honest, 2, torch.tensor([[5]]))
    # The hostile session is not wedged either: it takes a step within its positions.
    runtime.step(hostile, 0, torch.tensor([[1, 2]]))


def test_the_scheduler_is_not_wedged_by_a_failing_batch_mate(tiny_models: dict[str, Path]) -> None:
    shard = load_shard(tiny_models["gpt2"], "0:3", device=CPU)
    runtime = SpanRuntime(shard, RuntimeLimits(max_batch_positions=2048))
    honest, hostile = b"h" * 16, b"x" * 16

    async def main() -> None:
        scheduler = StepScheduler(runtime)
        runtime.open(honest)
        runtime.open(hostile, max_positions=1100)
        try:
            await scheduler.run(honest, 0, torch.tensor([[1, 2, 3]]), None)
            outcomes = await asyncio.gather(
                scheduler.run(honest, 1, torch.tensor([[4]]), None),
                scheduler.run(hostile, 0, torch.randint(0, 250, (1, 1100)), None),
                return_exceptions=True,
            )
            assert not isinstance(outcomes[0], BaseException), outcomes[0]
            assert isinstance(outcomes[1], BaseException)
            await scheduler.run(honest, 2, torch.tensor([[5]]), None)
        finally:
            await scheduler.close()

    asyncio.run(main())


def test_float64_hidden_states_cannot_write_past_a_sessions_retention_reservation(
    tiny_models: dict[str, Path],
) -> None:
    """A previous hop sends its hidden states in float64 (a wire dtype): each step's input takes twice what the
    session reserved for it on disk. Past its reservation, a session's steps are refused; the disk budget holds."""
    shard = load_shard(tiny_models["llama"], "3:6", device=CPU)
    positions = 16
    budget = SpanRuntime(shard).retained_bytes(positions)
    runtime = SpanRuntime(shard, RuntimeLimits(max_retained_bytes=budget + 4096))
    runtime.open(b"x" * 16, max_positions=positions)
    for step in range(positions):
        try:
            runtime.step(b"x" * 16, step, torch.randn(1, 1, shard.hidden_size, dtype=torch.float64))
        except ProviderBusy:
            break
    assert runtime.store.used_bytes <= runtime.limits.max_retained_bytes
    # An honest session takes every position it reserved, one at a time, in the span's own width.
    for span, make in (
        ("3:6", lambda: torch.randn(1, 1, shard.hidden_size)),
        ("0:3", lambda: torch.tensor([[7]])),
        ("4:6", lambda: torch.randn(1, 1, shard.hidden_size)),
    ):
        honest = SpanRuntime(load_shard(tiny_models["llama"], span, device=CPU))
        honest.open(b"h" * 16, max_positions=positions)
        honest.step(b"h" * 16, 0, make().repeat(1, 2, 1) if make().dim() == 3 else make().repeat(1, 2))
        for step in range(1, positions - 1):
            honest.step(b"h" * 16, step, make())
