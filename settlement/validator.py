"""The validator: re-executes sampled hops, and slashes the providers whose outputs do not match.

Metering draws hops for validation (``settlement.ledger``); each drawn hop is a ``validations`` row. Validating
one (the ``settlement.validate_hop`` task):

    fetch     the provider's retained steps of the hop's session, with a ticket for the job signed by this
              validator's key (providers accept fetches only from validators they trust)
    judge     hashes against the signed transcript; on the last span, every emitted token against the provider's
              own logits and the job's sampling parameters; then one prefill on the reference weights of the
              same model root and span, compared within the tolerance of the provider's dtype
              (settlement.validation)
    decide    passed: the job clears once all its drawn hops are decided.
              failed: the evidence is stored, the job is voided (see below), the provider's asks are pulled,
              and StakeManager.slash takes a share of its stake, bonded and unbonding, under the evidence's
              keccak256, graded by what the evidence shows: ``slash_bps`` for a proven wrong output, token or
              transcript; ``unavailable_slash_bps`` for data not produced and ``excess_slash_bps`` for a
              hop mean just past its calibrated bound, which may have causes short of cheating. The
              challenger's share of a slash goes to this validator's account.

Data the provider cannot produce. A provider must keep a session's steps for ``window_s`` after the job
finished; gateways book only asks that say they keep them longer (``SettlementSettings.min_retention_s``). A
provider that answers without them (or refuses this validator's ticket) inside the window fails the validation,
as one that cannot be reached fails once the window has passed with every attempt unanswered while the
validator kept trying (see :func:`unavailable`). Trouble
on the validator's side (no reference weights, out of memory, a crash, a backlog) is never the provider's: it is
recorded on the validation (``trouble``, shown in the gateway's ``/health``) and retried within
``TROUBLE_RETRY_S``; an attempt after the window that finds no data blames nobody, the hop is ``missed``, and
the job clears as if it had not been drawn. A validator that falls behind therefore lets a hop go unjudged only
once its provider, keeping its data as long as its ask says, has deleted it: ``missed`` hops show in ``/health``
for the operator, who must keep the validator within the window.

Voiding. Because a job enters an epoch only once cleared, a voided job's earnings were never in any root:
voiding takes nothing back from anyone. Its ledger entries are marked voided and its charge's metered amount
becomes 0, so its client pays nothing for it (every hop after the cheating one computed on bad data, so the
whole answer is void): a channel payer's money stays in its channel, and the gateway lowers the channel's
charged total by the job's charge, so the vouchers it already signed cover that much more of its next
requests, and whatever it does not spend comes back when it leaves the channel; an exact payer is refunded the
whole payment on chain in the next epoch. The honest providers on the same route go unpaid for that job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from settlement.contracts import BPS
from settlement.db import channels, validations
from settlement.db.schema import (
    Ask,
    ChainSend,
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
from settlement.errors import CannotJudge, TransactionReverted, UnknownJob
from settlement.outbox import send_once
from settlement.tickets import KeyRing
from settlement.validation import EXCESS_ERROR, ReferenceSpan, Verdict, judge_span
from worker.client import PeerLink, RetainedStep, fetch_retained
from worker.errors import HopRefused, UnknownSession, WorkerError
from worker.server import ServerLimits
from worker.shard import Shard, default_device, load_shard, model_root
from worker.tls import NO_FINGERPRINT
from worker.transcript import StepHashes
from worker.wire import FrameLimits

log = logging.getLogger(__name__)

DATA_UNAVAILABLE = "data_unavailable"
EVIDENCE_KIND = "strata.validation/1"


class ReferenceModels:
    """Reference weights by model root, loaded on first use from the checkpoint directories given (MODELS:
    ``PATH`` or ``NAME=PATH`` each), in fp32 on ``device``."""

    def __init__(self, entries: Sequence[str], *, device: torch.device | None = None) -> None:
        self.directories = [Path(entry.partition("=")[2] or entry) for entry in entries]
        self.device = device or default_device()
        self._roots: dict[str, Path] | None = None
        self._spans: dict[tuple[str, int, int], ReferenceSpan] = {}

    def span(self, root: str, start: int, end: int) -> ReferenceSpan | None:
        if self._roots is None:
            self._roots = {model_root(directory): directory for directory in self.directories}
        directory = self._roots.get(root.lower())
        if directory is None:
            return None
        key = (root.lower(), start, end)
        if key not in self._spans:
            device = self.device
            self._spans[key] = ReferenceSpan(
                lambda dtype: load_shard(directory, f"{start}:{end}", device=device, dtype=dtype)
            )
        return self._spans[key]


@dataclass(frozen=True)
class Outcome:
    validation_id: int
    status: str
    reason: str | None = None
    retry_in_s: float | None = None  # pending: try again after this long

    def as_json(self) -> dict[str, Any]:
        return {"validation": self.validation_id, "status": self.status, "reason": self.reason}


@dataclass(frozen=True)
class _Hop:
    """What validating a hop reads from the database, detached from any session."""

    validation: int
    status: str
    reason: str | None  # why it failed, once decided
    slash_status: str | None
    evidence_hash: str | None
    last_attempt_at: datetime | None
    unreachable_since: datetime | None  # the first of the attempts since which the provider has not answered
    job_id: str
    model_root: str
    finished_at: datetime
    provider: str
    endpoint: str
    session: str
    layers: tuple[int, int]
    attempt: int
    position: int
    tokens: int
    transcript_root: str
    transcript: list[list[Any]]
    signature: str | None
    fingerprint: bytes  # of the certificate the provider's ask named: the link to it pins it

    # What the last span's session was opened with (Hop.committed_sampling): its tokens are checked under them.
    sampling: dict[str, Any] | None

    def steps(self) -> list[StepHashes]:
        return [StepHashes.from_row(row) for row in self.transcript]


# A session is fetched a part (its inputs, then its outputs) at a time, in as many requests as the provider's
# reply size needs (worker.server.ServerLimits.max_fetch_bytes), each under ``fetch_timeout_s`` and a floor rate
# per byte; the whole fetch gets a round trip per request and the floor rate on top, so a provider far away or
# with a long session is not failed for either, while one that drips its answer cannot hold the validator for
# long. Capped below the longest ticket a provider takes (ServerLimits.max_ticket_lifetime_s, 600 s), less the
# ticket's margin.
FETCH_ROUND_TRIP_S = 0.25
FETCH_REPLY_BYTES = ServerLimits().max_fetch_bytes
FETCH_FLOOR_BYTES_PER_S = 1 << 20
MAX_FETCH_S = 540.0
# Past the deadline, an unreachable provider is blamed only if the validator's last attempt before it began
# within a retry interval, a whole fetch and this much of it.
PATIENCE_SLACK_S = 30.0
# The validator's own trouble (no reference weights, out of memory) is retried this soon.
TROUBLE_RETRY_S = 30.0
# Refusals that say the provider does not have the data; any other refusal is treated as no answer.
NO_DATA = frozenset({UnknownSession.code})


@dataclass(frozen=True)
class _FetchPlan:
    limits: FrameLimits  # per frame
    part_timeout_s: float  # per request: a reply of inputs or outputs, up to the whole part
    budget_s: float  # the whole session


def fetch_budget_s(payload_bytes: int, request_timeout_s: float) -> float:
    """How long fetching a session's inputs and outputs, at most ``payload_bytes`` in all, may take."""
    requests = 2 + payload_bytes // FETCH_REPLY_BYTES
    budget = request_timeout_s + requests * FETCH_ROUND_TRIP_S + payload_bytes / FETCH_FLOOR_BYTES_PER_S
    return min(budget, MAX_FETCH_S)


def unavailable(
    *,
    now: float,
    deadline: float,
    refused: bool,
    unreachable_since: float | None = None,
    previous_attempt: float | None = None,
    patience_s: float = 0.0,
) -> ValidationStatus | None:
    """Who answers for data a provider did not produce at an attempt at ``now``: FAILED (the provider), MISSED
    (nobody: it no longer had to keep it), or None (try again).

    A provider must produce a session's data until ``deadline`` (the window after its job finished). Refusing, or
    answering without it, inside the window is its fault; after the window it is not, however the validator
    came to be late (no reference weights yet, a crash, a backlog). An unreachable provider is tried again until
    the deadline, and is at fault only if it was unreachable at every attempt from ``unreachable_since`` on and
    the validator was still trying as the window closed: its ``previous_attempt`` at most ``patience_s`` (a
    retry interval, a whole fetch and a margin) before the deadline, and this attempt at most that after it. A
    validator that stopped trying earlier, or came back much later, blames nobody.
    """
    if refused:
        return ValidationStatus.FAILED if now <= deadline else ValidationStatus.MISSED
    if now < deadline:
        return None
    kept_trying = (
        previous_attempt is not None
        and unreachable_since is not None
        and unreachable_since <= previous_attempt <= deadline
        and deadline - previous_attempt <= patience_s
        and now - deadline <= patience_s  # and tried again soon after: not an hour late, after its own outage
    )
    return ValidationStatus.FAILED if kept_trying else ValidationStatus.MISSED


class Validator:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        contracts: Contracts,
        account: LocalAccount,
        references: ReferenceModels,
        *,
        window_s: float = 600.0,
        slash_bps: int = BPS,
        unavailable_slash_bps: int = BPS // 10,
        excess_slash_bps: int = BPS // 10,
        fetch_timeout_s: float = 30.0,  # per request: one part of one step
        retry_s: float = 10.0,
        send_lock: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for bps in (slash_bps, unavailable_slash_bps, excess_slash_bps):
            if not 0 < bps <= BPS:
                raise ValueError(f"slash shares must be in (0, {BPS}] basis points, got {bps}")
        self.sessions = sessions
        self.contracts = contracts
        self.account = account
        self.references = references
        self.window_s = window_s
        # Graded by what the evidence shows: a wrong output, a wrong token, a broken transcript prove a cheat and
        # take slash_bps; data not produced, or a hop mean just past its calibrated bound (excess_error), show
        # less (a disk lost, hardware noisier than any calibrated) and take less.
        self.penalties = {DATA_UNAVAILABLE: unavailable_slash_bps, EXCESS_ERROR: excess_slash_bps}
        self.slash_bps = slash_bps
        self.fetch_timeout_s = fetch_timeout_s
        self.retry_s = retry_s
        self.send_lock = send_lock  # one slash at a time per validator key: the nonces are shared
        self.clock = clock

    # -- the work ------------------------------------------------------------------------------------------

    def validate(self, validation_id: int) -> Outcome:
        hop = self._load(validation_id)
        if hop.status == ValidationStatus.FAILED and hop.slash_status == SlashStatus.PENDING:
            self._slash(hop)  # decided by an earlier run that stopped before the slash was mined
        if hop.status != ValidationStatus.PENDING:
            return Outcome(validation_id, hop.status)
        reference = self.references.span(hop.model_root, *hop.layers)
        if reference is None:  # the validator's own trouble: no attempt is counted against the provider
            return self._troubled(
                hop, f"no reference weights for model {hop.model_root}: add its checkpoint to MODELS"
            )
        try:
            plan = self._plan(hop, reference.shard())
        except (OSError, torch.OutOfMemoryError) as exc:
            return self._troubled(hop, f"the reference weights for {hop.model_root} do not load: {exc}")
        now = self.clock()
        deadline = hop.finished_at.timestamp() + self.window_s
        previous = hop.last_attempt_at.timestamp() if hop.last_attempt_at else None
        self._attempting(hop, now)
        try:
            steps = asyncio.run(self._fetch(hop, plan))
        except (WorkerError, TimeoutError, OSError) as exc:
            answered = self.clock()  # a long fetch may end well after it began
            if isinstance(exc, HopRefused) and exc.code in NO_DATA:  # it answered, without the data
                refused = unavailable(now=answered, deadline=deadline, refused=True)
                assert refused is not None  # an answer is never a reason to wait
                return self._unavailable(hop, refused, f"{exc.code}: {exc}")
            # No answer that can be held against it: unreachable, too slow, or it refused the ticket (a clock
            # skewed, this validator not yet among those it trusts). Tried again until the window closes.
            unreachable_since = hop.unreachable_since.timestamp() if hop.unreachable_since else now
            status = unavailable(
                now=now,
                deadline=deadline,
                refused=False,
                unreachable_since=unreachable_since,
                previous_attempt=previous,
                patience_s=self.retry_s + plan.budget_s + PATIENCE_SLACK_S,
            )
            if status is None:
                log.info("validation %d: %s unreachable (%r), retrying", validation_id, hop.endpoint, exc)
                self._unreachable(hop, unreachable_since)
                return Outcome(
                    validation_id,
                    ValidationStatus.PENDING,
                    retry_in_s=max(1.0, min(self.retry_s, deadline - answered)),
                )
            return self._unavailable(hop, status, f"unreachable: {exc!r}")
        if hop.unreachable_since is not None:
            self._unreachable(hop, None)  # it answered: an earlier streak of silence is over
        try:
            verdict = judge_span(reference, steps, hop.steps(), sampling=hop.sampling)
        except CannotJudge as exc:
            log.warning("validation %d missed: %s", validation_id, exc)
            with self.sessions.begin() as session:
                self._record(session, hop, ValidationStatus.MISSED, None, str(exc), None)
            return Outcome(validation_id, ValidationStatus.MISSED)
        except Exception as exc:  # out of memory, a kernel that fails: the validator's own trouble
            log.exception("validation %d: re-executing the hop failed", validation_id)
            return self._troubled(hop, f"re-executing the hop failed: {exc!r}"[:400])
        return self._decide(hop, verdict)

    def _troubled(self, hop: _Hop, trouble: str) -> Outcome:
        """The validator cannot judge the hop now, through no fault of the provider's: recorded (``/health``
        shows it) and tried again soon, ahead of the next epoch's re-queue. Nothing is counted against the
        provider; if the trouble outlasts the window, the next attempt after it finds the data gone and the hop
        is missed (see :func:`unavailable`)."""
        log.error("validation %d cannot be judged yet: %s", hop.validation, trouble)
        with self.sessions.begin() as session:
            session.execute(update(Validation).where(Validation.id == hop.validation).values(trouble=trouble))
        return Outcome(
            hop.validation, ValidationStatus.PENDING, reason="validator_trouble", retry_in_s=TROUBLE_RETRY_S
        )

    def _attempting(self, hop: _Hop, now: float) -> None:
        at = datetime.fromtimestamp(now, UTC)
        with self.sessions.begin() as session:
            session.execute(
                update(Validation)
                .where(Validation.id == hop.validation)
                .values(
                    attempts=Validation.attempts + 1,
                    trouble=None,
                    first_attempt_at=func.coalesce(Validation.first_attempt_at, at),
                    last_attempt_at=at,
                )
            )

    def _unreachable(self, hop: _Hop, since: float | None) -> None:
        with self.sessions.begin() as session:
            session.execute(
                update(Validation)
                .where(Validation.id == hop.validation)
                .values(unreachable_since=None if since is None else datetime.fromtimestamp(since, UTC))
            )

    def _load(self, validation_id: int) -> _Hop:
        with self.sessions() as session:
            validation = session.get(Validation, validation_id)
            if validation is None:
                raise UnknownJob(f"no validation {validation_id}")
            hop = session.get(Hop, validation.hop_id)
            job = session.get(Job, validation.job_id)
            assert hop is not None and job is not None and job.finished_at is not None
            receipt = session.scalar(select(Receipt).where(Receipt.hop_id == hop.id))
            ask = session.get(Ask, hop.ask_id)
            return _Hop(
                validation_id,
                validation.status,
                validation.reason,
                validation.slash_status,
                validation.evidence_hash,
                validation.last_attempt_at,
                validation.unreachable_since,
                job.id,
                job.model_root,
                job.finished_at,
                hop.provider,
                hop.endpoint,
                hop.session or "",
                (hop.layer_start, hop.layer_end),
                hop.attempt,
                hop.position,
                hop.tokens,
                hop.transcript_root,
                list(hop.transcript or []),
                receipt.signature if receipt else None,
                bytes.fromhex(ask.tls_fingerprint.removeprefix("0x")) if ask is not None else bytes(32),
                hop.committed_sampling(job.request),
            )

    def _plan(self, hop: _Hop, shard: Shard) -> _FetchPlan:
        """How much a hop's retained data may weigh and how long fetching it may take, from the model and the
        hop: inputs are token ids on the first span and hidden states elsewhere, outputs hidden states, or one
        row of logits a step on the last span."""
        span, tokens, steps = shard.span, hop.tokens, len(hop.transcript)
        input_bytes = tokens * (8 if span.first else shard.hidden_size * 4)
        output_bytes = steps * shard.vocab_size * 4 if span.last else tokens * shard.hidden_size * 4
        # A frame holds at most every position of the hop, each a hidden state or a row of logits.
        width = tokens * max(shard.hidden_size, shard.vocab_size)
        limits = FrameLimits(max_payload_bytes=width * 4, max_elements=width)
        part_timeout_s = self.fetch_timeout_s + max(input_bytes, output_bytes) / FETCH_FLOOR_BYTES_PER_S
        budget_s = fetch_budget_s(input_bytes + output_bytes, self.fetch_timeout_s)
        return _FetchPlan(limits, min(part_timeout_s, budget_s), budget_s)

    async def _fetch(self, hop: _Hop, plan: _FetchPlan) -> list[RetainedStep]:
        """The provider's retained steps of the hop's session, read over a link pinned to its certificate with a
        ticket naming it and the session: it can be used to read nothing else, by nobody else."""
        keys = KeyRing(self.account, self.contracts.protocol_domain())
        ticket = keys.fetch_ticket(
            job_id=bytes.fromhex(hop.job_id[2:]),
            session=bytes.fromhex(hop.session),
            provider=to_checksum_address(hop.provider),
            expires_at=int(self.clock() + plan.budget_s) + 60,
        )
        link = PeerLink(
            hop.endpoint,
            hop.fingerprint,
            keys,
            tls=hop.fingerprint != NO_FINGERPRINT,
            expect=to_checksum_address(hop.provider),
        )
        try:
            return await asyncio.wait_for(
                fetch_retained(
                    link,
                    ticket,
                    max_steps=len(hop.transcript),
                    limits=plan.limits,
                    part_timeout_s=plan.part_timeout_s,
                ),
                plan.budget_s,
            )
        finally:
            await link.close()

    def _unavailable(self, hop: _Hop, status: ValidationStatus, detail: str) -> Outcome:
        if status == ValidationStatus.MISSED:
            log.warning(
                "validation %d missed: the provider no longer had to keep the data (%s)",
                hop.validation,
                detail,
            )
            with self.sessions.begin() as session:
                self._record(session, hop, ValidationStatus.MISSED, None, detail, None)
            return Outcome(hop.validation, ValidationStatus.MISSED)
        return self._decide(
            hop, Verdict.failed(DATA_UNAVAILABLE, f"the provider could not produce the data ({detail})")
        )

    def _decide(self, hop: _Hop, verdict: Verdict) -> Outcome:
        if verdict.passed:
            with self.sessions.begin() as session:
                self._record(session, hop, ValidationStatus.PASSED, None, None, verdict.metrics)
            return Outcome(hop.validation, ValidationStatus.PASSED)
        evidence = self._evidence(hop, verdict)
        evidence_hash = "0x" + keccak(evidence.encode()).hex()
        now = datetime.fromtimestamp(self.clock(), UTC)
        with self.sessions.begin() as session:
            decided = validations.decide(
                session,
                validation_id=hop.validation,
                job_id=hop.job_id,
                status=ValidationStatus.FAILED,
                now=now,
                reason=verdict.reason,
                detail=verdict.detail,
                metrics=verdict.metrics,
                evidence=evidence,
                evidence_hash=evidence_hash,
            )
            if decided:
                self._void(session, hop.job_id, now)
                session.execute(
                    update(Ask)
                    .where(Ask.provider == hop.provider, Ask.withdrawn_at.is_(None))
                    .values(withdrawn_at=now)
                )
        if not decided:
            # Another run decided it first: its decision stands, with its evidence, and it slashes (or a later
            # run resumes its slash); this one acts on nothing.
            log.info("validation %d was decided by another run", hop.validation)
            return Outcome(hop.validation, self._load(hop.validation).status)
        log.warning(
            "validation %d failed: %s on layers %s of job %s: %s (%s)",
            hop.validation, hop.provider, hop.layers, hop.job_id, verdict.reason, verdict.detail,
        )  # fmt: skip
        self._slash(self._load(hop.validation))
        return Outcome(hop.validation, ValidationStatus.FAILED, verdict.reason)

    def _record(
        self,
        session: Session,
        hop: _Hop,
        status: ValidationStatus,
        reason: str | None,
        detail: str | None,
        metrics: dict[str, Any] | None,
    ) -> None:
        validations.decide(
            session,
            validation_id=hop.validation,
            job_id=hop.job_id,
            status=status,
            now=datetime.fromtimestamp(self.clock(), UTC),
            reason=reason,
            detail=detail,
            metrics=metrics,
        )

    @staticmethod
    def _void(session: Session, job_id: str, now: datetime) -> None:
        job = session.get(Job, job_id, with_for_update=True)
        assert job is not None
        if job.voided_at is not None:
            return
        job.voided_at = now
        session.execute(update(LedgerEntry).where(LedgerEntry.job_id == job_id).values(voided=True))
        charge = session.scalar(select(Charge).where(Charge.job_id == job_id))
        if charge is None:
            return
        assert charge.epoch is None, "a job is settled only once cleared, and this one was not"
        charge.metered = 0
        if charge.channel_id is not None and charge.amount:
            session.execute(channels.void(charge.channel_id, charge.amount))

    def _evidence(self, hop: _Hop, verdict: Verdict) -> str:
        """The canonical JSON document a slash's evidence hash commits to: anyone holding the provider's
        receipt and the reference weights can check it."""
        document = {
            "kind": EVIDENCE_KIND,
            "chainId": self.contracts.deployment.chain_id,
            "stakeManager": self.contracts.stake.address,
            "validator": self.account.address,
            "job": hop.job_id,
            "modelRoot": hop.model_root,
            "hop": {
                "provider": hop.provider,
                "layers": list(hop.layers),
                "attempt": hop.attempt,
                "position": hop.position,
                "session": hop.session,
                "tokens": hop.tokens,
                "transcriptRoot": hop.transcript_root,
                "receiptSignature": hop.signature,
                "transcript": hop.transcript,
            },
            "reason": verdict.reason,
            "detail": verdict.detail,
            "metrics": verdict.metrics,
            "decidedAt": int(self.clock()),
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":"))

    def _slash(self, hop: _Hop) -> None:
        assert hop.evidence_hash is not None
        stake = self.contracts.stake
        evidence = bytes.fromhex(hop.evidence_hash[2:])
        key = f"slash:{hop.evidence_hash}"
        with self.send_lock():
            if stake.evidence_used(evidence) and not self._sent(key):
                self._slashed(
                    hop, SlashStatus.SLASHED, None, None
                )  # slashed under this evidence by another run or by hand
                return
            held = stake.stake_of(hop.provider)
            amount = (
                (held.staked + held.unbonding) * self.penalties.get(hop.reason or "", self.slash_bps) // BPS
            )
            if amount == 0 and not self._sent(key):
                log.warning("validation %d: %s has no stake left to slash", hop.validation, hop.provider)
                self._slashed(hop, SlashStatus.NOTHING, 0, None)
                return
            try:
                receipt = send_once(
                    self.sessions,
                    self.contracts.chain,
                    self.account,
                    key,
                    partial(stake.slash_call, provider=hop.provider, amount=amount, evidence_hash=evidence),
                    "StakeManager.slash",
                )
            except TransactionReverted as exc:
                if exc.error_name != "NothingToSlash":
                    raise
                self._slashed(hop, SlashStatus.NOTHING, 0, None)
                return
        slashed = stake.slashed_amount(receipt)
        slashed = amount if slashed is None else slashed
        self._slashed(hop, SlashStatus.SLASHED, slashed, "0x" + bytes(receipt["transactionHash"]).hex())
        log.warning("slashed %s by %d (validation %d)", hop.provider, slashed, hop.validation)

    def _sent(self, key: str) -> bool:
        with self.sessions() as session:
            return session.scalar(select(ChainSend.id).where(ChainSend.key == key)) is not None

    def _slashed(self, hop: _Hop, status: str, amount: int | None, tx_hash: str | None) -> None:
        with self.sessions.begin() as session:
            session.execute(
                update(Validation)
                .where(Validation.id == hop.validation)
                .values(slash_status=status, slashed=amount, slash_tx=tx_hash)
            )


def unfinished(sessions: sessionmaker[Session]) -> list[int]:
    """Validations still to do: undecided, or failed with their slash not yet mined."""
    with sessions() as session:
        return list(
            session.scalars(
                select(Validation.id)
                .where(
                    (Validation.status == ValidationStatus.PENDING)
                    | (Validation.slash_status == SlashStatus.PENDING)
                )
                .order_by(Validation.id)
            )
        )


__all__ = ["Outcome", "ReferenceModels", "Validator", "unfinished"]
