"""Continuous batching on a provider: the steps that arrive while a forward pass runs go together into the next.

The hop server hands every step to :meth:`StepScheduler.run` and awaits it. One task loops: it takes every step
waiting, runs them as one batch on the runtime (:meth:`worker.runtime.SpanRuntime.run_batch`) on a worker
thread, so the event loop goes on reading the next steps off the network meanwhile, and answers each step that
finished. A prefill too long for one pass stays in the loop for the next, beside whatever decodes arrived.

A pass reads every weight of the span whatever its rows, so on a decode step's few rows its time hardly grows
with them (here, 13 ms for one row of an 8-layer span of the 300M model, 34 ms for sixteen): the fewer passes,
the more tokens. Batches form from load itself, as steps pile up while a pass computes; and before a pass the
scheduler waits, at most as long as the last pass took, for the steps of the sessions that stepped here within the
last second and are still on their way round their routes. On a ring, sessions then travel together, each
provider taking all of them in one pass, rather than spread round it in small passes at every provider at once.
A lone session never waits (every session that may come is already here), and no step waits more than one pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from worker.errors import ProviderBusy
from worker.runtime import PendingStep, SpanRuntime, StepRecord

log = logging.getLogger(__name__)

# A session that took a step this recently is expected back soon; its next step is worth waiting for.
ACTIVE_WITHIN_S = 1.0
MAX_GATHER_S = 0.25


class StepScheduler:
    def __init__(self, runtime: SpanRuntime) -> None:
        self.runtime = runtime
        self._waiting: list[tuple[PendingStep, asyncio.Future[tuple[torch.Tensor, StepRecord, float]]]] = []
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.Task[None] | None = None
        self._pass_s = 0.0  # how long the last pass took
        # Every pass on one thread of its own: OpenMP keeps a team of threads per thread that starts parallel work,
        # and passes handed to whichever thread of a pool is free ran a quarter slower here than on one thread.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="span-compute")

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
            await self._gather(len(carried))
            batch = carried + [(pending, future, 0.0) for pending, future in self._waiting]
            self._waiting = []
            started = time.perf_counter()
            try:
                steps = [pending for pending, _, _ in batch]
                await asyncio.get_running_loop().run_in_executor(self._compute, self.runtime.run_batch, steps)
            except Exception as exc:  # a bug, say: refuse the batch, keep serving
                log.exception("a batch of %d steps failed", len(batch))
                for pending, _, _ in batch:
                    if not pending.done:
                        self.runtime.abandon(pending)  # its session takes steps again
                        pending.error = ProviderBusy(f"the step's batch failed on this provider: {exc}"[:300])
            spent_ms = (time.perf_counter() - started) * 1e3
            self._pass_s = spent_ms / 1e3
            log.debug("a pass of %d steps: %.1f ms", len(batch), spent_ms)
            carried = []
            for pending, future, ms in batch:
                if future.done():  # its caller went away
                    if not pending.done:
                        self.runtime.abandon(pending)
                    continue
                if pending.error is not None:
                    future.set_exception(pending.error)
                elif pending.result is not None:
                    output, record = pending.result
                    future.set_result((output, record, round(ms + spent_ms, 3)))
                else:
                    carried.append((pending, future, ms + spent_ms))

    async def _gather(self, carried: int) -> None:
        """Waits, at most one pass's time, for the steps of sessions that are running elsewhere on their routes
        to arrive, so that they share the next pass rather than each run one of their own."""
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(self._pass_s, MAX_GATHER_S)
        while len(self._waiting) + carried < self.runtime.active_sessions(ACTIVE_WITHIN_S):
            left = deadline - loop.time()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return
            self._wake.clear()

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        self._compute.shutdown(wait=False)
