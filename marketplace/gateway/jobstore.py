"""A job's rows: written when it is admitted, moved along as it rests and runs, and its outcome (hops, receipts,
evidence of false receipts, its charge) recorded in one transaction with what the payment gate settles.

Every write of a job's own rows goes through here; the payment gate writes the job's row in the transaction that
secures its payment, from :meth:`JobStore.row`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from marketplace.gateway.coordinator import HopRecord, Outcome
from marketplace.gateway.payments.gate import Reservation, Settled, hex0x
from settlement.db import validations
from settlement.db.schema import Channel, HopStatus, Job, JobStatus, Validation
from settlement.db.schema import Hop as HopRow
from settlement.db.schema import Receipt as ReceiptRow

if TYPE_CHECKING:
    from marketplace.gateway.jobs import Request

log = logging.getLogger(__name__)

RECORD_ATTEMPTS = (
    3  # a database that fails an outcome's transaction (a lost connection, a lock) gets two more
)


class JobStore:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        chain_id: int,
        gateway: str,
        clock: Callable[[], float],
    ) -> None:
        self.sessions = sessions
        self.chain_id = chain_id  # named in the evidence of false receipts, with the gateway's address
        self.gateway = gateway
        self.clock = clock

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def row(self, job_id: str, request: Request, reservation: Reservation, status: str) -> Job:
        """A new job's row, holding what its payment reserved."""
        now = self._now()
        return Job(
            id=job_id,
            kind=request.kind,
            model_root=request.model.root,
            model_name=request.model.name,
            status=status,
            scheme=reservation.scheme,
            payer=reservation.payer,
            channel_id=reservation.channel_id,
            quote=reservation.quote,
            charged=0,
            max_price=request.max_price,
            max_tokens=request.max_tokens,
            prompt_tokens=len(request.prompt),
            completion_tokens=0,
            failovers=0,
            request=request.stored(),
            created_at=now,
            started_at=now if status == JobStatus.RUNNING else None,
            expires_at=now + timedelta(seconds=request.ttl_s) if request.ttl_s else None,
        )

    async def add(self, row: Job) -> None:
        async with self.sessions() as session, session.begin():
            session.add(row)

    async def mark_running(self, job_id: str, at: float) -> None:
        async with self.sessions() as session, session.begin():
            await session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(status=JobStatus.RUNNING, started_at=datetime.fromtimestamp(at, UTC))
            )

    async def record(
        self,
        job_id: str,
        *,
        status: str,
        finish: str | None,
        output: str,
        outcome: Outcome,
        charged: int,
        settle: Callable[[AsyncSession], Awaitable[Settled]],
    ) -> tuple[Job, Settled]:
        """Records the job's outcome and, in the same transaction, what ``settle`` makes of its payment. Raises
        after RECORD_ATTEMPTS failures: the reservation stays on the job's row, and recovery at the next start
        releases it."""
        for attempt in range(1, RECORD_ATTEMPTS + 1):
            try:
                async with self.sessions() as session, session.begin():
                    job = await session.get(Job, job_id)
                    assert job is not None
                    job.status = status
                    job.finish_reason = finish
                    job.output = output
                    job.completion_tokens = len(outcome.tokens)
                    job.charged = charged
                    job.failovers = outcome.failovers
                    job.error_code = outcome.error_code
                    job.error_message = outcome.error_message
                    job.finished_at = self._now()
                    for hop in outcome.hops:
                        row = _hop_row(job_id, hop)
                        session.add(row)
                        if hop.receipt is not None or hop.status == HopStatus.FALSE_RECEIPT:
                            await session.flush()  # the hop's id, which its receipt and evidence name
                        if hop.receipt is not None:
                            session.add(_receipt_row(job_id, row.id, hop))
                        if hop.status == HopStatus.FALSE_RECEIPT:
                            session.add(self._false_receipt(job_id, row.id, hop, job.finished_at))
                    settled = await settle(session)
                return job, settled
            except Exception:
                if attempt == RECORD_ATTEMPTS:
                    log.exception("job %s: its outcome could not be recorded", job_id)
                    raise
                await asyncio.sleep(0.2 * attempt)
        raise AssertionError("unreachable")

    async def fail_interrupted(self, release: Callable[[AsyncSession, Job], Awaitable[object]]) -> int:
        """Jobs a crash left running fail uncharged, each releasing (``release``) what its payment held; returns
        how many."""
        async with self.sessions() as session, session.begin():
            stale = (await session.scalars(select(Job).where(Job.status == JobStatus.RUNNING))).all()
            for job in stale:
                job.status, job.error_code = JobStatus.FAILED, "gateway_restarted"
                job.error_message = "the gateway restarted while this job ran; nothing was charged"
                job.finished_at = self._now()
                await release(session, job)
        return len(stale)

    async def resting(self) -> list[Job]:
        async with self.sessions() as session:
            return list((await session.scalars(select(Job).where(Job.status == JobStatus.RESTING))).all())

    async def get(self, job_id: str) -> Job | None:
        async with self.sessions() as session:
            return await session.get(Job, job_id)

    async def channel(self, channel_id: str) -> Channel | None:
        async with self.sessions() as session:
            return await session.get(Channel, channel_id)

    def _false_receipt(self, job_id: str, hop_id: int, hop: HopRecord, now: datetime) -> Validation:
        """The evidence of a false receipt: the receipt as signed, beside the gateway's record of the hop."""
        assert hop.receipt is not None and hop.refusal is not None
        document = {
            "kind": validations.FALSE_RECEIPT_EVIDENCE_KIND,
            "chainId": self.chain_id,
            "gateway": self.gateway,
            "job": job_id,
            "receipt": hop.receipt.to_json(),
            "recorded": {
                "provider": hop.ask.provider,
                "layers": [hop.ask.start, hop.ask.end],
                "attempt": hop.attempt,
                "position": hop.position,
                "session": hex0x(hop.session),
                "positions": hop.tokens,
                "transcriptRoot": hex0x(hop.transcript_root),
                "transcript": [step.to_row() for step in hop.steps],
            },
            "reason": hop.refusal,
            "decidedAt": int(now.timestamp()),
        }
        evidence = json.dumps(document, sort_keys=True, separators=(",", ":"))
        return validations.false_receipt(
            job_id=job_id,
            hop_id=hop_id,
            provider=hop.ask.provider,
            evidence=evidence,
            detail=hop.refusal,
            now=now,
        )


def _hop_row(job_id: str, hop: HopRecord) -> HopRow:
    return HopRow(
        job_id=job_id,
        attempt=hop.attempt,
        position=hop.position,
        ask_id=hop.ask.id,
        provider=hop.ask.provider,
        endpoint=hop.ask.endpoint,
        layer_start=hop.ask.start,
        layer_end=hop.ask.end,
        price_per_million=hop.ask.price_per_million,
        tokens=hop.tokens,
        transcript_root=hex0x(hop.transcript_root),
        transcript=[step.to_row() for step in hop.steps],
        status=hop.status,
        session=hop.session.hex(),
        sampling=hop.sampling,
    )


def _receipt_row(job_id: str, hop_id: int, hop: HopRecord) -> ReceiptRow:
    receipt = hop.receipt
    assert receipt is not None
    return ReceiptRow(
        hop_id=hop_id,
        job_id=job_id,
        provider=receipt.provider,
        tokens=min(receipt.positions, 2**63 - 1),
        transcript_root=hex0x(receipt.transcript_root),
        gateway=receipt.gateway,
        sampling_hash=hex0x(receipt.sampling_hash),
        signature=hex0x(receipt.signature),
        verified=hop.verified,
        amount=hop.amount,
    )
