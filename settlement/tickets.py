"""The hop protocol's signatures under one deployment's protocol domain: tickets the gateway and validators
sign, receipts and endpoint proofs providers sign, and every party's proof of its key on a connection.

:class:`KeyRing` signs with one key and :class:`SignatureChecks` recovers signers; the provider node, the
gateway and the validator are handed them through the seams in :mod:`worker.trust`.
"""

from __future__ import annotations

import dataclasses

from coincurve import PrivateKey
from eth_account.signers.local import LocalAccount

from settlement.eip712 import (
    Domain,
    EndpointProof,
    FetchTicket,
    HopReceipt,
    HopReport,
    HopTicket,
    PeerAuth,
    protocol_domain,
    recover_hash_signer,
    recover_signer,
    sign_hash,
)
from worker import messages
from worker.trust import ReceiptFields

UINT64_MAX = 2**64 - 1


def domain_of(chain_id: int, stake_manager: str) -> Domain:
    return protocol_domain(chain_id, stake_manager)


def _hop_ticket(ticket: messages.HopTicket) -> HopTicket:
    return HopTicket(
        ticket.job_id,
        ticket.session,
        ticket.provider,
        ticket.model_root,
        ticket.layer_start,
        ticket.layer_end,
        ticket.previous,
        ticket.next,
        ticket.next_endpoint,
        ticket.next_fingerprint,
        ticket.max_positions,
        ticket.expires_at,
    )


def _receipt(fields: ReceiptFields | messages.SignedReceipt) -> HopReceipt:
    return HopReceipt(*(getattr(fields, field.name) for field in dataclasses.fields(ReceiptFields)))


class KeyRing:
    """Signs everything one party of the protocol signs, with its key."""

    def __init__(self, account: LocalAccount, domain: Domain) -> None:
        self.account = account
        self.domain = domain
        self._key = PrivateKey(bytes(account.key))

    @property
    def address(self) -> str:
        return str(self.account.address)

    def peer_auth(self, challenge: bytes, server_fingerprint: bytes) -> bytes:
        return PeerAuth(challenge, server_fingerprint).sign(self.account, self.domain)

    def hop_report(self, entry: bytes, next_report: bytes) -> bytes:
        return sign_hash(self._key, HopReport(entry, next_report).digest(self.domain))

    def receipt(self, fields: ReceiptFields) -> messages.SignedReceipt:
        signature = _receipt(fields).sign(self.account, self.domain)
        return messages.SignedReceipt(**vars(fields), signature=signature)

    def endpoint_proof(self, challenge: bytes, endpoint: str, fingerprint: bytes) -> bytes:
        return EndpointProof(challenge, self.address, endpoint, fingerprint).sign(self.account, self.domain)

    def hop_ticket(self, unsigned: messages.HopTicket) -> messages.HopTicket:
        """``unsigned`` (its signature field ignored), signed by this key: the gateway's."""
        signature = _hop_ticket(unsigned).sign(self.account, self.domain)
        return messages.HopTicket(**{**unsigned.__dict__, "signature": signature})

    def fetch_ticket(
        self, *, job_id: bytes, session: bytes, provider: str, expires_at: int
    ) -> messages.FetchTicket:
        """A validator's permission to read ``provider``'s retained steps of ``session``."""
        signature = FetchTicket(job_id, session, provider, expires_at).sign(self.account, self.domain)
        return messages.FetchTicket(job_id, session, provider, expires_at, signature)


class SignatureChecks:
    """Recovers the signers of the protocol's messages under one deployment's domain."""

    def __init__(self, domain: Domain) -> None:
        self.domain = domain

    def peer_auth(self, challenge: bytes, server_fingerprint: bytes, signature: bytes) -> str:
        return recover_hash_signer(PeerAuth(challenge, server_fingerprint).digest(self.domain), signature)

    def hop_report(self, entry: bytes, next_report: bytes, signature: bytes) -> str:
        return recover_hash_signer(HopReport(entry, next_report).digest(self.domain), signature)

    def hop_ticket(self, ticket: messages.HopTicket) -> str:
        return recover_signer(_hop_ticket(ticket).signable(self.domain), ticket.signature)

    def fetch_ticket(self, ticket: messages.FetchTicket) -> str:
        unsigned = FetchTicket(ticket.job_id, ticket.session, ticket.provider, ticket.expires_at)
        return recover_signer(unsigned.signable(self.domain), ticket.signature)

    def receipt(self, receipt: messages.SignedReceipt) -> str:
        return recover_signer(_receipt(receipt).signable(self.domain), receipt.signature)

    def endpoint_proof(
        self, challenge: bytes, provider: str, endpoint: str, fingerprint: bytes, signature: bytes
    ) -> str:
        proof = EndpointProof(challenge, provider, endpoint, fingerprint)
        return recover_signer(proof.signable(self.domain), signature)
