"""JSON from strangers, parsed with a bound on its nesting.

Python's JSON parser recurses once per level of nesting, and a dependency of ours (py_ecc, through eth-account)
raises the interpreter's recursion limit to 100,000: a document nested a few hundred thousand levels deep then
overflows the C stack and kills the process outright (no RecursionError to catch). Anything that parses JSON a
peer, a client or a gateway sent goes through ``loads``, which measures the nesting first.

The measure strips string literals (where brackets are text) with one regular expression, keeps only the
brackets, and takes the running sum of +1 and -1 over them with numpy: linear in the document, and at C speed
(a few milliseconds a megabyte), since an unpaid request is measured before anything else.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import numpy as np

__all__ = ["MAX_DEPTH", "TooDeep", "loads"]

# Every document this project exchanges nests under a dozen levels; a JSON schema a client sends, deeper, and the
# grammar library refuses schemas past 128 levels anyway.
MAX_DEPTH: Final = 256
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # unrolled: no alternation per character
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class TooDeep(ValueError):
    """A document nested deeper than its reader takes."""


def loads(data: str | bytes | bytearray, *, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` of ``data``, refusing (TooDeep, a ValueError) a document nested past ``max_depth``."""
    raw = data.encode("utf-8", errors="surrogatepass") if isinstance(data, str) else bytes(data)
    check_depth(raw, max_depth)
    return json.loads(raw)


def check_depth(raw: bytes, max_depth: int = MAX_DEPTH) -> None:
    """Raises TooDeep when the JSON text ``raw`` nests past ``max_depth``; malformed text is left to the parser."""
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return  # too few openings to nest that deep, strings included
    brackets = np.frombuffer(_STRING.sub(b'""', raw).translate(None, _NOT_BRACKETS), dtype=np.uint8)
    # "[" and "{" are 0x5B and 0x7B, "]" and "}" 0x5D and 0x7D: the bit of value 2 is set on the opening ones.
    steps = (brackets & 2).astype(np.int32) - 1
    if brackets.size and int(np.cumsum(steps).max()) > max_depth:
        raise TooDeep(f"JSON nested deeper than {max_depth} levels")
