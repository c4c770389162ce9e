"""Sessions on one shard: a KV cache each, steps in order, their inputs and outputs retained, and limits that
say "busy" instead of running out of memory or disk.

A session's step 0 is the prefill (the whole prompt, or a replayed prefix); every later step adds positions,
normally one token. The first span takes token ids (1, seq) int64; every other span takes hidden states
(1, seq, hidden). Each step's input and output are written to disk with their sha256 (the same digests the wire
format puts in frame headers) and kept for ``retention_s`` after the session ends, so a validator can fetch
them (:mod:`worker.retention`).

Steps run in batches (:meth:`SpanRuntime.run_batch`): one forward pass over the span takes the next positions of
every step handed to it, packed together (:mod:`worker.batching`), each session attending to its own keys and
values. Decode steps (one position) always go in whole; a prefill goes in chunks of what is left of the pass's
``max_batch_positions``, so a long prompt never holds up the sessions decoding beside it for more than one pass.
A family whose attention cannot be packed (learned attention sinks) runs one step at a time on the model's own
attention and cache.

A session's room is reserved when it opens, for the most positions its ticket allows: its keys and values
(counted in positions, ``max_cached_tokens`` over all sessions) and its retained steps on disk
(``max_retained_bytes``), together. A session that opened never finds either full halfway through.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache

from worker.batching import SessionKV
from worker.errors import (
    BadStepInput,
    ProviderBusy,
    SessionExists,
    StepOutOfOrder,
    UnknownSession,
    WorkerError,
)
from worker.retention import KeptStep, RetainedSession, RetentionStore
from worker.shard import Shard
from worker.wire import HEADER_SIZE, payload_sha256


@dataclass(frozen=True)
class RuntimeLimits:
    max_sessions: int = 64  # sessions open at once
    max_cached_tokens: int = 65_536  # KV cache positions reserved, summed over open sessions' position caps
    max_batch_positions: int = 256  # new positions in one forward pass: decodes whole, prefills chunked
    max_session_tokens: int = 8_192  # positions in one session (prompt and generated)
    session_idle_s: float = 300.0  # an open session unused this long is closed
    retention_s: float = 900.0  # how long a session's steps are kept after it closes
    max_retained_bytes: int = 64 << 30  # on disk, with what open sessions may still write: past it, busy

    def __post_init__(self) -> None:
        for name in (
            "max_sessions",
            "max_cached_tokens",
            "max_session_tokens",
            "max_retained_bytes",
            "max_batch_positions",
        ):
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
    kv: SessionKV | None  # its keys and values for packed steps; None once closed, or on an unpackable span
    cache: DynamicCache | None  # its cache on a span whose steps run one at a time
    retained: RetainedSession  # its steps on disk
    opened_at: float
    last_used: float
    max_positions: int  # what it reserved: its ticket's cap
    next_step: int = 0
    positions: int = 0
    closed_at: float | None = None
    spoiled: str | None = None  # why no further step can run: its cache holds a step that was refused
    in_progress: PendingStep | None = None  # its step admitted to a pass and not yet finished or refused
    # Every step's input in one dtype, the first's: steps alike join into one fetch reply (worker.server), and
    # a previous hop alternating dtypes could otherwise make the provider's data too slow to fetch.
    input_dtype: torch.dtype | None = None
    retained_from: int = 0  # the size of its file of steps when it opened, before any step

    @property
    def retained_steps(self) -> int:
        """Bytes its steps took on disk so far."""
        return self.retained.size - self.retained_from

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


@dataclass(eq=False)
class PendingStep:
    """A session's step on its way through :meth:`SpanRuntime.run_batch`: done once ``result`` or ``error`` is
    set. A prefill longer than a pass's room takes several passes; ``computed`` says how far it got."""

    session: bytes
    step: int
    inputs: torch.Tensor
    input_hash: bytes | None = None  # the inputs' sha256 when the caller already verified it (a wire frame's)
    computed: int = 0
    outputs: list[torch.Tensor] = field(default_factory=list)
    result: tuple[torch.Tensor, StepRecord] | None = None
    error: WorkerError | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    @property
    def left(self) -> int:
        width = int(self.inputs.shape[1]) if self.inputs.dim() >= 2 else 0  # a malformed one is refused later
        return width - self.computed


class SpanRuntime:
    """Runs steps for many sessions on one shard, many sessions' steps to a forward pass. Thread-safe: a batch
    computes without holding the runtime's lock, so sessions open and close meanwhile.

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
            if self.cached_tokens + positions > self.limits.max_cached_tokens:
                raise ProviderBusy(
                    f"KV caches have {self.cached_tokens} positions reserved and the session asks {positions}: "
                    f"the limit is {self.limits.max_cached_tokens}"
                )
            retained = self.store.begin(session_id, job, self.retained_bytes(positions))
            now = self.clock()
            packed = self.shard.packable
            session = Session(
                session_id,
                self.shard.new_kv(positions) if packed else None,
                None if packed else self.shard.new_cache(),
                retained,
                opened_at=now,
                last_used=now,
                max_positions=positions,
                retained_from=retained.size,
            )
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
            session.kv = session.cache = None
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

    def active_sessions(self, within_s: float) -> int:
        """Open sessions that opened or took a step within the last ``within_s`` seconds."""
        since = self.clock() - within_s
        return sum(1 for session in list(self._open.values()) if session.last_used >= since)

    @property
    def cached_tokens(self) -> int:
        """KV cache positions reserved by open sessions."""
        return sum(session.max_positions for session in self._open.values())

    # -- steps ----------------------------------------------------------------------------------------------

    def step(
        self, session_id: bytes, step: int, inputs: torch.Tensor, *, input_hash: bytes | None = None
    ) -> tuple[torch.Tensor, StepRecord]:
        """Runs one step on its own. Returns the span's output (hidden states, or last-position logits on the
        last span) and its record; raises the WorkerError that refused it."""
        pending = PendingStep(session_id, step, inputs, input_hash)
        while not pending.done:
            self.run_batch([pending])
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def run_batch(self, pending: Sequence[PendingStep]) -> None:
        """One forward pass over the next positions of ``pending`` steps (at most one per session), decodes first
        and prefills chunked within ``max_batch_positions``; each step that finishes or is refused gets its
        ``result`` or ``error``. Steps left unfinished go on in a later call."""
        with self._lock:
            room = self.limits.max_batch_positions
            admitted: list[tuple[PendingStep, Session, int]] = []
            for item in sorted(pending, key=lambda p: p.left > 1):
                if item.done:
                    continue
                session = self._admit(item)
                if session is None:
                    continue
                count = min(item.left, max(room, 1 if not admitted else 0))
                if count == 0:
                    if not item.computed:  # not begun: checked again when it gets room
                        session.in_progress = None
                    continue
                admitted.append((item, session, count))
                room -= count
        if not admitted:
            return
        outputs: list[torch.Tensor | Exception]
        try:
            outputs = list(self._forward(admitted))
        except Exception as exc:  # out of memory, say, or one step past a learned position embedding
            if self.shard.packable and len(admitted) > 1:
                # Each step alone, so that no session is refused for what another sent. A failed packed pass
                # leaves every session's cache as good as before: positions past a session's own are written
                # again before any attention reads them.
                outputs = [self._forward_alone(entry) for entry in admitted]
            else:
                outputs = [exc] * len(admitted)
        with self._lock:
            for (item, session, count), output in zip(admitted, outputs, strict=True):
                if isinstance(output, Exception):
                    if session.in_progress is item:
                        session.in_progress = None
                    if not self.shard.packable:  # its cache took some of the step's positions
                        session.spoiled = f"a batch failed: {output}"[:200]
                    item.error = ProviderBusy(f"the step's batch failed on this provider: {output}"[:300])
                    continue
                item.computed += count
                item.outputs.append(output)
                if item.left == 0:
                    self._finish(item, session)

    def abandon(self, item: PendingStep) -> None:
        """Forgets a step whose caller went away before it finished (a prefill part way through its chunks): its
        session may take the step again."""
        with self._lock:
            session = self._open.get(item.session)
            if session is not None and session.in_progress is item:
                session.in_progress = None

    def _admit(self, item: PendingStep) -> Session | None:
        """The session ``item`` runs in, with ``item`` marked its step in progress, or None with ``item.error`` set
        (checked at the step's first chunk; a later chunk only needs its session still open and still on it)."""
        session = self._open.get(item.session)
        try:
            if session is None:
                raise UnknownSession(f"no open session {item.session.hex()}")
            if item.computed:
                if session.in_progress is not item:
                    raise UnknownSession(f"session {item.session.hex()} dropped the step")
                return session
            if session.spoiled is not None:
                raise BadStepInput(f"session {item.session.hex()} takes no more steps: {session.spoiled}")
            if session.in_progress is not None or item.step != session.next_step:
                raise StepOutOfOrder(item.session.hex(), session.next_step, item.step)
            seq = self._check_input(item.inputs)
            if session.input_dtype not in (None, item.inputs.dtype):
                raise BadStepInput(
                    f"the session's steps are {session.input_dtype}, this one is {item.inputs.dtype}"
                )
            if session.positions + seq > session.max_positions:
                raise ProviderBusy(
                    f"session {item.session.hex()} would hold {session.positions + seq} positions, "
                    f"the limit is {session.max_positions}"
                )
            # Its reservation was for the widest input a step takes in the span's terms (float32 hidden states);
            # a previous hop sending float64 takes more per position, and past the reservation it is refused.
            if session.retained_steps + self._step_bytes(item.inputs) > session.retained.reserved:
                raise ProviderBusy(
                    f"session {item.session.hex()}'s step would write past the disk it reserved for its steps"
                )
        except WorkerError as exc:
            item.error = exc
            return None
        session.in_progress = item
        return session

    def _step_bytes(self, inputs: torch.Tensor) -> int:
        """The most a step of ``inputs`` writes to disk: its input as sent, its output at float32 width."""
        shard = self.shard
        output = shard.vocab_size if shard.span.last else int(inputs.shape[1]) * shard.hidden_size
        return 2 * HEADER_SIZE + inputs.numel() * inputs.element_size() + output * 4

    def _forward_alone(self, entry: tuple[PendingStep, Session, int]) -> torch.Tensor | Exception:
        try:
            return self._forward([entry])[0]
        except Exception as exc:  # the step's own failure, reported to it
            return exc

    def _forward(self, admitted: list[tuple[PendingStep, Session, int]]) -> list[torch.Tensor]:
        rows = []
        for item, session, count in admitted:
            chunk = item.inputs[:, item.computed : item.computed + count]
            rows.append((session, session.positions + item.computed, chunk))
        if self.shard.packable:
            return self.shard.forward_packed([(s.kv, past, chunk) for s, past, chunk in rows])  # type: ignore[misc]
        outputs = []
        for session, _, chunk in rows:
            key = "input_ids" if self.shard.span.first else "hidden"
            outputs.append(self.shard.forward(cache=session.cache, **{key: chunk}))  # type: ignore[arg-type]
        return outputs

    def _finish(self, item: PendingStep, session: Session) -> None:
        """Records a step whose every position was computed, or refuses it if its output is not finite."""
        session.in_progress = None
        if self._open.get(item.session) is not session:
            item.error = UnknownSession(f"session {item.session.hex()} closed while its step ran")
            return
        # A chunked prefill's hidden states are its chunks' together; on the last span only the last one's logits.
        whole = self.shard.span.last or len(item.outputs) == 1
        output = item.outputs[-1] if whole else torch.cat(item.outputs, dim=1)
        seq = int(item.inputs.shape[1])
        if not bool(torch.isfinite(output).all()):
            # Finite inputs that overflow in this span's precision (say, float32 values past float16's range).
            # The step is not recorded, so the session still closes with a receipt for the steps before it; but
            # the cache took the step's positions, so no later step can run on it.
            session.spoiled = f"step {item.step}'s output was not finite"
            item.error = BadStepInput(f"span {self.shard.span}'s output is not finite for this input")
            return
        record = StepRecord(
            item.step,
            item.inputs,
            output,
            item.input_hash or payload_sha256(item.inputs),
            payload_sha256(output),
        )
        try:
            self.store.append(
                item.session,
                item.step,
                ((record.input, record.input_hash), (record.output, record.output_hash)),
            )
        except OSError as exc:  # unretained, the step did not happen: the session may take it again
            item.error = ProviderBusy(f"the step could not be kept for validators: {exc}"[:300])
            return
        session.positions += seq
        session.input_dtype = item.inputs.dtype
        session.next_step += 1
        session.last_used = self.clock()
        item.result = (output, record)

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
