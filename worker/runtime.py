"""Sessions on one shard: a KV cache each, steps in order, their inputs and outputs retained, and limits that
say "busy" instead of running out of memory or disk.

A session's step 0 is the prefill (the whole prompt, or a replayed prefix); every later step adds positions,
normally one token. The first span takes token ids (1, seq) int64; every other span takes hidden states
(1, seq, hidden). Each step's input and output are written to disk with their sha256 (the same digests the wire
format puts in frame headers) and kept for ``retention_s`` after the session ends, so a validator can fetch
them (:mod:`worker.retention`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from worker.errors import BadStepInput, ProviderBusy, SessionExists, StepOutOfOrder, UnknownSession
from worker.retention import KeptStep, RetainedSession, RetentionStore
from worker.shard import Shard
from worker.wire import HEADER_SIZE, payload_sha256


@dataclass(frozen=True)
class RuntimeLimits:
    max_sessions: int = 64  # sessions open at once
    max_cached_tokens: int = 65_536  # positions held in KV caches, summed over open sessions
    max_session_tokens: int = 8_192  # positions in one session (prompt and generated)
    session_idle_s: float = 300.0  # an open session unused this long is closed
    retention_s: float = 900.0  # how long a session's steps are kept after it closes
    max_retained_bytes: int = 64 << 30  # on disk, with what open sessions may still write: past it, busy

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


@dataclass
class Session:
    id: bytes
    cache: DynamicCache
    retained: RetainedSession  # its steps on disk
    opened_at: float
    last_used: float
    next_step: int = 0
    positions: int = 0
    closed_at: float | None = None
    spoiled: str | None = None  # why no further step can run: its cache holds a step that was refused
    # Every step's input in one dtype, the first's: steps alike join into one fetch reply (worker.server), and
    # a previous hop alternating dtypes could otherwise make the provider's data too slow to fetch.
    input_dtype: torch.dtype | None = None

    @property
    def job(self) -> bytes:
        return self.retained.job

    @property
    def records(self) -> list[KeptStep]:
        return self.retained.steps

    @property
    def tokens(self) -> int:
        """Positions this span processed for the session: what its receipt bills."""
        return self.positions


class SpanRuntime:
    """Runs steps for many sessions on one shard. Thread-safe; steps of one shard run one at a time.

    ``retained`` is the directory its steps are kept in, read back on start (a provider that restarts keeps
    what validators may still ask for); None keeps them in a temporary directory removed with the runtime.
    ``clock`` stands in for both the wall clock that retention is kept by (it outlives the process) and the
    monotonic one that idle sessions are timed by (a clock stepped forward must not close them).
    """

    def __init__(
        self,
        shard: Shard,
        limits: RuntimeLimits | None = None,
        clock: Callable[[], float] | None = None,
        *,
        retained: Path | None = None,
    ) -> None:
        self.shard = shard
        self.limits = limits or RuntimeLimits()
        self.clock = clock or time.monotonic
        self.store = RetentionStore(
            retained,
            budget_bytes=self.limits.max_retained_bytes,
            retention_s=self.limits.retention_s,
            clock=clock or time.time,
        )
        self._open: dict[bytes, Session] = {}
        self._lock = threading.RLock()

    # -- sessions -------------------------------------------------------------------------------------------

    def open(self, session_id: bytes, job: bytes = b"", *, max_positions: int | None = None) -> Session:
        """Opens a session of at most ``max_positions`` positions (default: the session limit), reserving the
        disk its steps may take."""
        with self._lock:
            self.expire()
            if session_id in self._open or session_id in self.store:
                raise SessionExists(f"session {session_id.hex()} already exists")
            if len(self._open) >= self.limits.max_sessions:
                raise ProviderBusy(
                    f"{len(self._open)} sessions open, the limit is {self.limits.max_sessions}"
                )
            positions = min(max_positions or self.limits.max_session_tokens, self.limits.max_session_tokens)
            retained = self.store.begin(session_id, job, self.retained_bytes(positions))
            now = self.clock()
            session = Session(session_id, self.shard.new_cache(), retained, opened_at=now, last_used=now)
            self._open[session_id] = session
            return session

    def retained_bytes(self, positions: int) -> int:
        """The most ``positions`` positions' steps can take on disk: every step one position, its input as wide
        as the span accepts, its output a row of logits (last span) or hidden states in float32."""
        shard = self.shard
        widest_input = 8 if shard.span.first else shard.hidden_size * 4
        widest_output = (shard.vocab_size if shard.span.last else shard.hidden_size) * 4
        return positions * (2 * HEADER_SIZE + widest_input + widest_output)

    def close(self, session_id: bytes) -> Session:
        """Ends a session: its KV cache is freed, its steps are retained for ``retention_s``."""
        with self._lock:
            session = self._open.pop(session_id, None)
            if session is None:
                raise UnknownSession(f"no open session {session_id.hex()}")
            session.cache = self.shard.new_cache()
            session.closed_at = self.store.close(session_id).closed_at
            return session

    def retained(self, session_id: bytes) -> list[StepRecord]:
        """The steps of a session, open or closed within the retention window, read back from disk."""
        with self._lock:
            session = self.retained_session(session_id)
            records = []
            for kept in session.steps:
                inputs = self.store.read(session_id, kept.step, "input")
                outputs = self.store.read(session_id, kept.step, "output")
                records.append(
                    StepRecord(kept.step, inputs.tensor, outputs.tensor, inputs.sha256, outputs.sha256)
                )
            return records

    def retained_session(self, session_id: bytes) -> RetainedSession:
        """A session open, or closed within the retention window: its job and where its steps lie."""
        with self._lock:
            self.expire()
            return self.store.get(session_id)

    def read(self, session_id: bytes, step: int, part: str) -> torch.Tensor:
        """One retained step's ``input`` or ``output``. Without the runtime's lock: a kept step's bytes never
        change, and a fetch reading them in a thread must not hold up steps (a session expired meanwhile raises
        UnknownSession, or FileNotFoundError if its file went between the lookup and the read)."""
        return self.store.read(session_id, step, part).tensor

    def expire(self) -> None:
        """Closes idle sessions and forgets retained steps past the window."""
        with self._lock:
            now = self.clock()
            for session_id in [
                s.id for s in self._open.values() if now - s.last_used > self.limits.session_idle_s
            ]:
                self.close(session_id)
            self.store.expire()

    def is_open(self, session_id: bytes) -> bool:
        return session_id in self._open

    def knows(self, session_id: bytes) -> bool:
        """Whether the session is open, or closed and its steps still retained."""
        return session_id in self._open or session_id in self.store

    @property
    def cached_tokens(self) -> int:
        return sum(session.positions for session in self._open.values())

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
            if session.input_dtype not in (None, inputs.dtype):
                raise BadStepInput(
                    f"the session's steps are {session.input_dtype}, this one is {inputs.dtype}"
                )
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
            self.store.append(
                session_id, step, ((record.input, record.input_hash), (record.output, record.output_hash))
            )
            session.positions += seq
            session.input_dtype = inputs.dtype
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
