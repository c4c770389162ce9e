"""A provider's presence on a gateway: its signed ask posted, re-posted before it expires, and a signed
heartbeat every few seconds so the gateway keeps matching it. ``strata provider serve --gateway`` runs one.

Asks and heartbeats name the gateway they are for, so that another gateway cannot replay them; the announcer
asks the gateway its address (``GET /health``) and posts to it only when it is one the provider trusts. An ask
names the provider's TLS certificate by its fingerprint: whoever connects to the endpoint pins it. Its capacity
is the number of concurrent sessions the provider batches; a gateway counts against it the sessions it started
there, and spreads sessions by the free share and the step times it measures. Capacity 0 withdraws the ask.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx
from eth_account.signers.local import LocalAccount
from eth_utils.address import is_address, to_checksum_address

from settlement.eip712 import Ask, Domain, Heartbeat

log = logging.getLogger(__name__)

# The gateway's code refusing an ask from a provider StakeManager deems inactive.
NOT_STAKED = "provider_not_staked"
UNTRUSTED = "untrusted_gateway"  # the gateway at the URL is not one this provider serves


class AnnounceError(Exception):
    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


# How long a provider keeps a session's steps for validators unless told otherwise: above the default validation
# window and its margin (settlement.config: 600 s and 60 s), which gateways require of an ask.
DEFAULT_RETENTION_S = 900


@dataclass(frozen=True)
class Offer:
    model_root: str  # 0x-prefixed
    layer_start: int
    layer_end: int
    price_per_million: int  # base units per million token-layers
    capacity: int  # concurrent sessions the provider batches (gateways spread sessions by it); 0 withdraws
    endpoint: str  # host:port the gateway and other providers reach this provider at
    tls_fingerprint: bytes  # sha256 of the certificate the endpoint presents (zero: plain TCP, development)
    retention_s: int  # how long a session's steps are kept for validators after it ends


class Announcer:
    def __init__(
        self,
        gateway_url: str,
        account: LocalAccount,
        offer: Offer,
        *,
        domain: Domain,
        trusted: Iterable[str] | None,  # None: whichever gateway answers at the URL
        ask_ttl_s: int = 24 * 3600,
        heartbeat_s: float = 10.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self.account = account
        self.offer = offer
        self.domain = domain
        self.trusted = None if trusted is None else {to_checksum_address(address) for address in trusted}
        self.gateway: str | None = None  # its address, once it said and it is one of the trusted
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

    async def learn_gateway(self) -> str:
        """The gateway's address, as it says; refused unless it is one this provider trusts."""
        if self.gateway is None:
            try:
                response = await self.client.get(self.gateway_url + "/health")
                said = response.json().get("gateway")
            except (httpx.HTTPError, ValueError, AttributeError) as exc:
                raise AnnounceError(f"{self.gateway_url} did not say who it is: {exc}") from exc
            if not isinstance(said, str) or not is_address(said):
                raise AnnounceError(f"{self.gateway_url} did not say who it is")
            if self.trusted is not None and to_checksum_address(said) not in self.trusted:
                raise AnnounceError(
                    f"{self.gateway_url} is {said!r}, not a gateway this provider trusts", UNTRUSTED
                )
            self.gateway = to_checksum_address(said)
        return self.gateway

    def signed_ask(self, capacity: int | None = None) -> dict[str, Any]:
        if self.gateway is None:
            raise AnnounceError("the gateway's address is not known yet: learn_gateway() first")
        offer = self.offer
        expires_at = int(time.time()) + self.ask_ttl_s
        ask = Ask(
            self.account.address,
            self.gateway,
            bytes.fromhex(offer.model_root.removeprefix("0x")),
            offer.layer_start,
            offer.layer_end,
            offer.price_per_million,
            offer.capacity if capacity is None else capacity,
            offer.retention_s,
            offer.endpoint,
            offer.tls_fingerprint,
            self._nonce(),
            expires_at,
        )
        return {
            "provider": ask.provider,
            "gateway": ask.gateway,
            "tlsFingerprint": "0x" + ask.tls_fingerprint.hex(),
            "modelRoot": "0x" + ask.model_root.hex(),
            "layerStart": ask.layer_start,
            "layerEnd": ask.layer_end,
            "pricePerMillion": str(ask.price_per_million),
            "capacity": ask.capacity,
            "retentionS": ask.retention_s,
            "endpoint": ask.endpoint,
            "nonce": ask.nonce,
            "expiresAt": ask.expires_at,
            "signature": "0x" + ask.sign(self.account, self.domain).hex(),
        }

    async def post_ask(self, capacity: int | None = None) -> dict[str, Any]:
        await self.learn_gateway()
        body = self.signed_ask(capacity)
        result = await self._post("/v1/asks", body)
        self.ask_expires_at = int(body["expiresAt"])
        return result

    async def heartbeat(self) -> dict[str, Any]:
        gateway = await self.learn_gateway()
        timestamp = max(self._last_beat + 1, int(time.time()))
        self._last_beat = timestamp
        signature = Heartbeat(self.account.address, gateway, timestamp).sign(self.account, self.domain)
        return await self._post(
            "/v1/providers/heartbeat",
            {
                "provider": self.account.address,
                "gateway": gateway,
                "timestamp": timestamp,
                "signature": "0x" + signature.hex(),
            },
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
