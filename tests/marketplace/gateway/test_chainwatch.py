"""The chain watcher's bookkeeping on a fake chain: what it caches, what an event makes it re-read, and that it
keeps following after the endpoint fails (the integration tests follow real anvil events)."""

from __future__ import annotations

import asyncio

import pytest

from marketplace.gateway import chainwatch
from marketplace.gateway.chainwatch import ChainWatcher, ChannelView
from settlement.contracts import CHANNEL_CLOSED
from settlement.errors import ChainUnavailable
from tests.marketplace.gateway.fakes import FakeChainReader, provider

CHANNEL = bytes(range(32))
OTHER = bytes(range(1, 33))


def watcher_on(reader: FakeChainReader, **callbacks: object) -> ChainWatcher:
    return ChainWatcher(reader, poll_s=0.01, **callbacks)  # type: ignore[arg-type]


def test_a_channel_is_read_once_then_served_from_the_cache() -> None:
    reader = FakeChainReader(channels={CHANNEL: ChannelView(500, 0)})
    watcher = watcher_on(reader)

    async def reads() -> tuple[ChannelView, ChannelView, ChannelView]:
        first = await watcher.channel(CHANNEL)
        reader.channels[CHANNEL] = ChannelView(900, 0)  # deposited, but no poll has seen it yet
        second = await watcher.channel(CHANNEL)
        fresh = await watcher.channel(CHANNEL, fresh=True)
        return first, second, fresh

    first, second, fresh = asyncio.run(reads())
    assert (first.deposit, second.deposit, fresh.deposit) == (500, 500, 900)
    assert reader.reads.count(f"channel {CHANNEL.hex()[:8]}") == 2


def test_a_cached_channel_is_trusted_only_while_it_is_current() -> None:
    """Younger than max_age, or kept current by a round of events that reached the head: served from the cache.
    Older, with the watcher not following: read again, and with the chain unreachable that read fails instead of
    serving a deposit that may have been withdrawn since."""
    reader = FakeChainReader(channels={CHANNEL: ChannelView(500, 0)})
    watcher = ChainWatcher(reader, poll_s=0.01, max_age_s=0.05)

    async def reads() -> list[object]:
        seen: list[object] = [(await watcher.channel(CHANNEL)).deposit]
        reader.channels[CHANNEL] = ChannelView(500, 2_000)  # an exit the watcher has not followed
        seen.append((await watcher.channel(CHANNEL)).exiting)  # current enough: cached
        await asyncio.sleep(0.06)
        seen.append((await watcher.channel(CHANNEL)).exiting)  # too old: read again
        await asyncio.sleep(0.06)
        reader.down = True
        try:
            await watcher.channel(CHANNEL)
        except ChainUnavailable as exc:
            seen.append(type(exc).__name__)
        return seen

    assert asyncio.run(reads()) == [500, False, True, "ChainUnavailable"]


def test_an_event_refreshes_the_channels_it_names_and_only_those_already_cached() -> None:
    reader = FakeChainReader(channels={CHANNEL: ChannelView(500, 0)})
    watcher = watcher_on(reader)

    async def follow() -> ChannelView:
        await watcher.start()
        await watcher.channel(CHANNEL)
        reader.channels[CHANNEL] = ChannelView(500, 2_000)
        reader.emit("WithdrawInitiated", channelId=CHANNEL)
        reader.emit("ChannelFunded", channelId=OTHER)  # never asked about: not worth a read
        await watcher.sync()
        await watcher.stop()
        return await watcher.channel(CHANNEL)

    view = asyncio.run(follow())
    assert view.exiting and not view.closed
    assert f"channel {OTHER.hex()[:8]}" not in reader.reads


def test_an_exit_is_told_for_every_channel_it_names() -> None:
    reader = FakeChainReader(channels={CHANNEL: ChannelView(500, 0)})
    exits: list[bytes] = []
    watcher = ChainWatcher(reader, poll_s=0.01, on_exit=exits.append)

    async def follow() -> None:
        await watcher.start()
        reader.emit("WithdrawInitiated", channelId=OTHER)  # never read by the gateway: still told
        reader.emit("ChannelFunded", channelId=CHANNEL)
        await watcher.sync()
        await watcher.stop()

    asyncio.run(follow())
    assert exits == [OTHER]


def test_a_closed_channel_reads_as_closed() -> None:
    assert ChannelView(0, CHANNEL_CLOSED).closed
    assert not ChannelView(0, CHANNEL_CLOSED).exiting


def test_stake_events_refresh_the_provider_and_a_slash_pulls_it() -> None:
    alice = provider(1).address
    reader = FakeChainReader(active={alice: True})
    changes: list[tuple[str, bool]] = []
    slashed: list[str] = []
    watcher = watcher_on(
        reader, on_stake_change=lambda a, active: changes.append((a, active)), on_slashed=slashed.append
    )

    async def follow() -> bool:
        await watcher.start()
        assert await watcher.is_active(alice)
        reader.active[alice] = False
        reader.emit("Slashed", provider=alice)
        await watcher.sync()
        return await watcher.is_active(alice)

    assert asyncio.run(follow()) is False
    assert changes == [(alice, True), (alice, False)]
    assert slashed == [alice]


def test_a_new_minimum_stake_rereads_every_known_provider() -> None:
    providers = [provider(i).address for i in range(3)]
    reader = FakeChainReader(active=dict.fromkeys(providers, True))
    watcher = watcher_on(reader)

    async def follow() -> list[bool]:
        await watcher.start()
        for address in providers:
            await watcher.is_active(address)
        reader.active = dict.fromkeys(providers, False)
        reader.emit("MinStakeChanged", minStake=10**9)
        await watcher.sync()
        return [await watcher.is_active(address) for address in providers]

    assert asyncio.run(follow()) == [False, False, False]


@pytest.mark.parametrize(
    "errors",
    [
        [ChainUnavailable("the endpoint does not answer")] * 3,
        # No ChainError: the watcher used to die on one, silently.
        [RuntimeError("429 Too Many Requests"), ValueError("invalid JSON-RPC response")],
    ],
    ids=["endpoint-down", "rpc-errors"],
)
def test_it_keeps_following_after_the_endpoint_fails(errors: list[Exception]) -> None:
    reader = FakeChainReader(channels={CHANNEL: ChannelView(500, 0)})
    watcher = watcher_on(reader)

    async def follow() -> tuple[bool, int]:
        await watcher.start()
        await watcher.channel(CHANNEL)
        reader.errors = list(errors)  # what the next polls meet
        reader.channels[CHANNEL] = ChannelView(500, CHANNEL_CLOSED)
        reader.emit("WithdrawFinalized", channelId=CHANNEL)
        for _ in range(300):
            await asyncio.sleep(0.01)
            if (await watcher.channel(CHANNEL)).closed:
                break
        await watcher.stop()
        return (await watcher.channel(CHANNEL)).closed, watcher.failures

    assert asyncio.run(follow()) == (True, 0)


def test_logs_are_read_a_page_at_a_time_and_in_halves_when_a_page_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(chainwatch, "MAX_LOG_BLOCKS", 40)
    reader = FakeChainReader(channels={CHANNEL: ChannelView(500, 0)}, max_range=15)
    watcher = watcher_on(reader)

    async def follow() -> ChannelView:
        await watcher.start()
        await watcher.channel(CHANNEL)
        reader.block += 100  # a hundred quiet blocks, then the exit
        reader.channels[CHANNEL] = ChannelView(500, CHANNEL_CLOSED)
        reader.emit("WithdrawFinalized", channelId=CHANNEL)
        await watcher.sync()
        return await watcher.channel(CHANNEL)

    assert asyncio.run(follow()).closed
    ranges = [read.split()[1] for read in reader.reads if read.startswith("events")]
    spans = [(int(a), int(b)) for a, b in (r.split("-") for r in ranges)]
    assert all(last - first < 40 for first, last in spans)  # never more than a page
    answered = [(first, last) for first, last in spans if last - first < 15]
    assert (
        sorted(answered)[0][0] == 101 and max(last for _, last in answered) == 201
    )  # every block, in the end
    assert watcher.lag_blocks == 0
