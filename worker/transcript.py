"""Transcripts and receipts, in one place: what a hop's steps add up to, how hops link, and when a receipt
bills. The hop server builds receipts with it; the gateway's coordinator and settlement's metering check them
with the same rules.

A hop's transcript is its steps, each ``(step, positions, input hash, output hash)`` (the positions it
received, sha256 of the frames' payloads); the last span's steps also carry the token it emitted. Its root is
sha256 over the steps in order, each as ``step (uint32 BE) ‖ positions (uint32 BE) ‖ input ‖ output`` and, on the
last span, ``‖ token (uint32 BE)``: a receipt therefore commits to the positions of every step, which its
``positions`` must add up to, and the last span's to every token the client was sent. A route's transcripts
link when each hop's input is the previous hop's output, step by step, and the first hop's input is what the
gateway sent.

A receipt bills when it is signed by the provider it names, for the gateway, job, session, model and span the
gateway asked for, over exactly the positions the gateway sent, its transcript root is the root of the entries
that hop authenticated as the route ran, and (on the last span) it commits to the sampling parameters the
session was opened with: a validator checks the emitted tokens under those.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from worker.messages import SignedReceipt
from worker.trust import ReceiptFields

NO_SAMPLING = bytes(32)  # the sampling hash of every span but the last


@dataclass(frozen=True)
class StepHashes:
    step: int
    input: bytes
    output: bytes
    token: int | None = None  # the last span's emitted token
    positions: int = field(kw_only=True)  # the positions the step's input held

    def leaf(self) -> bytes:
        leaf = self.step.to_bytes(4, "big") + self.positions.to_bytes(4, "big") + self.input + self.output
        return leaf if self.token is None else leaf + self.token.to_bytes(4, "big")

    def to_row(self) -> list[Any]:
        """The step as the hops table keeps it: [step, positions, "0x…input", "0x…output"], and the token on the
        last span."""
        row: list[Any] = [self.step, self.positions, "0x" + self.input.hex(), "0x" + self.output.hex()]
        return row if self.token is None else [*row, self.token]

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> StepHashes:
        """Raises ValueError or TypeError on a row that is not one."""
        step, positions, input_hash, output_hash, *token = row
        if len(token) > 1:
            raise ValueError(f"a transcript row has 4 or 5 fields, not {len(row)}")
        return cls(
            int(step),
            bytes.fromhex(str(input_hash).removeprefix("0x")),
            bytes.fromhex(str(output_hash).removeprefix("0x")),
            int(token[0]) if token else None,
            positions=int(positions),
        )


def transcript_root(steps: Sequence[StepHashes]) -> bytes:
    digest = hashlib.sha256()
    for entry in steps:
        digest.update(entry.leaf())
    return digest.digest()


def sampling_hash(sampling: Mapping[str, Any] | None) -> bytes:
    """What the last span's receipt commits to about how it sampled: the parameters as it received them, the
    seed included; NO_SAMPLING on other spans."""
    if sampling is None:
        return NO_SAMPLING
    return hashlib.sha256(json.dumps(sampling, sort_keys=True, separators=(",", ":")).encode()).digest()


def links(sent: bytes, hops: Sequence[StepHashes]) -> int | None:
    """The position of the first hop whose input is not what reached it, or None when the step links."""
    expected = sent
    for position, entry in enumerate(hops):
        if entry.input != expected:
            return position
        expected = entry.output
    return None


class ReceiptChecker(Protocol):
    def __call__(self, receipt: SignedReceipt) -> str:
        """The address that signed the receipt; raises ValueError when no signer can be recovered."""
        ...


def receipt_bills(receipt: SignedReceipt, expected: ReceiptFields, signer_of: ReceiptChecker) -> str | None:
    """None when the receipt bills the hop; else why not. ``expected`` is what it must say, from the gateway's own
    records (on the last span, ``sampling_hash`` of the parameters the session was opened with)."""
    said = (
        receipt.job_id,
        receipt.session,
        receipt.gateway,
        receipt.provider,
        receipt.model_root,
        receipt.layer_start,
        receipt.layer_end,
    )
    wanted = (
        expected.job_id,
        expected.session,
        expected.gateway,
        expected.provider,
        expected.model_root,
        expected.layer_start,
        expected.layer_end,
    )
    if said != wanted:
        return "the receipt is for another job, session, gateway, provider, model or span"
    if receipt.positions != expected.positions:
        return f"the receipt bills {receipt.positions} positions; {expected.positions} were sent"
    if receipt.transcript_root != expected.transcript_root:
        return "the receipt's transcript root is not the root of the steps the hop reported"
    if receipt.sampling_hash != expected.sampling_hash:
        return "the receipt commits to other sampling parameters than the session was opened with"
    try:
        signer = signer_of(receipt)
    except ValueError as exc:
        return f"the receipt's signature does not recover: {exc}"
    if signer != expected.provider:
        return f"the receipt is signed by {signer}, not by {expected.provider}"
    return None


def receipt_is_false(receipt: SignedReceipt, expected: ReceiptFields, signer_of: ReceiptChecker) -> bool:
    """Whether a receipt that does not bill its hop (``receipt_bills``) is its provider's own false word: signed
    by the provider, for this job, session and gateway, yet saying other than what the gateway recorded of the
    hop. Unlike a missing receipt, an unsigned one or someone else's, that is evidence against the provider."""
    try:
        signer = signer_of(receipt)
    except ValueError:
        return False
    about = (receipt.job_id, receipt.session, receipt.gateway)
    return signer == expected.provider and about == (expected.job_id, expected.session, expected.gateway)
