"""The marketplace's database: one schema, owned by the gateway and settlement together.

The gateway writes most of it (providers, asks, channels, jobs, hops, receipts, vouchers, charges and exact
authorizations); settlement writes the ledger, validations, epochs and chain sends, and moves channels and jobs
on (claimed totals, voided and cleared jobs). The tables sit here, in settlement, rather than under the gateway
because settlement must import them and no import goes upward; the gateway imports them from here too. One
Alembic history (migrations/) creates them on SQLite and PostgreSQL alike. The rules by which a channel or a
validation changes state live beside them, one module per aggregate: :mod:`.channels`, :mod:`.validations`.
Every status column takes the values of its ``StrEnum`` below.

Money is integers in token base units, stored as BIGINT: the API refuses amounts above 2**63 - 1 (9.2e12
dollars of a 6-decimal token) before they reach a table. Hex identifiers (addresses, job and channel ids,
hashes, signatures) are stored 0x-prefixed and lower-case, except addresses, which are checksummed.

A channel row is the gateway's side of a payment channel: the newest voucher it accepted, what it charged, and
what is reserved by requests in flight. The check constraint ``charged + reserved <= voucher_amount`` is the
voucher invariant itself: no request runs unless the payer's signature covers it.

The ledger (see ``settlement.ledger``): metering writes one :class:`LedgerEntry` per billable hop, splitting its
charge between the provider and the platform; an :class:`Epoch` settles every metered charge not yet settled
(redeeming vouchers, forwarding exact payments, refunding what exact payers overpaid) and posts the providers'
cumulative earnings as a Merkle root, taking only jobs whose sampling and validation finished
(``jobs.cleared_at``). A :class:`Validation` is one sampled hop re-executed (see ``settlement.validator``); a
failed one voids its job's entries. :class:`ChainSend` records each transaction settlement signs before it is
broadcast, so a worker that dies mid-epoch finds it again instead of sending a second one.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ADDRESS = String(42)
HASH = String(66)  # 0x + 32 bytes
SIGNATURE = String(132)  # 0x + 65 bytes

# Stable constraint names, so migrations can name what they change on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class PaymentScheme(StrEnum):
    """How a job was paid for; a channel's row is of the first two."""

    VOUCHER = "voucher"  # Strata's VoucherEscrow channels
    BATCH = "batch-settlement"  # x402's BatchSettlement channels
    EXACT = "exact"  # one EIP-3009 transfer of the quote
    NONE = "none"  # payments off


class JobStatus(StrEnum):
    RESTING = "resting"  # paid for, waiting in the book for a route at or below its max_price
    PAYING = "paying"  # an exact payment being settled on chain before it runs
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"  # rested past its deadline
    CANCELLED = "cancelled"


FINISHED_JOBS = (JobStatus.COMPLETED, JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.EXPIRED)


class HopStatus(StrEnum):
    RUNNING = "running"
    BILLED = "billed"  # its receipt verified: it bills its token-layers
    UNVERIFIED = "unverified"  # it finished, but its receipt did not check out: it bills nothing
    # It finished and signed a receipt that contradicts what it served: it bills nothing and is suspended.
    FALSE_RECEIPT = "false_receipt"
    ABANDONED = "abandoned"  # its route failed over: nobody on it bills that attempt
    FAILED = "failed"  # the provider that failed its route: suspended from matching for a while
    # Left out of its job's later attempts, not suspended: its word against another hop's, or a silent route.
    SUSPECT = "suspect"


class AuthorizationStatus(StrEnum):
    PENDING = "pending"
    SETTLED = "settled"
    FAILED = "failed"


class ValidationStatus(StrEnum):
    PENDING = "pending"
    PASSED = "passed"
    FAILED = "failed"
    MISSED = "missed"  # the validator could not try while the provider had to keep the data: nobody is blamed


class SlashStatus(StrEnum):
    PENDING = "pending"
    SLASHED = "slashed"
    NOTHING = "nothing"  # no stake was left to take
    SUSPENDED = (
        "suspended"  # no slash: a false receipt suspends its provider (see marketplace.gateway.coordinator)
    )


class EpochStatus(StrEnum):
    """The steps an epoch walks, in order; each is done when its transaction is mined."""

    REDEEM = "redeem"
    FORWARD = "forward"
    REFUND = "refund"
    POST = "post"
    POSTED = "posted"


class SendStatus(StrEnum):
    SIGNED = "signed"
    MINED = "mined"
    REVERTED = "reverted"
    DROPPED = "dropped"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores it naive and gives it back naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored: pass a UTC-aware one")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Provider(Base):
    __tablename__ = "providers"

    address: Mapped[str] = mapped_column(ADDRESS, primary_key=True)
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_timestamp: Mapped[int] = mapped_column(BigInteger, default=0)  # newest signed heartbeat, unix s
    ask_nonce: Mapped[int] = mapped_column(BigInteger, default=0)  # newest ask nonce accepted


class Ask(Base):
    """A signed offer. Replacing or withdrawing it sets ``withdrawn_at``; the live book is the rows without."""

    __tablename__ = "asks"
    __table_args__ = (
        CheckConstraint("layer_start >= 0 AND layer_end > layer_start", name="span"),
        CheckConstraint("price_per_million > 0", name="price"),
        CheckConstraint("capacity > 0", name="capacity"),
        Index("ix_asks_live", "model_root", "withdrawn_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(ForeignKey("providers.address"), index=True)
    model_root: Mapped[str] = mapped_column(HASH)
    layer_start: Mapped[int] = mapped_column(Integer)
    layer_end: Mapped[int] = mapped_column(Integer)
    price_per_million: Mapped[int] = mapped_column(BigInteger)
    capacity: Mapped[int] = mapped_column(Integer)
    # seconds the provider keeps a session's steps for validators after it ends, as its ask signs
    retention_s: Mapped[int] = mapped_column(BigInteger, server_default="0")
    endpoint: Mapped[str] = mapped_column(String(255))
    # sha256 of the TLS certificate the endpoint proved it holds (zeros: plain TCP, development only)
    tls_fingerprint: Mapped[str] = mapped_column(HASH, server_default="0x" + "00" * 32)
    nonce: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger)  # unix s
    signature: Mapped[str] = mapped_column(SIGNATURE)
    posted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    withdrawn_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Channel(Base):
    __tablename__ = "channels"
    __table_args__ = (
        CheckConstraint("charged >= 0 AND reserved >= 0", name="non_negative"),
        CheckConstraint("charged + reserved <= voucher_amount", name="covered_by_voucher"),
    )

    id: Mapped[str] = mapped_column(HASH, primary_key=True)
    payer: Mapped[str] = mapped_column(ADDRESS, index=True)
    # "voucher" (VoucherEscrow, the id names the payer) or "batch-settlement" (x402's BatchSettlement, the id is a
    # hash of ``config``, its ChannelConfig, which claims need).
    scheme: Mapped[str] = mapped_column(String(16), default="voucher", server_default="voucher")
    config: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    voucher_amount: Mapped[int] = mapped_column(BigInteger, default=0)  # the newest accepted voucher's amount
    voucher_signature: Mapped[str | None] = mapped_column(SIGNATURE)
    charged: Mapped[int] = mapped_column(BigInteger, default=0)  # cumulative, what settlement may claim
    reserved: Mapped[int] = mapped_column(BigInteger, default=0)  # quotes of requests in flight
    # Cumulative, what the payer's vouchers authorized request by request (each batch-settlement request's whole
    # quote): such a payer signs its next voucher for this plus the next quote. It runs above charged by what was
    # quoted and not metered; VoucherEscrow channels keep the two equal.
    acknowledged: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # A batch-settlement payer's cooperative refund, asked for and not yet made: its amount (0: everything not
    # charged). No request is admitted on the channel meanwhile. The operator makes it (settlement.refunds).
    refunding: Mapped[int | None] = mapped_column(BigInteger)
    refund_tx: Mapped[str | None] = mapped_column(HASH)  # the last refund's transaction
    # Cumulative, redeemed on chain by settlement. The server default fills rows older than settlement.
    claimed: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # When settlement saw the escrow close it: charges on it that were never redeemed can never be collected.
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("charged >= 0 AND charged <= quote", name="charged_within_quote"),
        Index("ix_jobs_status", "status"),
    )

    id: Mapped[str] = mapped_column(HASH, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # chat, completion, job
    model_root: Mapped[str] = mapped_column(HASH)
    model_name: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))  # JobStatus
    scheme: Mapped[str] = mapped_column(String(16))  # voucher, exact, none (payments off)
    payer: Mapped[str | None] = mapped_column(ADDRESS, index=True)
    channel_id: Mapped[str | None] = mapped_column(ForeignKey("channels.id"), index=True)
    quote: Mapped[int] = mapped_column(BigInteger, default=0)  # reserved (voucher) or paid (exact) up front
    charged: Mapped[int] = mapped_column(BigInteger, default=0)
    max_price: Mapped[int | None] = mapped_column(BigInteger)
    max_tokens: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    request: Mapped[dict[str, Any]] = mapped_column(JSON)  # what to run: prompt ids and sampling
    output: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    failovers: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    metered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # when its receipts entered the ledger
    # When its sampling decision and every validation it drew were done: only then may an epoch settle it.
    cleared_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When a failed validation voided it: its client pays nothing for it, its providers earn nothing.
    voided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Hop(Base):
    """One provider's session for a job. ``attempt`` counts routes: a failover starts attempt + 1."""

    __tablename__ = "hops"
    __table_args__ = (UniqueConstraint("job_id", "attempt", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)
    ask_id: Mapped[int] = mapped_column(ForeignKey("asks.id"))
    provider: Mapped[str] = mapped_column(ADDRESS, index=True)
    endpoint: Mapped[str] = mapped_column(String(255))
    layer_start: Mapped[int] = mapped_column(Integer)
    layer_end: Mapped[int] = mapped_column(Integer)
    price_per_million: Mapped[int] = mapped_column(BigInteger)
    tokens: Mapped[int] = mapped_column(Integer)  # positions the gateway sent through this hop
    transcript_root: Mapped[str] = mapped_column(HASH)  # computed by the gateway from the steps' hashes
    # [[step, positions, input hash, output hash(, token)], ...] as the route reported them: metering re-checks
    # the links and the root from these, and a validator compares a provider's retained tensors with them.
    # None on hops recorded before settlement existed.
    transcript: Mapped[list[list[Any]] | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))  # HopStatus
    # The hop session's 16 random bytes, hex: a validator fetches the provider's retained steps by it.
    session: Mapped[str | None] = mapped_column(String(32))
    # On the last span, the sampling parameters its session was opened with (worker.sampling.session_sampling):
    # its receipt commits to them and its tokens are judged under them. None on other spans, and on last spans
    # recorded before hops kept them, whose sessions were opened with the job's own ``request["sampling"]``.
    sampling: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    def committed_sampling(self, job_request: dict[str, Any] | None) -> dict[str, Any] | None:
        """What this last span's session sampled with."""
        if self.sampling is not None:
            return self.sampling
        return (job_request or {}).get("sampling")


class Receipt(Base):
    """A provider's signed HopReceipt, as received, with the gateway's verdict on it."""

    __tablename__ = "receipts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    hop_id: Mapped[int] = mapped_column(ForeignKey("hops.id"), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    provider: Mapped[str] = mapped_column(ADDRESS)
    tokens: Mapped[int] = mapped_column(BigInteger)  # the positions it signs for
    transcript_root: Mapped[str] = mapped_column(HASH)
    # The gateway the receipt is for, and the last span's commitment to how it sampled (zeros elsewhere). None on
    # receipts from before receipts named them, which no longer bill.
    gateway: Mapped[str | None] = mapped_column(ADDRESS)
    sampling_hash: Mapped[str | None] = mapped_column(HASH)
    signature: Mapped[str] = mapped_column(SIGNATURE)
    verified: Mapped[bool] = mapped_column(Boolean)
    amount: Mapped[int] = mapped_column(BigInteger)  # what this hop bills the client; 0 unless verified
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Charge(Base):
    """What a finished job cost its payer. ``refund`` is owed back on chain (exact payments paid the quote).

    ``metered`` is what the ledger bills, set by metering: the gateway's ``amount`` re-derived from receipts
    that verify. Settlement collects ``metered`` (at most ``amount``) in epoch ``epoch``.
    """

    __tablename__ = "charges"
    __table_args__ = (
        CheckConstraint("amount >= 0 AND amount <= quote", name="within_quote"),
        CheckConstraint("refund >= 0 AND refund <= quote - amount", name="refund"),
        Index("ix_charges_unsettled", "epoch", "metered"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), unique=True)
    payer: Mapped[str] = mapped_column(ADDRESS, index=True)
    scheme: Mapped[str] = mapped_column(String(16))
    channel_id: Mapped[str | None] = mapped_column(ForeignKey("channels.id"))
    quote: Mapped[int] = mapped_column(BigInteger)
    amount: Mapped[int] = mapped_column(BigInteger)
    refund: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    metered: Mapped[int | None] = mapped_column(BigInteger)
    epoch: Mapped[int | None] = mapped_column(Integer)


class Authorization(Base):
    """An EIP-3009 authorization (x402 `exact`), recorded before it is sent so a nonce is settled once."""

    __tablename__ = "authorizations"
    __table_args__ = (UniqueConstraint("payer", "nonce"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    payer: Mapped[str] = mapped_column(ADDRESS)
    nonce: Mapped[str] = mapped_column(HASH)
    value: Mapped[int] = mapped_column(BigInteger)
    valid_before: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))  # AuthorizationStatus
    tx_hash: Mapped[str | None] = mapped_column(HASH)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))
    # The chain's head when the gateway took it: its transfer, whoever sent it, is in a later block.
    from_block: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LedgerEntry(Base):
    """One billable hop: its charge to the client, split between its provider and the platform."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        CheckConstraint("provider_share >= 0 AND platform_fee >= 0", name="non_negative"),
        CheckConstraint("provider_share + platform_fee = charge", name="split"),
        Index("ix_ledger_entries_provider_epoch", "provider", "epoch"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    hop_id: Mapped[int] = mapped_column(ForeignKey("hops.id"), unique=True)
    provider: Mapped[str] = mapped_column(ADDRESS)
    token_layers: Mapped[int] = mapped_column(BigInteger)
    charge: Mapped[int] = mapped_column(BigInteger)
    provider_share: Mapped[int] = mapped_column(BigInteger)
    platform_fee: Mapped[int] = mapped_column(BigInteger)
    epoch: Mapped[int | None] = mapped_column(Integer)  # the epoch whose root first includes it
    # A failed validation of its job voided it: it never enters a root, and its charge is not collected.
    voided: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Validation(Base):
    """A sampled hop, re-executed by the validator. ``status``: pending, then passed, failed or missed (the
    validator could not try while the provider still had to keep the data: nobody is blamed).

    A failed one keeps its evidence: ``evidence`` is the canonical JSON document whose keccak256 is
    ``evidence_hash``, the hash StakeManager.slash records on chain. ``slash_status`` follows the slash:
    pending, slashed, or nothing (no stake left to take).
    """

    __tablename__ = "validations"
    __table_args__ = (Index("ix_validations_status", "status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    hop_id: Mapped[int] = mapped_column(ForeignKey("hops.id"), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    provider: Mapped[str] = mapped_column(ADDRESS, index=True)
    status: Mapped[str] = mapped_column(String(16))  # ValidationStatus
    reason: Mapped[str | None] = mapped_column(String(64))  # the failure's code
    detail: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    evidence: Mapped[str | None] = mapped_column(Text)
    evidence_hash: Mapped[str | None] = mapped_column(HASH, unique=True)
    slash_status: Mapped[str | None] = mapped_column(String(16))  # SlashStatus
    slashed: Mapped[int | None] = mapped_column(BigInteger)  # base units taken from the provider's stake
    slash_tx: Mapped[str | None] = mapped_column(HASH)
    attempts: Mapped[int] = mapped_column(
        Integer, default=0
    )  # fetches tried; the validator's own failures aside
    first_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Since when every attempt found the provider unreachable (None once it answers): past the window, that is
    # its fault only if the validator was still trying as the window closed.
    unreachable_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Why the validator could not judge it at its last try, through no fault of the provider's (no reference
    # weights, out of memory); None once an attempt got under way.
    trouble: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Epoch(Base):
    """One settlement: the charges it collects and the root it posts. ``number`` is the distributor's epoch.

    ``status`` walks redeem → forward → refund → post → posted; each step is done when its transactions are
    mined (or the chain shows their effect), so a rerun resumes where the last run stopped. Redemption may drop
    channels whose payer left before their batch landed: their charges go back out of the epoch, and
    ``settled``, ``leaves``, ``root`` and ``provider_total`` are what the rest collected.
    """

    __tablename__ = "epochs"

    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    status: Mapped[str] = mapped_column(String(16))  # EpochStatus
    settled: Mapped[int] = mapped_column(BigInteger)  # Σ metered charges this epoch collects
    redemptions: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # channel, voucher, signature, claimTo
    forward: Mapped[int] = mapped_column(BigInteger)  # exact payments passed on to the distributor
    leaves: Mapped[dict[str, str]] = mapped_column(JSON)  # account -> cumulative amount in the root
    root: Mapped[str] = mapped_column(HASH)
    provider_total: Mapped[int] = mapped_column(BigInteger)  # Σ leaves
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    posted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Refund(Base):
    """What an epoch owes one exact payer back: the part of its quotes that metering did not charge. Paid by its
    own transfer, after the epoch's other steps; one that cannot be paid yet (``error`` says why) is tried again
    at every close and never holds an epoch up."""

    __tablename__ = "refunds"
    __table_args__ = (CheckConstraint("amount > 0", name="positive"), UniqueConstraint("epoch", "payer"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    epoch: Mapped[int] = mapped_column(Integer, index=True)
    payer: Mapped[str] = mapped_column(ADDRESS)
    amount: Mapped[int] = mapped_column(BigInteger)
    paid_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(Text)


class ChainSend(Base):
    """A transaction settlement signed, recorded before broadcast under an idempotency key."""

    __tablename__ = "chain_sends"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(128), unique=True)  # e.g. epoch:3:redeem
    sender: Mapped[str] = mapped_column(ADDRESS)
    nonce: Mapped[int] = mapped_column(BigInteger)
    tx_hash: Mapped[str] = mapped_column(HASH)
    raw: Mapped[str] = mapped_column(Text)  # the signed bytes, hex: resent as they are, never re-signed
    status: Mapped[str] = mapped_column(String(16))  # SendStatus
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
