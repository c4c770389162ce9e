"""The client side of hop links: an authenticated connection to one provider (:class:`PeerLink`), a pool of
them (:class:`Peers`), a route of providers driven by the gateway (:class:`RouteClient`), and a validator's
reading of what a provider retained (:func:`fetch_retained`).

A link connects over TLS, checks that the provider's certificate is the one pinned for it (from its signed ask
or from a ticket), answers the provider's challenge with this party's key, and then carries one request and its
reply at a time, while one-way pushes (:meth:`PeerLink.send`) of any number of sessions go out between them,
each message written whole. It reconnects on the next request after it breaks.

:class:`RouteClient` opens a session on every provider of a route directly (each its own ticket), sends steps
to the first, verifies the route's signed report hop by hop, and closes each session directly, collecting each
provider's own receipt. When a step does not come back whole it says whom the failure is on
(:class:`~worker.errors.StepFailed`): a hop whose signed entry reports an error of its own; the hop that signed
for relaying a report which does not verify; for a hop that says it could not reach the next, the next if this
client cannot reach it either; and where two hops' signed words disagree (whose hashes do not link, who says the
other sent bad input or would not answer), both, with nobody suspended, since either may be the liar.

On a ring (:meth:`RouteClient.ring`) the gateway pushes the prefill to the first hop and reads each step's report
from the last hop's follow stream; every report is checked as on a chain, from the last hop down (each nested
report blamed, when it does not hold, on the hop that signed over it), and the first hop's input at each step must
be the token the last hop reported to the gateway at the step before, by the last hop's own signature. A step that
does not arrive within the step timeout is accounted for by asking every hop directly for its signed account of it
(:class:`~worker.messages.Account`); the first hop whose account is not "computed and sent on" is where the ring
broke, and it is blamed by the same rules as a chain's error entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from worker.errors import (
    CertificateMismatch,
    HopRefused,
    HopUnreachable,
    ProtocolError,
    StepFailed,
    Unauthenticated,
    WireError,
    WorkerError,
)
from worker.messages import (
    MAX_STOP_TOKENS,
    ZERO_ADDRESS,
    Account,
    Auth,
    Close,
    Fetch,
    Fetched,
    FetchTicket,
    Follow,
    Hello,
    HopEntry,
    HopTicket,
    Open,
    Push,
    Report,
    RingOrder,
    SignedReceipt,
    Step,
    checked,
)
from worker.protocol import read_control, read_frame, write_message
from worker.sampling import TokenLogprobs
from worker.tls import NO_FINGERPRINT, check_pinned, client_context
from worker.transcript import StepHashes, links
from worker.trust import Checks, Keys
from worker.wire import Frame, FrameLimits, payload_sha256

HANDSHAKE_TIMEOUT_S = 5.0
# Long enough for a long prompt's prefill through every hop after this one; a peer that never answers costs no
# one more than this.
REQUEST_TIMEOUT_S = 60.0
# A hop's report that the next one answered garbage, refused, presented another certificate, or could not be
# reached while this client reaches it: the two disagree and either may be lying (or the path between them
# attacked). Both are left out, neither suspended.
NEXT_DISPUTED = ("next_misbehaved", "next_refused", "next_certificate_mismatch", "next_unreachable")
# A hop's report that its input was bad or out of turn: it came from the hop before, so the two disagree.
INPUT_DISPUTED = ("bad_step_input", "step_out_of_order")
# A hop out of room for this session (KV cache, sessions): an honest answer. Routed around, never suspended.
CAPACITY = ("provider_busy",)
CLOSE_ATTEMPTS = 3
CLOSE_RETRY_S = 0.5
CLOSE_TIMEOUT_S = 10.0  # a close signs one receipt: quick, or not coming
# Of a step's budget, what the gateway keeps for the first hop's reply to reach it.
STEP_MARGIN_S = 0.5
ACCOUNT_TIMEOUT_S = 5.0  # a hop's account of a step is a lookup and one signature


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProtocolError(f"{endpoint!r} is not a host:port endpoint")
    return host.strip("[]"), int(port)


class PeerLink:
    """An authenticated connection to one provider, opened on first use and again after it breaks."""

    def __init__(
        self,
        endpoint: str,
        fingerprint: bytes,
        keys: Keys,
        *,
        tls: bool,
        expect: str | None = None,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.endpoint = endpoint
        self.host, self.port = parse_endpoint(endpoint)
        self.fingerprint = fingerprint
        self.keys = keys
        self.tls = tls
        self.expect = expect  # the provider's address, when the caller knows it: the server names itself
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()  # one request and its reply at a time
        self._write_lock = asyncio.Lock()  # one message written at a time
        self._connect_lock = asyncio.Lock()

    async def send(
        self,
        control: dict[str, Any],
        tensor: torch.Tensor | None = None,
        *,
        session: bytes = bytes(16),
        step: int = 0,
        sha256: bytes | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Sends one message that has no reply (a push), without waiting for any other exchange on this link to
        finish. Raises HopUnreachable when it cannot be written within ``timeout_s``."""
        timeout_s = self.request_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                _, writer = await self._connected()
                async with self._write_lock:
                    # Written whole before the first await: a cancelled sender never leaves half a message.
                    write_message(writer, control, tensor, session=session, step=step, sha256=sha256)
                    await writer.drain()
        except (TimeoutError, OSError) as exc:
            await self._drop()
            raise HopUnreachable(f"{self.endpoint}: {exc!r}") from exc

    async def request(
        self,
        control: dict[str, Any],
        tensor: torch.Tensor | None = None,
        *,
        session: bytes = bytes(16),
        step: int = 0,
        sha256: bytes | None = None,
        reply_frame: FrameLimits | None = None,
        timeout_s: float | None = None,
    ) -> tuple[Mapping[str, Any], Frame | None]:
        """Sends one request and reads its reply; ``reply_frame`` is the frame the reply may carry (None: none).
        Raises HopUnreachable when the reply has not come within ``timeout_s`` (default ``request_timeout_s``),
        time spent waiting behind this link's other requests included."""
        timeout_s = self.request_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout_s), self._lock:
                return await self._exchange(control, tensor, session, step, sha256, reply_frame)
        except TimeoutError as exc:  # the exchange, if it had begun, was abandoned on its way out
            raise HopUnreachable(f"{self.endpoint}: no reply in {timeout_s:g} s") from exc

    async def _exchange(
        self,
        control: dict[str, Any],
        tensor: torch.Tensor | None,
        session: bytes,
        step: int,
        sha256: bytes | None,
        reply_frame: FrameLimits | None,
    ) -> tuple[Mapping[str, Any], Frame | None]:
        try:
            reader, writer = await self._connected()
            async with self._write_lock:
                write_message(writer, control, tensor, session=session, step=step, sha256=sha256)
                await writer.drain()
            reply = await read_control(reader)
            frame = await read_frame(reader, reply_frame)
            return reply, frame
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            await self._drop()
            raise HopUnreachable(f"{self.endpoint}: {exc!r}") from exc
        except (ProtocolError, WireError, CertificateMismatch, Unauthenticated):
            await self._drop()  # the stream's framing, or the peer, can no longer be trusted
            raise
        except BaseException:
            # Cancelled mid-exchange (a timeout): the reply may still arrive and would be read as the answer to
            # the next request, so this connection is done. No await: we are being cancelled.
            self._abandon()
            raise

    async def probe(self) -> bool:
        """Whether the provider answers a new connection now: connected, its certificate the pinned one, our key
        accepted. A new one, since a connection this link already holds proves nothing about the present."""
        fresh = PeerLink(
            self.endpoint,
            self.fingerprint,
            self.keys,
            tls=self.tls,
            expect=self.expect,
            connect_timeout_s=self.connect_timeout_s,
        )
        try:
            await fresh._connected()
        except (WorkerError, OSError, TimeoutError, asyncio.IncompleteReadError):
            return False
        finally:
            await fresh._drop()
        return True

    async def _connected(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is not None and self._writer is not None and not self._writer.is_closing():
            return self._reader, self._writer
        async with self._connect_lock:
            if self._reader is not None and self._writer is not None and not self._writer.is_closing():
                return self._reader, self._writer
            return await self._connect()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                self.host,
                self.port,
                ssl=client_context() if self.tls else None,
                server_hostname="" if self.tls else None,
            ),
            self.connect_timeout_s,
        )
        try:
            if self.tls:
                check_pinned(writer.get_extra_info("ssl_object"), self.fingerprint, self.endpoint)
            sock = writer.get_extra_info("socket")
            if sock is not None:
                # Steps are small request/response exchanges: Nagle's delay would add up at every hop.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.wait_for(self._authenticate(reader, writer), HANDSHAKE_TIMEOUT_S)
        except Exception:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
            raise
        except BaseException:  # cancelled: no await
            writer.close()
            raise
        self._reader, self._writer = reader, writer
        return reader, writer

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = Hello.from_json(await read_control(reader, limit=1024))
        await read_frame(reader, None)
        pinned = self.fingerprint if self.tls else NO_FINGERPRINT
        if hello.fingerprint != pinned:
            raise CertificateMismatch(f"{self.endpoint} names another certificate than the one it presented")
        signature = await asyncio.to_thread(self.keys.peer_auth, hello.challenge, pinned)
        write_message(writer, Auth(self.keys.address, signature).to_json())
        await writer.drain()
        reply = await read_control(reader, limit=1024)
        await read_frame(reader, None)
        if reply.get("ok") is not True:
            error = reply.get("error")
            raise Unauthenticated(f"{self.endpoint} refused our key: {error}")
        if self.expect is not None and reply.get("provider") != self.expect:
            raise Unauthenticated(f"{self.endpoint} is {reply.get('provider')}, not {self.expect}")

    async def receive(
        self, reply_frame: FrameLimits | None, timeout_s: float
    ) -> tuple[Mapping[str, Any], Frame | None]:
        """The next message the provider sends on this link unasked (a follow stream's). Raises HopUnreachable when
        none comes within ``timeout_s`` or the link is gone; the link is then dropped (a message may be half read)."""
        reader = self._reader
        if reader is None:
            raise HopUnreachable(f"{self.endpoint}: not connected")
        try:
            async with asyncio.timeout(timeout_s):
                reply = await read_control(reader)
                frame = await read_frame(reader, reply_frame)
                return reply, frame
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            await self._drop()
            raise HopUnreachable(f"{self.endpoint}: {exc!r}") from exc
        except (ProtocolError, WireError):
            await self._drop()
            raise

    def _abandon(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def _drop(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):  # already gone: nothing left to close
                await self._writer.wait_closed()
        self._reader = self._writer = None

    async def close(self) -> None:
        async with self._lock:
            await self._drop()


class Peers:
    """Links to providers, one per (endpoint, certificate), authenticated with ``keys``. A zero fingerprint
    means a plain TCP link, which only a party that allows plaintext (development) opens."""

    def __init__(self, keys: Keys, *, allow_plaintext: bool = False) -> None:
        self.keys = keys
        self.allow_plaintext = allow_plaintext
        self._links: dict[tuple[str, bytes], PeerLink] = {}

    def get(self, endpoint: str, fingerprint: bytes, *, expect: str | None = None) -> PeerLink:
        key = (endpoint, fingerprint)
        link = self._links.get(key)
        if link is None:
            tls = fingerprint != NO_FINGERPRINT
            if not tls and not self.allow_plaintext:
                raise CertificateMismatch(f"{endpoint} names no certificate, and plaintext links are off")
            link = self._links[key] = PeerLink(endpoint, fingerprint, self.keys, tls=tls, expect=expect)
        return link

    def fresh(self, endpoint: str, fingerprint: bytes, *, expect: str | None = None) -> PeerLink:
        """A link of its own, outside the pool (a follow stream takes its connection for good)."""
        pooled = self.get(endpoint, fingerprint, expect=expect)
        return PeerLink(endpoint, fingerprint, self.keys, tls=pooled.tls, expect=expect)

    async def close(self) -> None:
        for link in self._links.values():
            await link.close()
        self._links.clear()


# -- a route, as the gateway drives it ------------------------------------------------------------------------


@dataclass(frozen=True)
class HopPlan:
    """One hop of a route: where it is, the certificate pinned for it, and its ticket."""

    endpoint: str
    fingerprint: bytes
    ticket: HopTicket

    @property
    def provider(self) -> str:
        return self.ticket.provider


@dataclass(frozen=True)
class StepResult:
    token: int
    hops: list[StepHashes]  # each hop's signed (step, input, output), the last one's token with it
    compute_ms: list[float | None]  # each hop's own account of its compute; telemetry, never billed
    logits: torch.Tensor | None = None  # the last position's (1, vocab), when asked for
    logprobs: TokenLogprobs | None = (
        None  # the token's, signed by the last hop, when the sampling asks for them
    )


class RouteClient:
    """Drives one session along one route: opens it on every hop, steps it through the first, closes every hop."""

    def __init__(
        self,
        hops: list[HopPlan],
        peers: Peers,
        *,
        checks: Checks,  # whose signature each hop's report carries
        vocab_size: int,
        step_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        if not hops:
            raise ValueError("a route needs at least one provider")
        if step_timeout_s <= 2 * STEP_MARGIN_S:
            raise ValueError(f"a step needs more than {2 * STEP_MARGIN_S:g} s")
        self.hops = hops
        self.peers = peers
        self.checks = checks
        self.vocab_size = vocab_size
        self.step_timeout_s = step_timeout_s
        self.session = hops[0].ticket.session
        self.top_logprobs: int | None = None  # alternatives the last hop reports a token, once opened to

    @property
    def is_ring(self) -> bool:
        """Whether the tickets make a ring: the last hop's names the first as its next."""
        return self.hops[-1].ticket.next != ZERO_ADDRESS

    def _link(self, hop: HopPlan) -> PeerLink:
        return self.peers.get(hop.endpoint, hop.fingerprint, expect=hop.provider)

    async def open(
        self,
        sampling: dict[str, Any] | None,
        *,
        steps: int | None = None,
        stop_token_ids: frozenset[int] = frozenset(),
    ) -> None:
        """Opens the session on every hop at once; raises StepFailed naming the hops that refused. On a ring the
        last hop is told to run at most ``steps`` steps and to stop after any of ``stop_token_ids``."""
        requested = (sampling or {}).get("logprobs")
        self.top_logprobs = None if requested is None else min(int(requested), self.vocab_size)
        ring = None
        if self.is_ring:
            stops = tuple(sorted(stop_token_ids))[
                :MAX_STOP_TOKENS
            ]  # past that, the gateway's own stop ends it
            ring = RingOrder(steps or self.hops[-1].ticket.max_positions, stops)

        async def open_one(position: int, hop: HopPlan) -> None:
            last = position == len(self.hops) - 1
            request = Open(hop.ticket, sampling if last else None, ring if last else None)
            reply, _ = await self._link(hop).request(request.to_json())
            checked(reply)

        outcomes = await asyncio.gather(
            *(open_one(i, hop) for i, hop in enumerate(self.hops)), return_exceptions=True
        )
        failed = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, BaseException)]
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, WorkerError | OSError):
                raise outcome
        if failed:
            raise StepFailed(
                f"hops {failed} did not open the session: {outcomes[failed[0]]!r}", blame(failed)
            )

    async def step(self, step: int, inputs: torch.Tensor, *, logits: bool = False) -> StepResult:
        first = self.hops[0]
        budget_ms = int((self.step_timeout_s - STEP_MARGIN_S) * 1e3)
        request = Step(self.session, step, int(inputs.shape[1]), logits, budget_ms)
        try:
            reply, frame = await self._link(first).request(
                request.to_json(),
                inputs,
                session=self.session,
                step=step,
                timeout_s=self.step_timeout_s,
                reply_frame=FrameLimits(max_payload_bytes=self.vocab_size * 8, max_elements=self.vocab_size)
                if logits
                else None,
            )
        except (CertificateMismatch, Unauthenticated) as exc:
            # Someone else answered at the provider's endpoint, or the provider does not know this gateway: the
            # path may be attacked, which is no proof against the provider. Leave it out; do not suspend it.
            raise StepFailed(
                f"the first hop is not the one pinned: {exc}", blame([0], suspend=False)
            ) from exc
        except (HopUnreachable, ProtocolError, WireError) as exc:
            raise StepFailed(f"the first hop failed: {exc}", blame([0])) from exc
        if "report" not in reply:
            raise StepFailed(f"the first hop refused the step: {reply.get('error')}", blame([0]))
        hops, compute_ms, logprobs = await self._verified(
            reply["report"], step, payload_sha256(inputs), int(inputs.shape[1])
        )
        tensor = frame.tensor if frame is not None else None
        return StepResult(hops[-1].token or 0, hops, compute_ms, tensor, logprobs)

    async def ring(
        self,
        prefill: torch.Tensor,
        *,
        steps: int,
        stop_token_ids: frozenset[int] = frozenset(),
        logits: bool = False,
    ) -> AsyncGenerator[StepResult, None]:
        """Runs the opened session as a ring: follows the last hop's stream, pushes the prefill to the first hop,
        and yields each step's verified result as the last hop reports it, until ``steps`` steps or a stop token.
        Raises StepFailed with the blame. Leaving early (a stop the gateway decided) does not stop the ring: close
        the sessions, naming the steps taken. Use it under contextlib.aclosing, so the stream is closed at once."""
        first, last = self.hops[0], self.hops[-1]
        follow = self.peers.fresh(last.endpoint, last.fingerprint, expect=last.provider)
        reply_frame = FrameLimits(max_payload_bytes=self.vocab_size * 8, max_elements=self.vocab_size)
        positions = int(prefill.shape[1])
        sent = payload_sha256(prefill)
        try:
            for position, link, message, tensor in (
                (len(self.hops) - 1, follow, Follow(self.session), None),
                (0, self._link(first), Push(self.session, 0, positions, None, logits), prefill),
            ):
                try:
                    await link.send(
                        message.to_json(),
                        tensor,
                        session=self.session,
                        sha256=sent,
                        timeout_s=self.step_timeout_s,
                    )
                except (CertificateMismatch, Unauthenticated) as exc:
                    raise StepFailed(
                        f"hop {position} is not the one pinned: {exc}", blame([position], suspend=False)
                    ) from exc
                except (HopUnreachable, ProtocolError, WireError) as exc:
                    raise StepFailed(f"hop {position} failed: {exc}", blame([position])) from exc
            previous: HopEntry | None = None
            for step in range(steps):
                try:
                    # Read with the logits' limits even when none were asked for: the flag travels unsigned in
                    # every push, so any hop may set it and the last hop then honestly sends them. A frame taken
                    # for a broken stream would blame the last hop for another's doing; it is read and dropped.
                    reply, frame = await follow.receive(reply_frame, self.step_timeout_s)
                except (HopUnreachable, ProtocolError, WireError) as exc:
                    raise StepFailed(
                        f"step {step} did not come back: {exc}", await self._account_blame(step)
                    ) from exc
                if "report" not in reply:
                    raise StepFailed(
                        f"the last hop's stream ended at step {step}: {reply.get('error') or reply}",
                        await self._account_blame(step),
                    )
                hops, compute_ms, logprobs, previous = await self._verified_ring(
                    reply["report"], step, sent, positions, previous
                )
                token = previous.token
                assert token is not None  # checked with the last hop's entry
                yield StepResult(
                    token, hops, compute_ms, frame.tensor if frame is not None and logits else None, logprobs
                )
                if token in stop_token_ids:
                    return
                positions, sent = 1, payload_sha256(torch.tensor([[token]], dtype=torch.int64))
        finally:
            await follow.close()

    async def _verified_ring(
        self, raw: Any, step: int, sent: bytes, positions: int, previous: HopEntry | None
    ) -> tuple[list[StepHashes], list[float | None], TokenLogprobs | None, HopEntry]:
        """A ring step's report, read from the last hop down (each report vouched for by the hop that nested it,
        the last hop's by the last hop): each hop's hashes, first hop first, its compute telemetry, the token's
        log probabilities and the last hop's entry. ``previous`` is the last hop's entry of the step before, which
        the first hop must have consumed; None at the prefill. Raises StepFailed with the blame."""
        count = len(self.hops)
        reports: list[Report] = []
        for position in range(count - 1, -1, -1):
            voucher = min(position + 1, count - 1)  # the hop that signed over this report
            hop = self.hops[position]
            if raw is None:
                raise StepFailed(f"hop {voucher} nested no report of hop {position}", blame([voucher]))
            try:
                current = Report.from_json(raw)
            except ProtocolError as exc:
                raise StepFailed(f"hop {position}'s report: {exc}", blame([voucher])) from exc
            entry = current.entry
            if (entry.provider, entry.session, entry.step) != (hop.provider, self.session, step) or (
                current.signer(self.checks.hop_report) != hop.provider
            ):
                raise StepFailed(f"hop {position}'s report does not verify", blame([voucher]))
            reports.insert(0, current)
            raw = current.downstream
        # What the first hop signed over: nothing at the prefill (the gateway pushed it); after it, the last hop's
        # report of the step before, whose token it consumed.
        if previous is None:
            if raw is not None or reports[0].below is not None:
                raise StepFailed("the first hop signed over a report at the prefill", blame([0]))
        else:
            try:
                handed = Report.from_json(raw) if raw is not None else None
            except ProtocolError:
                handed = None
            last = self.hops[-1].provider
            if handed is None or handed.signer(self.checks.hop_report) != last:
                raise StepFailed("the first hop consumed a token the last hop did not sign", blame([0]))
            if handed.entry.to_json() != previous.to_json():
                # Two entries for one step, both signed by the last hop: another token to the first than to us.
                raise StepFailed(
                    "the last hop handed the first another step than it reported", blame([count - 1])
                )
        hops: list[StepHashes] = []
        compute_ms: list[float | None] = []
        logprobs: TokenLogprobs | None = None
        for position, current in enumerate(reports):
            hashes, logprobs = await self._entry_checked(position, current.entry, step, positions)
            hops.append(hashes)
            compute_ms.append(current.compute_ms)
        broken = links(sent, hops)
        if broken is not None:
            culprits = [broken] if broken == 0 else [broken - 1, broken]
            raise StepFailed(f"hop {broken}'s input is not what reached it", blame(culprits, suspend=False))
        return hops, compute_ms, logprobs, reports[-1].entry

    async def _account_blame(self, step: int) -> Blame:
        """Whom a ring step that did not come back is on, from every hop's signed account of it, asked of each
        directly (and the last hop's of the step before, whose token the first hop should have had): the first hop
        with no account, or whose account is not "computed and sent on", is where the ring broke."""

        async def account(position: int, at: int) -> Report | None:
            hop = self.hops[position]
            try:
                reply, _ = await self._link(hop).request(
                    Account(self.session, at).to_json(), timeout_s=min(ACCOUNT_TIMEOUT_S, self.step_timeout_s)
                )
                report = Report.from_json(checked(reply).get("report"))
            except (WorkerError, OSError):
                return None
            entry = report.entry
            if (entry.provider, entry.session, entry.step) != (hop.provider, self.session, at) or (
                report.signer(self.checks.hop_report) != hop.provider
            ):
                return None
            return report

        count = len(self.hops)
        accounts = await asyncio.gather(*(account(position, step) for position in range(count)))
        for position, report in enumerate(accounts):
            if report is None:
                return blame([position])  # no account of its own work to give: down, or garbage
            error = report.entry.error
            if error is None:
                continue
            if error.code == "not_received":
                if position == 0 and step == 0:
                    return blame([0], suspend=False)  # this gateway's own push: lost on the way, or not taken
                before = position - 1 if position else count - 1
                sender = accounts[before] if position else await account(count - 1, step - 1)
                if sender is not None and sender.entry.error is not None:
                    return await self._blame_error(before, sender.entry.error.code, step - (position == 0))
                return blame([before, position], suspend=False)  # "sent it" against "never had it"
            if error.code == "in_progress":
                return blame([position])  # it holds the step past the step's time
            return await self._blame_error(position, error.code, step)
        # Every hop computed the step and sent it on: the last hop's report never reached this gateway.
        return blame([count - 1], suspend=False)

    async def _verified(
        self, report: Any, step: int, sent: bytes, positions: int
    ) -> tuple[list[StepHashes], list[float | None], TokenLogprobs | None]:
        """Each hop's authenticated account of the step, first hop first (and its compute telemetry), and the
        token's log probabilities; raises StepFailed with the blame."""
        hops: list[StepHashes] = []
        logprobs: TokenLogprobs | None = None
        compute_ms: list[float | None] = []
        raw: Any = report
        for position, hop in enumerate(self.hops):
            relayer = max(position - 1, 0)  # the hop that handed this report up
            if raw is None:
                # The hop before said it sent the step on and got nothing back, yet reported no error.
                raise StepFailed(f"hop {relayer} relayed no report from hop {position}", blame([relayer]))
            # The relayer signed for this report after checking it (the first hop's came straight here): one that
            # does not hold was altered, forged, or passed on unchecked by the relayer.
            try:
                current = Report.from_json(raw)
            except ProtocolError as exc:
                raise StepFailed(f"hop {position}'s report: {exc}", blame([relayer])) from exc
            entry = current.entry
            honest_entry = (
                entry.provider == hop.provider
                and entry.session == self.session
                and entry.step == step
                and current.signer(self.checks.hop_report) == hop.provider
            )
            if not honest_entry:
                raise StepFailed(f"hop {position}'s report does not verify", blame([relayer]))
            last = position == len(self.hops) - 1
            if last and current.downstream is not None:
                raise StepFailed("the last hop reported a hop after it", blame([position]))
            hashes, entry_logprobs = await self._entry_checked(position, entry, step, positions)
            logprobs = entry_logprobs if last else logprobs
            hops.append(hashes)
            compute_ms.append(current.compute_ms)
            raw = current.downstream
        broken = links(sent, hops)
        if broken is not None:
            # Two authenticated accounts disagree about the bytes between them: either hop may be lying.
            culprits = [broken] if broken == 0 else [broken - 1, broken]
            raise StepFailed(f"hop {broken}'s input is not what reached it", blame(culprits, suspend=False))
        return hops, compute_ms, logprobs

    async def _entry_checked(
        self, position: int, entry: HopEntry, step: int, positions: int
    ) -> tuple[StepHashes, TokenLogprobs | None]:
        """The hashes of a hop's authenticated entry, and on the last its token's log probabilities; raises
        StepFailed with the blame when the entry reports an error or says what it must not."""
        hop = self.hops[position]
        if entry.positions is not None and entry.positions != positions:
            # Not what this client sent. The first hop took it from this client (on a ring, after the prefill,
            # from the last hop, whose token the gateway checks against its own report): its own word is wrong.
            # Any other took it from the hop before: its word against that hop's, who signed for the step.
            # Checked before any error the entry reports: an inflated step may well be refused downstream.
            culprits = [position] if position == 0 else [position - 1, position]
            raise StepFailed(
                f"hop {position} says its input held {entry.positions} positions; {positions} were sent",
                blame(culprits, suspend=position == 0),
            )
        if entry.error is not None:
            raise StepFailed(
                f"hop {position} ({hop.provider}) failed: {entry.error.code}: {entry.error.message}",
                await self._blame_error(position, entry.error.code, step),
            )
        assert entry.input is not None and entry.output is not None
        logprobs = None
        if position == len(self.hops) - 1:
            if entry.token is None or not 0 <= entry.token < self.vocab_size:
                raise StepFailed(
                    f"the last hop emitted no token in 0..{self.vocab_size - 1}", blame([position])
                )
            logprobs = entry.logprobs
            if (logprobs is None) != (self.top_logprobs is None) or (
                logprobs is not None
                and (
                    len(logprobs.top) != self.top_logprobs
                    or any(not 0 <= token < self.vocab_size for token, _ in logprobs.top)
                )
            ):
                raise StepFailed(
                    f"the last hop's logprobs are not the {self.top_logprobs} alternatives asked for",
                    blame([position]),
                )
        elif entry.token is not None:
            raise StepFailed(f"hop {position} is not the last, yet emitted a token", blame([position]))
        assert entry.positions == positions  # an entry without an error carries them, checked above
        return StepHashes(step, entry.input, entry.output, entry.token, positions=entry.positions), logprobs

    async def _blame_error(self, position: int, code: str, step: int = 0) -> Blame:
        """Whom an authenticated error entry of the hop at ``position`` at ``step`` is on. On a ring the last hop's
        next is the first, and the first hop's input after the prefill came from the last."""
        count = len(self.hops)
        following: int | None = position + 1 if position + 1 < count else (0 if self.is_ring else None)
        before: int | None = position - 1 if position > 0 else (count - 1 if self.is_ring and step else None)
        if (
            code == "next_unreachable"
            and following is not None
            and not await self._link(self.hops[following]).probe()
        ):
            return blame([following])  # down for this client too
        if code in NEXT_DISPUTED and following is not None:
            return blame([position, following], suspend=False)
        if code in INPUT_DISPUTED or code == "out_of_time":
            # Its input (or its time) came from the hop before; from this client, for the first hop.
            return blame([position] if before is None else [before, position], suspend=False)
        if code in CAPACITY:
            return blame([position], suspend=False)
        return blame([position])

    async def close(self, steps: int | None = None) -> list[SignedReceipt | None]:
        """Every hop's own receipt, asked of it directly (retried a few times); None for a hop that gave none.
        ``steps``: the steps to bill, when a ring may have run past the ones the gateway took."""

        async def close_one(hop: HopPlan) -> SignedReceipt | None:
            for attempt in range(CLOSE_ATTEMPTS):
                try:
                    reply, _ = await self._link(hop).request(
                        Close(self.session, steps).to_json(),
                        timeout_s=min(CLOSE_TIMEOUT_S, self.step_timeout_s),
                    )
                    return SignedReceipt.from_json(checked(reply).get("receipt"))
                except (WorkerError, OSError):
                    if attempt + 1 < CLOSE_ATTEMPTS:
                        await asyncio.sleep(CLOSE_RETRY_S * (attempt + 1))
            return None

        return list(await asyncio.gather(*(close_one(hop) for hop in self.hops)))

    async def generate(
        self,
        prompt: list[int],
        *,
        max_tokens: int,
        sampling: dict[str, Any] | None = None,
        stop_token_ids: frozenset[int] = frozenset(),
        logits: bool = False,
    ) -> tuple[list[int], list[StepResult]]:
        """Opens the session, prefills, then one step per token until ``max_tokens`` or a stop token (on a ring, as
        the ring runs them). Does not close the session."""
        await self.open(sampling or {}, steps=max_tokens, stop_token_ids=stop_token_ids)
        prompt_ids = torch.tensor([prompt], dtype=torch.int64)
        if self.is_ring:
            async with contextlib.aclosing(
                self.ring(prompt_ids, steps=max_tokens, stop_token_ids=stop_token_ids, logits=logits)
            ) as ring:
                results = [result async for result in ring]
            return [r.token for r in results], results
        results = [await self.step(0, prompt_ids, logits=logits)]
        while len(results) < max_tokens and results[-1].token not in stop_token_ids:
            last = torch.tensor([[results[-1].token]], dtype=torch.int64)
            results.append(await self.step(len(results), last, logits=logits))
        return [r.token for r in results], results


@dataclass(frozen=True)
class Blame:
    positions: list[int]  # the hops at fault, to leave out of the next route
    suspend: bool = True  # whether they are sure enough to keep out of matching for a while


def blame(positions: list[int], *, suspend: bool = True) -> Blame:
    return Blame(sorted(set(positions)), suspend)


# -- a validator's reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetainedStep:
    """One step of a session as the provider kept it."""

    step: int
    input: torch.Tensor
    output: torch.Tensor
    input_hash: bytes  # sha256 of the frames' payloads, as received
    output_hash: bytes


async def fetch_retained(
    link: PeerLink,
    ticket: FetchTicket,
    *,
    max_steps: int,
    limits: FrameLimits,
    part_timeout_s: float | None = None,
) -> list[RetainedStep]:
    """Every retained step of the ticket's session on the provider behind ``link`` (for validators): the inputs,
    then the outputs, each in as few requests as the provider's reply size allows, each request within
    ``part_timeout_s`` (default: the link's).

    Raises HopRefused with the provider's code when it does not have them, ProtocolError when it answers out of
    turn or two parts disagree on how many. Of more than ``max_steps`` steps kept (a ring that ran past the steps
    its receipt bills), the first ``max_steps`` are read. ``limits`` bound each frame
    (from the model and the hop).
    """

    async def part(name: str) -> list[torch.Tensor]:
        tensors: list[torch.Tensor] = []
        count = 1  # steps to read: those kept, up to max_steps
        total = 0  # steps the provider says it kept
        while len(tensors) < count:
            reply, frame = await link.request(
                Fetch(ticket, len(tensors), name).to_json(), reply_frame=limits, timeout_s=part_timeout_s
            )
            fetched = Fetched.from_json(checked(reply))
            if (
                fetched.step != len(tensors)
                or fetched.part != name
                or (total and fetched.steps != total)
                or frame is None
                or frame.tensor.dim() < 2
                or int(frame.tensor.shape[1]) != sum(fetched.widths)
            ):
                raise ProtocolError(
                    f"{link.endpoint} answered a fetch of {name} from step {len(tensors)} amiss"
                )
            # A ring may have run past the steps billed (see worker.messages): the billed ones are the first.
            total, count = fetched.steps, min(fetched.steps, max_steps)
            start = 0
            for width in fetched.widths[: count - len(tensors)]:
                tensors.append(frame.tensor[:, start : start + width])
                start += width
        return tensors

    inputs = await part("input")
    outputs = await part("output")
    if len(outputs) != len(inputs):
        raise ProtocolError(f"{link.endpoint} kept {len(inputs)} inputs and {len(outputs)} outputs")
    # Each step's slice of a joined frame is contiguous along dim 1 only when dim 0 is 1, as a span's always is.
    return [
        RetainedStep(step, i.contiguous(), o.contiguous(), payload_sha256(i), payload_sha256(o))
        for step, (i, o) in enumerate(zip(inputs, outputs, strict=True))
    ]


__all__ = [
    "Blame",
    "HopPlan",
    "HopRefused",
    "PeerLink",
    "Peers",
    "RetainedStep",
    "RouteClient",
    "StepResult",
    "fetch_retained",
    "parse_endpoint",
]
