"""Control parts as a hostile peer may send them: whatever the bytes, reading them raises ProtocolError (the
peer's fault, answered with a refusal) and never anything a server would treat as its own failure."""

from __future__ import annotations

import asyncio
import struct
import subprocess
import sys

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


def test_a_control_part_nested_to_the_limit_is_refused_in_a_process_that_raised_its_recursion_limit() -> None:
    """eth-account's py_ecc raises the recursion limit to 100,000, past what the C stack holds: json.loads of a
    deep enough document then kills the process (SIGSEGV) instead of raising. In a child process, so that a
    regression fails this test rather than the whole run."""
    script = (
        "import asyncio, struct, sys\n"
        "import marketplace.cli, eth_account  # what a provider, gateway or validator imports\n"
        "from worker.errors import ProtocolError\n"
        "from worker.protocol import MAX_CONTROL_BYTES, read_control\n"
        "assert sys.getrecursionlimit() >= 100_000\n"
        'body = (b\'{"report":{"entry":{"logprobs":\' + b\'[\' * MAX_CONTROL_BYTES)[:MAX_CONTROL_BYTES]\n'
        "async def main():\n"
        "    reader = asyncio.StreamReader()\n"
        "    reader.feed_data(struct.pack('<I', len(body)) + body)\n"
        "    reader.feed_eof()\n"
        "    try:\n"
        "        await read_control(reader)\n"
        "    except ProtocolError as exc:\n"
        "        print('refused:', exc)\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: control part is not JSON we take: TooDeep" in done.stdout
