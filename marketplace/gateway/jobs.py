"""A request's life in the gateway: quote, payment, matching, generation, and the record of what it cost.

    quote      route it on the book (reserving nothing) and price (prompt + max_tokens) positions on that route
    admit      no payment: 402 with the quote. A payment: match again, now reserving capacity, and secure the
               payment against that route's quote, writing the job row in the same transaction.
    run        in a task of its own, so a client that disconnects cannot cut the bookkeeping short: the
               coordinator generates, text deltas go to whoever listens, and at the end one transaction writes
               the hops, the receipts, the charge and the channel's new totals.

What a job is charged: the metered sum of its verified receipts, at most the quote. A job that failed (no
route left after provider failures) is charged for the tokens it delivered, on the receipts that back them,
and nothing if it delivered none. A job whose client went away is charged for the positions computed before
it stopped; its text is kept and can be read at ``GET /v1/jobs/{id}``.

Jobs from ``POST /v1/jobs`` may rest in the book: paid up to their ``max_price``, they wait until a route at or
below it appears (bids by highest max price, then oldest first), or expire, releasing the reservation.

After a crash, jobs that were running have their reservations released uncharged, and exact payments that
were settled for them are recorded as refunds owed; resting jobs go back in the book.

An ``exact`` transfer is the gateway's to send, but anyone holding the authorization may send it first, and a
send may end without an answer. What the chain shows decides, never the send's own outcome: a transfer found
on chain (its AuthorizationUsed log) pays for the job; one whose outcome is unknown leaves the job ``paying``
until :meth:`JobRunner.reconcile_payments` (at start-up and every ``reconcile_s``) finds it landed (a refund
owed in full) or unable to land (expired, or cancelled by its payer: nothing owed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from marketplace.gateway.catalog import Catalog, ServedModel
from marketplace.gateway.coordinator import Coordinator, JobSpec, Outcome
from marketplace.gateway.errors import Conflict, GatewayError, PaymentRejected
from marketplace.gateway.jobstore import JobStore
from marketplace.gateway.metrics import Metrics
from marketplace.gateway.orderbook import Budget, OrderBook, Route
from marketplace.gateway.payments.gate import NONE, PaymentGate, Reservation, Settled, Terms, hex0x
from marketplace.gateway.payments.x402 import EXACT, VOUCHER, Payment, decode_payment, payment_required
from marketplace.gateway.resting import Resting, RestingJobs
from marketplace.gateway.text import TextStream
from settlement.db.schema import (
    Authorization,
    AuthorizationStatus,
    Channel,
    Job,
    JobStatus,
)
from settlement.pricing import TOKEN_LAYERS_PER_PRICE_UNIT
from worker.sampling import TokenLogprobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    kind: str  # chat, completion, job
    model: ServedModel
    prompt: list[int]
    max_tokens: int
    sampling: dict[str, Any]  # worker.sampling.SamplingParams' fields, as the last provider takes them
    stops: tuple[str, ...] = ()
    max_price: int | None = None  # the most the client will pay, base units
    ttl_s: int | None = None  # how long a job may rest in the book
    choices: int = 1  # generations of the prompt (n), each billed as computed

    @property
    def quote_tokens(self) -> int:
        return self.choices * (len(self.prompt) + self.max_tokens)

    def stored(self) -> dict[str, Any]:
        stored = {"prompt": self.prompt, "sampling": self.sampling, "stops": list(self.stops)}
        return stored if self.choices == 1 else {**stored, "choices": self.choices}


@dataclass(frozen=True)
class Quote:
    route: Route | None  # None only for a job that will rest until a route appears
    amount: int  # what the client authorizes: the route's cost and the failover margin, or its max_price
    cost: int | None = None  # what the route costs

    def describe(self) -> list[dict[str, Any]]:
        if self.route is None:
            return []
        return [
            {"provider": a.provider, "layers": [a.start, a.end], "pricePerMillion": str(a.price_per_million)}
            for a in self.route.asks
        ]


@dataclass(frozen=True)
class Delta:
    text: str
    # The tokens behind ``text`` with their log probabilities, when the request asked for them. A token whose
    # text is held back (an unfinished character, the start of a stop string) comes with the text that follows.
    logprobs: tuple[tuple[int, TokenLogprobs], ...] = ()
    choice: int = 0


@dataclass(frozen=True)
class Finished:
    job: Job
    settled: Settled
    finishes: tuple[str | None, ...] = ()  # each choice's finish_reason, when the job completed


@dataclass(frozen=True)
class Unrecorded:
    """The job ended but its outcome could not be written: nothing is charged for it, and its reservation is
    released when the gateway next starts."""

    message: str


Event = Delta | Finished | Unrecorded


@dataclass
class JobRun:
    """A job the runner accepted. ``events`` carries its text deltas, then one Finished (or Unrecorded), to a
    listener."""

    job_id: str
    request: Request
    reservation: Reservation
    listen: bool
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    halted: bool = False  # the listener went away: stop after the current step

    def halt(self) -> None:
        self.halted = True

    def publish(self, event: Event) -> None:
        if self.listen:
            self.events.put_nowait(event)


class JobRunner:
    def __init__(
        self,
        *,
        book: OrderBook,
        catalog: Catalog,
        coordinator: Coordinator,
        gate: PaymentGate,
        terms: Terms,
        sessions: async_sessionmaker[AsyncSession],
        payments_enabled: bool,
        metrics: Metrics,
        sweep_s: float = 1.0,
        reconcile_s: float = 30.0,
        max_resting_jobs: int = 10_000,
        max_resting_per_payer: int = 100,
        clock: Callable[[], float] = time.time,
        on_finished: Callable[[str], None] | None = None,
        check_payer: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.book = book
        self.catalog = catalog
        self.coordinator = coordinator
        self.gate = gate
        self.terms = terms
        self.sessions = sessions
        self.payments_enabled = payments_enabled
        self.metrics = metrics
        self.sweep_s = sweep_s
        self.reconcile_s = reconcile_s  # between passes of reconcile_payments
        self.clock = clock
        self.store = JobStore(
            sessions, chain_id=terms.chain_id, gateway=coordinator.keys.address, clock=clock
        )
        self.on_finished = on_finished  # hands the recorded job to metering
        self.check_payer = check_payer  # raises RateLimited for a payer over its rate
        self._resting = RestingJobs(max_jobs=max_resting_jobs, max_per_payer=max_resting_per_payer)
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self._reconciled_at = 0.0

    # -- quoting -------------------------------------------------------------------------------------------

    def quote(self, request: Request) -> Quote:
        started = time.perf_counter()
        route = self._route(request)
        self.metrics.route_seconds.observe(time.perf_counter() - started)
        return self._priced(request, route)

    def _route(self, request: Request, *, reserve: bool = False) -> Route | None:
        """The book's route for ``request`` (by price, load and speed), within its max_price if it has one; when
        no route fits it, the best route all the same, so that the refusal names its cost. With ``reserve``, its
        capacity is taken before anything else can take it."""
        model = request.model
        budget = None if request.max_price is None else Budget(request.quote_tokens, request.max_price)
        route = self.book.route(model.root, model.num_layers, budget=budget)
        if route is None and budget is not None:
            route = self.book.route(model.root, model.num_layers)
        if route is not None and reserve:
            self.book.reserve(route)
        return route

    def _priced(self, request: Request, route: Route | None) -> Quote:
        if route is None:
            if request.kind == "job" and request.max_price is not None:
                return Quote(None, request.max_price)
            raise Conflict("no_route", f"no live, staked providers cover every layer of {request.model.name}")
        cost = route.quote(request.quote_tokens)
        if request.max_price is not None and cost > request.max_price:
            if request.kind == "job":
                return Quote(None, request.max_price)  # rest until a cheaper route appears
            raise Conflict(
                "max_price_exceeded",
                f"the route costs {cost}, above max_price {request.max_price}",
                quote=str(cost),
            )
        # A job that may rest reserves its whole max price, so any route up to it can take it later.
        if request.kind == "job" and request.max_price is not None:
            return Quote(route, request.max_price, cost)
        # The margin lets a failover finish on a dearer spare; max_price caps it.
        amount = self.terms.with_margin(cost)
        return Quote(route, amount if request.max_price is None else min(amount, request.max_price), cost)

    def payment_required(
        self,
        request: Request,
        quote: Quote,
        url: str,
        error: str | None = None,
        *,
        batch_state: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return payment_required(
            url=url,
            description=f"{request.kind} on {request.model.name}: up to {request.quote_tokens} tokens",
            accepts=self.terms.accepts(
                quote.amount,
                route=quote.describe(),
                tokens=request.quote_tokens,
                cost=quote.cost,
                batch_state=batch_state,
            ),
            error=error,
        )

    # -- admission -----------------------------------------------------------------------------------------

    async def admit(self, request: Request, header: str | None, *, url: str) -> JobRun:
        """Secures payment and starts (or rests) the job; raises PaymentRejected carrying a fresh 402 quote."""
        if not self.payments_enabled:
            return await self._admit_unpaid(request, self.quote(request))
        if header is None:
            quote = self.quote(request)
            error = PaymentRejected(
                "payment_required", f"this request costs up to {quote.amount}; pay to continue"
            )
            error.details["required"] = self.payment_required(request, quote, url)
            raise error
        # What costs nothing to check comes first: a payment that cannot be read, or a payer over its rate, holds
        # no route's capacity even for a moment.
        try:
            payment = decode_payment(header)
            if self.check_payer is not None:
                await self.check_payer(payment.payer)
        except PaymentRejected as exc:
            raise self._requoted(exc, request, None, url) from None
        # Matching reserves the route's capacity before payment, so the quote paid is the quote of the route that
        # will run; it is the one route this admission computes, and a refusal quotes it again.
        started = time.perf_counter()
        route = self._route(request, reserve=True)
        self.metrics.route_seconds.observe(time.perf_counter() - started)
        try:
            quote = self._priced(request, route)
            if quote.route is None and route is not None:
                self.book.release(route)  # a job that rests until a cheaper route appears
                route = None
            return await self._admit_paid(request, payment, quote, route)
        except BaseException as exc:
            if route is not None:
                self.book.release(route)
            if isinstance(exc, PaymentRejected):
                raise self._requoted(exc, request, route, url) from None
            raise

    def _requoted(
        self, exc: PaymentRejected, request: Request, route: Route | None, url: str
    ) -> PaymentRejected:
        """A refused payment, carrying the 402's fresh quote (on ``route``, when one was matched)."""
        self.metrics.payments.labels(scheme="any", outcome=exc.code).inc()
        quoted = self._priced(request, route) if route is not None else self.quote(request)
        exc.details["required"] = self.payment_required(
            request, quoted, url, exc.code, batch_state=exc.details.pop("batch_state", None)
        )
        return exc

    async def _admit_unpaid(self, request: Request, quote: Quote) -> JobRun:
        job_id = hex0x(os.urandom(32))
        reservation = Reservation(NONE, None, 0)
        route = self._match(request) if quote.route is not None else None
        if route is None:
            self._resting.check_room(None, Fraction(quote.amount, request.quote_tokens))
        await self.store.add(
            self.store.row(job_id, request, reservation, JobStatus.RUNNING if route else JobStatus.RESTING)
        )
        return self._launch(job_id, request, reservation, route)

    def _match(self, request: Request) -> Route:
        route = self._route(request, reserve=True)
        if route is None:
            raise Conflict("no_route", f"no live, staked providers cover every layer of {request.model.name}")
        return route

    async def _admit_paid(
        self, request: Request, payment: Payment, quote: Quote, route: Route | None
    ) -> JobRun:
        """Secures the payment for a route already matched (reserved), or for a job that will rest."""
        if route is None:
            # Before any money moves: a job that would rest must have room in the book.
            self._resting.check_room(payment.payer, Fraction(quote.amount, request.quote_tokens))
        job_id = hex0x(os.urandom(32))
        status = JobStatus.RUNNING if route is not None else JobStatus.RESTING
        reservation = await self.gate.secure(
            payment,
            quote.amount,
            lambda pending: self.store.row(job_id, request, pending, status),
        )
        self.metrics.payments.labels(scheme=reservation.scheme, outcome="accepted").inc()
        return self._launch(job_id, request, reservation, route)

    def _launch(self, job_id: str, request: Request, reservation: Reservation, route: Route | None) -> JobRun:
        run = JobRun(job_id, request, reservation, listen=request.kind != "job")
        if route is None:
            now = self.clock()
            self._resting.add(Resting(run, now, now + (request.ttl_s or 0)))
            self._wake.set()
        else:
            self._spawn(run, route)
        return run

    def _spawn(self, run: JobRun, route: Route) -> None:
        task = asyncio.create_task(self._execute(run, route))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- running -------------------------------------------------------------------------------------------

    async def _execute(self, run: JobRun, route: Route) -> None:
        request, model = run.request, run.request.model
        texts = [TextStream(model.decode, request.stops) for _ in range(request.choices)]
        pending: list[list[tuple[int, TokenLogprobs]]] = [[] for _ in range(request.choices)]

        async def emit(choice: int, token: int, logprobs: TokenLogprobs | None) -> bool:
            text = texts[choice]
            if logprobs is not None and not text.stopped:
                pending[choice].append((token, logprobs))
            delta = text.push(token)
            if delta:
                run.publish(Delta(delta, tuple(pending[choice]), choice))
                pending[choice].clear()
            return not (text.stopped or run.halted)

        spec = JobSpec(
            job_id=bytes.fromhex(run.job_id[2:]),
            model_root=model.root,
            num_layers=model.num_layers,
            vocab_size=model.vocab_size,
            prompt=request.prompt,
            max_tokens=request.max_tokens,
            sampling=request.sampling,
            stop_token_ids=model.stop_token_ids,
            budget=run.reservation.quote if run.reservation.scheme != NONE else None,
            choices=request.choices,
        )
        self.metrics.jobs_running.inc()
        try:
            outcome = await self.coordinator.run(spec, route, emit, halted=lambda: run.halted)
        except Exception as exc:  # a bug must not strand the reservation: the job fails uncharged
            log.exception("job %s failed inside the gateway", run.job_id)
            outcome = Outcome([], None, [], 0, "internal_error", f"the gateway failed: {exc!r}")
        finally:
            self.metrics.jobs_running.dec()
        for choice, text in enumerate(texts):
            tail = text.flush()
            if tail or pending[choice]:
                run.publish(Delta(tail, tuple(pending[choice]), choice))
        # A stop string ends a choice as "stop", whatever ended its generation.
        finishes = [
            "stop" if text.stopped else finish for text, finish in zip(texts, outcome.finishes, strict=False)
        ]
        if outcome.error_code is not None:
            status, finish = JobStatus.FAILED, None
        elif "halted" in finishes:
            status, finish = JobStatus.CANCELLED, None  # the listener went away
        else:
            status, finish = JobStatus.COMPLETED, finishes[0]
        # Without payment checks nobody is charged; what the providers metered stays on the hops and receipts.
        paid = run.reservation.scheme != NONE
        # A failed job carries bills only for tokens it delivered (see Coordinator._bill_delivered).
        charged = outcome.charged if paid else 0
        self.metrics.tokens.inc(len(outcome.tokens))
        self.metrics.failovers.inc(outcome.failovers)
        try:
            output = texts[0].text if request.choices == 1 else json.dumps([text.text for text in texts])
            await self._finish(run, status, finish, output, outcome, charged, tuple(finishes))
        except Exception as exc:
            run.publish(
                Unrecorded(f"the gateway could not record this job's outcome: {exc.__class__.__name__}")
            )

    async def _finish(
        self,
        run: JobRun,
        status: str,
        finish: str | None,
        text: str,
        outcome: Outcome,
        charged: int,
        finishes: tuple[str | None, ...] = (),
    ) -> None:
        job, settled = await self.store.record(
            run.job_id,
            status=status,
            finish=finish,
            output=text,
            outcome=outcome,
            charged=charged,
            settle=lambda session: self.gate.settle(session, run.reservation, run.job_id, charged),
        )
        if self.on_finished is not None:
            self.on_finished(run.job_id)
        self.metrics.jobs.labels(status=status).inc()
        if charged:
            self.metrics.charged.labels(scheme=run.reservation.scheme).inc(charged)
        run.publish(Finished(job, settled, finishes))

    # -- resting jobs, expiry and recovery -----------------------------------------------------------------

    def wake(self) -> None:
        """The book changed: try the resting jobs again now."""
        self._wake.set()

    async def start(self) -> None:
        await self.recover()
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for resting in self._resting.values():
            resting.run.halt()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(
            *self._tasks, *([self._sweeper] if self._sweeper else []), return_exceptions=True
        )

    async def _sweep_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # woken by a change, or the periodic pass
                await asyncio.wait_for(self._wake.wait(), self.sweep_s)
            self._wake.clear()
            try:
                await self.sweep()
            except Exception:
                log.exception("matching resting jobs failed")
            if self.clock() >= self._reconciled_at + self.reconcile_s:
                self._reconciled_at = self.clock()
                try:
                    await self.reconcile_payments()
                except Exception:
                    log.exception("reconciling exact payments failed")

    async def sweep(self) -> None:
        """Expires resting jobs past their time, and starts those a route now serves within their price: per
        model, the best bid the cheapest route fits, again and again until none does (see
        marketplace.gateway.resting)."""
        self.book.expire()
        now = self.clock()
        for resting in self._resting.expired(now):
            await self._finish(resting.run, JobStatus.EXPIRED, None, "", Outcome([], None, [], 0), 0)
        for model in self._resting.models():
            while (started := await self._start_best(model, now)) is not None:
                self._spawn(*started)

    async def _start_best(self, model: ServedModel, now: float) -> tuple[JobRun, Route] | None:
        """The best-bidding job of ``model`` the cheapest route serves within its price, taken out of the book
        and marked running with the route reserved; None when there is none."""
        route = self.book.route(model.root, model.num_layers)
        if route is None:
            return None
        rate = Fraction(route.price_per_token, TOKEN_LAYERS_PER_PRICE_UNIT)  # base units per position
        for resting in self._resting.bids(model.root, rate):
            run = resting.run
            if now >= resting.expires:
                continue  # the next sweep expires it
            if route.quote(run.request.quote_tokens) > run.reservation.quote:
                continue  # per-hop rounding puts it a unit or two over: a later, longer job may still fit
            # Paid from a channel its payer has since started to leave: it would run on money that may be gone
            # before the work is redeemed. It ends uncharged; an unreachable chain leaves it for the next pass.
            try:
                leaving = await self._channel_leaving(run.reservation)
            except Exception as exc:  # whatever the endpoint does, this job waits and the others go on
                log.warning("job %s: its channel cannot be read yet: %r", run.job_id, exc)
                continue
            if not all(ask.live and ask.free > 0 for ask in route.asks):
                return None  # an admission took the route's room while the chain was read: the next pass
            self._resting.remove(run.job_id)
            if leaving:
                refused = Outcome(
                    [], None, [], 0, "channel_exiting", "its payer started to leave the channel"
                )
                await self._finish(run, JobStatus.FAILED, None, "", refused, 0)
                continue
            self.book.reserve(route)
            await self.store.mark_running(run.job_id, now)
            return run, route
        return None

    async def _channel_leaving(self, reservation: Reservation) -> bool:
        if reservation.scheme != VOUCHER or reservation.channel_id is None:
            return False
        view = await self.gate.watcher.channel(bytes.fromhex(reservation.channel_id[2:]))
        return view.exiting or view.closed

    async def recover(self) -> None:
        """Releases what jobs interrupted by a crash held, settles payments left unknown, and puts resting jobs
        back in the book."""
        await self.reconcile_payments()
        # A running exact job's transfer landed: the job went to running with its authorization settled.
        await self.store.fail_interrupted(
            lambda session, job: self.gate.settle(
                session, Reservation(job.scheme, job.payer, job.quote, channel_id=job.channel_id), job.id, 0
            )
        )
        for job in await self.store.resting():
            model = self.catalog.by_root(job.model_root)
            if model is None:
                continue
            request = Request(
                kind=job.kind,
                model=model,
                prompt=list(job.request["prompt"]),
                max_tokens=job.max_tokens,
                sampling=dict(job.request["sampling"]),
                stops=tuple(job.request.get("stops", ())),
                max_price=job.max_price,
                choices=int(job.request.get("choices", 1)),
            )
            reservation = Reservation(job.scheme, job.payer, job.quote, channel_id=job.channel_id)
            run = JobRun(job.id, request, reservation, listen=False)
            expires = job.expires_at.timestamp() if job.expires_at else self.clock()
            self._resting.add(Resting(run, job.created_at.timestamp(), expires))

    async def reconcile_payments(self) -> int:
        """Settles exact payments whose transfer's outcome was unknown (no receipt in time, the chain down, the
        gateway killed while sending); returns how many are still unknown. A transfer that landed, whoever sent
        it, is owed back in full (the job never ran); an authorization that can no longer land (its nonce spent
        without paying, or past validBefore by the chain's clock) fails with nothing owed; one that still may
        land is left for the next pass. One payment the chain cannot be asked about holds up no other."""
        async with self.sessions() as session:
            paying = (await session.scalars(select(Job).where(Job.status == JobStatus.PAYING))).all()
            records = {
                record.job_id: record
                for record in await session.scalars(
                    select(Authorization).where(Authorization.job_id.in_([job.id for job in paying]))
                )
            }
        unknown = 0
        for job in paying:
            record = records.get(job.id)
            if job.id in self.gate.paying or record is None:
                continue
            try:
                fate = await self.gate.exact_fate(
                    record.payer, bytes.fromhex(record.nonce[2:]), record.value, record.from_block
                )
            except Exception as exc:  # an endpoint down or refusing: asked again at the next pass
                log.warning("job %s: its exact payment cannot be looked up yet: %r", job.id, exc)
                unknown += 1
                continue
            if fate.paid_by is None and fate.can_still_land(record.valid_before):
                unknown += 1
                continue
            await self._settle_unknown(job, record, fate.paid_by)
        return unknown

    async def _settle_unknown(self, job: Job, record: Authorization, paid_by: str | None) -> None:
        async with self.sessions() as session, session.begin():
            decided = await session.execute(
                update(Authorization)
                .where(Authorization.id == record.id, Authorization.status == AuthorizationStatus.PENDING)
                .values(
                    status=AuthorizationStatus.SETTLED if paid_by else AuthorizationStatus.FAILED,
                    tx_hash=paid_by,
                )
            )
            if decided.rowcount != 1:  # type: ignore[attr-defined]
                return  # the send decided it meanwhile
            row = await session.get(Job, job.id)
            assert row is not None
            row.status, row.error_code = JobStatus.FAILED, "payment_unconfirmed"
            row.error_message = (
                "the payment landed after the gateway gave up waiting for it; it is refunded in full"
                if paid_by
                else "the payment never landed; nothing was charged"
            )
            row.finished_at = datetime.fromtimestamp(self.clock(), UTC)
            reservation = Reservation(EXACT, job.payer, job.quote) if paid_by else Reservation(NONE, None, 0)
            await self.gate.settle(session, reservation, job.id, 0)

    # -- reading -------------------------------------------------------------------------------------------

    async def job(self, job_id: str) -> Job | None:
        return await self.store.get(job_id)

    async def channel(self, channel_id: str) -> Channel | None:
        return await self.store.channel(channel_id)


__all__ = ["GatewayError", "JobRun", "JobRunner", "Quote", "Request", "Unrecorded"]
