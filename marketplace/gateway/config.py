"""Settings of the gateway; with the chain layer's, the only place it reads the environment."""

from __future__ import annotations

import ipaddress

from pydantic import Field, SecretStr, field_validator

from settlement.config import SettlementSettings


class GatewaySettings(SettlementSettings):
    gateway_key: SecretStr | None = Field(
        default=None,
        description="hex private key: signs job tickets (providers trust its address) and sends exact settlements",
    )
    payments_enabled: bool = Field(
        default=True, description="false serves without payment checks: for measurement and local trials only"
    )
    public_url: str | None = Field(
        default=None, description="base URL clients reach the gateway at; 402 quotes name resources under it"
    )
    quote_timeout_s: int = Field(
        default=300, ge=10, description="seconds a client has to pay a quote (x402 maxTimeoutSeconds)"
    )
    settle_margin_s: int = Field(
        default=30,
        ge=1,
        description="seconds an exact authorization must stay valid for, to settle it in time",
    )
    heartbeat_ttl_s: float = Field(
        default=30.0, gt=0, description="seconds after its last heartbeat that a provider stays matchable"
    )
    heartbeat_skew_s: int = Field(
        default=60, gt=0, description="seconds a heartbeat's timestamp may differ from the gateway's clock"
    )
    failure_suspend_s: float = Field(
        default=30.0, ge=0, description="seconds a provider that failed a job is left out of matching"
    )
    chain_poll_s: float = Field(default=1.0, gt=0, description="seconds between reads of new chain events")
    channel_max_age_s: float = Field(
        default=30.0,
        gt=0,
        description="the oldest cached channel state a payment is accepted against (unless the watcher kept it "
        "current); older, the chain is read, and without the chain the answer is 503 chain_unavailable",
    )
    step_timeout_s: float = Field(
        default=60.0, gt=0, description="seconds one step may take across the whole route before it fails"
    )
    ticket_ttl_s: int = Field(
        default=120,
        gt=0,
        le=600,
        description="seconds a hop ticket stays valid to open its session (providers refuse longer ones)",
    )
    allow_plaintext_hops: bool = Field(
        default=False,
        description="true books asks that name no TLS certificate and talks to them over plain TCP: development only",
    )
    hop_ring: bool = Field(
        default=True,
        description="true runs decode steps on a token ring (the last provider hands each token to the first); "
        "false sends every step through the chain and back to the gateway (the way without the ring)",
    )
    max_failovers: int = Field(
        default=3, ge=0, description="times a job may be moved to a fresh route after a provider fails"
    )
    job_sweep_s: float = Field(
        default=1.0, gt=0, description="seconds between matching passes over jobs resting in the book"
    )
    failover_margin_bps: int = Field(
        default=1_000,
        ge=0,
        le=10_000,
        description="basis points added to a route's cost in every quote (shown in the 402 as routeCost and "
        "failoverMarginBps): what lets a job whose provider fails finish on a dearer spare; only what is metered "
        "is charged",
    )
    max_session_positions: int = Field(
        default=8_192,
        gt=0,
        description="positions (prompt + max_tokens) a request may ask for, below a model's own context: the "
        "providers' session limit (a provider's default); /v1/models shows it as context_length",
    )
    max_resting_jobs: int = Field(
        default=10_000,
        gt=0,
        description="jobs that may rest in the book at once, waiting for a route in their price",
    )
    max_resting_jobs_per_payer: int = Field(
        default=100, gt=0, description="resting jobs of one payer (a channel's, or an exact payment's sender)"
    )
    payment_reconcile_s: float = Field(
        default=30.0,
        gt=0,
        description="seconds between passes over exact payments whose transfer's outcome was not known in time",
    )
    max_job_ttl_s: int = Field(
        default=21_600,
        gt=0,
        description="longest a job may rest in the book, seconds; with VALIDATION_WINDOW_S and EPOCH_S it must fit "
        "in the escrow's withdraw delay (checked at start-up)",
    )
    rate_limit_ip_per_s: float = Field(
        default=20.0,
        ge=0,
        description="requests a second one client address may send, sustained (0: no limit); /health and /metrics "
        "are not counted. An IPv6 client is counted by its /64. With a REDIS_URL, gateways sharing it share the limit",
    )
    rate_limit_ip_burst: int = Field(
        default=40, ge=1, description="requests one client address may send at once, on top of the rate"
    )
    rate_limit_payer_per_s: float = Field(
        default=20.0, ge=0, description="paid requests a second one payer may send, sustained (0: no limit)"
    )
    rate_limit_payer_burst: int = Field(
        default=40, ge=1, description="paid requests one payer may send at once"
    )
    rate_limit_max_keys: int = Field(
        default=100_000,
        gt=0,
        description="clients and payers whose buckets are kept in memory when there is no Redis (the least recent "
        "are forgotten, which only forgives them: about 200 bytes each)",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="addresses or CIDR blocks of reverse proxies whose X-Forwarded-For names the client, as a JSON "
        'list (["10.0.0.0/8"]); from anyone else the header is ignored, or clients could name themselves anything',
    )
    tokenize_threads: int = Field(
        default=2,
        gt=0,
        description="threads that render chat templates and tokenize prompts, off the event loop",
    )
    tokenize_queue: int = Field(
        default=32,
        ge=0,
        description="requests that may wait for a tokenizing thread; more are answered 503 busy (Retry-After 1)",
    )
    chain_cache_channels: int = Field(
        default=100_000,
        gt=0,
        description="channels with a deposit (or an exit) whose chain state is cached: the least recent are read "
        "again when next used",
    )
    chain_cache_unknown: int = Field(
        default=10_000,
        gt=0,
        description="channels without a deposit and providers without a stake remembered as such (ids any caller "
        "may choose, so kept apart from the channels and providers that cost their owners a deposit or a stake)",
    )
    chain_unknown_ttl_s: float = Field(
        default=60.0,
        gt=0,
        description="seconds a channel without a deposit or a provider without a stake is remembered as such "
        "(events of theirs refresh it sooner)",
    )
    chain_cold_reads_per_s: float = Field(
        default=10.0,
        gt=0,
        description="chain reads a second of channels and providers the chain has shown nothing for (all callers "
        "together): what a caller choosing random ids can make the gateway read; past it the answer is 503 "
        "chain_unavailable, or what is remembered",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            ipaddress.ip_network(network, strict=False)  # a ValueError names the entry that is not one
        return value
