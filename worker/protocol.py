"""Framing of hop messages on a connection: a JSON control part (:mod:`worker.messages`), then at most one
tensor frame (:mod:`worker.wire`), length-prefixed:

    uint32 control length │ control (UTF-8 JSON object) │ uint64 frame length │ frame (0 bytes: none)

The parts are read separately so that a receiver decides, from the control part and what it already knows
(the session, the model), how large a frame it will take before it reads one: an oversized or unwanted frame is
refused from its length and header alone, and the connection dropped, since its payload was never read.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import torch

from worker import jsontext
from worker.errors import ProtocolError
from worker.wire import HEADER_SIZE, Frame, FrameLimits, decode_payload, encode_frame_parts, read_header

# A report of hundreds of hops fits many times over; an open's sampling may carry a grammar (64 KiB at most) and
# a session's context of token ids.
MAX_CONTROL_BYTES = 512 * 1024
_CONTROL_LENGTH = struct.Struct("<I")
_FRAME_LENGTH = struct.Struct("<Q")


async def read_control(reader: asyncio.StreamReader, *, limit: int = MAX_CONTROL_BYTES) -> dict[str, Any]:
    """Reads one control part; raises asyncio.IncompleteReadError at a clean end of stream."""
    (length,) = _CONTROL_LENGTH.unpack(await reader.readexactly(_CONTROL_LENGTH.size))
    if length > limit:
        raise ProtocolError(f"control part of {length} bytes, the limit here is {limit}")
    body = await reader.readexactly(length)
    try:
        control = jsontext.loads(body)
    except (ValueError, RecursionError) as exc:
        # ValueError covers malformed JSON, bad UTF-8, integers past Python's digit limit and nesting past
        # jsontext's bound: whatever a peer sends is its error, never ours.
        raise ProtocolError(f"control part is not JSON we take: {type(exc).__name__}") from exc
    if not isinstance(control, dict):
        raise ProtocolError("control part must be a JSON object")
    return control


async def read_frame_length(reader: asyncio.StreamReader) -> int:
    (length,) = _FRAME_LENGTH.unpack(await reader.readexactly(_FRAME_LENGTH.size))
    return int(length)


async def read_frame_body(reader: asyncio.StreamReader, length: int, limits: FrameLimits) -> Frame:
    """The frame of ``length`` bytes after its length prefix; its header is checked against ``limits`` before a
    payload byte is read."""
    if length < HEADER_SIZE:
        raise ProtocolError(f"frame of {length} bytes is shorter than a frame header")
    header = read_header(await reader.readexactly(HEADER_SIZE), limits=limits)
    if header.frame_bytes != length:
        raise ProtocolError(f"frame length {length} disagrees with its header ({header.frame_bytes})")
    payload = bytearray(await reader.readexactly(header.payload_bytes))
    return decode_payload(header, payload)


async def read_frame(reader: asyncio.StreamReader, limits: FrameLimits | None) -> Frame | None:
    """The frame after a control part, or None when there is none; ``limits`` None takes no frame at all."""
    length = await read_frame_length(reader)
    if length == 0:
        return None
    if limits is None:
        raise ProtocolError("this message carries no frame")
    return await read_frame_body(reader, length, limits)


def write_message(
    writer: asyncio.StreamWriter,
    control: dict[str, Any],
    tensor: torch.Tensor | None = None,
    *,
    session: bytes = bytes(16),
    step: int = 0,
    sha256: bytes | None = None,
) -> None:
    """Queues one message on ``writer``; the caller drains. ``sha256`` is the payload's digest when the caller
    already has it (a runtime step hashed its output), so the hot path hashes each output once."""
    body = json.dumps(control, separators=(",", ":")).encode()
    writer.write(_CONTROL_LENGTH.pack(len(body)) + body)
    if tensor is None:
        writer.write(_FRAME_LENGTH.pack(0))
        return
    header, payload = encode_frame_parts(tensor, session=session, step=step, sha256=sha256)
    writer.write(_FRAME_LENGTH.pack(len(header) + len(payload)) + header)
    writer.write(payload)
