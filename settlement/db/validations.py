"""How validations and the jobs they hold back change: the rules of the validation aggregate, in one place.

Metering draws some of a job's billed hops; each drawn hop gets a pending validation (:func:`record`). The
validator decides each one (:func:`decide`): passed, failed, or missed (it could not try while the provider
still had to keep the data). A job is cleared, and only then may an epoch settle it, once nothing it drew is
still pending: at metering when it drew nothing, else when its last validation is decided (:func:`clear`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from eth_utils.crypto import keccak
from sqlalchemy import Select, and_, func, or_, select, update
from sqlalchemy.orm import Session

from settlement.db.schema import Job, SlashStatus, Validation, ValidationStatus

FALSE_RECEIPT = "false_receipt"  # a validation's reason, decided by the gateway when the receipt came in
FALSE_RECEIPT_EVIDENCE_KIND = "strata.false-receipt/1"


def record(*, job_id: str, hop_id: int, provider: str) -> Validation:
    """A hop drawn for validation, pending."""
    return Validation(
        hop_id=hop_id, job_id=job_id, provider=provider, status=ValidationStatus.PENDING, attempts=0
    )


def false_receipt(
    *, job_id: str, hop_id: int, provider: str, evidence: str, detail: str, now: datetime
) -> Validation:
    """A hop whose provider signed a false receipt (marketplace.gateway.coordinator): decided at once, failed,
    with the evidence; its provider is suspended, not slashed."""
    return Validation(
        hop_id=hop_id,
        job_id=job_id,
        provider=provider,
        status=ValidationStatus.FAILED,
        reason=FALSE_RECEIPT,
        detail=detail,
        evidence=evidence,
        evidence_hash="0x" + keccak(evidence.encode()).hex(),
        slash_status=SlashStatus.SUSPENDED,
        attempts=0,
        decided_at=now,
    )


def decide(
    session: Session,
    *,
    validation_id: int,
    job_id: str,
    status: ValidationStatus,
    now: datetime,
    reason: str | None = None,
    detail: str | None = None,
    metrics: dict[str, Any] | None = None,
    evidence: str | None = None,
    evidence_hash: str | None = None,
) -> bool:
    """Records a pending validation's verdict, with the evidence of a failure (its slash then pending), and
    clears its job when it was the last one pending. Returns whether this call decided it: a validation is
    decided once, by one conditional update, so two runs racing on one hop (a lock that expired, a task
    delivered twice) cannot both act on a failure, and the first evidence is never overwritten."""
    if status == ValidationStatus.PENDING:
        raise ValueError("a decision is passed, failed or missed")
    if (evidence is None) != (status != ValidationStatus.FAILED):
        raise ValueError("a failure, and only a failure, comes with its evidence")
    values: dict[str, Any] = {
        "status": status, "reason": reason, "detail": detail, "metrics": metrics, "decided_at": now,
    }  # fmt: skip
    if evidence is not None:
        values.update(evidence=evidence, evidence_hash=evidence_hash, slash_status=SlashStatus.PENDING)
    decided = session.execute(
        update(Validation)
        .where(Validation.id == validation_id, Validation.status == ValidationStatus.PENDING)
        .values(**values)
    )
    if decided.rowcount != 1:  # type: ignore[attr-defined]
        return False
    undecided = session.scalar(
        select(Validation.id)
        .where(Validation.job_id == job_id, Validation.status == ValidationStatus.PENDING)
        .limit(1)
    )
    if undecided is None:
        clear(session, job_id, now)
    return True


def clear(session: Session, job_id: str, now: datetime) -> None:
    """Nothing the job drew is pending any more: an epoch may settle it. Clearing happens once."""
    session.execute(update(Job).where(Job.id == job_id, Job.cleared_at.is_(None)).values(cleared_at=now))


MISSED_RECENTLY_S = 3600.0


@dataclass(frozen=True)
class Backlog:
    """Whether the validator keeps up, for ``/health`` and metrics."""

    pending: int  # drawn, not decided yet
    troubled: int  # of those, ones the validator could not judge at its last try (its own trouble)
    overdue: int  # of those, ones whose job finished more than the window ago: the validator fell behind
    missed_recently: int  # decided missed in the last hour: drawn, never judged

    @property
    def behind(self) -> bool:
        return bool(self.troubled or self.overdue or self.missed_recently)


def backlog_query(now: datetime, window_s: float) -> Select[int, int, int, int]:
    """One row of :class:`Backlog`'s counts, as of ``now``."""
    pending = Validation.status == ValidationStatus.PENDING
    recently = now - timedelta(seconds=MISSED_RECENTLY_S)
    return (
        select(
            func.count().filter(pending),
            func.count().filter(and_(pending, Validation.trouble.is_not(None))),
            func.count().filter(and_(pending, Job.finished_at < now - timedelta(seconds=window_s))),
            func.count().filter(Validation.status == ValidationStatus.MISSED),
        )
        .select_from(Validation)
        .join(Job, Job.id == Validation.job_id)
        .where(
            or_(pending, and_(Validation.status == ValidationStatus.MISSED, Validation.decided_at > recently))
        )
    )
