"""The paid edge under abuse: rate limits per client address and per payer (on Redis and in-process), the size
limits checked before tokenizing, tokenizing off the event loop, and chain reads a caller can trigger with ids of
its choosing.

The gateway tests run the real app on the session's anvil, without providers: nothing here needs a route. Requests
go through the app in the test's own event loop (``served``), each with the client address the test gives it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import select
import socket
import statistics
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from marketplace.devnet.redis_server import RedisServer
from marketplace.gateway.api.app import MAX_BODY_BYTES, create_app
from marketplace.gateway.api.routes.inference import CHARS_PER_TOKEN
from marketplace.gateway.api.schemas import MAX_MESSAGES
from marketplace.gateway.chainwatch import ChainWatcher, ChannelView
from marketplace.gateway.errors import RateLimited, Unavailable
from marketplace.gateway.ratelimit import BoundedWork, LocalBuckets, Rate, RateLimiter
from marketplace.testing.gateway import GatewayServer
from settlement.errors import ChainUnavailable
from tests.marketplace.gateway.fakes import FakeChainReader
from tests.marketplace.harness import Market, database, gateway_settings

SYSTEM_REDIS = "redis://127.0.0.1:6379"
on_sqlite = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


@pytest.fixture(params=["redis", "in-process"])
def redis_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """A Redis URL (the system's, else an embedded one), or None for the in-process buckets."""
    if request.param == "in-process":
        yield None
        return
    try:
        redis.Redis.from_url(SYSTEM_REDIS, socket_connect_timeout=2).ping()
    except redis.ConnectionError:
        with RedisServer() as server:
            yield server.url
        return
    yield f"{SYSTEM_REDIS}/{1 + uuid.uuid4().int % 15}"  # keys are random addresses that expire in seconds


def random_ip() -> str:
    return f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}"


# -- the limiter -------------------------------------------------------------------------------------------------


def test_a_bucket_admits_its_burst_then_its_rate() -> None:
    now = [0.0]
    buckets = LocalBuckets(10, clock=lambda: now[0])
    rate = Rate(per_s=10, burst=5)
    admitted = [buckets.take("a", rate) == 0 for _ in range(8)]
    assert admitted == [True] * 5 + [False] * 3
    assert buckets.take("a", rate) == pytest.approx(0.1)  # the next is due in one interval
    now[0] = 0.1
    assert buckets.take("a", rate) == 0
    assert buckets.take("b", rate) == 0  # another key has its own bucket


def test_the_in_process_buckets_are_bounded() -> None:
    buckets = LocalBuckets(1_000)
    for n in range(20_000):
        buckets.take(f"k{n}", Rate(1, 1))
    assert len(buckets) == 1_000


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    plain = RateLimiter(per_ip=Rate(1, 1), per_payer=Rate(1, 1))
    proxied = RateLimiter(per_ip=Rate(1, 1), per_payer=Rate(1, 1), trusted_proxies=["10.0.0.0/8"])
    assert plain.client_key("10.0.0.2", "203.0.113.9") == "10.0.0.2"
    assert proxied.client_key("10.0.0.2", "198.51.100.1, 203.0.113.9, 10.0.0.7") == "203.0.113.9"
    assert proxied.client_key("192.0.2.1", "203.0.113.9") == "192.0.2.1"  # not a trusted proxy
    assert proxied.client_key("10.0.0.2", "garbage") == "10.0.0.2"
    # An IPv6 host is counted by its /64; an IPv4-mapped one by its IPv4 address.
    assert (
        plain.client_key("2001:db8::1", None) == plain.client_key("2001:db8::ffff:1", None) == "2001:db8::/64"
    )
    assert plain.client_key("::ffff:192.0.2.1", None) == "192.0.2.1"


def test_both_backends_limit_one_client_and_not_another(redis_url: str | None) -> None:
    async def burst() -> tuple[list[RateLimited], int]:
        limiter = RateLimiter.from_url(
            redis_url, per_ip=Rate(20, 40), per_payer=Rate(5, 10), max_keys=1_000, trusted_proxies=[]
        )
        attacker, bystander, refused = random_ip(), random_ip(), []
        try:
            for _ in range(200):
                try:
                    await limiter.check_ip(attacker)
                except RateLimited as exc:
                    refused.append(exc)
            await limiter.check_ip(bystander)  # raises if the attacker's bucket were shared
            payer_refused = 0
            for _ in range(20):
                try:
                    await limiter.check_payer("0x" + "ab" * 20)
                except RateLimited:
                    payer_refused += 1
            if redis_url is not None:
                assert limiter._redis_down_until == 0, "Redis was not used"
        finally:
            await limiter.close()
        return refused, payer_refused

    refused, payer_refused = asyncio.run(burst())
    # 40 at once, and one more every 50 ms the loop took.
    assert 140 <= len(refused) <= 160
    assert refused[0].status == 429 and refused[0].code == "rate_limited" and refused[0].retry_after_s == 1
    assert 8 <= payer_refused <= 10


def test_without_redis_the_limits_are_kept_in_process() -> None:
    async def burst() -> int:
        limiter = RateLimiter.from_url(
            f"redis://127.0.0.1:{_closed_port()}", per_ip=Rate(1, 3), per_payer=Rate(1, 1), max_keys=10,
            trusted_proxies=[],
        )  # fmt: skip
        refused = 0
        for _ in range(10):
            try:
                await limiter.check_ip("192.0.2.1")
            except RateLimited:
                refused += 1
        await limiter.close()
        return refused

    assert asyncio.run(burst()) == 7


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_bounded_work_refuses_past_its_threads_and_queue() -> None:
    release = threading.Event()

    async def flood() -> tuple[int, list[str]]:
        pool = BoundedWork(threads=2, queue=3, name="tokenizing")
        calls = [asyncio.ensure_future(pool.run(release.wait)) for _ in range(8)]
        await asyncio.sleep(0.05)
        refused = [exc.code for exc in await _settled(calls[5:]) if isinstance(exc, Unavailable)]
        admitted = pool.admitted
        release.set()
        await asyncio.gather(*calls[:5])
        pool.close()
        return admitted, refused

    admitted, refused = asyncio.run(flood())
    assert admitted == 5
    assert refused == ["busy"] * 3


async def _settled(calls: Sequence[asyncio.Future[Any]]) -> list[BaseException | None]:
    return [call.exception() if call.done() else None for call in calls]


# -- chain reads a caller chooses ---------------------------------------------------------------------------------


def test_random_channel_ids_leave_the_caches_and_the_reads_bounded() -> None:
    """100,000 lookups of random channels (what GET /v1/channels/{id} or a voucher of a fresh key asks): the
    unfunded ones are remembered up to their cap, and the chain is read at the cold-read rate, not per lookup."""
    funded = os.urandom(32)
    reader = FakeChainReader(channels={funded: ChannelView(500, 0)})
    watcher = ChainWatcher(reader, poll_s=0.01, max_unknown=1_000, cold_reads_per_s=10)

    async def flood() -> tuple[int, float, int]:
        await watcher.channel(funded)
        started = time.monotonic()
        refused = 0
        for n in range(100_000):
            try:
                await watcher.channel(os.urandom(32), fresh=n % 2 == 0)
            except ChainUnavailable:
                refused += 1
        return refused, time.monotonic() - started, (await watcher.channel(funded)).deposit

    refused, elapsed_s, deposit = asyncio.run(flood())
    channel_reads = sum(1 for read in reader.reads if read.startswith("channel"))
    assert channel_reads <= 1 + 20 + 10 * elapsed_s + 1  # the funded one, the burst, the rate
    assert refused >= 100_000 - channel_reads
    assert watcher.cached["unfundedChannels"] <= 1_000
    assert watcher.cached["channels"] == 1 and deposit == 500  # the flood did not evict the funded channel


def test_an_unfunded_channel_is_remembered_until_it_is_funded() -> None:
    channel = os.urandom(32)
    reader = FakeChainReader()
    watcher = ChainWatcher(reader, poll_s=0.01)

    async def follow() -> list[int]:
        await watcher.start()
        seen = [(await watcher.channel(channel)).deposit for _ in range(5)]
        reader.channels[channel] = ChannelView(700, 0)
        reader.emit("ChannelFunded", channelId=channel)
        await watcher.sync()
        seen.append((await watcher.channel(channel)).deposit)
        await watcher.stop()
        return seen

    assert asyncio.run(follow()) == [0, 0, 0, 0, 0, 700]
    assert reader.reads.count(f"channel {channel.hex()[:8]}") == 2  # once unfunded, once on its event


def test_unstaked_providers_are_remembered_and_rationed() -> None:
    reader = FakeChainReader()
    watcher = ChainWatcher(reader, poll_s=0.01, max_unknown=100, cold_reads_per_s=5)

    async def flood() -> int:
        refused = 0
        for _ in range(1_000):
            try:
                await watcher.is_active("0x" + os.urandom(20).hex(), fresh=True)
            except ChainUnavailable:
                refused += 1
        return refused

    refused = asyncio.run(flood())
    assert refused >= 1_000 - 20
    assert watcher.cached["unstakedProviders"] <= 100


def test_the_latest_block_is_read_once_for_many_askers() -> None:
    reader = FakeChainReader()
    watcher = ChainWatcher(reader, poll_s=0.01)
    reader.block = 7
    reads = 0
    original = reader.block_number

    def counted() -> int:
        nonlocal reads
        reads += 1
        return original()

    reader.block_number = counted  # type: ignore[method-assign]

    async def ask() -> list[int]:
        return list(await asyncio.gather(*(watcher.latest_block() for _ in range(100))))

    assert asyncio.run(ask()) == [7] * 100
    assert reads == 1


# -- the gateway ----------------------------------------------------------------------------------------------------


@pytest.fixture
def settings_for(
    market: Market, models: dict[str, Path], migrated: str, tmp_path: Path
) -> Iterator[Callable[..., Any]]:
    """Gateway settings on a database of the test's own."""
    with database("sqlite", tmp_path, template=migrated) as url:
        yield lambda **overrides: gateway_settings(market, url, {"tiny": models["tiny"]}, **overrides)


@asynccontextmanager
async def served(settings: Any) -> AsyncIterator[tuple[Any, Callable[[str], httpx.AsyncClient]]]:
    """The gateway app started in this event loop, and clients of it at the addresses given."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        clients: list[httpx.AsyncClient] = []

        def client(address: str) -> httpx.AsyncClient:
            made = httpx.AsyncClient(
                transport=httpx.ASGITransport(app, client=(address, 40_000)), base_url="http://gateway"
            )
            clients.append(made)
            return made

        try:
            yield app, client
        finally:
            for made in clients:
                await made.aclose()


@on_sqlite
def test_a_thousand_requests_a_second_from_one_address_are_refused_and_another_is_served(
    settings_for: Callable[..., Any], redis_url: str | None
) -> None:
    settings = settings_for(
        redis_url=redis_url, rate_limit_ip_per_s=20, rate_limit_ip_burst=40
    )  # the defaults

    async def flood() -> tuple[list[httpx.Response], list[int], int]:
        async with served(settings) as (_app, client):
            attacker, bystander = client(random_ip()), client(random_ip())
            flooded: list[httpx.Response] = []
            served_to_bystander: list[int] = []
            for _ in range(10):  # 100 every 100 ms: a thousand in a second
                tick = time.monotonic()
                flooded += await asyncio.gather(*(attacker.get("/v1/models") for _ in range(100)))
                served_to_bystander.append((await bystander.get("/v1/models")).status_code)
                await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
            health = (await attacker.get("/health")).status_code  # not limited: probes must get through
            return flooded, served_to_bystander, health

    flooded, bystander, health = asyncio.run(flood())
    refused = [response for response in flooded if response.status_code == 429]
    admitted = [response for response in flooded if response.status_code == 200]
    assert len(admitted) + len(refused) == 1_000
    assert len(admitted) <= 40 + 20 * 3  # the burst and, at most, three seconds of the rate
    assert bystander == [200] * 10
    assert health == 200
    refusal = refused[0]
    assert refusal.json()["error"]["code"] == "rate_limited"
    assert int(refusal.headers["Retry-After"]) >= 1


@on_sqlite
def test_forwarded_for_from_an_untrusted_peer_does_not_escape_the_limit(
    settings_for: Callable[..., Any],
) -> None:
    settings = settings_for(rate_limit_ip_per_s=1, rate_limit_ip_burst=5)

    async def flood() -> list[int]:
        async with served(settings) as (_app, client):
            peer = client(random_ip())
            return [
                (await peer.get("/v1/models", headers={"X-Forwarded-For": random_ip()})).status_code
                for _ in range(10)
            ]

    assert asyncio.run(flood()) == [200] * 5 + [429] * 5


@on_sqlite
def test_size_limits_are_refused_before_tokenizing(settings_for: Callable[..., Any]) -> None:
    settings = settings_for(rate_limit_ip_per_s=0)

    async def refusals() -> list[tuple[int, str]]:
        async with served(settings) as (app, client):
            gateway = app.state.gateway
            tokenized = 0
            model = gateway.catalog.get("tiny")
            encode = model.encode_chat

            def counted(*args: Any) -> list[int]:
                nonlocal tokenized
                tokenized += 1
                return list(encode(*args))

            object.__setattr__(model, "encode_chat", counted)  # the model is a frozen dataclass
            http = client(random_ip())
            limit = model.context_length * CHARS_PER_TOKEN
            bodies: list[tuple[str, dict[str, Any]]] = [
                ("/v1/chat/completions", chat(["hi"] * (MAX_MESSAGES + 1))),
                ("/v1/chat/completions", chat(["x" * ((1 << 20) + 1)])),
                ("/v1/chat/completions", chat(["x" * (limit // 2 + 1)] * 2)),
                ("/v1/completions", {"model": "tiny", "prompt": "x" * (limit + 1)}),
                ("/v1/completions", {"model": "tiny", "prompt": [1] * (model.context_length + 1)}),
                ("/v1/jobs", {"model": "tiny", "prompt": "x" * (limit + 1)}),
            ]
            answers = []
            for path, body in bodies:
                response = await http.post(path, json=body)
                answers.append((response.status_code, response.json()["error"]["code"]))
            assert tokenized == 0
            return answers

    assert asyncio.run(refusals()) == [
        (400, "too_many_messages"),
        (400, "prompt_too_long"),
        (400, "prompt_too_long"),
        (400, "prompt_too_long"),
        (400, "prompt_too_long"),
        (400, "prompt_too_long"),
    ]


def chat(contents: list[str]) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": text} for text in contents],
        "max_tokens": 4,
    }


@on_sqlite
def test_a_huge_body_and_long_prompts_do_not_stall_health(settings_for: Callable[..., Any]) -> None:
    """Over real HTTP, while /health is asked every 10 ms: a 50 MB body (chunked, so that the gateway must read
    it to know) is refused with 413, and then for a second four clients keep sending the longest conversations
    the character limit allows, each rendered and tokenized. /health's latency is measured throughout."""
    server = GatewayServer(settings_for(rate_limit_ip_per_s=0)).start()
    try:
        model = server.gateway.catalog.get("tiny")
        per_message = model.context_length * CHARS_PER_TOKEN // 64 - 64
        words = " ".join(
            random.choice(["lorem", "ipsum", "dolor", "sit", "amet", "3.14"]) for _ in range(20_000)
        )
        large = chat([words[:per_message]] * 64)
        for n, message in enumerate(large["messages"]):  # chat templates want the turns to alternate
            message["role"] = ("user", "assistant")[n % 2]
        large["messages"][-1]["role"] = "user"
        # Encoded once: the clients share this process (and its GIL) with the gateway, so they should cost little.
        encoded, json_type = json.dumps(large).encode(), {"content-type": "application/json"}
        latencies: list[float] = []
        health: list[int] = []
        done = threading.Event()

        def probe() -> None:
            with httpx.Client(base_url=server.url, timeout=10) as http:
                while not done.is_set():
                    started = time.perf_counter()
                    health.append(http.get("/health").status_code)
                    latencies.append(time.perf_counter() - started)
                    time.sleep(0.01)

        codes: list[str] = []

        def send_large() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as http:
                until = time.monotonic() + 1.0
                while time.monotonic() < until:
                    codes.append(
                        answer(http.post("/v1/chat/completions", content=encoded, headers=json_type))
                    )

        prober = threading.Thread(target=probe)
        prober.start()
        while len(latencies) < 10:  # the first answers open the database's connections: not measured
            time.sleep(0.01)
        baseline = len(latencies)
        status = _post_huge(server.port, 50 << 20)
        during_huge = len(latencies)
        senders = [threading.Thread(target=send_large) for _ in range(4)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        done.set()
        prober.join()
    finally:
        server.stop()
    assert set(health) == {200}, health
    before, during = latencies[5:baseline], latencies[baseline:]
    print(
        f"\n/health: before {statistics.median(before) * 1e3:.1f} ms median; during the 50 MB body "
        f"{len(latencies[baseline:during_huge])} probes; during {len(codes)} long prompts: {len(during)} probes, "
        f"median {statistics.median(during) * 1e3:.1f} ms, 90th percentile "
        f"{statistics.quantiles(during, n=10)[-1] * 1e3:.1f} ms, max {max(during) * 1e3:.1f} ms"
    )
    assert status == 413
    # Each was tokenized: past the context in tokens, or within it and then priced (no route here, or pay).
    assert codes and set(codes) <= {"prompt_tokens_too_long", "no_route", "payment_required"}, set(codes)
    assert statistics.median(during) < 0.05


def answer(response: httpx.Response) -> str:
    error = response.json()["error"]
    if error["code"] == "prompt_too_long" and "prompt_tokens" in error.get("details", {}):
        return "prompt_tokens_too_long"  # counted in tokens: refused after tokenizing
    return str(error["code"])


def _post_huge(port: int, size: int) -> int:
    """Streams ``size`` bytes of chunked body (or as many as the gateway reads) and returns the answer's status."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        piece = 65_536
        chunk, sent, reply = f"{piece:x}\r\n".encode() + b"x" * piece + b"\r\n", 0, b""
        sock.setblocking(False)
        deadline = time.monotonic() + 10
        while b"\r\n" not in reply and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock] if sent < size else [], [], 1)
            if readable:
                data = sock.recv(65_536)
                if not data:
                    break
                reply += data
            elif writable:
                with suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                    sock.sendall(chunk)
                    sent += piece
        assert sent < 5 * MAX_BODY_BYTES, (
            sent
        )  # refused long before the whole body (the rest: socket buffers)
        return int(reply.split(b" ")[1])


@on_sqlite
def test_random_channel_lookups_on_anvil_are_answered_without_a_read_each(
    settings_for: Callable[..., Any],
) -> None:
    settings = settings_for(rate_limit_ip_per_s=0, chain_cold_reads_per_s=10)

    async def lookups() -> tuple[dict[int, int], int, float]:
        async with served(settings) as (app, client):
            http, watcher = client(random_ip()), app.state.gateway.watcher
            before, started = watcher.reads, time.monotonic()
            statuses: dict[int, int] = {}
            for _ in range(300):
                status = (await http.get(f"/v1/channels/0x{os.urandom(32).hex()}")).status_code
                statuses[status] = statuses.get(status, 0) + 1
            return statuses, watcher.reads - before, time.monotonic() - started

    statuses, reads, elapsed_s = asyncio.run(lookups())
    assert set(statuses) <= {404, 503}
    assert reads <= 20 + 10 * elapsed_s + 1
    assert statuses.get(503, 0) >= 300 - reads
