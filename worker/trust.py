"""The seams through which a party of the hop protocol signs with its key and checks others' signatures.

The EIP-712 encodings live with the other typed data in settlement.eip712, and settlement.tickets implements
these for a key and a deployment; the provider node is handed them by whoever assembles it. That keeps this
package free of the money layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from worker.messages import FetchTicket, HopTicket, SignedReceipt


@dataclass(frozen=True)
class ReceiptFields:
    """What a provider signs when a session ends: HopReceipt's fields."""

    job_id: bytes
    session: bytes
    gateway: str
    provider: str
    model_root: bytes
    layer_start: int
    layer_end: int
    positions: int  # positions processed; token-layers billed = positions × (layer_end - layer_start)
    transcript_root: bytes
    sampling_hash: bytes


class Keys(Protocol):
    """A party's key: it proves who the party is on a connection, signs its step reports, its receipts and its
    endpoint."""

    @property
    def address(self) -> str: ...

    def peer_auth(self, challenge: bytes, server_fingerprint: bytes) -> bytes: ...

    def hop_report(self, entry: bytes, next_report: bytes) -> bytes:
        """Signs a step's report (:class:`worker.messages.Report`'s digests)."""
        ...

    def receipt(self, fields: ReceiptFields) -> SignedReceipt: ...

    def endpoint_proof(self, challenge: bytes, endpoint: str, fingerprint: bytes) -> bytes: ...


class Checks(Protocol):
    """Recovers who signed what. Each method raises ValueError when no signer can be recovered."""

    def peer_auth(self, challenge: bytes, server_fingerprint: bytes, signature: bytes) -> str: ...

    def hop_report(self, entry: bytes, next_report: bytes, signature: bytes) -> str: ...

    def hop_ticket(self, ticket: HopTicket) -> str: ...

    def fetch_ticket(self, ticket: FetchTicket) -> str: ...

    def receipt(self, receipt: SignedReceipt) -> str: ...

    def endpoint_proof(
        self, challenge: bytes, provider: str, endpoint: str, fingerprint: bytes, signature: bytes
    ) -> str: ...
