"""A provider's presence on a gateway: its signed ask posted, re-posted before it expires, and a signed
heartbeat every few seconds so the gateway keeps matching it. ``strata provider serve --gateway`` runs one."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
from eth_account.signers.local import LocalAccount

from settlement.eip712 import Ask, Heartbeat, protocol_domain

log = logging.getLogger(__name__)

# The gateway's code refusing an ask from a provider StakeManager deems inactive.
NOT_STAKED = "provider_not_staked"


class AnnounceError(Exception):
    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Offer:
    model_root: str  # 0x-prefixed
    layer_start: int
    layer_end: int
    price_per_million: int  # base units per million token-layers
    capacity: int  # sessions at once
    endpoint: str  # host:port the gateway and other providers reach this provider at


class Announcer:
    def __init__(
        self,
        gateway_url: str,
        account: LocalAccount,
        offer: Offer,
        *,
        chain_id: int,
        ask_ttl_s: int = 24 * 3600,
        heartbeat_s: float = 10.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self.account = account
        self.offer = offer
        self.domain = protocol_domain(chain_id)
        self.ask_ttl_s = ask_ttl_s
        self.heartbeat_s = heartbeat_s
        self.client = client or httpx.AsyncClient(timeout=10.0)
        self._last_nonce = 0
        self._last_beat = 0
        self.ask_expires_at = 0

    def _nonce(self) -> int:
        # Microseconds since the epoch: above any ask this key posted before, across restarts too.
        self._last_nonce = max(self._last_nonce + 1, time.time_ns() // 1000)
        return self._last_nonce

    def signed_ask(self, capacity: int | None = None) -> dict[str, Any]:
        offer = self.offer
        expires_at = int(time.time()) + self.ask_ttl_s
        ask = Ask(
            self.account.address,
            bytes.fromhex(offer.model_root.removeprefix("0x")),
            offer.layer_start,
            offer.layer_end,
            offer.price_per_million,
            offer.capacity if capacity is None else capacity,
            offer.endpoint,
            self._nonce(),
            expires_at,
        )
        return {
            "provider": ask.provider,
            "modelRoot": "0x" + ask.model_root.hex(),
            "layerStart": ask.layer_start,
            "layerEnd": ask.layer_end,
            "pricePerMillion": str(ask.price_per_million),
            "capacity": ask.capacity,
            "endpoint": ask.endpoint,
            "nonce": ask.nonce,
            "expiresAt": ask.expires_at,
            "signature": "0x" + ask.sign(self.account, self.domain).hex(),
        }

    async def post_ask(self, capacity: int | None = None) -> dict[str, Any]:
        body = self.signed_ask(capacity)
        result = await self._post("/v1/asks", body)
        self.ask_expires_at = int(body["expiresAt"])
        return result

    async def heartbeat(self) -> dict[str, Any]:
        timestamp = max(self._last_beat + 1, int(time.time()))
        self._last_beat = timestamp
        signature = Heartbeat(self.account.address, timestamp).sign(self.account, self.domain)
        return await self._post(
            "/v1/providers/heartbeat",
            {"provider": self.account.address, "timestamp": timestamp, "signature": "0x" + signature.hex()},
        )

    async def withdraw(self) -> None:
        await self.post_ask(capacity=0)

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self.client.post(self.gateway_url + path, json=body)
        except httpx.HTTPError as exc:
            raise AnnounceError(f"{self.gateway_url} unreachable: {exc}") from exc
        try:
            data: Any = response.json() if response.content else {}
        except ValueError:  # not the gateway's JSON: a proxy's error page, say
            data = {}
        if response.status_code >= 400:
            error = data.get("error") if isinstance(data, dict) else None
            error = error if isinstance(error, dict) else {}
            raise AnnounceError(
                f"{path}: HTTP {response.status_code}: {error.get('message', response.reason_phrase)}",
                error.get("code"),
            )
        return data if isinstance(data, dict) else {}

    async def run(self) -> None:
        """Posts the ask, then heartbeats; re-posts before the ask expires and after the gateway forgets it."""
        backoff = 1.0
        while True:
            try:
                if time.time() > self.ask_expires_at - max(60.0, self.heartbeat_s * 3):
                    await self.post_ask()
                    log.info("ask posted to %s", self.gateway_url)
                await self.heartbeat()
                backoff = 1.0
                await asyncio.sleep(self.heartbeat_s)
            except AnnounceError as exc:
                if exc.code == "unknown_provider":
                    self.ask_expires_at = 0  # a gateway with a fresh database: post the ask again
                log.warning("announcing to %s failed: %s", self.gateway_url, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def aclose(self) -> None:
        await self.client.aclose()
