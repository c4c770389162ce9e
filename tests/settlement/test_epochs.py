"""close_epoch on a real chain and both databases: what it collects, what it posts, what providers claim, and the
same single on-chain effect after a crash or a failed RPC at every step."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from settlement.chain import Chain
from settlement.db.schema import ChainSend, Channel, Charge, Epoch, LedgerEntry, Refund
from settlement.deploy import Contracts
from settlement.epochs import REDEEM_GAS_PER_BATCH, REDEEM_GAS_PER_ENTRY, EpochCloser
from settlement.errors import ChainUnavailable, LedgerMismatch
from settlement.merkle import PayoutTree
from settlement.report import ledger_and_chain
from settlement.testing.ledger import Recorder
from tests.conftest import Actors, advance_time
from tests.settlement.ledger_data import ledger_database

ONE = 10**6


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def sessions(backend: str, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    with ledger_database(backend, tmp_path) as made:
        yield made


@pytest.fixture
def recorder(sessions: sessionmaker[Session], contracts: Contracts, actors: Actors) -> Recorder:
    recorder = Recorder(sessions, contracts, actors.providers)
    for payer in actors.payers[:2]:
        recorder.open_channel(payer, 5 * ONE)
    return recorder


def closer(recorder: Recorder, actors: Actors, **kwargs: object) -> EpochCloser:
    return EpochCloser(recorder.sessions, recorder.contracts, actors.operator, **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Ledger:
    charges: int
    provider_shares: dict[str, int]
    platform_fees: int


def ledger(sessions: sessionmaker[Session]) -> Ledger:
    with sessions() as session:
        charges = session.scalar(
            select(func.coalesce(func.sum(Charge.metered), 0)).where(Charge.epoch.is_not(None))
        )
        shares = session.execute(
            select(LedgerEntry.provider, func.sum(LedgerEntry.provider_share))
            .where(LedgerEntry.epoch.is_not(None))
            .group_by(LedgerEntry.provider)
        ).all()
        fees = session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.platform_fee), 0)).where(LedgerEntry.epoch.is_not(None))
        )
    return Ledger(int(charges or 0), {p: int(s) for p, s in shares}, int(fees or 0))


def latest_epoch(sessions: sessionmaker[Session]) -> Epoch:
    with sessions() as session:
        epoch = session.scalar(select(Epoch).order_by(Epoch.number.desc()).limit(1))
        assert epoch is not None
        return epoch


def assert_chain_matches_ledger(recorder: Recorder, actors: Actors) -> None:
    """The invariant after settlement: on-chain totals equal the ledger's, every base unit accounted for."""
    books = ledger(recorder.sessions)
    epoch = latest_epoch(recorder.sessions)
    distributor = recorder.contracts.distributor
    leaves = {account: int(amount) for account, amount in epoch.leaves.items()}
    treasury_leaf = leaves.get(actors.treasury.address, 0)
    assert books.charges == sum(books.provider_shares.values()) + books.platform_fees
    assert distributor.funded() == books.charges
    assert distributor.provider_total() == sum(books.provider_shares.values()) + treasury_leaf
    assert distributor.fees_paid() + treasury_leaf == books.platform_fees
    assert distributor.provider_total() == distributor.provider_pool(distributor.funded())
    assert distributor.epoch() == epoch.number
    assert distributor.merkle_root() == bytes.fromhex(epoch.root[2:])
    for provider, share in books.provider_shares.items():
        assert leaves[provider] == share
    report = ledger_and_chain(recorder.sessions, recorder.contracts)
    assert report.matches and report.settled == books.charges, report


def claim_all(recorder: Recorder, actors: Actors) -> dict[str, int]:
    """Every leaf of the latest root claims what it is owed (a stranger sends the claims); returns the amounts."""
    epoch = latest_epoch(recorder.sessions)
    leaves = {account: int(amount) for account, amount in epoch.leaves.items()}
    tree = PayoutTree.build(leaves)
    distributor, token = recorder.contracts.distributor, recorder.contracts.token
    paid: dict[str, int] = {}
    for account, cumulative in leaves.items():
        owed = cumulative - distributor.claimed(account)
        if owed == 0:
            continue
        before = token.balance_of(account)
        distributor.claim(
            actors.outsider,
            provider=account,
            cumulative_amount=cumulative,
            proof=tree.proof(account),
            expected_root=tree.root,
        )
        paid[account] = token.balance_of(account) - before
        assert paid[account] == owed
    return paid


def test_an_epoch_collects_every_charge_and_the_chain_equals_the_ledger(
    recorder: Recorder, actors: Actors
) -> None:
    token, escrow = recorder.contracts.token, recorder.contracts.escrow
    payer_a, payer_b, one_off = actors.payers
    voucher_jobs = [
        recorder.voucher_job(payer_a, tokens=50_000, headroom=30),
        recorder.voucher_job(payer_a, tokens=33_333),
        recorder.voucher_job(payer_b, tokens=77_777, headroom=5),
    ]
    exact_job = recorder.exact_job(one_off, tokens=41_000, headroom=123)
    refunded_before = token.balance_of(one_off.address)
    operator_before = token.balance_of(actors.operator.address)
    treasury_before = token.balance_of(actors.treasury.address)

    report = closer(recorder, actors).close()

    with recorder.sessions() as session:
        charges = {c.job_id: c for c in session.scalars(select(Charge))}
        channels = {c.payer: c for c in session.scalars(select(Channel))}
    assert report.status == "posted" and report.epoch == 1 and report.channels == 2
    assert all(charges[job].epoch == 1 for job in [*voucher_jobs, exact_job])
    # Each channel was claimed up to what it was charged, not up to its voucher.
    for payer in (payer_a, payer_b):
        channel = channels[payer.address]
        assert escrow.channel(bytes.fromhex(channel.id[2:])).claimed == channel.claimed == channel.charged
        assert channel.claimed < channel.voucher_amount
    # The exact payer got back what its quote overpaid; the operator passed the rest on and kept nothing.
    exact = charges[exact_job]
    assert token.balance_of(one_off.address) - refunded_before == exact.quote - exact.metered == 123
    assert operator_before - token.balance_of(actors.operator.address) == exact.quote
    assert report.settled == sum(c.metered or 0 for c in charges.values())
    assert_chain_matches_ledger(recorder, actors)
    assert (
        token.balance_of(actors.treasury.address) - treasury_before
        == recorder.contracts.distributor.fees_paid()
    )

    paid = claim_all(recorder, actors)
    books = ledger(recorder.sessions)
    for provider, share in books.provider_shares.items():
        assert paid[provider] == share
    # Everything redeemed is paid out: to providers, to the treasury as fees, and the treasury's rounding leaf.
    assert token.balance_of(recorder.contracts.distributor.address) == 0

    # A second epoch: cumulative leaves, and each provider claims only the difference.
    recorder.voucher_job(payer_b, tokens=123_456)
    recorder.voucher_job(payer_a, tokens=9_999, headroom=1)
    second = closer(recorder, actors).close()
    assert (second.status, second.epoch) == ("posted", 2)
    assert_chain_matches_ledger(recorder, actors)
    earlier = books.provider_shares
    paid = claim_all(recorder, actors)
    for provider, share in ledger(recorder.sessions).provider_shares.items():
        assert paid[provider] == share - earlier[provider]
    assert token.balance_of(recorder.contracts.distributor.address) == 0


def test_nothing_waiting_means_no_epoch(recorder: Recorder, actors: Actors) -> None:
    assert closer(recorder, actors).close().status == "idle"
    assert recorder.contracts.distributor.epoch() == 0


def test_finished_jobs_nobody_metered_are_metered_at_close(recorder: Recorder, actors: Actors) -> None:
    job = recorder.voucher_job(actors.payers[0], tokens=50_000)
    running = recorder.voucher_job(actors.payers[0], tokens=50_000, status="running")
    report = closer(recorder, actors).close()
    with recorder.sessions() as session:
        settled = {c.job_id: c.epoch for c in session.scalars(select(Charge))}
    assert report.settled == 450 and settled == {job: 1, running: None}


def test_a_channel_closed_before_redemption_is_left_out_and_the_rest_settles(
    recorder: Recorder, actors: Actors
) -> None:
    escaped, honest = actors.payers[:2]
    lost = recorder.voucher_job(escaped, tokens=50_000)
    kept = recorder.voucher_job(honest, tokens=50_000)
    channel = recorder.channels[escaped.address]
    recorder.contracts.escrow.initiate_withdraw(escaped, channel=channel)
    advance_time(recorder.contracts.chain, recorder.contracts.escrow.withdraw_delay())
    recorder.contracts.escrow.finalize_withdraw(escaped, channel=channel)

    report = closer(recorder, actors).close()
    with recorder.sessions() as session:
        settled = {c.job_id: c.epoch for c in session.scalars(select(Charge))}
        entries = {e.job_id: e.epoch for e in session.scalars(select(LedgerEntry))}
    assert report.channels == 1 and settled == {lost: None, kept: 1}
    assert entries[lost] is None and entries[kept] == 1
    assert_chain_matches_ledger(recorder, actors)


def test_a_database_behind_the_chain_is_refused(recorder: Recorder, actors: Actors) -> None:
    recorder.voucher_job(actors.payers[0], tokens=50_000)
    closer(recorder, actors).close()
    with recorder.sessions.begin() as session:
        session.execute(Epoch.__table__.delete())
    recorder.voucher_job(actors.payers[0], tokens=50_000)
    with pytest.raises(LedgerMismatch):
        closer(recorder, actors).close()


# -- crashes and failed RPCs -------------------------------------------------------------------------------


class Killed(BaseException):
    """What the checkpoint raises: the process is gone at this point (BaseException, so nothing catches it)."""


# Every point a close with a voucher channel, an exact payment and a refund passes, in order.
KILL_POINTS = [
    "open",
    "recorded:epoch:1:redeem",
    "mined:epoch:1:redeem",
    "redeem",
    "recorded:epoch:1:forward",
    "mined:epoch:1:forward",
    "forward",
    "recorded:epoch:1:refund",
    "mined:epoch:1:refund",
    "refund",
    "recorded:epoch:1:post",
    "mined:epoch:1:post",
]


def _crash_at(point: str):  # type: ignore[no-untyped-def]
    def checkpoint(event: str) -> None:
        if event.startswith(point):
            raise Killed(event)

    return checkpoint


@dataclass(frozen=True)
class Balances:
    operator: int
    refunded: int
    distributor: int
    treasury: int
    redeemed: int


def balances(recorder: Recorder, actors: Actors) -> Balances:
    token, c = recorder.contracts.token, recorder.contracts
    return Balances(
        token.balance_of(actors.operator.address),
        token.balance_of(actors.payers[2].address),
        c.distributor.funded(),
        token.balance_of(actors.treasury.address),
        c.escrow.total_redeemed(),
    )


def _scenario(recorder: Recorder, actors: Actors) -> None:
    recorder.voucher_job(actors.payers[0], tokens=50_000, headroom=7)
    recorder.voucher_job(actors.payers[1], tokens=60_000)
    recorder.exact_job(actors.payers[2], tokens=41_000, headroom=123)


@pytest.mark.parametrize("point", KILL_POINTS)
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_close_killed_at_any_step_has_one_effect_when_rerun(
    recorder: Recorder, actors: Actors, point: str
) -> None:
    _scenario(recorder, actors)
    before = balances(recorder, actors)
    with pytest.raises(Killed):
        closer(recorder, actors, checkpoint=_crash_at(point)).close()
    report = closer(recorder, actors).close()
    after = balances(recorder, actors)

    assert report.status == "posted" and report.epoch == 1
    assert recorder.contracts.distributor.epoch() == 1
    books = ledger(recorder.sessions)
    with recorder.sessions() as session:
        exact_quote = session.scalar(select(Charge.quote).where(Charge.scheme == "exact"))
        voucher_charges = session.scalar(select(func.sum(Charge.metered)).where(Charge.scheme == "voucher"))
    assert after.redeemed - before.redeemed == voucher_charges  # redeemed once, not twice
    assert after.distributor - before.distributor == books.charges
    assert before.operator - after.operator == exact_quote  # forwarded and refunded once, not twice
    assert after.refunded - before.refunded == 123
    assert_chain_matches_ledger(recorder, actors)
    with recorder.sessions() as session:
        sends = session.scalars(select(ChainSend)).all()
    assert all(send.status == "mined" for send in sends)
    assert closer(recorder, actors).close().status == "idle"


@pytest.mark.parametrize("point", ["recorded:epoch:1:redeem", "mined:epoch:1:post"])
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_worker_killed_with_sigkill_mid_epoch_is_resumed(
    recorder: Recorder, actors: Actors, tmp_path: Path, point: str
) -> None:
    _scenario(recorder, actors)
    before = balances(recorder, actors)
    deployment = tmp_path / "deployment.json"
    recorder.contracts.deployment.save(deployment)
    url = str(recorder.sessions.kw["bind"].url)
    script = f"""
import os, signal
from pathlib import Path
from eth_account import Account
from settlement.chain import Chain
from settlement.db.engine import blocking_sessions, create_blocking_engine
from settlement.deploy import Contracts, Deployment
from settlement.epochs import REDEEM_GAS_PER_BATCH, REDEEM_GAS_PER_ENTRY, EpochCloser

def checkpoint(event):
    if event.startswith({point!r}):
        os.kill(os.getpid(), signal.SIGKILL)

contracts = Contracts.load(Chain({recorder.contracts.chain.rpc_url!r}), Deployment.load(Path({str(deployment)!r})))
sessions = blocking_sessions(create_blocking_engine({url!r}))
EpochCloser(sessions, contracts, Account.from_key({actors.operator.key.hex()!r}), checkpoint=checkpoint).close()
"""
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]

    report = closer(recorder, actors).close()
    after = balances(recorder, actors)
    assert (report.status, report.epoch) == ("posted", 1)
    assert after.distributor - before.distributor == ledger(recorder.sessions).charges
    assert after.refunded - before.refunded == 123
    assert_chain_matches_ledger(recorder, actors)


class FlakyRpc(ThreadingHTTPServer):
    """A JSON-RPC proxy to anvil that goes silent, for good, right after it forwards one kind of call: the
    request reaches the chain, its answer never comes back, and neither does any later one."""

    def __init__(self, upstream: str, silent_after: str) -> None:
        self.upstream, self.silent_after, self.silent = upstream, silent_after, False

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler) -> None:
                body = handler.rfile.read(int(handler.headers["Content-Length"]))
                if self.silent:
                    handler.close_connection = True
                    return
                answer = httpx.post(self.upstream, content=body, headers={"Content-Type": "application/json"})
                if self.silent_after.encode() in body:
                    self.silent = True
                    handler.close_connection = True
                    return
                handler.send_response(answer.status_code)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(answer.content)))
                handler.end_headers()
                handler.wfile.write(answer.content)

            def log_message(handler, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_transaction_whose_answer_is_lost_is_not_sent_again(recorder: Recorder, actors: Actors) -> None:
    _scenario(recorder, actors)
    before = balances(recorder, actors)
    proxy = FlakyRpc(recorder.contracts.chain.rpc_url, silent_after="eth_sendRawTransaction")
    try:
        flaky = Contracts.load(
            Chain(proxy.url, read_attempts=2, retry_backoff_s=0.01), recorder.contracts.deployment
        )
        with pytest.raises(ChainUnavailable):
            EpochCloser(recorder.sessions, flaky, actors.operator).close()
    finally:
        proxy.shutdown()
        proxy.server_close()
    # The redemption reached the chain although the worker never heard back.
    assert recorder.contracts.escrow.total_redeemed() > before.redeemed
    report = closer(recorder, actors).close()
    after = balances(recorder, actors)
    with recorder.sessions() as session:
        voucher_charges = session.scalar(select(func.sum(Charge.metered)).where(Charge.scheme == "voucher"))
    assert report.status == "posted"
    assert after.redeemed - before.redeemed == voucher_charges
    assert after.refunded - before.refunded == 123
    assert_chain_matches_ledger(recorder, actors)


# -- redemption never stalls -------------------------------------------------------------------------------


def settled_epochs(sessions: sessionmaker[Session]) -> dict[str, int | None]:
    with sessions() as session:
        return {c.job_id: c.epoch for c in session.scalars(select(Charge))}


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_an_exit_finalized_in_the_block_before_the_redemption_drops_only_that_channel(
    recorder: Recorder, actors: Actors
) -> None:
    """The race no reading of the chain can exclude: the payer's finalizeWithdraw is mined in the same block as the
    operator's batch, ahead of it. The batch still lands for every other channel and the epoch closes."""
    escaped, honest = actors.payers[:2]
    lost = recorder.voucher_job(escaped, tokens=50_000)
    kept = recorder.voucher_job(honest, tokens=60_000)
    chain, escrow = recorder.contracts.chain, recorder.contracts.escrow
    channel = recorder.channels[escaped.address]
    escrow.initiate_withdraw(escaped, channel=channel)
    advance_time(chain, escrow.withdraw_delay())

    def race(event: str) -> None:
        # The batch is signed and about to be broadcast: the payer's exit goes first, into the same block.
        if event.startswith("recorded:epoch:1:redeem"):
            chain.w3.provider.make_request("evm_setAutomine", [False])
            finalize = escrow.contract.functions.finalizeWithdraw(channel).build_transaction(
                {"from": escaped.address, "nonce": chain.nonce(escaped.address, pending=True),
                 "gas": 200_000, "maxFeePerGas": 10**11, "maxPriorityFeePerGas": 5 * 10**10}
            )  # fmt: skip
            chain.w3.eth.send_raw_transaction(escaped.sign_transaction(finalize).raw_transaction)
            chain.w3.provider.make_request("evm_setIntervalMining", [1])

    try:
        report = closer(recorder, actors, checkpoint=race).close()
    finally:
        chain.w3.provider.make_request("evm_setIntervalMining", [0])
        chain.w3.provider.make_request("evm_setAutomine", [True])

    assert escrow.channel(channel).withdrawable_at == 2**256 - 1  # the payer did leave first
    assert (report.status, report.epoch, report.channels) == ("posted", 1, 1)
    assert settled_epochs(recorder.sessions) == {lost: None, kept: 1}
    with recorder.sessions() as session:
        closed = session.get(Channel, "0x" + channel.hex())
        assert closed is not None and closed.closed_at is not None and closed.claimed == 0
    assert_chain_matches_ledger(recorder, actors)
    # The lost charges are never tried again; the next epoch settles the honest payer's new work.
    later = recorder.voucher_job(honest, tokens=10_000)
    assert closer(recorder, actors).close().epoch == 2
    assert settled_epochs(recorder.sessions) == {lost: None, kept: 1, later: 2}
    assert_chain_matches_ledger(recorder, actors)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_redemption_is_split_into_batches_that_fit_the_gas_budget(recorder: Recorder, actors: Actors) -> None:
    payer = actors.payers[0]
    channels = recorder.open_channels(payer, 20, ONE)
    jobs = [recorder.voucher_job(payer, tokens=5_000, channel=channel) for channel in channels]
    budget = REDEEM_GAS_PER_BATCH + 6 * REDEEM_GAS_PER_ENTRY  # six channels a batch: four batches
    report = closer(recorder, actors, redeem_gas_budget=budget).close()

    assert (report.status, report.channels) == ("posted", 20)
    with recorder.sessions() as session:
        sends = session.scalars(select(ChainSend.key).where(ChainSend.key.like("epoch:1:redeem:%"))).all()
        receipts = [
            recorder.contracts.chain.receipt(tx)
            for tx in session.scalars(select(ChainSend.tx_hash).where(ChainSend.key.like("epoch:1:redeem:%")))
        ]
    assert sorted(sends) == [f"epoch:1:redeem:{i}" for i in range(4)]
    assert all(receipt is not None and receipt["gasUsed"] < budget for receipt in receipts)
    assert all(epoch == 1 for job, epoch in settled_epochs(recorder.sessions).items() if job in jobs)
    assert_chain_matches_ledger(recorder, actors)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_resumed_epoch_drops_a_channel_that_closed_while_it_was_stopped(
    recorder: Recorder, actors: Actors
) -> None:
    escaped, honest = actors.payers[:2]
    lost = recorder.voucher_job(escaped, tokens=50_000)
    kept = recorder.voucher_job(honest, tokens=60_000)
    escrow, channel = recorder.contracts.escrow, recorder.channels[escaped.address]
    escrow.initiate_withdraw(escaped, channel=channel)
    with pytest.raises(Killed):
        closer(recorder, actors, checkpoint=_crash_at("open")).close()
    advance_time(recorder.contracts.chain, escrow.withdraw_delay())
    escrow.finalize_withdraw(escaped, channel=channel)

    report = closer(recorder, actors).close()
    assert (report.status, report.channels) == ("posted", 1)
    assert settled_epochs(recorder.sessions) == {lost: None, kept: 1}
    assert_chain_matches_ledger(recorder, actors)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_refund_that_reverts_stays_owed_and_does_not_hold_the_epoch(
    recorder: Recorder, actors: Actors
) -> None:
    one_off = actors.payers[2]
    recorder.voucher_job(actors.payers[0], tokens=50_000)
    recorder.exact_job(one_off, tokens=41_000, headroom=123)
    token, operator = recorder.contracts.token, actors.operator
    # The operator's balance is gone when the refund is due: the transfer reverts.
    drained: list[int] = []

    def drain(event: str) -> None:
        if event == "forward":
            drained.append(token.balance_of(operator.address))
            token.transfer(operator, to=actors.admin.address, amount=drained[0])

    refunded_before = token.balance_of(one_off.address)
    report = closer(recorder, actors, checkpoint=drain).close()
    assert (report.status, report.refunded) == ("posted", 0)
    assert_chain_matches_ledger(recorder, actors)
    with recorder.sessions() as session:
        owed = session.scalars(select(Refund)).one()
    assert owed.paid_at is None and owed.error is not None and "ERC20InsufficientBalance" in owed.error

    # Funds are back; the next close pays it, once, even with nothing new to settle.
    token.transfer(actors.admin, to=operator.address, amount=drained[0])
    assert closer(recorder, actors).close().status == "idle"
    assert closer(recorder, actors).close().status == "idle"
    assert token.balance_of(one_off.address) - refunded_before == 123
    with recorder.sessions() as session:
        assert session.scalars(select(Refund)).one().paid_at is not None


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_more_channels_than_one_batch_holds_all_settle_and_the_next_epoch_too(
    recorder: Recorder, actors: Actors
) -> None:
    """More channels than one transaction may redeem: every one is collected, over several batches, and the epoch
    after settles as well. Scaled down from the 3,000 of benchmarks/settlement.py (which takes minutes here) by
    the same factor as the gas budget."""
    payer = actors.payers[0]
    channels = recorder.open_channels(payer, 300, ONE)
    for channel in channels:
        recorder.voucher_job(payer, tokens=1_000, channel=channel)
    budget = REDEEM_GAS_PER_BATCH + 80 * REDEEM_GAS_PER_ENTRY  # four batches
    report = closer(recorder, actors, redeem_gas_budget=budget).close()
    assert (report.status, report.epoch, report.channels) == ("posted", 1, 300)
    assert all(epoch == 1 for epoch in settled_epochs(recorder.sessions).values())
    assert_chain_matches_ledger(recorder, actors)

    for channel in channels[:10]:
        recorder.voucher_job(payer, tokens=1_000, channel=channel)
    assert closer(recorder, actors).close().channels == 10
    assert_chain_matches_ledger(recorder, actors)
