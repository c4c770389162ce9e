"""What an unpaid caller may cost the gateway: request rates per client address and per payer, and the bounded
pool that tokenizes prompts.

Rates are GCRA (the generic cell rate algorithm): a token bucket kept as one number per key, the "theoretical
arrival time" of the next request. A key may send ``burst`` requests at once and then one every
``1 / per_s`` seconds; a request that comes too early is refused with how long to wait. Two backends keep the
numbers:

- Redis (when the gateway has a ``REDIS_URL``, as under ``strata up``): one Lua script reads and moves a key's
  time atomically against Redis' own clock, so every gateway sharing the Redis shares the limits (the rate
  configured is then the fleet's, not each gateway's). Keys expire once their bucket is full again, so Redis holds
  only clients active in the last ``burst / per_s`` seconds.
- In-process otherwise, and whenever Redis does not answer (a limit that fails open would be no limit while
  Redis is down): an LRU of at most ``max_keys`` buckets. Evicting a bucket only forgets a client's debt, so the
  memory bound never refuses anyone.

A client is its address as the socket shows it. ``X-Forwarded-For`` is believed only from ``trusted_proxies``
(otherwise any client could name itself anything and never be limited). An IPv6 client is limited by its /64, the
block one host or one customer line is given: per address, an IPv6 host would have 2**64 buckets.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from marketplace.gateway.errors import RateLimited, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

REDIS_TIMEOUT_S = (
    1.0  # a limit check waits at most this for Redis (or a connection to it) before giving up on it
)
REDIS_CONNECTIONS = (
    16  # connections to Redis a gateway opens: a burst of requests queues for them, a script each
)
REDIS_RETRY_S = 5.0  # after Redis failed, how long the in-process buckets decide before Redis is tried again
KEY_PREFIX = "strata:ratelimit:"

# KEYS[1] the bucket; ARGV[1] microseconds between requests, ARGV[2] the burst. Returns 0 when the request is
# admitted (and counted), else the microseconds until it would be. Redis' clock, not the gateways': gateways
# whose clocks disagree still share one bucket. Microseconds since 1970 fit a Lua double exactly (< 2**53).
_GCRA = """
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local allowed_from = tat - (burst - 1) * interval
if now < allowed_from then return allowed_from - now end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1)
return 0
"""


@dataclass(frozen=True)
class Rate:
    per_s: float  # sustained requests per second; 0 turns the limit off
    burst: int  # requests admitted at once from a full bucket

    @property
    def interval_s(self) -> float:
        return 1.0 / self.per_s

    @property
    def enabled(self) -> bool:
        return self.per_s > 0


class LocalBuckets:
    """GCRA buckets in this process: an LRU of at most ``max_keys``."""

    def __init__(self, max_keys: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_keys = max_keys
        self.clock = clock
        self._tat: OrderedDict[str, float] = OrderedDict()  # key -> theoretical arrival time, clock seconds

    def __len__(self) -> int:
        return len(self._tat)

    def take(self, key: str, rate: Rate) -> float:
        """Counts a request of ``key``; returns 0 when admitted, else the seconds until it would be."""
        now = self.clock()
        tat = max(self._tat.get(key, now), now)
        allowed_from = tat - (rate.burst - 1) * rate.interval_s
        if now < allowed_from:
            return allowed_from - now
        self._tat[key] = tat + rate.interval_s
        self._tat.move_to_end(key)
        while len(self._tat) > self.max_keys:
            self._tat.popitem(last=False)
        return 0.0


class RateLimiter:
    """Per-client-address and per-payer limits; :meth:`check_ip` and :meth:`check_payer` raise
    :class:`~marketplace.gateway.errors.RateLimited` (429 ``rate_limited``, with Retry-After)."""

    def __init__(
        self,
        *,
        per_ip: Rate,
        per_payer: Rate,
        max_keys: int = 100_000,
        redis: Redis | None = None,
        trusted_proxies: Sequence[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_ip = per_ip
        self.per_payer = per_payer
        self.local = LocalBuckets(max_keys, clock)
        self.redis = redis
        self.trusted_proxies = [ipaddress.ip_network(network, strict=False) for network in trusted_proxies]
        self._script = redis.register_script(_GCRA) if redis is not None else None
        self._redis_down_until = 0.0

    @classmethod
    def from_url(
        cls,
        redis_url: str | None,
        *,
        per_ip: Rate,
        per_payer: Rate,
        max_keys: int,
        trusted_proxies: Sequence[str],
    ) -> RateLimiter:
        redis = None
        if redis_url:
            pool = BlockingConnectionPool.from_url(
                redis_url,
                max_connections=REDIS_CONNECTIONS,
                timeout=REDIS_TIMEOUT_S,
                socket_timeout=REDIS_TIMEOUT_S,
                socket_connect_timeout=REDIS_TIMEOUT_S,
            )
            redis = Redis.from_pool(pool)  # owns the pool: closing the client closes its connections
        return cls(
            per_ip=per_ip,
            per_payer=per_payer,
            max_keys=max_keys,
            redis=redis,
            trusted_proxies=trusted_proxies,
        )

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    async def check_ip(self, peer: str | None, forwarded_for: str | None = None) -> None:
        """Counts a request from ``peer`` (the socket's address), or from the client a trusted proxy names."""
        if not self.per_ip.enabled or peer is None:
            return
        await self._take("ip:" + self.client_key(peer, forwarded_for), self.per_ip, "client address")

    async def check_payer(self, payer: str) -> None:
        """Counts a paid request of ``payer`` (a checksummed address); call it once the payment names its payer,
        before anything else is done for it."""
        if self.per_payer.enabled:
            await self._take("payer:" + payer.lower(), self.per_payer, "payer")

    def client_key(self, peer: str, forwarded_for: str | None) -> str:
        """The key a client is limited by: its address (an IPv6 one's /64), or, from a trusted proxy, the nearest
        address in X-Forwarded-For that is not itself a trusted proxy (the ones before it the client wrote)."""
        address = _address(peer)
        if address is None:
            return peer  # not an IP address (a Unix socket's path, a test client's name): as it is
        if forwarded_for and self._trusted(address):
            for hop in reversed(forwarded_for.split(",")):
                named = _address(hop.strip())
                if named is None:
                    break  # garbled: the proxy's own address is the one to believe
                address = named
                if not self._trusted(named):
                    break
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.IPv6Network((address, 64), strict=False))
        return str(address)

    def _trusted(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self.trusted_proxies)

    async def _take(self, key: str, rate: Rate, what: str) -> None:
        wait_s = await self._redis_take(key, rate)
        if wait_s is None:
            wait_s = self.local.take(key, rate)
        if wait_s > 0:
            raise RateLimited(
                "rate_limited",
                f"too many requests from this {what}: at most {rate.per_s:g} a second (bursts of {rate.burst})",
                # Whole seconds, rounded up: a client that waits what it is told is admitted.
                retry_after_s=max(1, math.ceil(wait_s)),
            )

    async def _redis_take(self, key: str, rate: Rate) -> float | None:
        """Seconds to wait per Redis (0 when admitted); None when Redis does not answer."""
        if self._script is None or time.monotonic() < self._redis_down_until:
            return None
        interval_us = max(1, round(rate.interval_s * 1_000_000))
        try:
            wait_us = await self._script(keys=[KEY_PREFIX + key], args=[interval_us, rate.burst])
        except (TimeoutError, RedisError, OSError) as exc:
            if time.monotonic() >= self._redis_down_until:  # once per outage, not once per request in flight
                log.warning(
                    "rate limits kept in-process for %g s: Redis did not answer (%r)", REDIS_RETRY_S, exc
                )
            self._redis_down_until = time.monotonic() + REDIS_RETRY_S
            return None
        return int(wait_us) / 1_000_000


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class BoundedWork:
    """A pool of ``threads`` threads for CPU-bound work an unpaid request asks for (rendering a chat template,
    tokenizing a prompt), which would otherwise stall the event loop. At most ``threads + queue`` calls are
    admitted at once, running or waiting; past that :meth:`run` refuses at once with 503 ``busy`` rather than
    letting a queue grow without bound. A call counts until its thread is done with it, even when its request
    went away meanwhile: the work is not cancelled, so it still occupies the pool."""

    def __init__(self, threads: int, queue: int, name: str) -> None:
        self.limit = threads + queue
        self.name = name
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._lock = threading.Lock()  # the count is released from the worker threads
        self._admitted = 0

    @property
    def admitted(self) -> int:
        return self._admitted

    async def run(self, work: Callable[..., T], *args: object) -> T:
        with self._lock:
            if self._admitted >= self.limit:
                raise Unavailable(
                    "busy",
                    f"the gateway is {self.name} {self.limit} requests already: try again",
                    retry_after_s=1,
                )
            self._admitted += 1
        try:
            future: Future[T] = self._executor.submit(work, *args)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(lambda _done: self._release())
        return await asyncio.wrap_future(future)

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
