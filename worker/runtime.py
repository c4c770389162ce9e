"""Sessions on one shard: a KV cache each, steps in order, a retention buffer, and limits that say "busy"
instead of running out of memory.

A session's step 0 is the prefill (the whole prompt, or a replayed prefix); every later step adds positions,
normally one token. The first span takes token ids (1, seq) int64; every other span takes hidden states
(1, seq, hidden). Each step's input and output are kept, with their sha256 (the same digests the wire format
puts in frame headers), for ``retention_s`` after the session ends, so a validator can fetch them and a
coordinator can recover from a failure downstream.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from worker.errors import BadStepInput, ProviderBusy, SessionExists, StepOutOfOrder, UnknownSession
from worker.shard import Shard
from worker.wire import payload_sha256


@dataclass(frozen=True)
class RuntimeLimits:
    max_sessions: int = 64  # sessions open at once
    max_cached_tokens: int = 65_536  # positions held in KV caches, summed over open sessions
    max_session_tokens: int = 8_192  # positions in one session (prompt and generated)
    session_idle_s: float = 300.0  # an open session unused this long is closed
    retention_s: float = 900.0  # how long a session's steps are kept after it closes
    max_retained_bytes: int = 1 << 30  # inputs and outputs kept, summed over sessions; oldest dropped first

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_cached_tokens", "max_session_tokens", "max_retained_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.session_idle_s <= 0 or self.retention_s < 0:
            raise ValueError("session_idle_s must be positive and retention_s not negative")


@dataclass(frozen=True)
class StepRecord:
    step: int
    input: torch.Tensor
    output: torch.Tensor
    input_hash: bytes
    output_hash: bytes

    @property
    def nbytes(self) -> int:
        return (
            self.input.numel() * self.input.element_size() + self.output.numel() * self.output.element_size()
        )


@dataclass
class Session:
    id: bytes
    cache: DynamicCache
    job: bytes  # the job ticket's id: whoever fetches the retained steps must name the same job
    opened_at: float
    last_used: float
    next_step: int = 0
    positions: int = 0
    records: list[StepRecord] = field(default_factory=list)
    closed_at: float | None = None
    spoiled: str | None = None  # why no further step can run: its cache holds a step that was refused

    @property
    def tokens(self) -> int:
        """Positions this span processed for the session: what its receipt bills."""
        return self.positions


class SpanRuntime:
    """Runs steps for many sessions on one shard. Thread-safe; steps of one shard run one at a time."""

    def __init__(
        self, shard: Shard, limits: RuntimeLimits | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.shard = shard
        self.limits = limits or RuntimeLimits()
        self.clock = clock
        self._open: dict[bytes, Session] = {}
        self._closed: dict[bytes, Session] = {}
        self._lock = threading.RLock()

    # -- sessions -------------------------------------------------------------------------------------------

    def open(self, session_id: bytes, job: bytes = b"") -> Session:
        with self._lock:
            self.expire()
            if session_id in self._open or session_id in self._closed:
                raise SessionExists(f"session {session_id.hex()} already exists")
            if len(self._open) >= self.limits.max_sessions:
                raise ProviderBusy(
                    f"{len(self._open)} sessions open, the limit is {self.limits.max_sessions}"
                )
            now = self.clock()
            session = Session(session_id, self.shard.new_cache(), job, opened_at=now, last_used=now)
            self._open[session_id] = session
            return session

    def close(self, session_id: bytes) -> Session:
        """Ends a session: its KV cache is freed, its steps are retained for ``retention_s``."""
        with self._lock:
            session = self._open.pop(session_id, None)
            if session is None:
                raise UnknownSession(f"no open session {session_id.hex()}")
            session.cache = self.shard.new_cache()
            session.closed_at = self.clock()
            self._closed[session_id] = session
            self._trim_retention()
            return session

    def retained(self, session_id: bytes) -> list[StepRecord]:
        """The steps of a session, open or closed within the retention window."""
        return list(self.retained_session(session_id).records)

    def retained_session(self, session_id: bytes) -> Session:
        """A session open, or closed within the retention window, with its steps."""
        with self._lock:
            self.expire()
            session = self._open.get(session_id) or self._closed.get(session_id)
            if session is None:
                raise UnknownSession(f"no data kept for session {session_id.hex()}")
            return session

    def expire(self) -> None:
        """Closes idle sessions and forgets retained steps past the window."""
        with self._lock:
            now = self.clock()
            for session_id in [
                s.id for s in self._open.values() if now - s.last_used > self.limits.session_idle_s
            ]:
                self.close(session_id)
            for session_id in [
                s.id
                for s in self._closed.values()
                if s.closed_at is not None and now - s.closed_at > self.limits.retention_s
            ]:
                del self._closed[session_id]

    def is_open(self, session_id: bytes) -> bool:
        return session_id in self._open

    def knows(self, session_id: bytes) -> bool:
        """Whether the session is open, or closed and its steps still retained."""
        return session_id in self._open or session_id in self._closed

    @property
    def cached_tokens(self) -> int:
        return sum(session.positions for session in self._open.values())

    def _trim_retention(self) -> None:
        total = sum(
            record.nbytes for s in (*self._open.values(), *self._closed.values()) for record in s.records
        )
        for session in sorted(self._closed.values(), key=lambda s: s.closed_at or 0.0):
            if total <= self.limits.max_retained_bytes:
                return
            total -= sum(record.nbytes for record in session.records)
            del self._closed[session.id]

    # -- steps ----------------------------------------------------------------------------------------------

    def step(
        self, session_id: bytes, step: int, inputs: torch.Tensor, *, input_hash: bytes | None = None
    ) -> tuple[torch.Tensor, StepRecord]:
        """Runs one step. Returns the span's output (hidden states, or last-position logits on the last span).

        ``input_hash`` is the inputs' sha256 when the caller already verified it (a wire frame's), so the hot
        path does not hash the same bytes twice.
        """
        with self._lock:
            session = self._open.get(session_id)
            if session is None:
                raise UnknownSession(f"no open session {session_id.hex()}")
            if session.spoiled is not None:
                raise BadStepInput(f"session {session_id.hex()} takes no more steps: {session.spoiled}")
            if step != session.next_step:
                raise StepOutOfOrder(session_id.hex(), session.next_step, step)
            seq = self._check_input(inputs)
            if session.positions + seq > self.limits.max_session_tokens:
                raise ProviderBusy(
                    f"session {session_id.hex()} would hold {session.positions + seq} positions, "
                    f"the limit is {self.limits.max_session_tokens}"
                )
            if self.cached_tokens + seq > self.limits.max_cached_tokens:
                raise ProviderBusy(
                    f"KV caches hold {self.cached_tokens} positions, the limit is {self.limits.max_cached_tokens}"
                )
            if self.shard.span.first:
                output = self.shard.forward(cache=session.cache, input_ids=inputs)
            else:
                output = self.shard.forward(cache=session.cache, hidden=inputs)
            if not bool(torch.isfinite(output).all()):
                # Finite inputs that overflow in this span's precision (say, float32 values past float16's
                # range). The step is not recorded, so the session still closes with a receipt for the steps
                # before it; but the cache took the step's positions (a sliding window may have dropped older
                # ones for them), so no later step can run on it.
                session.spoiled = f"step {step}'s output was not finite"
                raise BadStepInput(f"span {self.shard.span}'s output is not finite for this input")
            record = StepRecord(
                step, inputs, output, input_hash or payload_sha256(inputs), payload_sha256(output)
            )
            session.records.append(record)
            session.positions += seq
            session.next_step += 1
            session.last_used = self.clock()
            return output, record

    def _check_input(self, inputs: torch.Tensor) -> int:
        shard = self.shard
        if shard.span.first:
            if (
                inputs.dtype != torch.int64
                or inputs.dim() != 2
                or inputs.shape[0] != 1
                or inputs.shape[1] == 0
            ):
                raise BadStepInput(
                    f"the first span takes token ids (1, seq) int64, got {inputs.dtype} {tuple(inputs.shape)}"
                )
            if int(inputs.min()) < 0 or int(inputs.max()) >= shard.vocab_size:
                raise BadStepInput(f"token ids must be in [0, {shard.vocab_size})")
        else:
            expected = (1, inputs.shape[1] if inputs.dim() == 3 else -1, shard.hidden_size)
            if (
                not inputs.is_floating_point()
                or inputs.dim() != 3
                or tuple(inputs.shape) != expected
                or inputs.shape[1] == 0
            ):
                raise BadStepInput(
                    f"span {shard.span} takes hidden states (1, seq, {shard.hidden_size}), "
                    f"got {inputs.dtype} {tuple(inputs.shape)}"
                )
            if not bool(torch.isfinite(inputs).all()):
                raise BadStepInput("hidden states contain NaN or infinity")
        return int(inputs.shape[1])
