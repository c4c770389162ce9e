"""Settlement's Celery app: ``celery -A settlement.tasks worker -B`` meters jobs and closes epochs.

    settlement.meter_job(job_id)   a finished job's receipts into the ledger, and its hops drawn for validation
                                   with probability SAMPLE_RATE; the gateway sends one per job
    settlement.validate_hop(id)    re-executes one drawn hop and slashes on a mismatch (settlement.validator);
                                   retried while the provider cannot be reached, within the window
    settlement.close_epoch()       Celery beat every EPOCH_S seconds, or on demand; see settlement.epochs. It
                                   also sends validate_hop again for every validation still undone that has
                                   none on its way (queue_validation), so retries never pile up, and makes
                                   the cooperative refunds still asked for
    settlement.refund_channel(id)  a batch-settlement channel's cooperative refund the gateway granted
                                   (settlement.refunds); one operator transaction at a time, under the
                                   close_epoch lock

Queues: validate_hop goes to the ``validation`` queue, the rest to Celery's default ``celery`` queue. A worker
started without ``-Q`` consumes both; to keep the operator's and the validator's keys in separate processes,
run one worker with OPERATOR_KEY and ``-Q celery`` (with beat) and another with VALIDATOR_KEY and ``-Q validation``
(what `strata up` does). A task refuses to run in a worker without the key it signs with.

Nothing is sampled unless a validator is there to validate it (VALIDATOR_KEY in this worker, or VALIDATOR_ADDRESS
naming one that runs elsewhere): a drawn hop holds its job's payout back until it is validated.

Redis (REDIS_URL) is both broker and result backend. Tasks are acknowledged after they run
(``task_acks_late``), so a worker killed mid-task has its task delivered again; both tasks are idempotent, and
close_epoch resumes its unfinished epoch. Only one close_epoch runs at a time: it holds a Redis lock.

Settings are read when the app is first configured, not at import time.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from eth_account import Account
from eth_account.signers.local import LocalAccount
from redis import Redis
from redis.exceptions import LockError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from settlement.chain import Chain
from settlement.config import SettlementSettings
from settlement.db.engine import blocking_sessions, create_blocking_engine
from settlement.deploy import Contracts, Deployment
from settlement.epochs import EpochCloser
from settlement.errors import (
    ChainUnavailable,
    ConfigurationError,
    EpochBusy,
    TransactionRejected,
    TransactionTimeout,
)
from settlement.ledger import meter_job as meter
from settlement.refunds import refund_channel, refunds_asked

if TYPE_CHECKING:  # the validator runs models: torch is imported by the workers that validate, when they do
    from settlement.validator import Validator

log = logging.getLogger(__name__)

METER_JOB = "settlement.meter_job"
VALIDATE_HOP = "settlement.validate_hop"
CLOSE_EPOCH = "settlement.close_epoch"
REFUND_CHANNEL = "settlement.refund_channel"
SETTLEMENT_QUEUE = "celery"  # Celery's default queue: metering and epochs, with the operator's key
VALIDATION_QUEUE = "validation"  # validate_hop, with the validator's key
_CLOSE_LOCK = "strata:close_epoch"
_SLASH_LOCK = "strata:slash"
_QUEUED = "strata:validate:queued:{}"
# How long a validation counts as on its way without news: a chain of retries lost with its worker is queued
# again by an epoch close after this. Each attempt renews it.
QUEUED_TTL_S = 30 * 60
# Failures that a later attempt can get past; a revert or a ledger mismatch is not one of them.
_TRANSIENT = (ChainUnavailable, TransactionTimeout, TransactionRejected, OperationalError, EpochBusy)


def make_app(settings: SettlementSettings | None = None) -> Celery:
    """A Celery app on ``settings``' Redis; with none, SettlementSettings() when it is first configured."""
    app = Celery("strata")

    def configure(*_: Any, **__: Any) -> None:
        nonlocal settings
        settings = settings or SettlementSettings()
        if settings.redis_url is None:
            raise ConfigurationError("no REDIS_URL: settlement needs Redis as its Celery broker")
        app.conf.update(
            broker_url=settings.redis_url,
            result_backend=settings.redis_url,
            task_acks_late=True,
            task_reject_on_worker_lost=True,
            worker_prefetch_multiplier=1,
            result_expires=24 * 3600,
            broker_connection_retry_on_startup=True,
            beat_schedule={"close-epoch": {"task": CLOSE_EPOCH, "schedule": settings.epoch_s}},
            # Both queues declared, so that a worker given no -Q consumes both.
            task_queues={name: {"routing_key": name} for name in (SETTLEMENT_QUEUE, VALIDATION_QUEUE)},
            task_default_queue=SETTLEMENT_QUEUE,
        )

    app.on_configure.connect(configure, weak=False)
    return app


app = make_app()


@dataclass(frozen=True)
class Context:
    """What the tasks of one worker process share, built on first use."""

    settings: SettlementSettings
    sessions: sessionmaker[Session]
    contracts: Contracts
    operator: LocalAccount | None  # None without an OPERATOR_KEY: a validator's worker
    redis: Redis
    validator: Validator | None  # None without a VALIDATOR_KEY

    @property
    def sample_rate(self) -> float:
        validated = self.validator is not None or self.settings.validator_address is not None
        return self.settings.sample_rate if validated else 0.0

    def operator_account(self) -> LocalAccount:
        if self.operator is None:
            raise ConfigurationError("no OPERATOR_KEY: this worker cannot sign redemptions and roots")
        return self.operator


@cache
def context() -> Context:
    settings = SettlementSettings()
    if settings.operator_key is None and settings.validator_key is None:
        raise ConfigurationError(
            "no OPERATOR_KEY or VALIDATOR_KEY: a settlement worker signs with one of them"
        )
    if settings.redis_url is None:
        raise ConfigurationError("no REDIS_URL")
    chain = Chain(
        settings.rpc_url,
        request_timeout_s=settings.rpc_timeout_s,
        receipt_timeout_s=settings.receipt_timeout_s,
    )
    contracts = Contracts.load(chain, Deployment.load(settings.deployment_file))
    operator: LocalAccount | None = (
        Account.from_key(settings.operator_key.get_secret_value()) if settings.operator_key else None
    )
    sessions = blocking_sessions(create_blocking_engine(settings.database_url))
    redis = Redis.from_url(settings.redis_url)
    validator = None
    if settings.validator_key is not None:
        from settlement.validator import ReferenceModels, Validator

        validator = Validator(
            sessions,
            contracts,
            Account.from_key(settings.validator_key.get_secret_value()),
            ReferenceModels(settings.models),
            window_s=settings.validation_window_s,
            slash_bps=settings.slash_bps,
            unavailable_slash_bps=settings.unavailable_slash_bps,
            excess_slash_bps=settings.excess_slash_bps,
            send_lock=lambda: redis.lock(_SLASH_LOCK, timeout=10 * 60, blocking_timeout=5 * 60),
        )
    elif settings.sample_rate > 0 and settings.validator_address is None:
        log.warning("no VALIDATOR_KEY or VALIDATOR_ADDRESS: hops are not sampled for validation")
    return Context(settings, sessions, contracts, operator, redis, validator)


@app.task(
    name=METER_JOB,
    autoretry_for=_TRANSIENT,
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=8,
)
def meter_job(job_id: str) -> dict[str, Any]:
    ctx = context()
    with ctx.sessions.begin() as session:
        metered = meter(session, job_id, domain=ctx.contracts.protocol_domain(), sample_rate=ctx.sample_rate)
    if metered is None:
        return {"jobId": job_id, "metered": False}
    for validation in metered.sampled:
        queue_validation(ctx.redis, validation)
    return {
        "jobId": job_id,
        "metered": True,
        "charge": str(metered.charge),
        "entries": metered.entries,
        "refused": {str(hop): reason for hop, reason in metered.refused.items()},
        "sampled": metered.sampled,
    }


@app.task(
    name=VALIDATE_HOP,
    queue=VALIDATION_QUEUE,  # on the task, not in task_routes: routes set while configuring re-enter configure
    bind=True,
    autoretry_for=_TRANSIENT,
    retry_backoff=True,
    retry_backoff_max=120,
    max_retries=10,
)
def validate_hop(self: Task, validation_id: int) -> dict[str, Any]:
    ctx = context()
    if ctx.validator is None:
        raise ConfigurationError("no VALIDATOR_KEY: this worker cannot validate")
    lock = ctx.redis.lock(f"strata:validate:{validation_id}", timeout=15 * 60)
    if not lock.acquire(blocking=False):
        return {"validation": validation_id, "status": "busy"}  # another worker has it
    queued = _QUEUED.format(validation_id)
    ctx.redis.set(queued, 1, ex=QUEUED_TTL_S)  # claimed anew: a chain that outlived its claim holds it again
    try:
        outcome = ctx.validator.validate(validation_id)
    except _TRANSIENT:
        raise  # retried by Celery: the chain goes on
    except Exception:
        ctx.redis.delete(queued)  # this chain ends here; the next epoch close queues the validation again
        raise
    finally:
        with contextlib.suppress(LockError):
            lock.release()
    if outcome.retry_in_s is not None:
        # Not an error: the provider did not answer yet, and the validator decides when it is too late.
        raise self.retry(countdown=outcome.retry_in_s, max_retries=None)
    ctx.redis.delete(queued)
    return outcome.as_json()


def queue_validation(redis: Redis, validation_id: int) -> bool:
    """Sends validate_hop for a validation unless one is already on its way (queued, running or waiting to
    retry); returns whether it sent one. Every epoch close queues each undone validation, and without this
    each would start another chain of retries beside the ones still going."""
    if not claim_validation(redis, validation_id):
        return False
    validate_hop.delay(validation_id)
    return True


def claim_validation(redis: Redis, validation_id: int) -> bool:
    """Marks a validation as on its way, unless it already is."""
    return bool(redis.set(_QUEUED.format(validation_id), 1, nx=True, ex=QUEUED_TTL_S))


@app.task(
    name=CLOSE_EPOCH,
    autoretry_for=_TRANSIENT,
    retry_backoff=True,
    retry_backoff_max=120,
    max_retries=10,
)
def close_epoch() -> dict[str, Any]:
    ctx = context()
    # The lock outlives a worker killed while holding it by at most its timeout; the rerun then resumes.
    lock = ctx.redis.lock(_CLOSE_LOCK, timeout=15 * 60, blocking_timeout=5 * 60)
    if not lock.acquire():
        raise EpochBusy("another close_epoch held the lock for five minutes")
    try:
        closer = EpochCloser(ctx.sessions, ctx.contracts, ctx.operator_account(), sample_rate=ctx.sample_rate)
        report = closer.close().as_json()
        # Refunds the gateway granted whose task was lost: their payers are waiting, their channels closed to use.
        for channel_id in refunds_asked(ctx.sessions):
            refund_channel(ctx.sessions, ctx.contracts, ctx.operator_account(), channel_id)
    finally:
        with contextlib.suppress(LockError):  # it expired: whoever holds it now resumes the same epoch
            lock.release()
    if ctx.sample_rate > 0:
        from settlement.validator import unfinished

        # Validations drawn here or whose tasks were lost; one already on its way is left to it.
        for validation in unfinished(ctx.sessions):
            queue_validation(ctx.redis, validation)
    return report


@app.task(
    name=REFUND_CHANNEL, autoretry_for=_TRANSIENT, retry_backoff=True, retry_backoff_max=30, max_retries=10
)
def refund_batch_channel(channel_id: str) -> dict[str, Any] | None:
    """Makes the cooperative refund the gateway granted on ``channel_id`` (settlement.refunds). The operator sends
    one transaction at a time: it waits for an epoch being closed."""
    ctx = context()
    lock = ctx.redis.lock(_CLOSE_LOCK, timeout=15 * 60, blocking_timeout=5 * 60)
    if not lock.acquire():
        raise EpochBusy("close_epoch held the lock for five minutes")
    try:
        made = refund_channel(ctx.sessions, ctx.contracts, ctx.operator_account(), channel_id)
    finally:
        with contextlib.suppress(LockError):
            lock.release()
    return (
        None
        if made is None
        else {"channelId": made.channel_id, "amount": str(made.amount), "tx": made.tx_hash}
    )
