"""Metering: receipts that verify become ledger entries split 80/20; anything that does not verify bills nothing."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from eth_account import Account
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from settlement.db import validations
from settlement.db.schema import (
    Charge,
    Hop,
    Job,
    LedgerEntry,
    Receipt,
    SlashStatus,
    Validation,
    ValidationStatus,
)
from settlement.deploy import Contracts
from settlement.errors import UnknownJob
from settlement.ledger import meter_job, split
from settlement.testing.ledger import GATEWAY, MODEL_ROOT, Recorder
from settlement.tickets import KeyRing
from tests.conftest import Actors
from tests.settlement.ledger_data import ledger_database
from worker.transcript import StepHashes, sampling_hash, transcript_root
from worker.trust import ReceiptFields

ONE = 10**6


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    with ledger_database(request.param, tmp_path) as made:
        yield made


@pytest.fixture
def recorder(sessions: sessionmaker[Session], contracts: Contracts, actors: Actors) -> Recorder:
    recorder = Recorder(sessions, contracts, actors.providers)
    recorder.open_channel(actors.payers[0], 5 * ONE)
    return recorder


def meter(recorder: Recorder, job_id: str) -> object:
    with recorder.sessions.begin() as session:
        return meter_job(session, job_id, domain=recorder.contracts.protocol_domain())


def entries(recorder: Recorder, job_id: str) -> list[LedgerEntry]:
    with recorder.sessions() as session:
        return list(
            session.scalars(select(LedgerEntry).where(LedgerEntry.job_id == job_id).order_by(LedgerEntry.id))
        )


def charge_of(recorder: Recorder, job_id: str) -> Charge:
    with recorder.sessions() as session:
        charge = session.scalar(select(Charge).where(Charge.job_id == job_id))
        assert charge is not None
        return charge


def test_split_is_80_percent_rounded_down_to_the_provider() -> None:
    assert [split(c) for c in (0, 1, 4, 5, 7, 10, 99)] == [
        (0, 0), (0, 1), (3, 1), (4, 1), (5, 2), (8, 2), (79, 20),
    ]  # fmt: skip
    rng = random.Random(7)
    for charge in (rng.randrange(2**63) for _ in range(1_000)):
        provider, platform = split(charge)
        assert provider + platform == charge and provider == charge * 8 // 10


def test_each_verified_hop_becomes_one_entry(recorder: Recorder, actors: Actors) -> None:
    job_id = recorder.voucher_job(actors.payers[0], tokens=50_000)
    metered = meter(recorder, job_id)
    rows = entries(recorder, job_id)
    assert [r.provider for r in rows] == [p.address for p in actors.providers]
    # 50,000 positions × 2 layers at 1,000 / 2,000 / 1,500 base units per million token-layers.
    assert [r.token_layers for r in rows] == [100_000] * 3
    assert [r.charge for r in rows] == [100, 200, 150]
    assert [(r.provider_share, r.platform_fee) for r in rows] == [(80, 20), (160, 40), (120, 30)]
    assert charge_of(recorder, job_id).metered == charge_of(recorder, job_id).amount == 450
    assert metered.already is False


def test_metering_twice_writes_nothing_more(recorder: Recorder, actors: Actors) -> None:
    job_id = recorder.voucher_job(actors.payers[0], tokens=50_000)
    first = meter(recorder, job_id)
    again = meter(recorder, job_id)
    assert again.already is True and again.charge == first.charge == 450
    assert len(entries(recorder, job_id)) == 3


def test_a_running_job_is_not_metered_and_an_unknown_one_is_refused(
    recorder: Recorder, actors: Actors
) -> None:
    job_id = recorder.voucher_job(actors.payers[0], tokens=50_000, status="running")
    assert meter(recorder, job_id) is None
    assert entries(recorder, job_id) == []
    with pytest.raises(UnknownJob):
        meter(recorder, "0x" + "00" * 32)


def _tamper(recorder: Recorder, job_id: str, position: int, **values: object) -> None:
    with recorder.sessions.begin() as session:
        hop = session.scalar(select(Hop).where(Hop.job_id == job_id, Hop.position == position))
        assert hop is not None
        hop_values = {k: v for k, v in values.items() if k in ("transcript", "tokens")}
        receipt_values = {
            k.removeprefix("receipt_"): v for k, v in values.items() if k.startswith("receipt_")
        }
        if hop_values:
            session.execute(update(Hop).where(Hop.id == hop.id).values(**hop_values))
        if receipt_values:
            session.execute(update(Receipt).where(Receipt.hop_id == hop.id).values(**receipt_values))


def test_a_receipt_signed_by_someone_else_bills_nothing(recorder: Recorder, actors: Actors) -> None:
    job_id = recorder.voucher_job(actors.payers[0], tokens=50_000)
    stranger = Account.create()
    with recorder.sessions() as session:
        receipt = session.scalar(
            select(Receipt).where(Receipt.job_id == job_id, Receipt.provider == actors.providers[1].address)
        )
        assert receipt is not None
    forged = stranger.unsafe_sign_hash(b"\x11" * 32).signature
    _tamper(recorder, job_id, 1, receipt_signature="0x" + bytes(forged).hex())
    metered = meter(recorder, job_id)
    assert [r.provider for r in entries(recorder, job_id)] == [
        actors.providers[0].address,
        actors.providers[2].address,
    ]
    assert "signed by" in next(iter(metered.refused.values()))
    # The client was charged 450 by the gateway; the ledger collects only what verifies.
    assert charge_of(recorder, job_id).metered == 250


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("link", "input is not the previous hop's output"),
        ("tokens", "positions"),
        ("no_transcript", "no recorded transcript"),
        ("no_receipt", "no receipt"),
    ],
)
def test_receipts_that_do_not_check_out_bill_nothing(
    recorder: Recorder, actors: Actors, change: str, reason: str
) -> None:
    job_id = recorder.voucher_job(actors.payers[0], tokens=50_000)
    with recorder.sessions.begin() as session:
        hop = session.scalar(select(Hop).where(Hop.job_id == job_id, Hop.position == 1))
        assert hop is not None and hop.transcript is not None
        if change == "link":
            # Hop 1 claims another input than hop 0's output, with a root and signature to match its story:
            # the receipt alone is fine, the chain of hops is not.
            steps = [list(step) for step in hop.transcript]
            steps[0][2] = "0x" + "ee" * 32  # [step, positions, input, output]
            root = transcript_root([StepHashes.from_row(step) for step in steps])
            assert hop.session is not None
            signed = KeyRing(actors.providers[1], recorder.contracts.protocol_domain()).receipt(
                ReceiptFields(
                    job_id=bytes.fromhex(job_id[2:]), session=bytes.fromhex(hop.session), gateway=GATEWAY,
                    provider=hop.provider, model_root=bytes.fromhex(MODEL_ROOT[2:]), layer_start=hop.layer_start,
                    layer_end=hop.layer_end, positions=hop.tokens, transcript_root=root,
                    sampling_hash=sampling_hash(None),
                )
            )  # fmt: skip
            signature = signed.signature
            hop.transcript, hop.transcript_root = steps, "0x" + root.hex()
            session.execute(
                update(Receipt)
                .where(Receipt.hop_id == hop.id)
                .values(signature="0x" + signature.hex(), transcript_root="0x" + root.hex())
            )
        elif change == "tokens":
            session.execute(update(Receipt).where(Receipt.hop_id == hop.id).values(tokens=hop.tokens + 1))
        elif change == "no_transcript":
            hop.transcript = None
        else:
            session.execute(Receipt.__table__.delete().where(Receipt.hop_id == hop.id))
    metered = meter(recorder, job_id)
    reasons = list(metered.refused.values())
    assert reasons and any(reason in r for r in reasons), reasons
    assert actors.providers[1].address not in {r.provider for r in entries(recorder, job_id)}
    if change == "link":
        assert entries(recorder, job_id) == []  # a broken chain bills no hop of its route


def test_a_last_span_receipt_for_other_sampling_bills_nothing(recorder: Recorder, actors: Actors) -> None:
    """The last span's receipt commits to the sampling it was opened with; a provider that signs another (to
    escape the token check under the job's own) bills nothing."""
    job_id = recorder.voucher_job(actors.payers[0], tokens=50_000)
    with recorder.sessions.begin() as session:
        hop = session.scalar(select(Hop).where(Hop.job_id == job_id, Hop.position == 2))
        assert hop is not None and hop.session is not None
        signed = KeyRing(actors.providers[2], recorder.contracts.protocol_domain()).receipt(
            ReceiptFields(
                job_id=bytes.fromhex(job_id[2:]), session=bytes.fromhex(hop.session), gateway=GATEWAY,
                provider=hop.provider, model_root=bytes.fromhex(MODEL_ROOT[2:]), layer_start=hop.layer_start,
                layer_end=hop.layer_end, positions=hop.tokens, transcript_root=bytes.fromhex(hop.transcript_root[2:]),
                sampling_hash=sampling_hash({"temperature": 0.0}),
            )
        )  # fmt: skip
        session.execute(
            update(Receipt)
            .where(Receipt.hop_id == hop.id)
            .values(signature="0x" + signed.signature.hex(), sampling_hash="0x" + signed.sampling_hash.hex())
        )
    reasons = list(meter(recorder, job_id).refused.values())  # type: ignore[attr-defined]
    assert any("other sampling parameters" in reason for reason in reasons), reasons
    assert actors.providers[2].address not in {r.provider for r in entries(recorder, job_id)}


def test_a_validation_is_decided_once_and_its_evidence_never_overwritten(
    recorder: Recorder, actors: Actors
) -> None:
    """Two runs judging one hop (a lock that expired under a slow one, a task delivered twice) race to decide it:
    one conditional update lets exactly one win, and only the winner's failure voids, pulls asks and slashes."""
    job_id = recorder.voucher_job(actors.payers[0], tokens=50_000)
    with recorder.sessions.begin() as session:
        hop = session.scalar(select(Hop).where(Hop.job_id == job_id, Hop.position == 1))
        assert hop is not None
        validation = validations.record(job_id=job_id, hop_id=hop.id, provider=hop.provider)
        session.add(validation)
        session.flush()
        validation_id = validation.id
    now = datetime.now(UTC)

    def fail(evidence: str) -> bool:
        with recorder.sessions.begin() as session:
            return validations.decide(
                session, validation_id=validation_id, job_id=job_id, status=ValidationStatus.FAILED, now=now,
                reason="output_mismatch", evidence=evidence, evidence_hash="0x" + "11" * 32,
            )  # fmt: skip

    assert fail('{"first": true}')
    assert not fail('{"second": true}')
    with recorder.sessions.begin() as session:
        assert not validations.decide(
            session, validation_id=validation_id, job_id=job_id, status=ValidationStatus.PASSED, now=now
        )
    with recorder.sessions() as session:
        decided = session.get(Validation, validation_id)
        assert decided is not None
        assert (decided.status, decided.evidence) == (ValidationStatus.FAILED, '{"first": true}')
        assert decided.slash_status == SlashStatus.PENDING
        job = session.get(Job, job_id)
        assert job is not None and job.cleared_at is not None
    with pytest.raises(ValueError, match="evidence"), recorder.sessions.begin() as session:
        validations.decide(
            session, validation_id=validation_id, job_id=job_id, status=ValidationStatus.FAILED, now=now
        )


def test_the_ledger_adds_up_to_the_charges_exactly(recorder: Recorder, actors: Actors) -> None:
    rng = random.Random(3)
    recorder.open_channel(actors.payers[1], 5 * ONE)
    jobs = [
        recorder.voucher_job(actors.payers[rng.randrange(2)], tokens=rng.randrange(1, 90_000))
        for _ in range(12)
    ]
    for job_id in jobs:
        meter(recorder, job_id)
    with recorder.sessions() as session:
        charged = session.scalar(select(func.sum(Charge.metered)))
        amounts = session.scalar(select(func.sum(Charge.amount)))
        providers = session.scalar(select(func.sum(LedgerEntry.provider_share)))
        platform = session.scalar(select(func.sum(LedgerEntry.platform_fee)))
        metered_jobs = session.scalar(
            select(func.count()).select_from(Job).where(Job.metered_at.is_not(None))
        )
    assert charged == amounts == providers + platform
    assert metered_jobs == len(jobs)
