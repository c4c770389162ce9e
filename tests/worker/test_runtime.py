"""Sessions on a shard: ordering, limits that answer busy, expiry, and retained steps on disk."""

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
    # A session's KV room is reserved when it opens, at its cap: the second does not fit beside the first's 8.
    with pytest.raises(ProviderBusy, match="limit is 10"):
        runtime.open(b"b" * 16)
    runtime.open(b"b" * 16, max_positions=2)
    runtime.step(b"b" * 16, 0, torch.ones((1, 2), dtype=torch.int64))


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


def test_a_full_disk_budget_refuses_new_sessions_and_drops_nothing_inside_the_window(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Room for one session's steps: a second session is busy, not a reason to delete the first one's data a
    validator may still ask for; once the first is past its window, the room is back."""
    clock = Clock()
    shard = load_shard(tiny_models["llama"], "0:6", device=CPU)
    one_session = SpanRuntime(shard).retained_bytes(PROMPT.shape[1]) + 1024  # and its file's first line
    limits = RuntimeLimits(retention_s=600, max_retained_bytes=one_session)
    runtime = SpanRuntime(shard, limits, clock, retained=tmp_path)
    runtime.open(b"a" * 16, max_positions=PROMPT.shape[1])
    runtime.step(b"a" * 16, 0, PROMPT)
    runtime.close(b"a" * 16)
    with pytest.raises(ProviderBusy, match="budget"):
        runtime.open(b"b" * 16, max_positions=PROMPT.shape[1])
    clock.now += 599
    assert len(runtime.retained(b"a" * 16)) == 1
    clock.now += 2
    runtime.open(b"b" * 16, max_positions=PROMPT.shape[1])
    with pytest.raises(UnknownSession):
        runtime.retained(b"a" * 16)
    assert list(tmp_path.iterdir()) == [tmp_path / ("62" * 16 + ".steps")]


def test_retained_steps_survive_a_restart(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A provider restarted inside the window still has every step: of sessions it closed, and of the one it
    was serving when it stopped, whose window starts at the restart. A session id is still taken."""
    clock = Clock()
    shard = load_shard(tiny_models["llama"], "0:6", device=CPU)
    limits = RuntimeLimits(retention_s=600)
    before = SpanRuntime(shard, limits, clock, retained=tmp_path)
    for name in (b"a" * 16, b"b" * 16):
        before.open(name, b"j" * 32)
        before.step(name, 0, PROMPT)
        before.step(name, 1, torch.tensor([[BOS]]))
    before.close(b"a" * 16)  # b is open when the process stops
    kept = {name: before.retained(name) for name in (b"a" * 16, b"b" * 16)}
    del before

    clock.now += 500
    after = SpanRuntime(shard, limits, clock, retained=tmp_path)
    for name, records in kept.items():
        again = after.retained(name)
        assert after.retained_session(name).job == b"j" * 32
        assert [(r.step, r.input_hash, r.output_hash) for r in again] == [
            (r.step, r.input_hash, r.output_hash) for r in records
        ]
        assert all(torch.equal(x.output, y.output) for x, y in zip(again, records, strict=True))
    with pytest.raises(SessionExists):
        after.open(b"a" * 16)
    clock.now += 101  # a's window ends 600 s after it closed; b's 600 s after the restart
    with pytest.raises(UnknownSession):
        after.retained(b"a" * 16)
    assert len(after.retained(b"b" * 16)) == 2


def test_a_step_torn_by_a_crash_is_cut_off_on_restart(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    shard = load_shard(tiny_models["llama"], "0:6", device=CPU)
    before = SpanRuntime(shard, retained=tmp_path)
    before.open(b"a" * 16)
    before.step(b"a" * 16, 0, PROMPT)
    before.step(b"a" * 16, 1, torch.tensor([[BOS]]))
    path = before.retained_session(b"a" * 16).path
    del before
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(
            size - 100
        )  # the second step's output half written, then the zeros a power loss leaves
        handle.seek(0, 2)
        handle.write(bytes(300))
    after = SpanRuntime(shard, retained=tmp_path)
    assert [r.step for r in after.retained(b"a" * 16)] == [0]
    assert path.stat().st_size < size - 100


def test_a_session_takes_its_inputs_in_one_dtype(tiny_models: dict[str, Path]) -> None:
    """A previous hop alternating dtypes would split every fetch reply at every step."""
    runtime = SpanRuntime(load_shard(tiny_models["llama"], "3:6", device=CPU))
    runtime.open(b"a" * 16)
    hidden = torch.randn(1, 3, runtime.shard.hidden_size)
    runtime.step(b"a" * 16, 0, hidden)
    with pytest.raises(BadStepInput, match="float32"):
        runtime.step(b"a" * 16, 1, hidden[:, :1].half())
    runtime.step(b"a" * 16, 1, hidden[:, :1])


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
