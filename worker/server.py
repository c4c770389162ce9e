"""The hop server: one provider's span behind a TCP port, forwarding each step straight to the next provider.

A step enters the first provider, runs its span, and travels provider to provider along the route it carries;
no coordinator sits between hops. The reply travels back up the same connections, each provider putting its
own (input hash, output hash) in front of the transcript, so the caller sees every hop. The last provider
samples the next token. Closing a session walks the route the same way, each provider adding its signed
HopReceipt.

A validator fetches a session's retained steps one tensor at a time (``fetch``), for as long as the runtime
keeps them (``RuntimeLimits.retention_s``). Its request carries a ticket for the session's job signed by a
trusted validator: the hidden states are the client's data, and tickets the gateway issued travel along the
route, so a gateway ticket never unlocks them.

The job ticket is checked when a session opens (step 0): its signature, its expiry, and that it is for this
model. Later messages of the session must carry the same job id; re-checking the signature on every token
would cost more than the hop itself.

Compute runs on the event loop's thread, one step at a time: a provider has one accelerator, and while a step
waits for the providers downstream the loop is free to serve others.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from worker.client import ConnectionPool, parse_endpoint
from worker.errors import ProtocolError, TicketRefused, UnknownSession, WireError, WorkerError
from worker.protocol import Message, error_reply, read_message, write_message
from worker.receipts import ReceiptFields, ReceiptSigner, TicketGrant, TicketVerifier, transcript_root
from worker.runtime import SpanRuntime
from worker.sampling import Sampler, SamplingParams
from worker.wire import FrameLimits

log = logging.getLogger(__name__)

MAX_ROUTE = 256


@dataclass
class _SessionMeta:
    grant: TicketGrant
    job: str  # the ticket's jobId as sent, compared on every later message
    sampler: Sampler | None


class HopServer:
    def __init__(
        self,
        runtime: SpanRuntime,
        *,
        endpoint: str,
        verify_ticket: TicketVerifier,
        sign_receipt: ReceiptSigner,
        verify_fetch: TicketVerifier | None = None,
        limits: FrameLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.runtime = runtime
        self.endpoint = endpoint
        self.verify_ticket = verify_ticket
        self.sign_receipt = sign_receipt
        self.verify_fetch = verify_fetch  # None: no validator may fetch retained steps
        self.clock = clock
        hidden = runtime.shard.hidden_size
        self.limits = limits or FrameLimits(
            max_payload_bytes=runtime.limits.max_session_tokens * hidden * 4,
            max_elements=runtime.limits.max_session_tokens * hidden,
        )
        self.peers = ConnectionPool(self.limits)
        self._sessions: dict[bytes, _SessionMeta] = {}
        self._server: asyncio.Server | None = None
        self._expiry: asyncio.Task[None] | None = None

    @property
    def span(self) -> list[int]:
        return [self.runtime.shard.span.start, self.runtime.shard.span.end]

    async def start(self, host: str, port: int, *, expire_every_s: float = 10.0) -> asyncio.Server:
        self._server = await asyncio.start_server(self._serve_connection, host, port)
        self._expiry = asyncio.create_task(self._expire_periodically(expire_every_s))
        return self._server

    async def _expire_periodically(self, every_s: float) -> None:
        """Frees the KV caches of abandoned sessions and the retained steps of old ones."""
        while True:
            await asyncio.sleep(every_s)
            self.runtime.expire()
            for session in [s for s in self._sessions if not self.runtime.is_open(s)]:
                del self._sessions[session]

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.peers.close()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                try:
                    message = await read_message(reader, self.limits)
                except asyncio.IncompleteReadError:
                    return  # the peer closed the connection between messages
                except (ProtocolError, WireError) as exc:
                    # The stream's framing is lost: answer once, then hang up.
                    write_message(writer, error_reply(exc.code, str(exc), self.endpoint))
                    await writer.drain()
                    return
                try:
                    reply, tensor = await self._dispatch(message)
                except Exception:  # a bug here must not take the connection, or other sessions, down with it
                    log.exception("hop request failed")
                    reply, tensor = error_reply("internal_error", "the provider failed", self.endpoint), None
                frame = message.frame
                write_message(
                    writer,
                    reply,
                    tensor,
                    session=frame.session if frame is not None else bytes(16),
                    step=frame.step if frame is not None else 0,
                )
                await writer.drain()
        except (ConnectionError, OSError) as exc:
            log.info("connection dropped: %s", exc)
        finally:
            writer.close()

    async def _dispatch(self, message: Message) -> tuple[dict[str, Any], torch.Tensor | None]:
        op = message.control.get("op")
        try:
            if op == "step":
                return await self._step(message)
            if op == "close":
                return await self._close(message), None
            if op == "fetch":
                return self._fetch(message.control)
            raise ProtocolError(f"unknown op {op!r}")
        except WorkerError as exc:
            return error_reply(exc.code, str(exc), self.endpoint), None
        except ValueError as exc:  # invalid sampling parameters and the like
            return error_reply("bad_request", str(exc), self.endpoint), None

    # -- parsing ------------------------------------------------------------------------------------------

    @staticmethod
    def _session_id(control: dict[str, Any]) -> bytes:
        value = control.get("session")
        if not isinstance(value, str) or len(value) != 32:
            raise ProtocolError("session must be 16 bytes of hex")
        try:
            return bytes.fromhex(value)
        except ValueError as exc:
            raise ProtocolError("session must be 16 bytes of hex") from exc

    @staticmethod
    def _route(control: dict[str, Any]) -> list[str]:
        route = control.get("route", [])
        if (
            not isinstance(route, list)
            or len(route) > MAX_ROUTE
            or not all(isinstance(e, str) for e in route)
        ):
            raise ProtocolError(f"route must be a list of at most {MAX_ROUTE} host:port endpoints")
        for endpoint in route:
            parse_endpoint(endpoint)
        return route

    def _authorised(self, session: bytes, control: dict[str, Any]) -> _SessionMeta:
        meta = self._sessions.get(session)
        if meta is None:
            raise UnknownSession(f"no open session {session.hex()}")
        ticket = control.get("ticket")
        if not isinstance(ticket, dict) or ticket.get("jobId") != meta.job:
            raise ProtocolError("the ticket does not match the session's job")
        return meta

    # -- operations ---------------------------------------------------------------------------------------

    async def _step(self, message: Message) -> tuple[dict[str, Any], torch.Tensor | None]:
        control = message.control
        session = self._session_id(control)
        step = control.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ProtocolError("step must be a non-negative integer")
        route = self._route(control)
        frame = message.frame
        if frame is None:
            raise ProtocolError("a step carries its input as a frame")
        if frame.session != session or frame.step != step:
            raise ProtocolError("the frame belongs to another session or step")
        last = self.runtime.shard.span.last
        if last and route:
            raise ProtocolError("the route goes on past the last layer")
        if not last and not route:
            raise ProtocolError(
                f"the route ends at layer {self.runtime.shard.span.end}, before the last layer"
            )

        meta = self._open(session, control) if step == 0 else self._authorised(session, control)
        started = time.perf_counter()
        output, record = self.runtime.step(session, step, frame.tensor, input_hash=frame.sha256)
        own = {
            "provider": self.sign_receipt.address,
            "span": self.span,
            "in": record.input_hash.hex(),
            "out": record.output_hash.hex(),
            # Compute time of this hop, so a caller can tell transport from compute (not part of any receipt).
            "compute_ms": round((time.perf_counter() - started) * 1e3, 3),
        }

        if last:
            assert meta.sampler is not None
            token = meta.sampler.next_token(output[:, -1, :])
            logits = output[:, -1, :] if control.get("logits") is True else None
            return {"ok": True, "token": token, "transcript": [own]}, logits

        forwarded: dict[str, Any] = {
            key: control[key]
            for key in ("op", "session", "step", "ticket", "sampling", "logits")
            if key in control
        }
        forwarded["route"] = route[1:]
        reply = await self.peers.get(route[0]).request(forwarded, output, session=session, step=step)
        if reply.control.get("ok") is not True:
            return reply.control, None
        transcript = reply.control.get("transcript")
        if not isinstance(transcript, list):
            raise ProtocolError(f"{route[0]} replied without a transcript")
        logits = reply.frame.tensor if reply.frame is not None else None
        return {**reply.control, "transcript": [own, *transcript]}, logits

    def _open(self, session: bytes, control: dict[str, Any]) -> _SessionMeta:
        ticket = control.get("ticket")
        grant = self.verify_ticket(ticket if isinstance(ticket, dict) else {}, now=int(self.clock()))
        root = bytes.fromhex(self.runtime.shard.root.removeprefix("0x"))
        if grant.model_root != root:
            raise TicketRefused(
                f"the ticket is for model 0x{grant.model_root.hex()}, this provider serves {self.runtime.shard.root}"
            )
        sampler = None
        if self.runtime.shard.span.last:
            sampling = control.get("sampling", {})
            if not isinstance(sampling, dict):
                raise ProtocolError("sampling must be an object")
            sampler = Sampler(SamplingParams.from_dict(sampling))
        self.runtime.open(session, grant.job_id)
        meta = _SessionMeta(grant, str(ticket["jobId"]), sampler)  # type: ignore[index]
        self._sessions[session] = meta
        return meta

    async def _close(self, message: Message) -> dict[str, Any]:
        control = message.control
        session = self._session_id(control)
        route = self._route(control)
        meta = self._authorised(session, control)
        closed = self.runtime.close(session)
        del self._sessions[session]
        shard = self.runtime.shard
        fields = ReceiptFields(
            job_id=meta.grant.job_id,
            provider=self.sign_receipt.address,
            model_root=meta.grant.model_root,
            layer_start=shard.span.start,
            layer_end=shard.span.end,
            tokens=closed.tokens,
            transcript_root=transcript_root(closed.records),
        )
        own = {
            "provider": fields.provider,
            "span": self.span,
            "tokens": fields.tokens,
            "transcriptRoot": fields.transcript_root.hex(),
            "signature": self.sign_receipt(fields).hex(),
        }
        if not route:
            return {"ok": True, "receipts": [own]}
        forwarded = {
            "op": "close",
            "session": control["session"],
            "ticket": control["ticket"],
            "route": route[1:],
        }
        reply = await self.peers.get(route[0]).request(forwarded)
        if reply.control.get("ok") is not True:
            return reply.control
        receipts = reply.control.get("receipts")
        if not isinstance(receipts, list):
            raise ProtocolError(f"{route[0]} replied without receipts")
        return {"ok": True, "receipts": [own, *receipts]}

    def _fetch(self, control: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
        """One retained step's input or output, for a validator holding a ticket for the session's job."""
        session = self._session_id(control)
        if self.verify_fetch is None:
            raise TicketRefused("this provider trusts no validator")
        ticket = control.get("ticket")
        grant = self.verify_fetch(ticket if isinstance(ticket, dict) else {}, now=int(self.clock()))
        step, part = control.get("step"), control.get("part")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ProtocolError("step must be a non-negative integer")
        if part not in ("input", "output"):
            raise ProtocolError('part must be "input" or "output"')
        retained = self.runtime.retained_session(session)
        if retained.job != grant.job_id:
            # The same answer as for a session never seen: a ticket for one job learns nothing of another.
            raise UnknownSession(f"no data kept for session {session.hex()}")
        records = retained.records
        if step >= len(records):
            raise ProtocolError(f"session {session.hex()} has {len(records)} steps")
        record = records[step]
        tensor = record.input if part == "input" else record.output
        return {"ok": True, "step": record.step, "steps": len(records), "part": part}, tensor
