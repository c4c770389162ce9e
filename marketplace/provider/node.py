"""The provider node, assembled in one place: a span of a model loaded and checked, the runtime that keeps its
sessions, the hop server in front of it on TLS, the tickets it honours and the key that signs its receipts, and
the announcer that keeps its ask on a gateway's book. `strata provider serve` parses its options into a
:class:`NodeConfig` and runs a :class:`ProviderNode`; nothing else builds one.

What a provider keeps secret: its staked key (it signs receipts, asks, and its proof on every connection) and
its TLS key (whoever holds it can answer at the provider's endpoint in its name, until the provider posts an ask
with a new certificate). Both stay on the provider's machine; the certificate itself is public.

The ask's capacity is the number of concurrent sessions the node batches into one forward pass; gateways spread
sessions over asks by it (marketplace.gateway.orderbook). A node never announces more than its runtime admits
(``RuntimeLimits.max_sessions``): :class:`NodeConfig` refuses it.

A gateway matches only staked providers: when the gateway refuses the node's first ask because StakeManager
deems it inactive, :meth:`ProviderNode.start` stops the node again and raises :class:`NotStaked`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from eth_account.signers.local import LocalAccount

from marketplace.provider.announce import NOT_STAKED, AnnounceError, Announcer, Offer
from settlement.eip712 import Domain
from settlement.tickets import KeyRing, SignatureChecks
from worker.runtime import RuntimeLimits, SpanRuntime
from worker.server import HopServer
from worker.shard import Shard, load_shard
from worker.tls import NO_FINGERPRINT, TlsIdentity

log = logging.getLogger(__name__)


class NotStaked(Exception):
    """The gateway refused the node's ask: its key is not staked (or is below the minimum stake)."""


@dataclass(frozen=True)
class Announcement:
    """Where and at what the node offers its span."""

    gateway_url: str
    price: int  # token base units per million token-layers
    capacity: int  # concurrent sessions the node batches; at most its runtime's max_sessions


@dataclass(frozen=True)
class NodeConfig:
    model: Path  # a Hugging Face checkpoint directory
    layers: str  # the span, "start:end"
    host: str  # the address the hop server listens on
    port: int
    account: LocalAccount  # signs receipts, asks, heartbeats and its proof on every connection
    gateways: tuple[str, ...]  # addresses whose job tickets are honoured
    validators: tuple[str, ...]  # addresses allowed to fetch retained steps; none: nobody may
    domain: Domain  # the protocol domain: the chain and the deployment's StakeManager
    tls: TlsIdentity | None  # the node's certificate and key; None serves plain TCP (development only)
    limits: RuntimeLimits
    retained: Path  # where steps are kept for validators; read back on restart
    advertise: str | None = None  # host:port others reach the node at [default: host:port]
    device: torch.device | None = None  # None: CUDA when there is one, else the CPU
    dtype: torch.dtype | None = None  # None: fp32 on CPU, bf16 on a GPU
    announce: Announcement | None = None  # None: the node posts no ask (`strata provider ask` may)

    def __post_init__(self) -> None:
        # The ask is the provider's signed word to gateways: it must not offer sessions its runtime refuses.
        if self.announce is not None and not 0 < self.announce.capacity <= self.limits.max_sessions:
            raise ValueError(
                f"capacity {self.announce.capacity} is not within 1..{self.limits.max_sessions}, the sessions the "
                "runtime admits at once (max_sessions)"
            )

    @property
    def endpoint(self) -> str:
        return self.advertise or f"{self.host}:{self.port}"


class ProviderNode:
    def __init__(
        self, config: NodeConfig, shard: Shard, *, server: Callable[..., HopServer] = HopServer
    ) -> None:
        self.config = config
        self.shard = shard
        self.runtime = SpanRuntime(shard, config.limits, retained=config.retained)
        self.server = server(
            self.runtime,
            keys=KeyRing(config.account, config.domain),
            checks=SignatureChecks(config.domain),
            gateways=set(config.gateways),
            validators=set(config.validators),
            tls=config.tls,
        )
        self.announcer: Announcer | None = None
        if config.announce is not None:
            self.announcer = Announcer(
                config.announce.gateway_url,
                config.account,
                Offer(
                    shard.root,
                    shard.span.start,
                    shard.span.end,
                    config.announce.price,
                    config.announce.capacity,
                    config.endpoint,
                    config.tls.fingerprint if config.tls is not None else NO_FINGERPRINT,
                    int(config.limits.retention_s),
                ),
                domain=config.domain,
                trusted=config.gateways,
            )
        self._announcing: asyncio.Task[None] | None = None

    @classmethod
    def load(
        cls,
        config: NodeConfig,
        *,
        adapt: Callable[[Shard], Shard] | None = None,
        server: Callable[..., HopServer] = HopServer,
    ) -> ProviderNode:
        """Loads the span (checking its hashes against the model's root) and assembles the node around it.
        ``adapt`` may replace the loaded shard and ``server`` the hop server (the cheating and misbehaving
        providers of demonstrations and tests use them)."""
        shard = load_shard(config.model, config.layers, device=config.device, dtype=config.dtype)
        return cls(config, adapt(shard) if adapt is not None else shard, server=server)

    async def start(self) -> None:
        """Listens, then posts the ask and keeps heartbeating. A gateway that cannot be reached yet is retried
        by the announcer; one that refuses an unstaked key stops the node (:class:`NotStaked`)."""
        await self.server.start(self.config.host, self.config.port)
        if self.announcer is None:
            return
        try:
            await self.announcer.post_ask()
        except AnnounceError as exc:
            if exc.code == NOT_STAKED:
                await self.announcer.aclose()
                await self.server.close()
                raise NotStaked(
                    f"{self.config.account.address} is not staked, so {self.announcer.gateway_url} refuses "
                    f"its ask: {exc}"
                ) from exc
            log.warning("could not post the ask yet (%s); retrying", exc)
        self._announcing = asyncio.create_task(self.announcer.run())

    async def stop(self) -> None:
        """Withdraws the ask (so the node stops being matched before its port closes), then closes."""
        if self.announcer is not None:
            if self._announcing is not None:
                self._announcing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._announcing
            try:
                await self.announcer.withdraw()
            except AnnounceError as exc:
                log.warning("could not withdraw the ask: %s", exc)
            await self.announcer.aclose()
        await self.server.close()
