"""Sessions on a shard: ordering, limits that answer busy, expiry, and the retention buffer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker.errors import BadStepInput, ProviderBusy, SessionExists, StepOutOfOrder, UnknownSession
from worker.runtime import RuntimeLimits, SpanRuntime
from worker.shard import load_shard
from worker.testing.tiny import BOS
from worker.wire import payload_sha256

CPU = torch.device("cpu")
PROMPT = torch.tensor([[BOS, *b"hello"]])


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def runtimes(tiny_models: dict[str, Path]) -> tuple[SpanRuntime, SpanRuntime]:
    directory = tiny_models["llama"]
    return SpanRuntime(load_shard(directory, "0:3", device=CPU)), SpanRuntime(
        load_shard(directory, "3:6", device=CPU)
    )


def test_two_runtimes_generate_like_the_whole_model(
    tiny_models: dict[str, Path], runtimes: tuple[SpanRuntime, SpanRuntime]
) -> None:
    first, last = runtimes
    whole = SpanRuntime(load_shard(tiny_models["llama"], "0:6", device=CPU))
    session = b"\x01" * 16
    for runtime in (first, last, whole):
        runtime.open(session)
    inputs = PROMPT
    for step in range(5):
        hidden, _ = first.step(session, step, inputs)
        logits, record = last.step(session, step, hidden)
        expected, _ = whole.step(session, step, inputs)
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
        assert record.input_hash == payload_sha256(hidden)
        inputs = logits[:, -1:].argmax(-1)
    assert first.close(session).tokens == PROMPT.shape[1] + 4


def test_steps_must_come_in_order(runtimes: tuple[SpanRuntime, SpanRuntime]) -> None:
    first, _ = runtimes
    session = b"\x02" * 16
    first.open(session)
    with pytest.raises(StepOutOfOrder) as caught:
        first.step(session, 1, PROMPT)
    assert (caught.value.expected, caught.value.got, caught.value.code) == (0, 1, "step_out_of_order")
    first.step(session, 0, PROMPT)
    with pytest.raises(StepOutOfOrder):
        first.step(session, 0, PROMPT)


def test_unknown_and_duplicate_sessions(runtimes: tuple[SpanRuntime, SpanRuntime]) -> None:
    first, _ = runtimes
    with pytest.raises(UnknownSession):
        first.step(b"\x03" * 16, 0, PROMPT)
    first.open(b"\x04" * 16)
    with pytest.raises(SessionExists):
        first.open(b"\x04" * 16)


@pytest.mark.parametrize(
    "inputs",
    [
        torch.tensor([[1.0, 2.0]]),  # floats where token ids belong
        torch.tensor([1, 2]),  # no batch dimension
        torch.tensor([[1, 100_000]]),  # outside the vocabulary
        torch.tensor([[-1]]),
        torch.zeros((1, 0), dtype=torch.int64),
    ],
)
def test_bad_token_ids_are_refused(runtimes: tuple[SpanRuntime, SpanRuntime], inputs: torch.Tensor) -> None:
    first, _ = runtimes
    first.open(b"\x05" * 16)
    with pytest.raises(BadStepInput):
        first.step(b"\x05" * 16, 0, inputs)


@pytest.mark.parametrize(
    "inputs",
    [
        torch.zeros((1, 2, 64)),  # wrong hidden size
        torch.zeros((2, 2, 128)),  # batch of two
        torch.zeros((1, 2, 128), dtype=torch.int64),
        torch.full((1, 2, 128), float("nan")),
    ],
)
def test_bad_hidden_states_are_refused(
    runtimes: tuple[SpanRuntime, SpanRuntime], inputs: torch.Tensor
) -> None:
    _, last = runtimes
    last.open(b"\x06" * 16)
    with pytest.raises(BadStepInput):
        last.step(b"\x06" * 16, 0, inputs)


def test_session_limit_answers_busy(tiny_models: dict[str, Path]) -> None:
    runtime = SpanRuntime(load_shard(tiny_models["llama"], "0:6", device=CPU), RuntimeLimits(max_sessions=2))
    runtime.open(b"a" * 16)
    runtime.open(b"b" * 16)
    with pytest.raises(ProviderBusy):
        runtime.open(b"c" * 16)
    runtime.close(b"a" * 16)
    runtime.open(b"c" * 16)


def test_token_limits_answer_busy(tiny_models: dict[str, Path]) -> None:
    limits = RuntimeLimits(max_cached_tokens=10, max_session_tokens=8)
    runtime = SpanRuntime(load_shard(tiny_models["llama"], "0:6", device=CPU), limits)
    runtime.open(b"a" * 16)
    with pytest.raises(ProviderBusy, match="limit is 8"):
        runtime.step(b"a" * 16, 0, torch.ones((1, 9), dtype=torch.int64))
    runtime.step(b"a" * 16, 0, torch.ones((1, 6), dtype=torch.int64))
    runtime.open(b"b" * 16)
    with pytest.raises(ProviderBusy, match="limit is 10"):
        runtime.step(b"b" * 16, 0, torch.ones((1, 5), dtype=torch.int64))


def test_idle_sessions_expire_and_steps_are_retained_for_the_window(tiny_models: dict[str, Path]) -> None:
    clock = Clock()
    limits = RuntimeLimits(session_idle_s=60, retention_s=600)
    runtime = SpanRuntime(load_shard(tiny_models["llama"], "0:6", device=CPU), limits, clock)
    runtime.open(b"a" * 16)
    runtime.step(b"a" * 16, 0, PROMPT)
    clock.now += 61
    runtime.expire()
    with pytest.raises(UnknownSession):
        runtime.step(b"a" * 16, 1, PROMPT[:, :1])
    records = runtime.retained(b"a" * 16)
    assert [r.step for r in records] == [0]
    assert records[0].output_hash == payload_sha256(records[0].output)
    clock.now += 601
    with pytest.raises(UnknownSession):
        runtime.retained(b"a" * 16)


def test_retention_drops_the_oldest_sessions_past_its_byte_budget(tiny_models: dict[str, Path]) -> None:
    shard = load_shard(tiny_models["llama"], "0:6", device=CPU)
    one_step = PROMPT.numel() * 8 + shard.vocab_size * 4  # token ids in, the last position's logits out
    runtime = SpanRuntime(shard, RuntimeLimits(max_retained_bytes=one_step + 1))
    for name in (b"a" * 16, b"b" * 16):
        runtime.open(name)
        runtime.step(name, 0, PROMPT)
        runtime.close(name)
    with pytest.raises(UnknownSession):
        runtime.retained(b"a" * 16)
    assert len(runtime.retained(b"b" * 16)) == 1


def test_an_input_that_overflows_the_span_is_refused_and_spoils_only_what_comes_after(
    tiny_models: dict[str, Path],
) -> None:
    first = SpanRuntime(load_shard(tiny_models["llama"], "0:3", device=CPU))
    last = SpanRuntime(load_shard(tiny_models["llama"], "3:6", device=CPU, dtype=torch.float16))
    session = b"\x07" * 16
    first.open(session)
    last.open(session)
    hidden, _ = first.step(session, 0, PROMPT)
    last.step(session, 0, hidden)
    hidden, _ = first.step(session, 1, torch.tensor([[BOS]]))
    # Finite float32, so it passes the input check; in this span's float16 it is infinite, its output NaN.
    with pytest.raises(BadStepInput, match="not finite"):
        last.step(session, 1, torch.full_like(hidden, 1e5))
    with pytest.raises(BadStepInput, match="no more steps"):
        last.step(session, 1, hidden)
    closed = last.close(session)
    assert [record.step for record in closed.records] == [0]
    assert closed.tokens == PROMPT.shape[1]
