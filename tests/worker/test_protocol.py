"""Control parts as a hostile peer may send them: whatever the bytes, reading them raises ProtocolError (the
peer's fault, answered with a refusal) and never anything a server would treat as its own failure."""

from __future__ import annotations

import asyncio
import struct

import pytest

from worker.errors import ProtocolError
from worker.protocol import read_control


def _read(body: bytes, *, limit: int = 64 * 1024) -> dict[str, object]:
    async def run() -> dict[str, object]:
        reader = asyncio.StreamReader()
        reader.feed_data(struct.pack("<I", len(body)) + body)
        reader.feed_eof()
        return await read_control(reader, limit=limit)

    return asyncio.run(run())


def test_a_control_part_is_a_json_object() -> None:
    assert _read(b'{"op": "step", "step": 3}') == {"op": "step", "step": 3}


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 20_000 + b"]" * 20_000,  # nested deeper than the parser's stack
        b'{"step": ' + b"9" * 5_000 + b"}",  # an integer past Python's digit limit
        b'{"op": "\xff\xfe"}',  # not UTF-8
        b'{"op": "step"',  # cut short
        b"",
    ],
    ids=["deep", "huge-int", "bad-utf8", "truncated", "empty"],
)
def test_malformed_control_parts_are_the_peers_error(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        _read(body, limit=1 << 20)


@pytest.mark.parametrize("body", [b"[]", b'"step"', b"3", b"null"])
def test_a_control_part_that_is_not_an_object(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="JSON object"):
        _read(body)


def test_a_control_part_over_the_limit_is_refused_from_its_length() -> None:
    async def run() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(struct.pack("<I", 1 << 30))  # its body never comes: it is not waited for
        await read_control(reader, limit=1024)

    with pytest.raises(ProtocolError, match="limit"):
        asyncio.run(run())
