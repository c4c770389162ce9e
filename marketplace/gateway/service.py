"""Everything a running gateway holds, built when it starts and torn down when it stops."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from functools import partial

from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from marketplace.gateway.catalog import Catalog
from marketplace.gateway.chainwatch import ChainWatcher, ContractsReader
from marketplace.gateway.config import GatewaySettings
from marketplace.gateway.coordinator import Coordinator
from marketplace.gateway.jobs import JobRunner
from marketplace.gateway.market import LinkProver, Market
from marketplace.gateway.metrics import Metrics
from marketplace.gateway.orderbook import OrderBook
from marketplace.gateway.payments.gate import PaymentGate, Terms
from marketplace.gateway.ratelimit import BoundedWork, Rate, RateLimiter
from settlement.chain import Chain
from settlement.config import SettlementSettings
from settlement.db.engine import create_engine, migrate, sessions
from settlement.db.schema import Channel
from settlement.deploy import Contracts, Deployment
from settlement.errors import ConfigurationError
from settlement.tasks import CLOSE_EPOCH, METER_JOB, REFUND_CHANNEL, make_app
from settlement.tickets import KeyRing, SignatureChecks

log = logging.getLogger(__name__)


class MeteringQueue:
    """Hands each recorded job to settlement's meter_job task on Redis.

    Best effort by design: a job whose task is lost (Redis down, a full queue) is metered by the next
    close_epoch, which meters every finished job nobody metered. Sending runs on a worker thread, so a slow
    broker never holds up a request.
    """

    def __init__(self, redis_url: str) -> None:
        self.app = make_app(SettlementSettings(redis_url=redis_url))
        self._sending: set[asyncio.Future[None]] = set()

    def submit(self, job_id: str) -> None:
        # A lost one is metered by close_epoch, which meters every finished job nobody metered.
        self._background(asyncio.to_thread(self._send, METER_JOB, [job_id], f"metering of job {job_id}"))

    def refund(self, channel_id: str) -> None:
        """Asks the operator's worker for the cooperative refund the gateway just granted on ``channel_id``. A
        task lost on the way is not a refund lost: every close_epoch makes the refunds still asked for."""
        self._background(
            asyncio.to_thread(self._send, REFUND_CHANNEL, [channel_id], f"refund of {channel_id}")
        )

    def redeem_if_owed(self, sessions: async_sessionmaker[AsyncSession], channel_id: bytes) -> None:
        """A payer started to leave ``channel_id``: if it was charged more than was redeemed, asks for an epoch
        now rather than at the next scheduled one. The withdraw delay covers the schedule (see
        check_job_lifetime); this only shortens how long the operator's money waits on a leaving payer."""
        self._background(self._redeem_if_owed(sessions, channel_id))

    async def _redeem_if_owed(self, sessions: async_sessionmaker[AsyncSession], channel_id: bytes) -> None:
        async with sessions() as session:
            channel = await session.get(Channel, "0x" + channel_id.hex())
        if channel is not None and channel.charged > channel.claimed:
            owed = channel.charged - channel.claimed
            reason = f"an early epoch (channel {channel.id} is exiting with {owed} unredeemed)"
            await asyncio.to_thread(self._send, CLOSE_EPOCH, [], reason)

    def _background(self, work: Awaitable[None]) -> None:
        future = asyncio.ensure_future(work)
        self._sending.add(future)
        future.add_done_callback(self._sending.discard)

    def _send(self, task: str, args: list[str], what: str) -> None:
        try:
            self.app.send_task(task, args=args, retry=False)
            log.debug("queued %s", what)
        except Exception as exc:  # kombu raises many kinds; close_epoch does each of these in the end
            log.warning("%s not queued (close_epoch will see to it): %r", what, exc)

    async def close(self) -> None:
        await asyncio.gather(*self._sending, return_exceptions=True)


JOB_LIFETIME_SLACK_S = 600  # a job's run after it leaves the book, and the time an epoch itself takes


def check_job_lifetime(settings: GatewaySettings, withdraw_delay_s: int) -> None:
    """A payer who starts leaving its channel as a job is paid has the escrow's withdraw delay before it can take
    its deposit back. The exit may be seen up to channel_max_age_s late, the job may rest for up to
    max_job_ttl_s and then run, its hops are validated within validation_window_s of its end, and the epoch that
    redeems it closes up to epoch_s later (the settlement worker must run with the same EPOCH_S): all of that
    must fit in the delay, or work paid from the channel may never be collected."""
    needed = (
        settings.max_job_ttl_s + settings.validation_window_s + settings.epoch_s + settings.channel_max_age_s
        + JOB_LIFETIME_SLACK_S
    )  # fmt: skip
    if needed >= withdraw_delay_s:
        raise ConfigurationError(
            f"the escrow's withdraw delay ({withdraw_delay_s} s) must exceed MAX_JOB_TTL_S + VALIDATION_WINDOW_S + "
            f"EPOCH_S + CHANNEL_MAX_AGE_S + {JOB_LIFETIME_SLACK_S} s for a job's run and an epoch's own time "
            f"({needed:g} s): a payer could leave with the deposit before the work it paid for is redeemed"
        )


@dataclass
class Gateway:
    settings: GatewaySettings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    contracts: Contracts
    account: LocalAccount
    catalog: Catalog
    book: OrderBook
    watcher: ChainWatcher
    terms: Terms
    market: Market
    runner: JobRunner
    metrics: Metrics
    metering: MeteringQueue | None
    # Built here rather than in start() so that a Gateway made by hand (in tests) has them too.
    limiter: RateLimiter = field(
        default_factory=lambda: RateLimiter(per_ip=Rate(0, 1), per_payer=Rate(0, 1))  # no limits
    )
    tokenizers: BoundedWork = field(default_factory=lambda: BoundedWork(2, 32, "tokenizing"))

    @classmethod
    async def start(cls, settings: GatewaySettings) -> Gateway:
        if settings.gateway_key is None:
            raise ConfigurationError("no GATEWAY_KEY: the gateway signs job tickets with it")
        try:
            account: LocalAccount = Account.from_key(settings.gateway_key.get_secret_value())
        except ValueError as exc:
            raise ConfigurationError(f"GATEWAY_KEY is not a private key: {exc}") from exc
        if not settings.models:
            raise ConfigurationError("no MODELS: name at least one checkpoint directory to serve")

        await asyncio.to_thread(migrate, settings.database_url)
        engine = create_engine(settings.database_url)
        chain = Chain(
            settings.rpc_url,
            request_timeout_s=settings.rpc_timeout_s,
            receipt_timeout_s=settings.receipt_timeout_s,
        )
        deployment = Deployment.load(settings.deployment_file)
        contracts = await asyncio.to_thread(Contracts.load, chain, deployment)
        if settings.payments_enabled:
            check_job_lifetime(settings, await asyncio.to_thread(contracts.escrow.withdraw_delay))
        catalog = await asyncio.to_thread(
            Catalog.load, settings.models, max_session_positions=settings.max_session_positions
        )
        terms = await asyncio.to_thread(
            Terms.of,
            contracts,
            timeout_s=settings.quote_timeout_s,
            settle_margin_s=settings.settle_margin_s,
            failover_margin_bps=settings.failover_margin_bps,
        )

        metrics = Metrics()
        book = OrderBook(heartbeat_ttl_s=settings.heartbeat_ttl_s, clock=time.time)
        watcher = ChainWatcher(
            ContractsReader(contracts),
            poll_s=settings.chain_poll_s,
            max_age_s=settings.channel_max_age_s,
            on_stake_change=book.set_active,
            on_slashed=book.pull,
            max_channels=settings.chain_cache_channels,
            max_unknown=settings.chain_cache_unknown,
            unknown_ttl_s=settings.chain_unknown_ttl_s,
            cold_reads_per_s=settings.chain_cold_reads_per_s,
        )
        session_factory = sessions(engine)
        metering = MeteringQueue(settings.redis_url) if settings.redis_url else None
        if metering is not None:
            watcher.on_exit = partial(metering.redeem_if_owed, session_factory)
        domain = contracts.protocol_domain()
        keys, checks = KeyRing(account, domain), SignatureChecks(domain)
        coordinator = Coordinator(
            book,
            keys,
            check_receipt=checks.receipt,
            allow_plaintext=settings.allow_plaintext_hops,
            step_timeout_s=settings.step_timeout_s,
            ticket_ttl_s=settings.ticket_ttl_s,
            max_failovers=settings.max_failovers,
            failure_suspend_s=settings.failure_suspend_s,
            ring=settings.hop_ring,
            clock=time.time,
        )
        limiter = RateLimiter.from_url(
            settings.redis_url,
            per_ip=Rate(settings.rate_limit_ip_per_s, settings.rate_limit_ip_burst),
            per_payer=Rate(settings.rate_limit_payer_per_s, settings.rate_limit_payer_burst),
            max_keys=settings.rate_limit_max_keys,
            trusted_proxies=settings.trusted_proxies,
        )
        runner = JobRunner(
            book=book,
            catalog=catalog,
            coordinator=coordinator,
            gate=PaymentGate(terms, watcher, contracts, account, session_factory),
            terms=terms,
            sessions=session_factory,
            payments_enabled=settings.payments_enabled,
            metrics=metrics,
            sweep_s=settings.job_sweep_s,
            reconcile_s=settings.payment_reconcile_s,
            max_resting_jobs=settings.max_resting_jobs,
            max_resting_per_payer=settings.max_resting_jobs_per_payer,
            on_finished=metering.submit if metering else None,
            check_payer=limiter.check_payer,
        )
        market = Market(
            book=book,
            catalog=catalog,
            watcher=watcher,
            sessions=session_factory,
            domain=domain,
            gateway=account.address,
            prove_endpoint=LinkProver(keys, checks),
            allow_plaintext=settings.allow_plaintext_hops,
            heartbeat_skew_s=settings.heartbeat_skew_s,
            min_retention_s=settings.min_retention_s,
            on_change=runner.wake,
        )
        tokenizers = BoundedWork(settings.tokenize_threads, settings.tokenize_queue, "tokenizing")
        gateway = cls(
            settings, engine, session_factory, contracts, account, catalog, book, watcher, terms, market, runner,
            metrics, metering, limiter, tokenizers,
        )  # fmt: skip
        await watcher.start()
        await market.load()
        await runner.start()
        log.info(
            "gateway %s serving %s on chain %d", account.address, [m.name for m in catalog], terms.chain_id
        )
        return gateway

    async def stop(self) -> None:
        await self.runner.stop()
        if self.metering is not None:
            await self.metering.close()
        await self.watcher.stop()
        await self.limiter.close()
        self.tokenizers.close()
        await self.engine.dispose()
