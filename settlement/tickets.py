"""Job tickets the gateway signs for providers, and the HopReceipts providers sign back.

Both use the EIP-712 types in :mod:`settlement.eip712`. The provider node sees them only through the seams
in :mod:`worker.receipts`, wired by ``strata provider serve``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils.address import is_address, to_checksum_address

from settlement.eip712 import HopReceipt, JobTicket, protocol_domain, recover_signer
from worker.errors import TicketRefused
from worker.receipts import ReceiptFields, TicketGrant

UINT64_MAX = 2**64 - 1


def issue_ticket(
    gateway: LocalAccount, *, job_id: bytes, model_root: bytes, expires_at: int, chain_id: int
) -> dict[str, Any]:
    """A ticket as hop messages carry it: its fields and the gateway's signature, hex-encoded."""
    ticket = JobTicket(job_id, model_root, expires_at)
    return {
        "jobId": "0x" + job_id.hex(),
        "modelRoot": "0x" + model_root.hex(),
        "expiresAt": expires_at,
        "signature": "0x" + ticket.sign(gateway, protocol_domain(chain_id)).hex(),
    }


def _bytes_field(ticket: Mapping[str, object], name: str, size: int) -> bytes:
    value = ticket.get(name)
    if not isinstance(value, str) or not value.startswith("0x"):
        raise TicketRefused(f"ticket field {name} must be 0x-prefixed hex")
    try:
        raw = bytes.fromhex(value[2:])
    except ValueError as exc:
        raise TicketRefused(f"ticket field {name} is not hex") from exc
    if len(raw) != size:
        raise TicketRefused(f"ticket field {name} must be {size} bytes, got {len(raw)}")
    return raw


class GatewayTicketVerifier:
    """Accepts tickets signed by one of ``trusted`` gateway addresses and not yet expired."""

    def __init__(self, trusted: Iterable[str], *, chain_id: int) -> None:
        self.trusted = {to_checksum_address(address) for address in trusted if is_address(address)}
        if not self.trusted:
            raise ValueError("a provider must trust at least one gateway address")
        self.domain = protocol_domain(chain_id)

    def __call__(self, ticket: Mapping[str, object], *, now: int) -> TicketGrant:
        if not isinstance(ticket, Mapping):
            raise TicketRefused("no job ticket")
        job_id = _bytes_field(ticket, "jobId", 32)
        model_root = _bytes_field(ticket, "modelRoot", 32)
        signature = _bytes_field(ticket, "signature", 65)
        expires_at = ticket.get("expiresAt")
        if (
            not isinstance(expires_at, int)
            or isinstance(expires_at, bool)
            or not 0 <= expires_at <= UINT64_MAX
        ):
            raise TicketRefused("ticket field expiresAt must be a uint64")
        try:
            signer = recover_signer(
                JobTicket(job_id, model_root, expires_at).signable(self.domain), signature
            )
        except ValueError as exc:
            raise TicketRefused(f"ticket signature is malformed: {exc}") from exc
        if signer not in self.trusted:
            raise TicketRefused(f"ticket signed by {signer}, which is not a trusted gateway")
        if expires_at <= now:
            raise TicketRefused(f"ticket for job 0x{job_id.hex()} expired at {expires_at} (now {now})")
        return TicketGrant(job_id, model_root, expires_at, signer)


def receipt_of(fields: ReceiptFields) -> HopReceipt:
    return HopReceipt(
        fields.job_id,
        fields.provider,
        fields.model_root,
        fields.layer_start,
        fields.layer_end,
        fields.tokens,
        fields.transcript_root,
    )


class KeyReceiptSigner:
    """Signs HopReceipts with a provider's key."""

    def __init__(self, account: LocalAccount, *, chain_id: int) -> None:
        self.account = account
        self.address: str = str(account.address)
        self.domain = protocol_domain(chain_id)

    def __call__(self, fields: ReceiptFields) -> bytes:
        return receipt_of(fields).sign(self.account, self.domain)


def receipt_signer(fields: ReceiptFields, signature: bytes, *, chain_id: int) -> str:
    """Who signed a receipt; the gateway compares it with the receipt's provider."""
    return receipt_of(fields).signer(signature, protocol_domain(chain_id))
