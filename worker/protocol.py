"""Hop messages between the coordinator and providers, and between providers.

A message is a small JSON control part and at most one tensor frame (:mod:`worker.wire`), length-prefixed on
a persistent TCP connection:

    uint32 control length │ control (UTF-8 JSON object) │ uint64 frame length │ frame (0 bytes: none)

Control parts are tiny (ids, a route, a ticket); tensors never go through JSON. A reply answers each request
on the same connection, in order.

Requests (``"op"``):
    step    run one step of a session here, then forward to ``route[0]`` with ``route[1:]``; the frame is the
            step's input. The reply carries every hop's (input hash, output hash) from here to the end of the
            route, and from the last span the sampled token.
    close   end the session here and down the route; the reply carries every hop's signed HopReceipt.
    fetch   one retained step of a session on this provider, its ``"input"`` or ``"output"`` as the frame
            (for validators: the ticket must be signed by a trusted validator); the reply says how many steps
            the session has.

Replies: ``{"ok": true, ...}`` or ``{"ok": false, "error": {"code", "message", "hop"}}`` where ``hop`` is
the endpoint that failed, so the coordinator knows whom to route around.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass
from typing import Any

import torch

from worker.errors import ProtocolError
from worker.wire import HEADER_SIZE, Frame, FrameLimits, decode_payload, encode_frame_parts, read_header

MAX_CONTROL_BYTES = 64 * 1024  # a route of hundreds of hops and a ticket fit many times over
_CONTROL_LENGTH = struct.Struct("<I")
_FRAME_LENGTH = struct.Struct("<Q")


@dataclass(frozen=True)
class Message:
    control: dict[str, Any]
    frame: Frame | None = None


async def read_message(reader: asyncio.StreamReader, limits: FrameLimits) -> Message:
    """Reads one message; raises asyncio.IncompleteReadError at a clean end of stream."""
    (control_length,) = _CONTROL_LENGTH.unpack(await reader.readexactly(_CONTROL_LENGTH.size))
    if control_length > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control part of {control_length} bytes, the limit is {MAX_CONTROL_BYTES}")
    try:
        control = json.loads(await reader.readexactly(control_length))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"control part is not JSON: {exc}") from exc
    if not isinstance(control, dict):
        raise ProtocolError("control part must be a JSON object")
    (frame_length,) = _FRAME_LENGTH.unpack(await reader.readexactly(_FRAME_LENGTH.size))
    if frame_length == 0:
        return Message(control)
    if frame_length < HEADER_SIZE:
        raise ProtocolError(f"frame of {frame_length} bytes is shorter than a frame header")
    # The header is checked against the limits before the payload is read, so an oversized frame costs nothing.
    header = read_header(await reader.readexactly(HEADER_SIZE), limits=limits)
    if header.frame_bytes != frame_length:
        raise ProtocolError(f"frame length {frame_length} disagrees with its header ({header.frame_bytes})")
    payload = bytearray(await reader.readexactly(header.payload_bytes))
    return Message(control, decode_payload(header, payload))


def write_message(
    writer: asyncio.StreamWriter,
    control: dict[str, Any],
    tensor: torch.Tensor | None = None,
    *,
    session: bytes = b"",
    step: int = 0,
) -> None:
    """Queues one message on ``writer``; the caller drains."""
    body = json.dumps(control, separators=(",", ":")).encode()
    writer.write(_CONTROL_LENGTH.pack(len(body)) + body)
    if tensor is None:
        writer.write(_FRAME_LENGTH.pack(0))
        return
    header, payload = encode_frame_parts(tensor, session=session, step=step)
    writer.write(_FRAME_LENGTH.pack(len(header) + len(payload)) + header)
    writer.write(payload)


def error_reply(code: str, message: str, hop: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message, "hop": hop}}
