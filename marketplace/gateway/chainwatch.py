"""The chain state the gateway decides with, cached and kept current from contract events.

Paying a request must not wait for the chain, so channel deposits and exits, and whether a provider is
staked, are read once and then followed: every ``poll_s`` the watcher reads the new logs of VoucherEscrow and
StakeManager and re-reads the state of every channel or provider they touch. It re-reads rather than applying
each event's delta, so a value read at block N and an event from block N or earlier can never be counted twice.

What it costs to be a poll behind: a payer who starts to leave its channel is seen at most ``poll_s`` late,
and the operator still has the escrow's whole withdraw delay to redeem what was charged before that.

A cached channel is used only while it is current: read less than ``max_age_s`` ago, or kept so by a round of
events that reached the head less than ``max_age_s`` ago. Otherwise it is read again, and with the chain
unreachable that read raises ChainUnavailable, which the payment path answers with 503 ``chain_unavailable``:
no request is served against a deposit that may have been withdrawn since.

The caches are keyed by ids any caller chooses (a voucher for a random channel of a fresh key, a GET of
``/v1/channels/{id}``, an ask signed by an unstaked key), so they are bounded LRUs, and what a caller can make the
gateway read is rationed. Channels with a deposit (or an exit) and staked providers cost their owners tokens: they
are kept apart, up to ``max_channels``. Ids the chain shows nothing for (no deposit, no stake) are remembered as
such for ``unknown_ttl_s`` in an LRU of their own, up to ``max_unknown``, so a flood of them never evicts a real
payer; and reading one that is not remembered takes one of ``cold_reads_per_s`` reads a second, all callers
together. With none left the answer is what is remembered (a fresh read asked for), else ChainUnavailable: 503
``chain_unavailable`` with Retry-After, which costs a caller a request and the chain nothing. Reads that events
ask for are never rationed: events cost gas.

It never stops following. Any error a round meets (an endpoint down, an HTTP 429, a JSON-RPC error, a reply
that does not decode) is logged and the round retried after a backoff that doubles up to ``MAX_BACKOFF_S``.
Logs are read ``MAX_LOG_BLOCKS`` blocks at a time, the cursor advancing after each page, and a page the
endpoint refuses (too many results, too wide a range) is read again in halves down to single blocks. How far
behind it is (blocks, and seconds since the last round that reached the head) is in ``/health`` and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

from eth_utils.abi import event_abi_to_log_topic
from eth_utils.address import to_checksum_address
from web3._utils.events import get_event_data

from marketplace.gateway.ratelimit import LocalBuckets, Rate
from settlement.contracts import CHANNEL_CLOSED
from settlement.deploy import Contracts
from settlement.errors import ChainError, ChainUnavailable

log = logging.getLogger(__name__)

BIGINT_MAX = 2**63 - 1  # the largest amount the gateway's tables account in
MAX_LOG_BLOCKS = 2_000  # blocks of logs asked for at once: what public endpoints commonly allow
MAX_BACKOFF_S = 30.0
CHANNEL_MAX_AGE_S = 30.0  # the oldest cached channel state a payment may be accepted against
MAX_CHANNELS = 100_000  # channels with a deposit and staked providers cached (each costs its owner tokens)
MAX_UNKNOWN = 10_000  # channels without a deposit and providers without a stake remembered as such
UNKNOWN_TTL_S = 60.0  # how long they are
COLD_READS_PER_S = 10.0  # reads a second of ids not remembered, all callers together
HEAD_MAX_AGE_S = 1.0  # the oldest latest-block answer /health is given

_CHANNEL_EVENTS = {"ChannelFunded", "WithdrawInitiated", "WithdrawFinalized"}
# x402's BatchSettlement's, named apart (its withdrawal events share VoucherEscrow's names).
BATCH_EVENT = "Batch."
_BATCH_CHANNEL_EVENTS = {
    BATCH_EVENT + name
    for name in ("Deposited", "WithdrawInitiated", "WithdrawFinalized", "Refunded", "Claimed")
}
_STAKE_EVENTS = {"Staked", "UnstakeRequested", "Withdrawn", "Slashed"}


@dataclass(frozen=True)
class ChannelView:
    """A VoucherEscrow channel, or an x402 BatchSettlement one: there the deposit is the channel's balance, and
    ``withdrawable_at`` is when its payer asked to withdraw (such a channel never closes for good)."""

    deposit: int  # capped at BIGINT_MAX: no voucher above it is accepted anyway
    withdrawable_at: int  # 0 while open; CHANNEL_CLOSED once the payer left; else when it may leave
    claimed: int = 0  # what the operator collected from it on chain

    def as_json(self, channel_id: str) -> dict[str, Any]:
        """As x402's batch-settlement ``channelState`` names the chain's part."""
        return {
            "channelId": channel_id,
            "balance": str(self.deposit),
            "totalClaimed": str(self.claimed),
            "withdrawRequestedAt": self.withdrawable_at,
        }

    @property
    def exiting(self) -> bool:
        return 0 < self.withdrawable_at < CHANNEL_CLOSED

    @property
    def closed(self) -> bool:
        return self.withdrawable_at == CHANNEL_CLOSED


UNFUNDED = ChannelView(0, 0)  # a channel never funded, as the escrow reads it

K = TypeVar("K")
V = TypeVar("V")


class Lru(Generic[K, V]):
    """A dict of at most ``capacity`` entries: adding one past it forgets the least recently used."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._entries))  # a copy: reads while iterating may reorder or evict

    def get(self, key: K) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def pop(self, key: K) -> V | None:
        return self._entries.pop(key, None)


class _Read:
    """A channel read in flight; ``overtaken`` once an event's refresh of the channel began after it did."""

    overtaken = False


class ChainReader(Protocol):
    """What the watcher reads of the chain: a narrow seam, so that its bookkeeping can be tested on a fake."""

    def block_number(self) -> int: ...

    def events(self, first: int, last: int) -> list[ChainEvent]:
        """The escrow's and the stake manager's events in blocks ``first`` to ``last``, in order."""
        ...

    def channel(self, channel_id: bytes) -> ChannelView: ...

    def batch_channel(self, channel_id: bytes) -> ChannelView: ...

    def is_active(self, provider: str) -> bool: ...


@dataclass(frozen=True)
class ChainEvent:
    name: str  # the event's name in the contract's ABI
    args: dict[str, Any]


class ContractsReader:
    """The chain through the deployed contracts' wrappers (blocking calls; the watcher runs them in threads)."""

    def __init__(self, contracts: Contracts) -> None:
        self.contracts = contracts
        self._events: dict[tuple[str, bytes], tuple[str, dict[str, Any]]] = {}
        for wrapper, prefix in (
            (contracts.escrow, ""),
            (contracts.stake, ""),
            (contracts.batch, BATCH_EVENT),
        ):
            for entry in wrapper.contract.abi:
                if entry.get("type") == "event":
                    event = cast(dict[str, Any], entry)
                    topic = event_abi_to_log_topic(event)  # type: ignore[arg-type]
                    self._events[(wrapper.address.lower(), topic)] = (prefix, event)

    def block_number(self) -> int:
        chain = self.contracts.chain
        return chain.read(lambda: int(chain.w3.eth.block_number))

    def events(self, first: int, last: int) -> list[ChainEvent]:
        chain = self.contracts.chain
        addresses = [
            self.contracts.escrow.address,
            self.contracts.stake.address,
            self.contracts.batch.address,
        ]
        logs = chain.read(
            lambda: list(chain.w3.eth.get_logs({"address": addresses, "fromBlock": first, "toBlock": last}))
        )
        decoded = []
        for entry in logs:
            if not entry["topics"]:
                continue
            known = self._events.get((str(entry["address"]).lower(), bytes(entry["topics"][0])))
            if known is None:
                continue
            prefix, abi = known
            event = get_event_data(chain.w3.codec, abi, entry)
            decoded.append(ChainEvent(prefix + str(event["event"]), dict(event["args"])))
        return decoded

    def channel(self, channel_id: bytes) -> ChannelView:
        state = self.contracts.escrow.channel(channel_id)
        return ChannelView(min(state.deposit, BIGINT_MAX), state.withdrawable_at, state.claimed)

    def batch_channel(self, channel_id: bytes) -> ChannelView:
        state = self.contracts.batch.channel(channel_id)
        return ChannelView(min(state.balance, BIGINT_MAX), state.withdraw_initiated_at, state.total_claimed)

    def is_active(self, provider: str) -> bool:
        return bool(self.contracts.stake.is_active(provider))


class ChainWatcher:
    def __init__(
        self,
        reader: ChainReader,
        *,
        poll_s: float = 1.0,
        on_stake_change: Callable[[str, bool], None] = lambda _address, _active: None,
        on_slashed: Callable[[str], object] = lambda _address: None,
        on_exit: Callable[[bytes], object] = lambda _channel: None,
        max_age_s: float = CHANNEL_MAX_AGE_S,
        max_channels: int = MAX_CHANNELS,
        max_unknown: int = MAX_UNKNOWN,
        unknown_ttl_s: float = UNKNOWN_TTL_S,
        cold_reads_per_s: float = COLD_READS_PER_S,
    ) -> None:
        self.reader = reader
        self.poll_s = poll_s
        self.max_age_s = max_age_s
        self.on_stake_change = on_stake_change
        self.on_slashed = on_slashed  # a validator slashed the provider: its asks leave the book
        self.on_exit = on_exit  # a payer started to leave a channel: what it owes should be redeemed soon
        self.unknown_ttl_s = unknown_ttl_s
        # Funded (or exiting, or closed) channels: the view, and when it was read (monotonic).
        self._channels: Lru[bytes, tuple[ChannelView, float]] = Lru(max_channels)
        self._unfunded: Lru[bytes, float] = Lru(max_unknown)  # when each was read without a deposit
        self._active: Lru[str, bool] = Lru(max_channels)  # staked providers (only True is kept here)
        self._unstaked: Lru[str, float] = Lru(max_unknown)  # when each was read without a stake
        self._reading: dict[
            bytes, list[_Read]
        ] = {}  # channel reads in flight, to know which an event overtook
        # Two seconds' worth at once: a burst of new payers right after a deposit round is not refused.
        self._cold_rate = Rate(cold_reads_per_s, max(1, math.ceil(2 * cold_reads_per_s)))
        self._cold_reads = LocalBuckets(1)
        self.reads = 0  # reads of channels and stakes made, for metrics and tests
        self._latest: tuple[int | ChainError, float] | None = (
            None  # the head last read (or why not), and when
        )
        self._latest_read: asyncio.Future[int] | None = None
        self._cursor: int | None = None
        self._head: int | None = None  # the latest block the endpoint reported
        self._synced_at: float | None = None  # monotonic time the cursor last reached the head
        self.failures = 0  # rounds failed in a row
        self._task: asyncio.Task[None] | None = None

    # -- reads ---------------------------------------------------------------------------------------------

    async def channel(self, channel_id: bytes, *, fresh: bool = False, batch: bool = False) -> ChannelView:
        """The channel's state (on x402's BatchSettlement when ``batch``), read again when ``fresh`` or when the
        cached copy is no longer current; raises ChainUnavailable when that read cannot be made (or, for a
        channel not known to be funded, when the reads of such ids are spent this second and nothing is
        remembered of it). The two contracts' ids share the caches: an escrow id starts with its payer's
        address, a batch one is a hash, and neither can be made to equal the other."""
        cached = self._channels.get(channel_id)
        if cached is not None:
            if not fresh and self._current(cached[1]):
                return cached[0]
            return await self._read_channel(channel_id, batch=batch)
        read_at = self._unfunded.get(channel_id)
        remembered = read_at is not None and self._remembered(read_at)
        if remembered and not fresh:
            return UNFUNDED
        if not self._cold_read_allowed():
            if remembered:
                return UNFUNDED  # a fresh read was asked for; what the watcher followed still stands
            raise ChainUnavailable("too many reads of unknown channels and providers this second: try again")
        return await self._read_channel(channel_id, batch=batch)

    def _current(self, read_at: float) -> bool:
        now = time.monotonic()
        followed = self._synced_at is not None and now - self._synced_at < self.max_age_s
        return followed or now - read_at < self.max_age_s

    def _remembered(self, read_at: float) -> bool:
        """Whether an id read as unknown at ``read_at`` may still be answered as such."""
        return self._current(read_at) and time.monotonic() - read_at < self.unknown_ttl_s

    def _cold_read_allowed(self) -> bool:
        return self._cold_reads.take("", self._cold_rate) == 0

    async def _read_channel(
        self, channel_id: bytes, *, refresh: bool = False, batch: bool = False
    ) -> ChannelView:
        # A read that an event's refresh overtook is older than what the refresh caches: it must not replace it
        # (a payer's exit would be forgotten while the watcher, following, keeps the cache current).
        reads = self._reading.setdefault(channel_id, [])
        if refresh:
            for earlier in reads:
                earlier.overtaken = True
        read = _Read()
        reads.append(read)
        try:
            self.reads += 1
            state_of = self.reader.batch_channel if batch else self.reader.channel
            view = await asyncio.to_thread(state_of, channel_id)
        finally:
            reads.remove(read)
            if not reads:
                del self._reading[channel_id]
        if not read.overtaken:
            if view == UNFUNDED:
                self._channels.pop(channel_id)
                self._unfunded.put(channel_id, time.monotonic())
            else:
                self._unfunded.pop(channel_id)
                self._channels.put(channel_id, (view, time.monotonic()))
        return view

    async def is_active(self, provider: str, *, fresh: bool = False) -> bool:
        """Whether ``provider`` is staked, read again when ``fresh``; rationed as :meth:`channel` is for an
        address not known to be staked."""
        provider = to_checksum_address(provider)
        if provider in self._active:
            self._active.get(provider)  # most recently used
            return True if not fresh else await self._read_stake(provider)
        read_at = self._unstaked.get(provider)
        remembered = read_at is not None and self._remembered(read_at)
        if remembered and not fresh:
            return False
        if not self._cold_read_allowed():
            if remembered:
                return False
            raise ChainUnavailable("too many reads of unknown channels and providers this second: try again")
        return await self._read_stake(provider)

    async def _read_stake(self, provider: str) -> bool:
        self.reads += 1
        active = await asyncio.to_thread(self.reader.is_active, provider)
        if active:
            self._unstaked.pop(provider)
            self._active.put(provider, True)
        else:
            self._active.pop(provider)
            self._unstaked.put(provider, time.monotonic())
        self.on_stake_change(provider, active)
        return active

    async def latest_block(self, *, max_age_s: float = HEAD_MAX_AGE_S) -> int:
        """The chain's latest block number, read at most once per ``max_age_s`` however many ask (concurrent
        askers share one read, and a failed read is remembered as long): /health is unauthenticated and must not
        be an RPC call per request. Raises ChainError when the chain cannot be read."""
        if self._latest is not None and time.monotonic() - self._latest[1] < max_age_s:
            answer = self._latest[0]
            if isinstance(answer, BaseException):
                raise answer
            return answer
        if self._latest_read is None or self._latest_read.done():
            self._latest_read = asyncio.ensure_future(self._read_latest())
        return await asyncio.shield(self._latest_read)

    async def _read_latest(self) -> int:
        try:
            block = await asyncio.to_thread(self.reader.block_number)
        except ChainError as exc:
            self._latest = (exc, time.monotonic())
            raise
        self._latest = (block, time.monotonic())
        return block

    @property
    def cached(self) -> dict[str, int]:
        """Entries in each cache: channels and providers known funded or staked, and ids known to be neither."""
        return {
            "channels": len(self._channels),
            "unfundedChannels": len(self._unfunded),
            "providers": len(self._active),
            "unstakedProviders": len(self._unstaked),
        }

    # -- following events ------------------------------------------------------------------------------------

    @property
    def lag_blocks(self) -> int | None:
        """Blocks between the head the endpoint last reported and the last one read; None before the first."""
        if self._head is None or self._cursor is None:
            return None
        return max(0, self._head - self._cursor)

    @property
    def seconds_since_sync(self) -> float | None:
        """Since the cursor last reached the head; None before it first did."""
        return None if self._synced_at is None else time.monotonic() - self._synced_at

    async def start(self) -> None:
        self._cursor = self._head = await asyncio.to_thread(self.reader.block_number)
        self._synced_at = time.monotonic()
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(min(self.poll_s * 2**self.failures, max(MAX_BACKOFF_S, self.poll_s)))
            try:
                await self.sync()
            except Exception as exc:  # whatever the endpoint does, the watcher goes on
                self.failures += 1
                level = logging.WARNING if isinstance(exc, ChainError) else logging.ERROR
                log.log(level, "chain events not read (%d rounds in a row): %r", self.failures, exc)
            else:
                self.failures = 0

    async def sync(self) -> None:
        """Reads the events since the last sync and refreshes what they touched."""
        latest = await asyncio.to_thread(self.reader.block_number)
        self._head = latest
        self._latest = (latest, time.monotonic())
        if self._cursor is None:
            self._cursor = latest
        while self._cursor < latest:
            last = min(latest, self._cursor + MAX_LOG_BLOCKS)
            await self._apply(await self._events(self._cursor + 1, last))
            self._cursor = last
        self._synced_at = time.monotonic()

    async def _events(self, first: int, last: int) -> list[ChainEvent]:
        """The events of blocks ``first`` to ``last``, in halves when the endpoint refuses the whole range."""
        try:
            return await asyncio.to_thread(self.reader.events, first, last)
        except ChainError:
            raise  # unreachable, or refusing us: a smaller range would not help
        except Exception:
            # An error of the endpoint's about this request (too many results, too wide a range). Halving ends
            # at one block: a failure there is raised, after about log2(MAX_LOG_BLOCKS) tries.
            if first == last:
                raise
            middle = (first + last) // 2
            return [*await self._events(first, middle), *await self._events(middle + 1, last)]

    async def _apply(self, events: list[ChainEvent]) -> None:
        """Refreshes what ``events`` touched."""
        channels: set[bytes] = set()
        batch_channels: set[bytes] = set()
        providers: set[str] = set()
        slashed: set[str] = set()
        everyone = False
        exits: set[bytes] = set()
        for event in events:
            if event.name in _BATCH_CHANNEL_EVENTS:
                batch_channels.add(bytes(event.args["channelId"]))
                if event.name == BATCH_EVENT + "WithdrawInitiated":
                    exits.add(bytes(event.args["channelId"]))
            elif event.name in _CHANNEL_EVENTS:
                channels.add(bytes(event.args["channelId"]))
                if event.name == "WithdrawInitiated":
                    exits.add(bytes(event.args["channelId"]))
            elif event.name in _STAKE_EVENTS:
                providers.add(to_checksum_address(event.args["provider"]))
                if event.name == "Slashed":
                    slashed.add(to_checksum_address(event.args["provider"]))
            elif event.name == "MinStakeChanged":
                everyone = True
        # Only channels asked about are worth a read; a funding of one remembered as unfunded is among them.
        for channel_id in channels:
            if channel_id in self._channels or channel_id in self._unfunded:
                await self._read_channel(channel_id, refresh=True)
        for channel_id in batch_channels:
            if channel_id in self._channels or channel_id in self._unfunded:
                await self._read_channel(channel_id, refresh=True, batch=True)
        # A new minimum stake may change any provider's standing: every one remembered (at most max_channels +
        # max_unknown reads, on an event only the admin can cause).
        for provider in [*self._active, *self._unstaked] if everyone else providers:
            await self._read_stake(provider)
        for provider in slashed:
            self.on_slashed(provider)
        for channel_id in exits:
            self.on_exit(channel_id)
