"""Paying before serving, as unit tests: the payment gate's voucher checks on a fake chain, and the job runner's
admission (quote, payment, reservation, matching) on a fake chain, fake providers and a real SQLite database.
test_gateway.py runs the same paths end to end against anvil and provider processes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from marketplace.gateway.chainwatch import BIGINT_MAX, ChainWatcher, ChannelView
from marketplace.gateway.errors import Conflict, InvalidRequest, PaymentRejected, Unavailable
from marketplace.gateway.jobs import JobRunner, Request
from marketplace.gateway.metrics import Metrics
from marketplace.gateway.orderbook import BookAsk
from marketplace.gateway.payments.gate import PaymentGate
from marketplace.gateway.payments.x402 import VoucherPayment, encode_header
from marketplace.gateway.resting import TooManyResting
from settlement.contracts import CHANNEL_CLOSED, channel_id
from settlement.db.engine import create_engine, migrate, sessions
from settlement.db.schema import Channel, Job, JobStatus
from settlement.eip712 import Voucher
from tests.marketplace.gateway.fakes import (
    CHAIN_ID,
    MODEL_ROOT,
    FakeChainReader,
    FakeTransport,
    book_with,
    coordinator,
    model,
    provider,
    terms,
)
from worker.sampling import SamplingParams

PAYER: LocalAccount = Account.from_key(b"\x07" * 32)
STRANGER: LocalAccount = Account.from_key(b"\x08" * 32)
CHANNEL = channel_id(PAYER.address, 1)
ROUTE = [(1, 0, 2, 1_000_000), (2, 2, 4, 1_000_000), (3, 4, 6, 1_000_000)]
T = TypeVar("T")


def voucher(amount: int, *, signer: LocalAccount = PAYER, channel: bytes = CHANNEL) -> VoucherPayment:
    signature = Voucher(channel, amount).sign(signer, terms().escrow_domain)
    return VoucherPayment(f"eip155:{CHAIN_ID}", terms().token, channel, amount, signature)


def header(payment: VoucherPayment) -> str:
    payload = {
        "channelId": "0x" + payment.channel_id.hex(),
        "maxClaimableAmount": str(payment.amount),
        "signature": "0x" + payment.signature.hex(),
    }
    accepted = {"scheme": "voucher", "network": payment.network, "asset": payment.asset}
    return encode_header({"x402Version": 2, "accepted": accepted, "payload": payload})


def gate_on(reader: FakeChainReader, sessions: async_sessionmaker[AsyncSession] | None = None) -> PaymentGate:
    gateway = Account.from_key(b"\x42" * 32)
    return PaymentGate(terms(), ChainWatcher(reader), contracts=None, gateway=gateway, sessions=sessions)  # type: ignore[arg-type]


# -- the payment gate's voucher checks -------------------------------------------------------------------


def check(reader: FakeChainReader, payment: VoucherPayment) -> ChannelView:
    return asyncio.run(gate_on(reader).check_voucher(payment))


def test_a_voucher_within_the_deposit_of_an_open_channel_passes() -> None:
    reader = FakeChainReader(channels={CHANNEL: ChannelView(1_000, 0)})
    assert check(reader, voucher(1_000)).deposit == 1_000


@pytest.mark.parametrize(
    ("state", "payment", "code"),
    [
        (ChannelView(1_000, 0), voucher(10, signer=STRANGER), "invalid_signature"),
        (ChannelView(0, 0), voucher(10), "unknown_channel"),
        (ChannelView(1_000, 0), voucher(1_001), "insufficient_deposit"),
        (ChannelView(1_000, 5_000), voucher(10), "channel_exiting"),
        (ChannelView(1_000, CHANNEL_CLOSED), voucher(10), "channel_closed"),
        (ChannelView(10**30, 0), voucher(BIGINT_MAX + 1), "amount_out_of_range"),
    ],
)
def test_a_voucher_that_does_not_pay_is_refused_with_its_code(
    state: ChannelView, payment: VoucherPayment, code: str
) -> None:
    reader = FakeChainReader(channels={CHANNEL: state})
    with pytest.raises(PaymentRejected) as refused:
        check(reader, payment)
    assert refused.value.code == code


def test_a_malformed_signature_is_refused() -> None:
    payment = voucher(10)
    bad = VoucherPayment(payment.network, payment.asset, CHANNEL, 10, b"\x01" * 65)
    with pytest.raises(PaymentRejected) as refused:
        check(FakeChainReader(channels={CHANNEL: ChannelView(1_000, 0)}), bad)
    assert refused.value.code == "invalid_signature"


@pytest.mark.parametrize("field", ["network", "asset"])
def test_a_voucher_for_another_chain_or_token_is_refused(field: str) -> None:
    payment = voucher(10)
    other = {"network": "eip155:1", "asset": STRANGER.address}[field]
    wrong = VoucherPayment(**{**payment.__dict__, field: other})
    with pytest.raises(PaymentRejected) as refused:
        check(FakeChainReader(channels={CHANNEL: ChannelView(1_000, 0)}), wrong)
    assert refused.value.code == f"wrong_{field}"


def test_a_deposit_newer_than_the_cache_is_read_before_refusing() -> None:
    reader = FakeChainReader(channels={CHANNEL: ChannelView(100, 0)})
    gate = gate_on(reader)

    async def pay() -> ChannelView:
        await gate.watcher.channel(CHANNEL)  # cached at 100
        reader.channels[CHANNEL] = ChannelView(5_000, 0)  # topped up since
        return await gate.check_voucher(voucher(4_000))

    assert asyncio.run(pay()).deposit == 5_000


def test_a_voucher_near_the_cached_deposit_is_checked_against_the_chain() -> None:
    """Within 10% of the deposit as cached: the channel is read again, and an exit the cache missed is seen."""
    reader = FakeChainReader(channels={CHANNEL: ChannelView(1_000, 0)})
    gate = gate_on(reader)

    async def pay(amount: int) -> ChannelView:
        await gate.watcher.channel(CHANNEL)
        reader.channels[CHANNEL] = ChannelView(1_000, 2_000)  # the payer started to leave since
        return await gate.check_voucher(voucher(amount))

    assert not asyncio.run(pay(899)).exiting  # far from the deposit: the cache (current) is used
    with pytest.raises(PaymentRejected) as refused:
        asyncio.run(pay(901))
    assert refused.value.code == "channel_exiting"


def test_an_unreachable_chain_is_a_503_to_retry_not_a_blind_acceptance() -> None:
    reader = FakeChainReader(channels={CHANNEL: ChannelView(1_000, 0)}, down=True)
    with pytest.raises(Unavailable) as unavailable:
        check(reader, voucher(500))
    assert (unavailable.value.status, unavailable.value.code) == (503, "chain_unavailable")
    assert unavailable.value.retry_after_s > 0


# -- the job runner's admission ----------------------------------------------------------------------------


class Admission:
    """A job runner over a fake chain, fake providers and a real SQLite database. Build it, and use it, inside
    one event loop; ``close`` stops what it started."""

    def __init__(self, database: str, asks: list[tuple[int, int, int, int]], deposit: int = 10**9) -> None:
        self.reader = FakeChainReader(channels={CHANNEL: ChannelView(deposit, 0)})
        self.book, self.asks = book_with(asks)
        self.engine = create_engine(database)
        self.sessions = sessions(self.engine)
        self.transport = FakeTransport(self.asks)
        self.runner = JobRunner(
            book=self.book,
            catalog=None,  # type: ignore[arg-type]
            coordinator=coordinator(self.book, self.transport),
            gate=gate_on(self.reader, self.sessions),
            terms=terms(),
            sessions=self.sessions,
            payments_enabled=True,
            metrics=Metrics(),
        )

    def request(self, *, kind: str = "chat", max_tokens: int = 4, max_price: int | None = None) -> Request:
        return Request(kind, model(), [1, 2, 3, 4], max_tokens, {}, max_price=max_price, ttl_s=60)

    async def admit(self, request: Request, payment: str | None) -> Any:
        return await self.runner.admit(request, payment, url="http://gateway/v1/chat/completions")

    async def refused(self, request: Request, payment: str | None) -> Exception:
        try:
            await self.admit(request, payment)
        except (PaymentRejected, Conflict, InvalidRequest) as exc:
            return exc
        raise AssertionError("admitted")

    async def rows(self) -> tuple[list[Job], Channel | None]:
        async with self.sessions() as session:
            jobs = list((await session.scalars(select(Job))).all())
            channel = await session.get(Channel, "0x" + CHANNEL.hex())
        return jobs, channel

    def held(self) -> int:
        return sum(ask.in_use for ask in self.asks)

    async def close(self) -> None:
        await self.runner.stop()
        await self.engine.dispose()


@pytest.fixture
def database(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    migrate(url)
    yield url


def scenario(
    database: str, asks: list[tuple[int, int, int, int]], body: Callable[[Admission], Awaitable[T]]
) -> T:
    async def run() -> T:
        admission = Admission(database, asks)
        try:
            return await body(admission)
        finally:
            await admission.close()

    return asyncio.run(run())


def test_no_payment_gets_a_quote_for_the_cheapest_route(database: str) -> None:
    async def body(admission: Admission) -> tuple[Exception, list[str], int, Any]:
        asked = await admission.refused(admission.request(), None)
        return asked, [ask.provider for ask in admission.asks], admission.held(), await admission.rows()

    asked, providers, held, rows = scenario(database, ROUTE, body)
    assert isinstance(asked, PaymentRejected) and asked.code == "payment_required"
    (offer, _exact, _batch) = asked.details["required"]["accepts"]
    assert int(offer["amount"]) == (4 + 4) * 6  # (prompt + max_tokens) × six layers at one unit each
    assert [hop["provider"] for hop in offer["extra"]["route"]] == providers
    assert held == 0
    assert rows == ([], None)


def test_a_covering_voucher_reserves_its_quote_and_holds_the_route(database: str) -> None:
    async def body(admission: Admission) -> tuple[Any, int, list[Job], Channel | None]:
        run = await admission.admit(admission.request(), header(voucher(48)))
        held = admission.held()  # before the job gets to run and release its route
        return (run, held, *await admission.rows())

    run, held, jobs, channel = scenario(database, ROUTE, body)
    assert run.reservation.quote == 48
    assert held == 3
    assert [job.status for job in jobs] == [JobStatus.RUNNING]
    assert channel is not None and (channel.voucher_amount, channel.reserved, channel.charged) == (48, 48, 0)


@pytest.mark.parametrize(
    ("amounts", "code"),
    [
        ((47,), "voucher_too_low"),  # does not cover the quote of 48
        ((48, 48), "voucher_not_increasing"),  # the same voucher again
        ((48, 60), "voucher_too_low"),  # above the last, but 48 is still reserved: 60 < 48 + 48
    ],
)
def test_a_voucher_that_does_not_cover_changes_nothing_and_frees_the_route(
    database: str, amounts: tuple[int, ...], code: str
) -> None:
    async def body(admission: Admission) -> tuple[Exception, int, list[Job], Channel | None]:
        admission.asks[0].capacity = 8
        admission.transport.hold = asyncio.Event()  # earlier jobs stay running: their quotes stay reserved
        for amount in amounts[:-1]:
            await admission.admit(admission.request(), header(voucher(amount)))
        before = admission.held()
        refused = await admission.refused(admission.request(), header(voucher(amounts[-1])))
        return (refused, admission.held() - before, *await admission.rows())

    refused, newly_held, jobs, channel = scenario(database, [(1, 0, 6, 1_000_000)], body)
    assert isinstance(refused, PaymentRejected) and refused.code == code
    assert "channel" in refused.details  # the channel's real figures, for the client to re-sign from
    assert len(jobs) == len(amounts) - 1
    assert newly_held == 0
    assert (channel.voucher_amount if channel else 0) == (amounts[0] if len(amounts) > 1 else 0)


def test_no_route_is_refused_before_any_payment_is_secured(database: str) -> None:
    async def body(admission: Admission) -> tuple[Exception, Any]:
        refused = await admission.refused(admission.request(), header(voucher(10**6)))
        return refused, await admission.rows()

    refused, (jobs, channel) = scenario(database, ROUTE[:2], body)  # nobody serves layers 4:6
    assert isinstance(refused, Conflict) and refused.code == "no_route"
    assert (jobs, channel) == ([], None)  # the voucher was read, and nothing was reserved on it


def test_a_malformed_payment_header_is_a_bad_request(database: str) -> None:
    async def body(admission: Admission) -> tuple[Exception, int]:
        return await admission.refused(admission.request(), "not even base64"), admission.held()

    refused, held = scenario(database, ROUTE, body)
    assert isinstance(refused, InvalidRequest) and refused.code == "invalid_payment_header"
    assert held == 0


def test_a_chat_above_its_max_price_is_refused_and_a_job_rests(database: str) -> None:
    async def body(admission: Admission) -> tuple[Exception, Any, list[Job], int]:
        refused = await admission.refused(admission.request(max_price=47), None)
        run = await admission.admit(admission.request(kind="job", max_price=40), header(voucher(40)))
        return refused, run, (await admission.rows())[0], admission.held()

    refused, run, jobs, held = scenario(database, ROUTE, body)
    assert isinstance(refused, Conflict) and refused.code == "max_price_exceeded"
    assert run.reservation.quote == 40  # a resting job reserves its whole max price
    assert [(job.status, job.model_root) for job in jobs] == [(JobStatus.RESTING, MODEL_ROOT)]
    assert held == 0


def test_a_resting_job_whose_payer_starts_leaving_its_channel_never_runs(database: str) -> None:
    """Paid, resting, and then the payer starts its exit: when a route within the job's price appears, the job
    ends uncharged instead of running on a deposit that may be gone before the work is redeemed."""

    async def body(admission: Admission) -> tuple[list[Job], Channel | None, int, int]:
        run = await admission.admit(admission.request(kind="job", max_price=40), header(voucher(40)))
        admission.reader.channels[CHANNEL] = ChannelView(10**9, 2_000)  # withdrawable at 2,000: exiting
        admission.runner.gate.watcher.max_age_s = 0  # as once the cached state is older than the bound
        for number, (index, start, end) in enumerate([(4, 0, 2), (5, 2, 4), (6, 4, 6)], start=10):
            cheap = BookAsk(number, provider(index).address, MODEL_ROOT, start, end, 500_000, 4,
                            f"10.0.0.{index}:7000", bytes(32), 1_000.0 + 3600)  # fmt: skip
            admission.book.post(cheap)
            admission.book.set_active(cheap.provider, True)
        assert admission.book.route(MODEL_ROOT, 6) is not None  # within its 40: it would start now
        await admission.runner.sweep()
        jobs, channel = await admission.rows()
        return jobs, channel, admission.held(), run.reservation.quote

    jobs, channel, held, quote = scenario(database, ROUTE, body)
    assert quote == 40
    (job,) = jobs
    assert (job.status, job.error_code, job.charged) == (JobStatus.FAILED, "channel_exiting", 0)
    assert channel is not None and (channel.reserved, channel.charged) == (0, 0)
    assert held == 0 and job.started_at is None


def test_a_payer_with_its_share_of_resting_jobs_is_refused_before_it_pays(database: str) -> None:
    async def body(admission: Admission) -> tuple[Exception, list[Job], Channel | None]:
        admission.runner._resting.max_per_payer = 1
        await admission.admit(admission.request(kind="job", max_price=40), header(voucher(40)))
        try:
            await admission.admit(admission.request(kind="job", max_price=40), header(voucher(80)))
        except TooManyResting as exc:
            jobs, channel = await admission.rows()
            return exc, jobs, channel
        raise AssertionError("a second resting job was taken")

    refused, jobs, channel = scenario(database, ROUTE, body)
    assert (refused.status, refused.code) == (429, "too_many_resting_jobs")  # type: ignore[attr-defined]
    assert len(jobs) == 1 and channel is not None and channel.reserved == 40  # the second paid nothing


def test_a_session_too_large_to_open_is_refused_before_payment() -> None:
    """With a penalty over the prompt, a session carries its every id; past what a provider reads in one message,
    the request is refused, rather than the providers being blamed for refusing it."""
    from marketplace.gateway.api.routes.inference import _check_open_size

    sampling = {"temperature": 0.0, "repetition_penalty": 1.2}
    params = SamplingParams.from_dict(sampling)
    _check_open_size(sampling, params, 8_192, 151_000)
    with pytest.raises(InvalidRequest) as refused:
        _check_open_size(sampling, params, 80_000, 151_000)
    assert refused.value.code == "prompt_too_long"
    _check_open_size({"temperature": 0.0}, SamplingParams(), 80_000, 151_000)  # no history: nothing to carry
