"""Continuous batching on a provider: the steps that arrive while a forward pass runs go together into the next.

The hop server hands every step to :meth:`StepScheduler.run` and awaits it. One task loops: it takes every step
waiting, runs them as one batch on the runtime (:meth:`worker.runtime.SpanRuntime.run_batch`) on a worker
thread, so the event loop goes on reading the next steps off the network meanwhile, and answers each step that
finished. A prefill too long for one pass stays in the loop for the next, beside whatever decodes arrived.

There is no waiting for a batch to fill: a step that finds the span idle runs at once, alone. Batches form from
load itself, because steps pile up while a pass computes, so a single session pays no latency for batching and
many sessions share each pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import torch

from worker.errors import ProviderBusy
from worker.runtime import PendingStep, SpanRuntime, StepRecord

log = logging.getLogger(__name__)


class StepScheduler:
    def __init__(self, runtime: SpanRuntime) -> None:
        self.runtime = runtime
        self._waiting: list[tuple[PendingStep, asyncio.Future[tuple[torch.Tensor, StepRecord, float]]]] = []
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.Task[None] | None = None

    async def run(
        self, session: bytes, step: int, inputs: torch.Tensor, input_hash: bytes | None
    ) -> tuple[torch.Tensor, StepRecord, float]:
        """Runs the step in the next batch: its output, its record, and the milliseconds its batch's forward pass
        (or passes, for a chunked prefill) took. Raises the WorkerError that refused it."""
        if self._loop is None:
            self._wake = asyncio.Event()
            self._loop = asyncio.create_task(self._batches())
        assert self._wake is not None
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((PendingStep(session, step, inputs, input_hash), future))
        self._wake.set()
        outcome: tuple[torch.Tensor, StepRecord, float] = await future
        return outcome

    async def _batches(self) -> None:
        assert self._wake is not None
        carried: list[tuple[PendingStep, asyncio.Future[tuple[torch.Tensor, StepRecord, float]], float]] = []
        while True:
            if not self._waiting and not carried:
                await self._wake.wait()
            self._wake.clear()
            batch = carried + [(pending, future, 0.0) for pending, future in self._waiting]
            self._waiting = []
            started = time.perf_counter()
            try:
                await asyncio.to_thread(self.runtime.run_batch, [pending for pending, _, _ in batch])
            except Exception as exc:  # a bug, say: refuse the batch, keep serving
                log.exception("a batch of %d steps failed", len(batch))
                for pending, _, _ in batch:
                    if not pending.done:
                        pending.error = ProviderBusy(f"the step's batch failed on this provider: {exc}"[:300])
            spent_ms = (time.perf_counter() - started) * 1e3
            carried = []
            for pending, future, ms in batch:
                if future.done():  # its caller went away
                    continue
                if pending.error is not None:
                    future.set_exception(pending.error)
                elif pending.result is not None:
                    output, record = pending.result
                    future.set_result((output, record, round(ms + spent_ms, 3)))
                else:
                    carried.append((pending, future, ms + spent_ms))

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
