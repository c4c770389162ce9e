"""Metering: a finished job's signed receipts become ledger entries, one per billable hop.

A hop is billable only if everything the gateway saw can be checked again from what it recorded, by the same
rules the gateway billed with (worker.transcript):

    the provider's HopReceipt signature recovers to the hop's provider, over the job, the session, the gateway,
    the model root, the span, the positions and the transcript root;
    the transcript root is the root of the hop's recorded steps (on the last span, with the tokens it emitted);
    the transcript links: at every step each hop's input hash is the previous hop's output hash.

Its charge is ``tokens × span layers × price`` (settlement.pricing, rounded up per hop), split

    provider_share = charge × 8000 // 10000      (80%, rounded down, exactly as FeeSplit.providerShare on chain)
    platform_fee   = charge − provider_share     (20%, rounded up)

so every entry satisfies provider_share + platform_fee = charge in integer base units, and the job's charge is
the sum of its entries. The gateway charged the client the same sum from the same receipts; if the recorded
data no longer supports what it charged, metering bills only what does verify and the rest of the charge is
never collected: it stays in the client's channel (or is refunded, for exact payments).

Sampling. Metering a job is also when each of its billable hops is drawn for validation, with probability
``sample_rate``, from the operating system's CSPRNG: after the job ended, so no provider can know while it
serves whether its hop will be checked. A job with no hop drawn is cleared at once; one with hops drawn is
cleared when their validations are done (``settlement.validator``). Only cleared jobs enter an epoch.

Metering is idempotent: a job is metered once (``jobs.metered_at``), under a row lock where the database has
them, so a task delivered twice writes nothing the second time.
"""

from __future__ import annotations

import logging
import secrets
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise

from eth_utils.address import to_checksum_address
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from settlement.contracts import BPS, PROVIDER_BPS
from settlement.db import validations
from settlement.db.schema import (
    FINISHED_JOBS,
    Charge,
    Hop,
    HopStatus,
    Job,
    LedgerEntry,
    Receipt,
)
from settlement.eip712 import Domain
from settlement.errors import UnknownJob
from settlement.pricing import hop_charge
from settlement.tickets import SignatureChecks
from worker.messages import SignedReceipt
from worker.transcript import (
    ReceiptChecker,
    StepHashes,
    receipt_bills,
    sampling_hash,
    transcript_root,
)
from worker.trust import ReceiptFields

log = logging.getLogger(__name__)


def split(charge: int) -> tuple[int, int]:
    """(provider share, platform fee) of a hop's charge; see the module docstring for the rounding."""
    provider_share = charge * PROVIDER_BPS // BPS
    return provider_share, charge - provider_share


@dataclass(frozen=True)
class Metered:
    job_id: str
    charge: int  # what the ledger bills: Σ of the job's entries
    entries: int
    refused: dict[int, str] = field(default_factory=dict)  # hop id -> why it is not billable
    already: bool = False  # metered by an earlier run
    sampled: list[int] = field(default_factory=list)  # ids of the validations drawn


_SYSTEM_RANDOM = secrets.SystemRandom()


def meter_job(
    session: Session,
    job_id: str,
    *,
    domain: Domain,
    sample_rate: float = 0.0,
    draw: Callable[[], float] = _SYSTEM_RANDOM.random,
) -> Metered | None:
    """Writes ``job_id``'s ledger entries in the caller's transaction, and draws its hops for validation with
    probability ``sample_rate``; None while the job is still running."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise UnknownJob(f"no job {job_id}")
    if job.metered_at is not None:
        total = session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.charge), 0)).filter_by(job_id=job_id)
        )
        count = session.scalar(select(func.count()).select_from(LedgerEntry).filter_by(job_id=job_id))
        return Metered(job_id, int(total or 0), int(count or 0), already=True)
    if job.status not in FINISHED_JOBS:
        return None

    charge = session.scalar(select(Charge).where(Charge.job_id == job_id))
    hops = session.scalars(select(Hop).where(Hop.job_id == job_id).order_by(Hop.attempt, Hop.position)).all()
    receipts = {r.hop_id: r for r in session.scalars(select(Receipt).where(Receipt.job_id == job_id))}
    billed = [hop for hop in hops if hop.status == HopStatus.BILLED]
    refused = _refusals(job, hops, billed, receipts, SignatureChecks(domain).receipt)
    # Unpaid jobs (payments off) and jobs charged nothing bill nobody, whatever their receipts say.
    collectable = charge.amount if charge is not None else 0
    entries: list[LedgerEntry] = []
    for hop in billed:
        if hop.id in refused:
            continue
        amount = hop_charge(hop.tokens, hop.layer_end - hop.layer_start, hop.price_per_million)
        if amount > collectable:
            refused[hop.id] = f"its charge {amount} is more than the client was charged"
            continue
        collectable -= amount
        provider_share, platform_fee = split(amount)
        entries.append(
            LedgerEntry(
                job_id=job_id,
                hop_id=hop.id,
                provider=hop.provider,
                token_layers=hop.tokens * (hop.layer_end - hop.layer_start),
                charge=amount,
                provider_share=provider_share,
                platform_fee=platform_fee,
            )
        )
    session.add_all(entries)
    hops_by_id = {hop.id: hop for hop in billed}
    drawn = [
        validations.record(job_id=job_id, hop_id=entry.hop_id, provider=entry.provider)
        for entry in entries
        if hops_by_id[entry.hop_id].session is not None and draw() < sample_rate
    ]
    session.add_all(drawn)
    session.flush()
    total = sum(entry.charge for entry in entries)
    if charge is not None:
        charge.metered = total
        if total != charge.amount:
            log.error(
                "job %s: the gateway charged %d but only %d is backed by verifiable receipts (%s)",
                job_id, charge.amount, total, refused,
            )  # fmt: skip
    job.metered_at = datetime.now(UTC)
    if not drawn:
        validations.clear(session, job_id, job.metered_at)
    return Metered(job_id, total, len(entries), refused, sampled=[v.id for v in drawn])


def _refusals(
    job: Job, hops: Sequence[Hop], billed: list[Hop], receipts: dict[int, Receipt], check: ReceiptChecker
) -> dict[int, str]:
    """Why each billed hop that fails a check is not billable, by hop id."""
    refused: dict[int, str] = {}
    for hop in billed:
        reason = _receipt_problem(job, hop, receipts.get(hop.id), check)
        if reason is not None:
            refused[hop.id] = reason
    # Links are checked over the whole route a billed hop ran on, including hops whose receipts failed.
    routes: dict[int, list[Hop]] = defaultdict(list)
    for hop in hops:
        routes[hop.attempt].append(hop)
    for attempt in {hop.attempt for hop in billed}:
        broken = _broken_link(routes[attempt])
        if broken is not None:
            for hop in billed:
                if hop.attempt == attempt:
                    refused.setdefault(hop.id, broken)
    return refused


def _steps(hop: Hop) -> list[StepHashes]:
    return [StepHashes.from_row(row) for row in hop.transcript or []]


def _receipt_problem(job: Job, hop: Hop, receipt: Receipt | None, check: ReceiptChecker) -> str | None:
    if receipt is None:
        return "no receipt"
    if not hop.transcript or hop.session is None or receipt.gateway is None or receipt.sampling_hash is None:
        return "no recorded transcript, session, gateway or sampling commitment"
    try:
        steps = _steps(hop)
        root = transcript_root(steps)
        signed = SignedReceipt(
            job_id=bytes.fromhex(job.id[2:]),
            session=bytes.fromhex(hop.session),
            gateway=receipt.gateway,
            provider=to_checksum_address(receipt.provider),
            model_root=bytes.fromhex(job.model_root[2:]),
            layer_start=hop.layer_start,
            layer_end=hop.layer_end,
            positions=receipt.tokens,
            transcript_root=bytes.fromhex(receipt.transcript_root[2:]),
            sampling_hash=bytes.fromhex(receipt.sampling_hash[2:]),
            signature=bytes.fromhex(receipt.signature[2:]),
        )
    except (ValueError, TypeError) as exc:
        return f"unreadable receipt or transcript: {exc}"
    if "0x" + root.hex() != hop.transcript_root:
        return "the transcript root does not match the recorded steps"
    if sum(step.positions for step in steps) != hop.tokens:
        return f"the recorded steps hold {sum(step.positions for step in steps)} positions, not {hop.tokens}"
    expected = ReceiptFields(
        job_id=signed.job_id,
        session=signed.session,
        gateway=signed.gateway,
        provider=to_checksum_address(hop.provider),
        model_root=signed.model_root,
        layer_start=hop.layer_start,
        layer_end=hop.layer_end,
        positions=hop.tokens,
        transcript_root=root,
        # The last span's steps carry their tokens; it alone samples, with the parameters its session was opened with.
        sampling_hash=sampling_hash(
            hop.committed_sampling(job.request) if steps[-1].token is not None else None
        ),
    )
    return receipt_bills(signed, expected, check)


def _broken_link(route: list[Hop]) -> str | None:
    """Why a route's transcripts do not chain hop to hop, or None when they do."""
    route = sorted(route, key=lambda hop: hop.position)
    if [hop.position for hop in route] != list(range(len(route))):
        return "the route's hops are not all recorded"
    try:
        transcripts = [_steps(hop) for hop in route]
    except (ValueError, TypeError) as exc:
        return f"unreadable transcript: {exc}"
    steps = [(entry.step, entry.positions) for entry in transcripts[0]]
    if any([(entry.step, entry.positions) for entry in t] != steps for t in transcripts):
        return "the hops recorded different steps, or different positions in a step"
    for upstream, downstream in pairwise(transcripts):
        for sent, received in zip(upstream, downstream, strict=True):
            if sent.output != received.input:
                return "a hop's input is not the previous hop's output"
    return None


__all__ = ["Metered", "UnknownJob", "meter_job", "split"]
