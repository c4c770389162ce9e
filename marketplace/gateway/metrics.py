"""Prometheus metrics of one gateway, in a registry of its own (so two gateways in one process do not clash)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from settlement.db.validations import Backlog


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "strata_http_requests", "HTTP requests answered", ["route", "status"], registry=self.registry
        )
        self.payments = Counter(
            "strata_payments", "payment checks by scheme and outcome code", ["scheme", "outcome"],
            registry=self.registry,
        )  # fmt: skip
        self.jobs = Counter("strata_jobs", "jobs finished, by status", ["status"], registry=self.registry)
        self.jobs_running = Gauge("strata_jobs_running", "jobs generating now", registry=self.registry)
        self.tokens = Counter("strata_tokens_generated", "tokens sampled for clients", registry=self.registry)
        self.charged = Counter(
            "strata_charged_base_units", "base units charged to clients", ["scheme"], registry=self.registry
        )
        self.failovers = Counter("strata_failovers", "jobs moved to a fresh route", registry=self.registry)
        self.route_seconds = Histogram(
            "strata_route_planning_seconds", "time to plan a route", registry=self.registry,
            buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05),
        )  # fmt: skip
        self.request_seconds = Histogram(
            "strata_request_seconds", "time to answer a request", ["route"], registry=self.registry
        )
        self.validations = Gauge(
            "strata_validations",
            "drawn hops: pending, troubled (the validator's own trouble), overdue (past the window), "
            "missed_recently (in the last hour)",
            ["state"],
            registry=self.registry,
        )

        self.watcher_lag_blocks = Gauge(
            "strata_chain_watcher_lag_blocks",
            "blocks the chain watcher is behind the head",
            registry=self.registry,
        )
        self.watcher_seconds_since_sync = Gauge(
            "strata_chain_watcher_seconds_since_sync",
            "seconds since the chain watcher last reached the head",
            registry=self.registry,
        )

    def observe_watcher(self, lag_blocks: int | None, seconds_since_sync: float | None) -> None:
        if lag_blocks is not None:
            self.watcher_lag_blocks.set(lag_blocks)
        if seconds_since_sync is not None:
            self.watcher_seconds_since_sync.set(seconds_since_sync)

    def observe_validation(self, backlog: Backlog) -> None:
        for state in ("pending", "troubled", "overdue", "missed_recently"):
            self.validations.labels(state).set(getattr(backlog, state))
