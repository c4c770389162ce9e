"""Attacks on batched steps: what one session sends must not refuse, wedge or change another session that shares
its pass."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from worker.errors import ProviderBusy
from worker.runtime import PendingStep, RuntimeLimits, SpanRuntime
from worker.scheduler import StepScheduler
from worker.shard import load_shard
from worker.testing.tiny import ARCHITECTURES

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


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_row_that_overflows_in_the_span_leaves_its_batch_mates_exact(
    tiny_models: dict[str, Path], arch: str
) -> None:
    """A hostile previous hop sends finite hidden states that overflow inside the span (inf, then NaN, in its
    rows): the honest rows packed beside it, before and after it, still equal each one's result alone, bit for
    bit with the same pass layout (MoE routing and every norm are per row)."""
    shard = load_shard(tiny_models[arch], "1:4", device=CPU)
    generator = torch.Generator().manual_seed(5)
    honest = [torch.randn((1, n, shard.hidden_size), generator=generator) for n in (3, 1)]
    hostile = torch.full((1, 4, shard.hidden_size), 3e38)
    hostile[0, :, ::2] = -3e38

    def run(rows: list[torch.Tensor]) -> list[torch.Tensor]:
        return shard.forward_packed([(shard.new_kv(16), 0, row) for row in rows])

    clean = run([honest[0], honest[1], honest[1]])
    dirty = run([honest[0], hostile, honest[1]])
    assert torch.equal(clean[0], dirty[0]) or float((clean[0] - dirty[0]).abs().max()) < 1e-5
    assert torch.equal(clean[2], dirty[2]) or float((clean[2] - dirty[2]).abs().max()) < 1e-5
    assert bool(torch.isfinite(dirty[0]).all()) and bool(torch.isfinite(dirty[2]).all())
