"""The hop server: one provider's span behind a TLS port, serving the sessions a trusted gateway opened on it
and sending each step on to the one peer the session's ticket names. The protocol and its threat model are in
:mod:`worker.messages`.

A connection starts with a challenge (:class:`~worker.messages.Hello`) that the client answers with its key
(:class:`~worker.messages.Auth`), bound to this server's certificate. A client that is not a trusted gateway,
a trusted validator, or the previous hop of a session open here has nothing to ask and is hung up on.
Requests are read in order on a connection; those with a reply are answered in order, one at a time:

    open    a trusted gateway opens its ticket's session here (the ticket names this provider and its span)
    step    (chain) the ticket's previous peer (or the gateway) sends a step; it runs, goes on to the ticket's next
            peer, and the reply carries this hop's signed report over the next hop's, checked
    push    (ring, no reply) the ticket's previous peer (or the gateway, for the prefill) pushes a step: once its
            frame is read it is queued on its session, and the connection's next message is read at once
    follow  the gateway that opened a ring session, on the last hop, gets the session's step reports as a stream
    account the gateway that opened a session gets this hop's signed account of one step
    close   the gateway that opened the session ends it and gets this provider's signed receipt (again, if it
            asks again), billing the steps the gateway says it took
    fetch   a trusted validator, with a ticket naming this provider and the session, reads its retained steps'
            inputs or outputs, many steps to a reply
    prove   a gateway checking this provider's ask gets the endpoint signed with the staked key

Defences against peers that do not follow the protocol: nothing but the handshake is read before the client is
known, and that within ``handshake_timeout_s``; a frame's size is derived from the session (positions left in
its ticket × the model's hidden size) and checked before its payload is read; payload bytes in flight across
all connections stay under ``max_inflight_bytes``; connections are capped before and after authentication;
idle connections are closed; signature checks run off the event loop's thread and are cached per connection.

Ring sessions. Why pushes rather than the chain's request and reply: a pushed step holds nothing while the rest
of the ring works on it, so any number of sessions' steps are in flight on one link and inside ``_compute`` at
once (which gathers the steps awaiting it into batches), while each session's own steps run strictly in order, on
a task of its own that takes them from the session's queue: a push is checked (its session, its sender, that it is
the next step) before its frame is read, computed once whatever came before it, and pushed on to the ticket's next
peer by a one-way write that waits for nobody's reply. A peer that keeps pushing steps that are not the next one is
hung up on after ``max_refused_pushes``. What a hop did with each step is kept (its signed report, or its error)
for the gateway's :class:`~worker.messages.Account` requests, for the last few steps of each session.

Chain steps run on the connection's own task: the sender waits for the reply anyway.

Compute. Every step, ring or chain, reaches the span through ``_compute``, which hands it to the provider's
:class:`~worker.scheduler.StepScheduler`: steps of different sessions that wait at the same time run in one
batched forward pass (:mod:`worker.batching`), on a worker thread, so the event loop keeps reading steps meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.client import Peers, parse_endpoint
from worker.errors import (
    CertificateMismatch,
    NotAuthorised,
    ProtocolError,
    ProviderBusy,
    TicketRefused,
    Unauthenticated,
    UnknownSession,
    WireError,
    WorkerError,
)
from worker.messages import (
    Account,
    Auth,
    Close,
    Fetch,
    Fetched,
    FetchTicket,
    Follow,
    Hello,
    HopEntry,
    HopError,
    Open,
    Prove,
    Push,
    Report,
    RingOrder,
    Step,
    parse_request,
    refusal,
)
from worker.protocol import read_control, read_frame_body, read_frame_length, write_message
from worker.runtime import SpanRuntime, StepRecord
from worker.sampling import Sampler, SamplingParams
from worker.scheduler import StepScheduler
from worker.tls import NO_FINGERPRINT, TlsIdentity
from worker.transcript import StepHashes, sampling_hash, transcript_root
from worker.trust import Checks, Keys, ReceiptFields
from worker.wire import Frame, FrameLimits

log = logging.getLogger(__name__)

HANDSHAKE_CONTROL_BYTES = 1024
# Of a step's budget, what a hop keeps for its report's way back when it gives the rest to the next hop.
FORWARD_MARGIN_S = 0.5
# Steps of a ring session whose account a hop keeps for the gateway to ask after.
ACCOUNTS_KEPT = 8
MAX_PROBLEM = 400  # characters of an error's message a hop signs
_END = object()  # the end of a follow stream


@dataclass(frozen=True)
class ServerLimits:
    handshake_timeout_s: float = 5.0  # to connect, say hello and be answered with a valid Auth
    idle_timeout_s: float = 300.0  # an authenticated connection with no request this long is closed
    read_timeout_s: float = 30.0  # once a request has begun, for the rest of it to arrive
    max_handshakes: int = 2048  # connections not yet authenticated, at once
    # Authenticated connections of peers that are neither a trusted gateway nor a trusted validator (previous
    # hops), at once and from any one of them: the parties this provider trusts are never crowded out.
    max_connections: int = 4096
    max_connections_per_peer: int = 64
    max_inflight_bytes: int = 1 << 30  # frame payload bytes being read, over all connections
    # A job's attempts at this provider (its failovers), while their sessions are remembered.
    max_sessions_per_job: int = 8
    max_ticket_lifetime_s: int = 600  # a ticket expiring later than this is refused: tickets are short-lived
    max_fetch_bytes: int = (
        64 << 20
    )  # retained steps sent in one fetch reply (one step at least, whatever its size)
    # Pushes a connection may send that are not its session's next step (replays, floods) before it is hung up on.
    max_refused_pushes: int = 64


@dataclass
class _Session:
    ticket: Any  # messages.HopTicket
    gateway: str  # the gateway that opened it: its only closer
    sampler: Sampler | None
    sampling: dict[str, Any] | None
    tokens: list[int] = field(default_factory=list)  # the last span's emitted tokens, by step
    positions: int = 0  # positions its steps have carried, against the ticket's cap
    receipt: Any = None  # messages.SignedReceipt once closed
    ring: RingOrder | None = None  # on the last hop of a ring session: when the ring stops
    accepted: int = 0  # ring: the next step a push may carry
    queue: asyncio.Queue[tuple[Push, Frame, str]] | None = None  # ring: pushed steps waiting their turn
    worker: asyncio.Task[None] | None = None  # ring: runs the queued steps in order
    outbox: asyncio.Queue[Any] | None = None  # ring, last hop: what the gateway's follow stream is sent
    followed: bool = False
    accounts: dict[int, Any] = field(default_factory=dict)  # ring: step -> its Report, or "in_progress"
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # held while one of its steps computes

    @property
    def closed(self) -> bool:
        return self.receipt is not None


class _Budget:
    """Bytes that may be in flight at once: a request over budget waits for others to finish, up to the read
    timeout. All on the event loop's thread: checking and taking need no lock."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._released = asyncio.Event()

    @contextlib.asynccontextmanager
    async def holding(self, amount: int, timeout_s: float) -> Any:
        if amount > self.total:
            raise ProviderBusy(f"a frame of {amount} bytes is more than this provider reads at once")
        try:
            async with asyncio.timeout(timeout_s):
                while self.free < amount:
                    self._released.clear()
                    await self._released.wait()
        except TimeoutError as exc:
            raise ProviderBusy("too many bytes in flight; try again") from exc
        self.free -= amount
        try:
            yield
        finally:
            self.free += amount
            self._released.set()


class HopServer:
    def __init__(
        self,
        runtime: SpanRuntime,
        *,
        keys: Keys,
        checks: Checks,
        gateways: set[str],  # whose tickets are honoured
        validators: set[str],  # who may fetch retained steps
        tls: TlsIdentity | None,  # None: plain TCP, for development only
        allow_plaintext: bool = False,  # whether steps may go on to a next hop over plain TCP (development)
        limits: ServerLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.runtime = runtime
        self.keys = keys
        self.checks = checks
        self.gateways = gateways
        self.validators = validators
        self.tls = tls
        self.limits = limits or ServerLimits()
        self.clock = clock
        self.fingerprint = tls.fingerprint if tls is not None else NO_FINGERPRINT
        self.peers = Peers(keys, allow_plaintext=allow_plaintext or tls is None)
        self._scheduler = StepScheduler(runtime)  # steps of many sessions, batched
        self._sessions: dict[bytes, _Session] = {}
        self._sessions_per_job: dict[bytes, int] = defaultdict(int)
        self._budget = _Budget(self.limits.max_inflight_bytes)
        self._handshaking = 0
        self._connected = 0
        self._connected_from: dict[str, int] = defaultdict(int)
        self._previous_of_unclosed: dict[str, int] = defaultdict(
            int
        )  # sessions not closed yet, by previous peer
        self._server: asyncio.Server | None = None
        self._expiry: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return self.keys.address

    async def start(self, host: str, port: int, *, expire_every_s: float = 10.0) -> asyncio.Server:
        tls: dict[str, Any] = {}
        if self.tls is not None:
            tls = {"ssl": self.tls.server_context(), "ssl_handshake_timeout": self.limits.handshake_timeout_s}
        self._server = await asyncio.start_server(self._serve_connection, host, port, **tls)
        self._expiry = asyncio.create_task(self._expire_periodically(expire_every_s))
        return self._server

    async def _expire_periodically(self, every_s: float) -> None:
        """Frees the KV caches of abandoned sessions and forgets sessions whose retained steps are gone."""
        while True:
            await asyncio.sleep(every_s)
            self.runtime.expire()
            for session_id in [s for s in self._sessions if not self.runtime.knows(s)]:
                session = self._sessions.pop(session_id)
                _stop_ring(session)
                _count_down(self._sessions_per_job, session.ticket.job_id)
                if session.receipt is None:
                    _count_down(self._previous_of_unclosed, session.ticket.previous)

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.peers.close()
        await self._scheduler.close()

    # -- connections ----------------------------------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if self._handshaking >= self.limits.max_handshakes:
                return  # hang up: the caller may try again
            self._handshaking += 1
            try:
                peer = await asyncio.wait_for(
                    self._handshake(reader, writer), self.limits.handshake_timeout_s
                )
            finally:
                self._handshaking -= 1
            if peer is None:
                return
            trusted = peer in self.gateways or peer in self.validators
            if not trusted and (
                self._connected >= self.limits.max_connections
                or self._connected_from[peer] >= self.limits.max_connections_per_peer
            ):
                # The answer to its first request: it may try again when one of its connections ends.
                write_message(writer, refusal("provider_busy", f"too many connections from {peer} or all"))
                await writer.drain()
                return
            self._connected += not trusted
            self._connected_from[peer] += not trusted
            try:
                await self._serve_requests(reader, writer, peer, trusted=trusted)
            finally:
                self._connected -= not trusted
                if not trusted:
                    _count_down(self._connected_from, peer)
        except (ConnectionError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            log.debug("connection ended: %r", exc)
        except asyncio.CancelledError:
            pass  # the server is shutting down
        finally:
            writer.close()

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str | None:
        """The client's address once it proved its key, or None (after telling it why) when it did not, or has
        no business here."""
        challenge = os.urandom(32)
        write_message(writer, Hello(challenge, self.fingerprint).to_json())
        await writer.drain()
        try:
            auth = Auth.from_json(await read_control(reader, limit=HANDSHAKE_CONTROL_BYTES))
            if await read_frame_length(reader) != 0:
                raise ProtocolError("auth carries no frame")
            signer = await asyncio.to_thread(
                self.checks.peer_auth, challenge, self.fingerprint, auth.signature
            )
        except (ProtocolError, ValueError) as exc:
            write_message(writer, refusal("unauthenticated", f"no proof of a key: {exc}"))
            await writer.drain()
            return None
        if signer != auth.address:
            write_message(writer, refusal("unauthenticated", "the signature is not the named address's"))
            await writer.drain()
            return None
        if not self._has_business(signer):
            write_message(writer, refusal("not_authorised", f"{signer} has nothing to ask of this provider"))
            await writer.drain()
            return None
        write_message(writer, {"ok": True, "provider": self.address})
        await writer.drain()
        return signer

    def _has_business(self, peer: str) -> bool:
        return peer in self.gateways or peer in self.validators or peer in self._previous_of_unclosed

    async def _serve_requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str, *, trusted: bool
    ) -> None:
        verified: dict[FetchTicket, str] = {}  # fetch tickets this connection already had checked
        refused = 0  # pushes that were not their session's next step
        while True:
            try:
                async with asyncio.timeout(self.limits.idle_timeout_s):
                    control = await read_control(reader)
            except asyncio.IncompleteReadError:
                return  # the peer closed the connection between requests
            try:
                request = parse_request(control)
                if not trusted and not isinstance(request, Step | Push):
                    # A previous hop only ever sends steps; anything else would just keep its connection alive.
                    raise NotAuthorised(f"{peer} sends steps here, nothing else")
                if isinstance(request, Push):
                    if not await self._accept_push(request, reader, peer):
                        refused += 1
                        if refused > self.limits.max_refused_pushes:
                            raise NotAuthorised(f"{peer} pushed {refused} steps out of turn")
                    continue
                if isinstance(request, Follow):
                    await self._no_frame(reader)
                    await self._follow(request, writer, peer)
                    return
                reply, tensor, sha = await self._handle(request, reader, peer, verified)
            except (ProtocolError, WireError, NotAuthorised, ProviderBusy, TimeoutError) as exc:
                code = exc.code if isinstance(exc, WorkerError) else "read_timeout"
                # Whatever frame followed was not read: the stream's framing is lost. Answer once, hang up.
                write_message(writer, refusal(code, str(exc)))
                await writer.drain()
                return
            session = request.session if isinstance(request, Step) else bytes(16)
            step = request.step if isinstance(request, Step) else 0
            write_message(writer, reply, tensor, session=session, step=step, sha256=sha)
            await writer.drain()

    async def _handle(
        self, request: Any, reader: asyncio.StreamReader, peer: str, verified: dict[FetchTicket, str]
    ) -> tuple[dict[str, Any], torch.Tensor | None, bytes | None]:
        if isinstance(request, Step):
            return await self._step(request, reader, peer)
        await self._no_frame(reader)
        try:
            if isinstance(request, Open):
                return await self._open(request, peer), None, None
            if isinstance(request, Close):
                session = self._sessions.get(request.session)
                if session is None:
                    return self._close(request, peer), None, None
                async with session.lock:  # not while one of its steps computes
                    return self._close(request, peer), None, None
            if isinstance(request, Account):
                return self._account(request, peer), None, None
            if isinstance(request, Fetch):
                reply, tensor = await self._fetch(request, peer, verified)
                return reply, tensor, None
            assert isinstance(request, Prove)
            return self._prove(request, peer), None, None
        except NotAuthorised:
            raise  # hung up on
        except (ValueError, WorkerError) as exc:
            code = exc.code if isinstance(exc, WorkerError) else "bad_request"
            return refusal(code, str(exc)), None, None

    async def _no_frame(self, reader: asyncio.StreamReader) -> None:
        async with asyncio.timeout(self.limits.read_timeout_s):
            length = await read_frame_length(reader)
        if length != 0:
            raise ProtocolError("this request carries no frame")

    # -- open -----------------------------------------------------------------------------------------------

    async def _open(self, request: Open, peer: str) -> dict[str, Any]:
        ticket = request.ticket
        if peer not in self.gateways:
            raise NotAuthorised(f"{peer} is not a gateway this provider serves")
        signer = await asyncio.to_thread(self.checks.hop_ticket, ticket)
        if signer != peer:
            raise TicketRefused(f"the ticket is signed by {signer}, not by the gateway opening it ({peer})")
        shard = self.runtime.shard
        if ticket.provider != self.address:
            raise TicketRefused(
                f"the ticket is for {ticket.provider}, not for this provider ({self.address})"
            )
        if (ticket.layer_start, ticket.layer_end) != (shard.span.start, shard.span.end):
            raise TicketRefused(
                f"the ticket is for layers {ticket.layer_start}:{ticket.layer_end}, not {shard.span}"
            )
        if ticket.model_root != bytes.fromhex(shard.root.removeprefix("0x")):
            raise TicketRefused(f"the ticket is for model 0x{ticket.model_root.hex()}, not {shard.root}")
        if ticket.last and not shard.span.last:
            # On the last span a ticket may name a next peer: the first hop, of a ring.
            raise TicketRefused("the ticket's route does not end where the model's layers do")
        if request.ring is not None and (ticket.last or not shard.span.last):
            raise ProtocolError("only the last hop of a ring is told when the ring stops")
        now = int(self.clock())
        if not now < ticket.expires_at <= now + self.limits.max_ticket_lifetime_s:
            raise TicketRefused(
                f"the ticket expires at {ticket.expires_at}: expired, or further off than allowed"
            )
        if ticket.max_positions > self.runtime.limits.max_session_tokens:
            # Out of this provider's room, like a full KV cache: the gateway routes around it and blames no one.
            raise ProviderBusy(
                f"the ticket allows {ticket.max_positions} positions; this provider takes at most "
                f"{self.runtime.limits.max_session_tokens} in a session"
            )
        if not ticket.last:
            parse_endpoint(ticket.next_endpoint)
        if self._sessions_per_job[ticket.job_id] >= self.limits.max_sessions_per_job:
            raise ProviderBusy(
                f"job 0x{ticket.job_id.hex()} opened {self.limits.max_sessions_per_job} sessions here"
            )
        sampler = None
        if shard.span.last:
            params = SamplingParams.from_dict(request.sampling or {})
            if params.grammar is None:
                sampler = Sampler(params)
            else:  # loading the tokenizer (once) and compiling the grammar are worth a thread, not the event loop
                sampler = await asyncio.to_thread(lambda: Sampler(params, shard.vocabulary()))
        elif request.sampling is not None:
            raise ProtocolError("only the last span samples")
        # A session id is opened once (SessionExists again), and only with room to keep its steps (ProviderBusy).
        self.runtime.open(ticket.session, ticket.job_id, max_positions=ticket.max_positions)
        self._sessions_per_job[ticket.job_id] += 1
        session = _Session(ticket, peer, sampler, request.sampling)
        if shard.span.last and not ticket.last:
            session.ring = request.ring or RingOrder(ticket.max_positions)
            session.outbox = asyncio.Queue()
        self._sessions[ticket.session] = session
        self._previous_of_unclosed[ticket.previous] += 1
        return {"ok": True}

    # -- step -----------------------------------------------------------------------------------------------

    async def _step(
        self, request: Step, reader: asyncio.StreamReader, peer: str
    ) -> tuple[dict[str, Any], torch.Tensor | None, bytes | None]:
        received = asyncio.get_running_loop().time()
        session = self._sessions.get(request.session)
        if session is None or not self.runtime.is_open(request.session):
            raise NotAuthorised(f"no open session {request.session.hex()} here")
        ticket = session.ticket
        if peer not in (ticket.previous, session.gateway):
            raise NotAuthorised(
                f"session {request.session.hex()} takes steps from {ticket.previous}, not {peer}"
            )
        if session.positions + request.positions > ticket.max_positions:
            raise ProviderBusy(f"the ticket allows {ticket.max_positions} positions in this session")
        frame = await self._read_step_frame(request.session, request.step, request.positions, reader)
        shard = self.runtime.shard

        entry = HopEntry(self.address, request.session, request.step, positions=request.positions)
        try:
            output, record, compute_ms = await self._compute(
                request.session, request.step, frame.tensor, frame.sha256
            )
        except WorkerError as exc:
            failed = HopEntry(**{**entry.__dict__, "error": HopError(exc.code, str(exc))})
            return {"report": Report.signed(self.keys.hop_report, failed).to_json()}, None, None
        session.positions += request.positions
        entry = HopEntry(
            self.address,
            request.session,
            request.step,
            record.input_hash,
            record.output_hash,
            positions=request.positions,
        )

        if shard.span.last:
            assert session.sampler is not None
            last = output[:, -1, :]
            token = session.sampler.next_token(last)
            session.tokens.append(token)
            logprobs = session.sampler.logprobs(last, token)
            entry = HopEntry(**{**entry.__dict__, "token": token, "logprobs": logprobs})
            logits = output[:, -1, :] if request.logits else None
            report = Report.signed(self.keys.hop_report, entry, None, compute_ms)
            return {"report": report.to_json()}, logits, None

        spent = asyncio.get_running_loop().time() - received
        left_s = request.budget_ms / 1e3 - spent - FORWARD_MARGIN_S
        downstream, logits, failure = await self._forward(ticket, request, output, record.output_hash, left_s)
        if failure is not None:
            entry = HopEntry(**{**entry.__dict__, "error": failure})
        report = Report.signed(self.keys.hop_report, entry, downstream, compute_ms)
        return {"report": report.to_json()}, logits, None

    async def _compute(
        self, session: bytes, step: int, inputs: torch.Tensor, input_hash: bytes
    ) -> tuple[torch.Tensor, StepRecord, float]:
        """Runs one session's step on the span, the one place steps reach the runtime: its output, its record, and
        the milliseconds of compute it took. Raises WorkerError."""
        return await self._scheduler.run(session, step, inputs, input_hash)

    async def _forward(
        self, ticket: Any, request: Step, output: torch.Tensor, output_hash: bytes, left_s: float
    ) -> tuple[Mapping[str, Any] | None, torch.Tensor | None, HopError | None]:
        """Sends the step on to the ticket's next peer with ``left_s`` of the budget; returns its report, or why
        there is none."""
        if left_s < 0.001:
            return None, None, HopError("out_of_time", "the step's budget was spent before it could go on")
        step = Step(request.session, request.step, request.positions, request.logits, int(left_s * 1e3))
        try:
            link = self.peers.get(ticket.next_endpoint, ticket.next_fingerprint, expect=ticket.next)
            reply, frame = await link.request(
                step.to_json(),
                output,
                timeout_s=left_s,
                session=request.session,
                step=request.step,
                sha256=output_hash,
                reply_frame=FrameLimits(
                    max_payload_bytes=self.runtime.shard.vocab_size * 8,
                    max_elements=self.runtime.shard.vocab_size,
                )
                if request.logits
                else None,
            )
        except (WorkerError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            if isinstance(exc, CertificateMismatch | Unauthenticated):
                code = "next_certificate_mismatch"  # not the peer the ticket pins: nothing was sent to it
            elif isinstance(exc, ProtocolError | WireError):
                code = "next_misbehaved"
            else:
                code = "next_unreachable"
            return None, None, HopError(code, f"{ticket.next_endpoint}: {exc}"[:400])
        if "report" not in reply:
            error = reply.get("error")
            detail = error.get("code") if isinstance(error, dict) else None
            return None, None, HopError("next_refused", f"{ticket.next_endpoint} refused the step ({detail})")
        downstream = reply["report"]
        # Checked before this hop signs for relaying it: the gateway blames whoever signs for a bad one.
        try:
            report = Report.from_json(downstream)
        except ProtocolError as exc:
            return None, None, HopError("next_misbehaved", f"{ticket.next_endpoint} sent no report: {exc}")
        entry = report.entry
        if (entry.provider, entry.session, entry.step) != (ticket.next, request.session, request.step) or (
            report.signer(self.checks.hop_report) != ticket.next
        ):
            return (
                None,
                None,
                HopError("next_misbehaved", f"{ticket.next_endpoint} sent a report not its own"),
            )
        return downstream, frame.tensor if frame is not None else None, None

    # -- the ring -------------------------------------------------------------------------------------------

    async def _accept_push(self, request: Push, reader: asyncio.StreamReader, peer: str) -> bool:
        """Reads a pushed step and queues it on its session; False when it is not the session's next step (read
        and dropped). Raises (and the connection is hung up on) when the sender has no business pushing it."""
        session = self._sessions.get(request.session)
        if session is None:
            raise NotAuthorised(f"no session {request.session.hex()} here")
        ticket = session.ticket
        if peer not in (ticket.previous, session.gateway):
            raise NotAuthorised(
                f"session {request.session.hex()} takes steps from {ticket.previous}, not {peer}"
            )
        if request.positions > ticket.max_positions:
            raise ProtocolError(f"the ticket allows {ticket.max_positions} positions in this session")
        frame = await self._read_step_frame(request.session, request.step, request.positions, reader)
        if session.closed:
            return True  # pushed before the sender learnt of the close: nothing is wrong with it
        if request.step != session.accepted:
            return False  # a replay, a skip, a flood: never computed
        problem = self._upstream_problem(session, request, frame, peer)
        if problem is not None:
            # Not taken, and the step stays open for its real input; this hop's signed word on what it got.
            self._account_error(session, request, HopError("bad_step_input", problem[:MAX_PROBLEM]))
            return False
        session.accepted += 1
        session.accounts[request.step] = "in_progress"
        session.accounts.pop(request.step - ACCOUNTS_KEPT, None)
        if session.queue is None:
            session.queue = asyncio.Queue()
            session.worker = asyncio.create_task(self._run_pushes(session))
        session.queue.put_nowait((request, frame, peer))
        return True

    async def _read_step_frame(
        self, session_id: bytes, step: int, positions: int, reader: asyncio.StreamReader
    ) -> Frame:
        shard = self.runtime.shard
        if shard.span.first:
            limits = FrameLimits(max_payload_bytes=positions * 8, max_elements=positions)
        else:
            width = positions * shard.hidden_size
            limits = FrameLimits(max_payload_bytes=width * 4, max_elements=width)
        timeout_s = self.limits.read_timeout_s
        async with asyncio.timeout(timeout_s):
            length = await read_frame_length(reader)
        if length == 0:
            raise ProtocolError("a step carries its input as a frame")
        async with self._budget.holding(length, timeout_s), asyncio.timeout(timeout_s):
            frame = await read_frame_body(reader, length, limits)
        if frame.session != session_id or frame.step != step:
            raise ProtocolError("the frame belongs to another session or step")
        if frame.tensor.dim() < 2 or int(frame.tensor.shape[1]) != positions:
            raise ProtocolError(
                f"the frame holds {frame.tensor.shape[1]} positions, the step says {positions}"
            )
        return frame

    async def _run_pushes(self, session: _Session) -> None:
        """A ring session's pushed steps, one after another, until it is closed (and this task cancelled)."""
        assert session.queue is not None
        while not session.closed:
            request, frame, peer = await session.queue.get()
            try:
                await self._ring_step(session, request, frame, peer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug here must not leave the step unaccounted for
                log.exception("ring step %d of session %s", request.step, request.session.hex())
                self._account_error(session, request, HopError("internal_error", repr(exc)))

    def _account_error(
        self, session: _Session, request: Push, error: HopError, entry: HopEntry | None = None
    ) -> None:
        base = entry or HopEntry(self.address, request.session, request.step, positions=request.positions)
        failed = HopEntry(**{**base.__dict__, "error": error})
        session.accounts[request.step] = Report.signed(self.keys.hop_report, failed, request.report).compact()

    async def _ring_step(self, session: _Session, request: Push, frame: Frame, peer: str) -> None:
        """Computes one pushed step, signs this hop's entry over the report it came with, and pushes the step on
        (on the last hop: the token to the first, the report to the gateway's follow stream)."""
        ticket = session.ticket
        shard = self.runtime.shard
        if session.positions + request.positions > ticket.max_positions:
            self._account_error(
                session, request, HopError("provider_busy", "the ticket's positions are spent")
            )
            return
        async with session.lock:
            if session.closed:
                return
            try:
                output, record, compute_ms = await self._compute(
                    request.session, request.step, frame.tensor, frame.sha256
                )
            except WorkerError as exc:
                self._account_error(session, request, HopError(exc.code, str(exc)[:MAX_PROBLEM]))
                return
            session.positions += request.positions
        entry = HopEntry(
            self.address,
            request.session,
            request.step,
            record.input_hash,
            record.output_hash,
            positions=request.positions,
        )
        if not shard.span.last:
            report = Report.signed(self.keys.hop_report, entry, request.report, compute_ms)
            session.accounts[request.step] = report.compact()
            onward = Push(request.session, request.step, request.positions, report.to_json(), request.logits)
            failure = await self._push(ticket, onward, output, record.output_hash)
            if failure is not None:
                self._account_error(session, request, failure, entry)
            return

        assert session.sampler is not None and session.ring is not None
        last = output[:, -1, :]
        token = session.sampler.next_token(last)
        session.tokens.append(token)
        entry = HopEntry(
            **{**entry.__dict__, "token": token, "logprobs": session.sampler.logprobs(last, token)}
        )
        report = Report.signed(self.keys.hop_report, entry, request.report, compute_ms)
        session.accounts[request.step] = report.compact()
        ring = session.ring
        if request.step + 1 < ring.steps and token not in ring.stop and not session.closed:
            # The next step's input goes first: the gateway's copy of the report is not on the token's path.
            onward = Push(request.session, request.step + 1, 1, report.compact().to_json(), request.logits)
            failure = await self._push(ticket, onward, torch.tensor([[token]], dtype=torch.int64), None)
            if failure is not None:
                self._account_error(session, request, failure, entry)
        if session.outbox is not None:
            logits = last if request.logits else None
            session.outbox.put_nowait((report.to_json(), logits, request.step))

    def _upstream_problem(self, session: _Session, request: Push, frame: Frame, peer: str) -> str | None:
        """Why a pushed step is not the input this hop may compute, or None: from the ticket's previous peer it
        comes with that peer's signed report of it (on the first span, the last hop's report of the step before,
        whose token is the frame); from the gateway with none."""
        ticket = session.ticket
        if peer != ticket.previous:  # the gateway that opened the session
            return None if request.report is None else "the gateway's steps carry no report"
        if request.report is None:
            return f"a step from {peer} carries its signed report"
        try:
            report = Report.from_json(request.report)
        except ProtocolError as exc:
            return f"the report pushed with the step is not one: {exc}"
        first = self.runtime.shard.span.first
        entry = report.entry
        step = request.step - 1 if first else request.step
        if (entry.provider, entry.session, entry.step) != (ticket.previous, request.session, step):
            return f"the report pushed with step {request.step} is not {ticket.previous}'s of step {step}"
        if entry.error is not None:
            return "the report pushed with the step is of an error"
        if first:
            ids = frame.tensor.reshape(-1)
            if frame.tensor.dtype != torch.int64 or ids.numel() != 1 or int(ids[0]) != entry.token:
                return "the token pushed is not the one the last hop signed for"
        elif entry.output != frame.sha256:
            return "the step pushed is not the output its sender signed for"
        if report.signer(self.checks.hop_report) != ticket.previous:
            return f"the report pushed with the step is not signed by {ticket.previous}"
        return None

    async def _push(
        self, ticket: Any, push: Push, tensor: torch.Tensor, sha256: bytes | None
    ) -> HopError | None:
        """Pushes a step to the ticket's next peer, one-way; why it could not, or None."""
        try:
            link = self.peers.get(ticket.next_endpoint, ticket.next_fingerprint, expect=ticket.next)
            await link.send(
                push.to_json(),
                tensor,
                session=push.session,
                step=push.step,
                sha256=sha256,
                timeout_s=self.limits.read_timeout_s,
            )
        except (WorkerError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            if isinstance(exc, CertificateMismatch | Unauthenticated):
                code = "next_certificate_mismatch"
            elif isinstance(exc, ProtocolError | WireError):
                code = "next_misbehaved"
            else:
                code = "next_unreachable"
            return HopError(code, f"{ticket.next_endpoint}: {exc}"[:MAX_PROBLEM])
        return None

    async def _follow(self, request: Follow, writer: asyncio.StreamWriter, peer: str) -> None:
        """The session's step reports, as the last hop makes them, until the session ends."""
        session = self._sessions.get(request.session)
        if session is None or session.outbox is None:
            write_message(writer, refusal("unknown_session", "no ring session of this last hop by that id"))
            await writer.drain()
            return
        if peer != session.gateway or session.followed:
            write_message(writer, refusal("not_authorised", "only its gateway follows a session, once"))
            await writer.drain()
            return
        session.followed = True
        outbox = session.outbox
        try:
            while True:
                item = await outbox.get()
                if item is _END:
                    outbox.put_nowait(_END)  # for a follower that comes back
                    write_message(writer, {"ok": True, "end": True})
                    await writer.drain()
                    return
                report, logits, step = item
                write_message(
                    writer, {"ok": True, "report": report}, logits, session=request.session, step=step
                )
                await writer.drain()
        finally:
            session.followed = False

    def _account(self, request: Account, peer: str) -> dict[str, Any]:
        session = self._sessions.get(request.session)
        if session is None:
            raise UnknownSession(f"no session {request.session.hex()} here")
        if peer != session.gateway:
            raise NotAuthorised("only the gateway that opened a session asks for its accounts")
        kept = session.accounts.get(request.step)
        if not isinstance(kept, Report):
            code = "in_progress" if kept == "in_progress" else "not_received"
            entry = HopEntry(
                self.address, request.session, request.step, error=HopError(code, f"step {request.step}")
            )
            kept = Report.signed(self.keys.hop_report, entry)
        return {"ok": True, "report": kept.to_json()}

    # -- close, fetch, prove --------------------------------------------------------------------------------

    def _close(self, request: Close, peer: str) -> dict[str, Any]:
        session = self._sessions.get(request.session)
        if session is None:
            raise UnknownSession(f"no session {request.session.hex()} here")
        if peer != session.gateway:
            raise NotAuthorised("only the gateway that opened a session closes it")
        if session.receipt is None:
            closed = self.runtime.close(request.session)
            _stop_ring(session)
            ticket = session.ticket
            shard = self.runtime.shard
            # A ring may have run past the gateway's stop: the receipt bills the steps the gateway says it took.
            records = closed.records if request.steps is None else closed.records[: request.steps]
            tokens = session.tokens[: len(records)] if shard.span.last else [None] * len(records)
            steps = [
                StepHashes(r.step, r.input_hash, r.output_hash, token, positions=r.positions)
                for r, token in zip(records, tokens, strict=True)
            ]
            session.receipt = self.keys.receipt(
                ReceiptFields(
                    job_id=ticket.job_id,
                    session=ticket.session,
                    gateway=session.gateway,
                    provider=self.address,
                    model_root=ticket.model_root,
                    layer_start=shard.span.start,
                    layer_end=shard.span.end,
                    positions=sum(r.positions for r in records),
                    transcript_root=transcript_root(steps),
                    sampling_hash=sampling_hash(session.sampling) if shard.span.last else sampling_hash(None),
                )
            )
            _count_down(self._previous_of_unclosed, ticket.previous)
        return {"ok": True, "receipt": session.receipt.to_json()}

    async def _fetch(
        self, request: Fetch, peer: str, verified: dict[FetchTicket, str]
    ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """Retained steps' inputs or outputs from ``request.step`` on, up to ``max_fetch_bytes`` in one frame, for
        the validator whose ticket names this provider and session. The ticket is verified once a connection."""
        if peer not in self.validators:
            raise NotAuthorised(f"{peer} is not a validator this provider lets read its data")
        ticket = request.ticket
        signer = verified.get(ticket)
        if signer is None:
            signer = await asyncio.to_thread(self.checks.fetch_ticket, ticket)
            verified[ticket] = signer
        if signer != peer:
            raise TicketRefused("the fetch ticket is not signed by the validator asking")
        if ticket.provider != self.address:
            raise TicketRefused(f"the fetch ticket is for {ticket.provider}, not for this provider")
        if ticket.expires_at <= int(self.clock()):
            raise TicketRefused("the fetch ticket expired")
        retained = self.runtime.retained_session(ticket.session)
        if retained.job != ticket.job_id:
            # The same answer as for a session never seen: a ticket for one job learns nothing of another.
            raise UnknownSession(f"no data kept for session {ticket.session.hex()}")
        steps = len(retained.steps)
        if request.step >= steps:
            raise ProtocolError(f"session {ticket.session.hex()} has {steps} steps")
        tensors = await asyncio.to_thread(self._read_run, ticket.session, request.step, steps, request.part)
        widths = tuple(int(t.shape[1]) for t in tensors)
        joined = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)
        return Fetched(request.step, steps, request.part, widths).to_json(), joined

    def _read_run(self, session: bytes, first: int, steps: int, part: str) -> list[torch.Tensor]:
        """Consecutive steps' ``part`` from ``first`` on, alike in dtype and trailing dims (so they join), within
        ``max_fetch_bytes``. Read off the event loop: steps keep running while a validator reads."""
        run: list[torch.Tensor] = []
        size = 0
        try:
            for step in range(first, steps):
                tensor = self.runtime.read(session, step, part)
                nbytes = tensor.numel() * tensor.element_size()
                if run and (
                    tensor.dtype != run[0].dtype
                    or tensor.shape[:1] + tensor.shape[2:] != run[0].shape[:1] + run[0].shape[2:]
                    or size + nbytes > self.limits.max_fetch_bytes
                ):
                    break
                run.append(tensor)
                size += nbytes
        except FileNotFoundError as exc:  # expired while it was read
            raise UnknownSession(f"no data kept for session {session.hex()}") from exc
        return run

    def _prove(self, request: Prove, peer: str) -> dict[str, Any]:
        if peer not in self.gateways:
            raise NotAuthorised(f"{peer} is not a gateway this provider announces itself to")
        signature = self.keys.endpoint_proof(request.challenge, request.endpoint, self.fingerprint)
        return {"ok": True, "signature": "0x" + signature.hex()}


def _stop_ring(session: _Session) -> None:
    """Ends a closed or forgotten session's ring: its queued steps are dropped, its follower told."""
    if session.worker is not None:
        session.worker.cancel()
    if session.outbox is not None:
        session.outbox.put_nowait(_END)


def _count_down(counts: dict[Any, int], key: Any) -> None:
    counts[key] -= 1
    if not counts[key]:
        del counts[key]
