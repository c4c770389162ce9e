"""EIP-712 typed data for every message Strata signs, used alike by signers and verifiers.

Hashing goes through eth-account's typed-data encoder; nothing here hashes structs by hand. Each message type
is declared once below with the domain it is signed under.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from coincurve import PublicKey
from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

VOUCHER_ESCROW_DOMAIN_NAME = "Strata VoucherEscrow"
DOMAIN_VERSION = "1"

# Tickets, receipts, asks and heartbeats: signed off chain, checked by the gateway, providers and validators.
PROTOCOL_DOMAIN_NAME = "Strata"

VOUCHER_TYPES = {
    "Voucher": [
        {"name": "channelId", "type": "bytes32"},
        {"name": "maxClaimableAmount", "type": "uint128"},
    ]
}

TRANSFER_WITH_AUTHORIZATION_TYPES = {
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ]
}

JOB_TICKET_TYPES = {
    "JobTicket": [
        {"name": "jobId", "type": "bytes32"},
        {"name": "modelRoot", "type": "bytes32"},
        {"name": "expiresAt", "type": "uint64"},
    ]
}

HOP_RECEIPT_TYPES = {
    "HopReceipt": [
        {"name": "jobId", "type": "bytes32"},
        {"name": "provider", "type": "address"},
        {"name": "modelRoot", "type": "bytes32"},
        {"name": "layerStart", "type": "uint32"},
        {"name": "layerEnd", "type": "uint32"},
        {"name": "tokens", "type": "uint64"},
        {"name": "transcriptRoot", "type": "bytes32"},
    ]
}

# Asks and heartbeats: signed by a provider's staked key, checked by the gateway's order book.
ASK_TYPES = {
    "Ask": [
        {"name": "provider", "type": "address"},
        {"name": "modelRoot", "type": "bytes32"},
        {"name": "layerStart", "type": "uint32"},
        {"name": "layerEnd", "type": "uint32"},
        {"name": "pricePerMillion", "type": "uint64"},
        {"name": "capacity", "type": "uint32"},
        {"name": "endpoint", "type": "string"},
        {"name": "nonce", "type": "uint64"},
        {"name": "expiresAt", "type": "uint64"},
    ]
}

HEARTBEAT_TYPES = {
    "Heartbeat": [
        {"name": "provider", "type": "address"},
        {"name": "timestamp", "type": "uint64"},
    ]
}

UINT128_MAX = 2**128 - 1


@dataclass(frozen=True)
class Domain:
    name: str
    version: str
    chain_id: int
    verifying_contract: str | None = None  # None for messages no contract checks

    def as_dict(self) -> dict[str, Any]:
        domain: dict[str, Any] = {"name": self.name, "version": self.version, "chainId": self.chain_id}
        if self.verifying_contract is not None:
            domain["verifyingContract"] = to_checksum_address(self.verifying_contract)
        return domain

    def fields(self) -> list[dict[str, str]]:
        fields = [
            {"name": "name", "type": "string"},
            {"name": "version", "type": "string"},
            {"name": "chainId", "type": "uint256"},
        ]
        if self.verifying_contract is not None:
            fields.append({"name": "verifyingContract", "type": "address"})
        return fields


def protocol_domain(chain_id: int) -> Domain:
    return Domain(PROTOCOL_DOMAIN_NAME, DOMAIN_VERSION, chain_id)


def voucher_domain(chain_id: int, escrow: str) -> Domain:
    return Domain(VOUCHER_ESCROW_DOMAIN_NAME, DOMAIN_VERSION, chain_id, escrow)


def token_domain(token_name: str, chain_id: int, token: str) -> Domain:
    return Domain(token_name, DOMAIN_VERSION, chain_id, token)


def typed_message(
    domain: Domain, types: dict[str, list[dict[str, str]]], message: dict[str, Any]
) -> SignableMessage:
    primary = next(iter(types))
    return encode_typed_data(
        full_message={
            "types": {"EIP712Domain": domain.fields(), **types},
            "primaryType": primary,
            "domain": domain.as_dict(),
            "message": message,
        }
    )


@dataclass(frozen=True)
class Voucher:
    """A payer's promise that its channel may be charged up to ``max_claimable_amount`` in total."""

    channel_id: bytes
    max_claimable_amount: int

    def __post_init__(self) -> None:
        if len(self.channel_id) != 32:
            raise ValueError(f"channel id must be 32 bytes, got {len(self.channel_id)}")
        if not 0 <= self.max_claimable_amount <= UINT128_MAX:
            raise ValueError(f"maxClaimableAmount {self.max_claimable_amount} is outside uint128")

    def signable(self, domain: Domain) -> SignableMessage:
        return typed_message(
            domain,
            VOUCHER_TYPES,
            {"channelId": self.channel_id, "maxClaimableAmount": self.max_claimable_amount},
        )

    def sign(self, account: LocalAccount, domain: Domain) -> bytes:
        return bytes(account.sign_message(self.signable(domain)).signature)

    def signer(self, signature: bytes, domain: Domain) -> str:
        return recover_signer(self.signable(domain), signature)

    def digest(self, domain: Domain) -> bytes:
        """The EIP-712 hash this voucher's signature signs, computed directly: a gateway recovers one signer
        per paid request, and the generic typed-data encoder costs several times the recovery itself."""
        struct = keccak(_VOUCHER_TYPEHASH + self.channel_id + self.max_claimable_amount.to_bytes(32, "big"))
        return keccak(b"\x19\x01" + _domain_separator(domain) + struct)

    def fast_signer(self, signature: bytes, domain: Domain) -> str:
        """Same as :meth:`signer`; raises ValueError on a malformed signature."""
        return recover_hash_signer(self.digest(domain), signature)


_VOUCHER_TYPEHASH = keccak(b"Voucher(bytes32 channelId,uint128 maxClaimableAmount)")


@functools.lru_cache(maxsize=64)
def _domain_separator(domain: Domain) -> bytes:
    return bytes(
        typed_message(domain, VOUCHER_TYPES, {"channelId": b"\0" * 32, "maxClaimableAmount": 0}).header
    )


def recover_hash_signer(digest: bytes, signature: bytes) -> str:
    """The address whose key signed the 32-byte ``digest``; raises ValueError on a malformed signature."""
    r, s, v = split_signature(signature)
    if v not in (27, 28):
        raise ValueError(f"signature v must be 27 or 28, got {v}")
    if int.from_bytes(s, "big") > _SECP256K1_HALF_N:
        raise ValueError("signature s is in the upper half of the curve order (EIP-2)")
    try:
        public = PublicKey.from_signature_and_message(r + s + bytes([v - 27]), digest, hasher=None)
    except Exception as exc:  # coincurve raises plain Exceptions for unrecoverable signatures
        raise ValueError(f"signature cannot be recovered: {exc}") from exc
    return to_checksum_address(keccak(public.format(compressed=False)[1:])[-20:])


_SECP256K1_HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0


@dataclass(frozen=True)
class TransferAuthorization:
    """An EIP-3009 ``TransferWithAuthorization``, as x402's ``exact`` scheme signs it."""

    sender: str
    recipient: str
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes

    def signable(self, domain: Domain) -> SignableMessage:
        return typed_message(
            domain,
            TRANSFER_WITH_AUTHORIZATION_TYPES,
            {
                "from": to_checksum_address(self.sender),
                "to": to_checksum_address(self.recipient),
                "value": self.value,
                "validAfter": self.valid_after,
                "validBefore": self.valid_before,
                "nonce": self.nonce,
            },
        )

    def sign(self, account: LocalAccount, domain: Domain) -> bytes:
        return bytes(account.sign_message(self.signable(domain)).signature)

    def signer(self, signature: bytes, domain: Domain) -> str:
        return recover_signer(self.signable(domain), signature)


@dataclass(frozen=True)
class JobTicket:
    """The gateway's permission for providers to serve ``job_id`` on model ``model_root`` until ``expires_at``."""

    job_id: bytes
    model_root: bytes
    expires_at: int

    def signable(self, domain: Domain) -> SignableMessage:
        return typed_message(
            domain,
            JOB_TICKET_TYPES,
            {"jobId": self.job_id, "modelRoot": self.model_root, "expiresAt": self.expires_at},
        )

    def sign(self, account: LocalAccount, domain: Domain) -> bytes:
        return bytes(account.sign_message(self.signable(domain)).signature)


@dataclass(frozen=True)
class HopReceipt:
    """A provider's signed account of one session of one job on its layer span."""

    job_id: bytes
    provider: str
    model_root: bytes
    layer_start: int
    layer_end: int
    tokens: int
    transcript_root: bytes

    def signable(self, domain: Domain) -> SignableMessage:
        return typed_message(
            domain,
            HOP_RECEIPT_TYPES,
            {
                "jobId": self.job_id,
                "provider": to_checksum_address(self.provider),
                "modelRoot": self.model_root,
                "layerStart": self.layer_start,
                "layerEnd": self.layer_end,
                "tokens": self.tokens,
                "transcriptRoot": self.transcript_root,
            },
        )

    def sign(self, account: LocalAccount, domain: Domain) -> bytes:
        return bytes(account.sign_message(self.signable(domain)).signature)

    def signer(self, signature: bytes, domain: Domain) -> str:
        return recover_signer(self.signable(domain), signature)


@dataclass(frozen=True)
class Ask:
    """A provider's offer to serve layers ``[layer_start, layer_end)`` of model ``model_root``.

    ``price_per_million`` is in token base units per million token-layers; ``capacity`` is how many sessions it
    serves at once (0 withdraws the offer); ``nonce`` only grows per provider, so an old ask cannot be replayed
    over a newer one.
    """

    provider: str
    model_root: bytes
    layer_start: int
    layer_end: int
    price_per_million: int
    capacity: int
    endpoint: str
    nonce: int
    expires_at: int

    def signable(self, domain: Domain) -> SignableMessage:
        return typed_message(
            domain,
            ASK_TYPES,
            {
                "provider": to_checksum_address(self.provider),
                "modelRoot": self.model_root,
                "layerStart": self.layer_start,
                "layerEnd": self.layer_end,
                "pricePerMillion": self.price_per_million,
                "capacity": self.capacity,
                "endpoint": self.endpoint,
                "nonce": self.nonce,
                "expiresAt": self.expires_at,
            },
        )

    def sign(self, account: LocalAccount, domain: Domain) -> bytes:
        return bytes(account.sign_message(self.signable(domain)).signature)

    def signer(self, signature: bytes, domain: Domain) -> str:
        return recover_signer(self.signable(domain), signature)


@dataclass(frozen=True)
class Heartbeat:
    """A provider saying it is alive at ``timestamp`` (unix seconds)."""

    provider: str
    timestamp: int

    def signable(self, domain: Domain) -> SignableMessage:
        return typed_message(
            domain,
            HEARTBEAT_TYPES,
            {"provider": to_checksum_address(self.provider), "timestamp": self.timestamp},
        )

    def sign(self, account: LocalAccount, domain: Domain) -> bytes:
        return bytes(account.sign_message(self.signable(domain)).signature)

    def signer(self, signature: bytes, domain: Domain) -> str:
        return recover_signer(self.signable(domain), signature)


def digest(message: SignableMessage) -> bytes:
    """The 32-byte EIP-712 digest that is signed, as contracts compute it with _hashTypedDataV4."""
    return keccak(b"\x19" + message.version + message.header + message.body)


def recover_signer(message: SignableMessage, signature: bytes) -> str:
    """The address that signed ``message``; raises ValueError on a malformed signature."""
    if len(signature) != 65:
        raise ValueError(f"signature must be 65 bytes (r, s, v), got {len(signature)}")
    return str(Account.recover_message(message, signature=signature))


def split_signature(signature: bytes) -> tuple[bytes, bytes, int]:
    """(r, s, v) of a 65-byte signature, with v normalised to 27 or 28."""
    if len(signature) != 65:
        raise ValueError(f"signature must be 65 bytes (r, s, v), got {len(signature)}")
    v = signature[64]
    if v < 27:
        v += 27
    return signature[:32], signature[32:64], v


def compact_signature(signature: bytes) -> tuple[bytes, bytes]:
    """EIP-2098 form (r, vs): s with the parity of v in its top bit, as VoucherEscrow.redeem takes it."""
    r, s, v = split_signature(signature)
    vs = int.from_bytes(s, "big") | ((v - 27) << 255)
    return r, vs.to_bytes(32, "big")


__all__ = [
    "DOMAIN_VERSION",
    "VOUCHER_ESCROW_DOMAIN_NAME",
    "Ask",
    "Domain",
    "Heartbeat",
    "HopReceipt",
    "JobTicket",
    "TransferAuthorization",
    "Voucher",
    "compact_signature",
    "digest",
    "protocol_domain",
    "recover_signer",
    "split_signature",
    "token_domain",
    "typed_message",
    "voucher_domain",
]
