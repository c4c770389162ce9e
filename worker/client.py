"""Persistent connections to providers: one per endpoint, requests answered in order."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from typing import Any

import torch

from worker.errors import HopFailed, HopUnreachable, ProtocolError, WireError
from worker.protocol import Message, read_message, write_message
from worker.wire import FrameLimits


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProtocolError(f"{endpoint!r} is not a host:port endpoint")
    return host.strip("[]"), int(port)


class HopConnection:
    """A connection to one provider, opened on first use and again after it breaks."""

    def __init__(self, endpoint: str, limits: FrameLimits, *, connect_timeout_s: float = 5.0) -> None:
        self.endpoint = endpoint
        self.host, self.port = parse_endpoint(endpoint)
        self.limits = limits
        self.connect_timeout_s = connect_timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def request(
        self,
        control: dict[str, Any],
        tensor: torch.Tensor | None = None,
        *,
        session: bytes = b"",
        step: int = 0,
    ) -> Message:
        async with self._lock:
            try:
                reader, writer = await self._connected()
                write_message(writer, control, tensor, session=session, step=step)
                await writer.drain()
                return await read_message(reader, self.limits)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                await self._drop()
                raise HopUnreachable(f"{self.endpoint}: {exc!r}") from exc
            except (ProtocolError, WireError):
                await self._drop()  # the stream's framing can no longer be trusted
                raise
            except BaseException:
                # Cancelled mid-exchange (a caller's timeout): the reply may still arrive and would be read as
                # the answer to the next request, so this connection is done. No await: we are being cancelled.
                self._abandon()
                raise

    async def _connected(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None or self._writer.is_closing():
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.connect_timeout_s
            )
            sock = writer.get_extra_info("socket")
            if sock is not None:
                # Steps are small request/response exchanges: Nagle's delay would add up at every hop.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._reader, self._writer = reader, writer
        return self._reader, self._writer

    def _abandon(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def _drop(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):  # already gone: nothing left to close
                await self._writer.wait_closed()
        self._reader = self._writer = None

    async def close(self) -> None:
        async with self._lock:
            await self._drop()


class ConnectionPool:
    def __init__(self, limits: FrameLimits) -> None:
        self.limits = limits
        self._connections: dict[str, HopConnection] = {}

    def get(self, endpoint: str) -> HopConnection:
        connection = self._connections.get(endpoint)
        if connection is None:
            connection = self._connections[endpoint] = HopConnection(endpoint, self.limits)
        return connection

    async def close(self) -> None:
        for connection in self._connections.values():
            await connection.close()
        self._connections.clear()


@dataclass(frozen=True)
class StepResult:
    token: int
    transcript: list[dict[str, Any]]  # one entry per hop: provider, span, input hash, output hash
    logits: torch.Tensor | None = None  # the last position's (1, vocab), when asked for


class RouteClient:
    """Drives sessions along one route of providers; the route's first endpoint is the only one contacted."""

    def __init__(self, route: list[str], ticket: dict[str, Any], pool: ConnectionPool) -> None:
        if not route:
            raise ValueError("a route needs at least one provider")
        self.route = route
        self.ticket = ticket
        self.pool = pool

    async def step(
        self,
        session: bytes,
        step: int,
        token_ids: torch.Tensor,
        sampling: dict[str, Any] | None = None,
        *,
        logits: bool = False,
    ) -> StepResult:
        control: dict[str, Any] = {
            "op": "step",
            "session": session.hex(),
            "step": step,
            "route": self.route[1:],
            "ticket": self.ticket,
        }
        if sampling is not None:
            control["sampling"] = sampling
        if logits:
            control["logits"] = True
        message = await self.pool.get(self.route[0]).request(control, token_ids, session=session, step=step)
        reply = _checked(message)
        token, transcript = reply.get("token"), reply.get("transcript")
        if not isinstance(token, int) or not isinstance(transcript, list):
            raise ProtocolError("a step reply must carry a token and a transcript")
        return StepResult(token, transcript, message.frame.tensor if message.frame is not None else None)

    async def close(self, session: bytes) -> list[dict[str, Any]]:
        control = {"op": "close", "session": session.hex(), "route": self.route[1:], "ticket": self.ticket}
        reply = _checked(await self.pool.get(self.route[0]).request(control))
        receipts = reply.get("receipts")
        if not isinstance(receipts, list):
            raise ProtocolError("a close reply must carry receipts")
        return receipts

    async def generate(
        self,
        session: bytes,
        prompt: list[int],
        *,
        max_tokens: int,
        sampling: dict[str, Any] | None = None,
        stop_token_ids: frozenset[int] = frozenset(),
        logits: bool = False,
    ) -> tuple[list[int], list[StepResult]]:
        """Prefill, then one step per token until ``max_tokens`` or a stop token. Does not close the session."""
        prompt_ids = torch.tensor([prompt], dtype=torch.int64)
        results = [await self.step(session, 0, prompt_ids, sampling or {}, logits=logits)]
        while len(results) < max_tokens and results[-1].token not in stop_token_ids:
            last = torch.tensor([[results[-1].token]], dtype=torch.int64)
            results.append(await self.step(session, len(results), last, logits=logits))
        return [r.token for r in results], results


@dataclass(frozen=True)
class RetainedStep:
    """One step of a session as the provider kept it."""

    step: int
    input: torch.Tensor
    output: torch.Tensor
    input_hash: bytes  # sha256 of the frames' payloads, as received
    output_hash: bytes


async def fetch_retained(
    connection: HopConnection, session: bytes, ticket: dict[str, Any], *, max_steps: int
) -> list[RetainedStep]:
    """Every retained step of ``session`` on the provider behind ``connection`` (for validators).

    Raises HopFailed with the provider's code when it does not have them, ProtocolError when it answers out of
    turn or claims more than ``max_steps`` steps.
    """

    async def part(step: int, name: str) -> tuple[int, Message]:
        control = {"op": "fetch", "session": session.hex(), "ticket": ticket, "step": step, "part": name}
        message = await connection.request(control)
        reply = _checked(message)
        count = reply.get("steps")
        if (
            reply.get("step") != step
            or not isinstance(count, int)
            or not 0 < count <= max_steps
            or message.frame is None
        ):
            raise ProtocolError(f"{connection.endpoint} answered fetch of step {step} with something else")
        return count, message

    steps: list[RetainedStep] = []
    count = 1
    while len(steps) < count:
        step = len(steps)
        count, inputs = await part(step, "input")
        _, outputs = await part(step, "output")
        assert inputs.frame is not None and outputs.frame is not None
        steps.append(
            RetainedStep(
                step, inputs.frame.tensor, outputs.frame.tensor, inputs.frame.sha256, outputs.frame.sha256
            )
        )
    return steps


def _checked(message: Message) -> dict[str, Any]:
    control = message.control
    if control.get("ok") is True:
        return control
    error = control.get("error")
    if not isinstance(error, dict):
        raise ProtocolError("an error reply without an error")
    raise HopFailed(str(error.get("code")), str(error.get("message")), str(error.get("hop")))
