"""What a provider attests to when a session ends, and the seams through which it signs and checks.

The EIP-712 encodings live with the other typed data in ``settlement.eip712``; the provider node only needs
something that signs a :class:`ReceiptFields` and something that checks a job ticket, and is handed both by
whoever starts it (``strata provider serve``). That keeps this package free of the money layer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the runtime pulls in torch; signing and checking receipts need none of it
    from worker.runtime import StepRecord


@dataclass(frozen=True)
class TicketGrant:
    """What a valid job ticket allows: serving ``job_id`` for ``model_root`` until ``expires_at`` (unix s)."""

    job_id: bytes
    model_root: bytes
    expires_at: int
    gateway: str


@dataclass(frozen=True)
class ReceiptFields:
    """A provider's account of one session: HopReceipt's fields."""

    job_id: bytes  # 32 bytes
    provider: str  # checksummed address
    model_root: bytes  # 32 bytes
    layer_start: int
    layer_end: int
    tokens: int  # positions processed; token-layers billed = tokens × (layer_end - layer_start)
    transcript_root: bytes  # 32 bytes, see transcript_root()


class TicketVerifier(Protocol):
    def __call__(self, ticket: Mapping[str, object], *, now: int) -> TicketGrant:
        """Checks a ticket as it arrived in a hop message (signature by a trusted gateway, expiry); raises
        TicketRefused."""
        ...


class ReceiptSigner(Protocol):
    address: str

    def __call__(self, fields: ReceiptFields) -> bytes:
        """Signs the receipt; returns a 65-byte signature."""
        ...


def transcript_root(records: list[StepRecord]) -> bytes:
    """The root of a session's steps on one provider; see :func:`transcript_root_of`."""
    return transcript_root_of([(r.step, r.input_hash, r.output_hash) for r in records])


def transcript_root_of(steps: list[tuple[int, bytes, bytes]]) -> bytes:
    """sha256 over each step's (step, input hash, output hash), in step order.

    The gateway recomputes it from the transcript that came back with each step, and checks that every hop's
    input hash is the previous hop's output hash.
    """
    digest = hashlib.sha256()
    for step, input_hash, output_hash in steps:
        digest.update(step.to_bytes(4, "big") + input_hash + output_hash)
    return digest.digest()
