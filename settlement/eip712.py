"""EIP-712 typed data for every message Strata signs, used alike by signers and verifiers.

Hashing goes through eth-account's typed-data encoder; nothing here hashes structs by hand. Each message type
is declared once below with the domain it is signed under.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from coincurve import PrivateKey, PublicKey
from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

VOUCHER_ESCROW_DOMAIN_NAME = "Strata VoucherEscrow"
DOMAIN_VERSION = "1"

# Tickets, receipts, asks, heartbeats and peer proofs: signed off chain, checked by the gateway, providers and
# validators, under a domain that names the deployment (its StakeManager), so that nothing signed for one
# deployment is accepted by another on the same chain.
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

# The protocol's messages, signed off chain under the protocol domain (see protocol_domain).

# The gateway's permission for one provider to serve one session of a job: its span, whom it takes steps
# from (``previous``: the provider before it, or the gateway for the first span) and the one peer it may
# send them on to (``next``: its endpoint and certificate, or nobody for the last span).
HOP_TICKET_TYPES = {
    "HopTicket": [
        {"name": "jobId", "type": "bytes32"},
        {"name": "session", "type": "bytes16"},
        {"name": "provider", "type": "address"},
        {"name": "modelRoot", "type": "bytes32"},
        {"name": "layerStart", "type": "uint32"},
        {"name": "layerEnd", "type": "uint32"},
        {"name": "previous", "type": "address"},
        {"name": "next", "type": "address"},
        {"name": "nextEndpoint", "type": "string"},
        {"name": "nextFingerprint", "type": "bytes32"},
        {"name": "maxPositions", "type": "uint32"},
        {"name": "expiresAt", "type": "uint64"},
    ]
}

# A validator's permission to read what one provider retained of one session.
FETCH_TICKET_TYPES = {
    "FetchTicket": [
        {"name": "jobId", "type": "bytes32"},
        {"name": "session", "type": "bytes16"},
        {"name": "provider", "type": "address"},
        {"name": "expiresAt", "type": "uint64"},
    ]
}

# What a provider did in one session. ``samplingHash`` commits the last span to how it sampled (the seed
# included); the last span's transcript root covers every token it emitted.
HOP_RECEIPT_TYPES = {
    "HopReceipt": [
        {"name": "jobId", "type": "bytes32"},
        {"name": "session", "type": "bytes16"},
        {"name": "gateway", "type": "address"},
        {"name": "provider", "type": "address"},
        {"name": "modelRoot", "type": "bytes32"},
        {"name": "layerStart", "type": "uint32"},
        {"name": "layerEnd", "type": "uint32"},
        {"name": "positions", "type": "uint64"},
        {"name": "transcriptRoot", "type": "bytes32"},
        {"name": "samplingHash", "type": "bytes32"},
    ]
}

# A connection's client proves its key to the server: over the server's challenge and the fingerprint of the
# certificate the client pinned, so that a relay in the middle (another certificate) cannot reuse it.
PEER_AUTH_TYPES = {
    "PeerAuth": [
        {"name": "challenge", "type": "bytes32"},
        {"name": "serverFingerprint", "type": "bytes32"},
    ]
}

# A hop's account of one step, signed by the hop it describes: the sha256 of its entry (worker.messages.HopEntry,
# canonical JSON) and of the next hop's report that it relayed, checked (zero: none). The relayer checks the
# next hop's signature before it signs over its report, so a report that does not hold is the relayer's doing.
HOP_REPORT_TYPES = {
    "HopReport": [
        {"name": "entry", "type": "bytes32"},
        {"name": "next", "type": "bytes32"},
    ]
}

# A provider proves that the endpoint its ask names answers with its staked key and its certificate.
ENDPOINT_PROOF_TYPES = {
    "EndpointProof": [
        {"name": "challenge", "type": "bytes32"},
        {"name": "provider", "type": "address"},
        {"name": "endpoint", "type": "string"},
        {"name": "tlsFingerprint", "type": "bytes32"},
    ]
}

# A payer asks for a job's output.
JOB_READ_TYPES = {
    "JobRead": [
        {"name": "jobId", "type": "bytes32"},
        {"name": "expiresAt", "type": "uint64"},
    ]
}

# Asks and heartbeats: signed by a provider's staked key, for one gateway, checked by its order book.
ASK_TYPES = {
    "Ask": [
        {"name": "provider", "type": "address"},
        {"name": "gateway", "type": "address"},
        {"name": "modelRoot", "type": "bytes32"},
        {"name": "layerStart", "type": "uint32"},
        {"name": "layerEnd", "type": "uint32"},
        {"name": "pricePerMillion", "type": "uint64"},
        {"name": "capacity", "type": "uint32"},
        {"name": "retentionS", "type": "uint32"},
        {"name": "endpoint", "type": "string"},
        {"name": "tlsFingerprint", "type": "bytes32"},
        {"name": "nonce", "type": "uint64"},
        {"name": "expiresAt", "type": "uint64"},
    ]
}

HEARTBEAT_TYPES = {
    "Heartbeat": [
        {"name": "provider", "type": "address"},
        {"name": "gateway", "type": "address"},
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


def protocol_domain(chain_id: int, deployment: str) -> Domain:
    """The domain of the protocol's messages; ``deployment`` is the deployment's StakeManager address."""
    return Domain(PROTOCOL_DOMAIN_NAME, DOMAIN_VERSION, chain_id, deployment)


def voucher_domain(chain_id: int, escrow: str) -> Domain:
    return Domain(VOUCHER_ESCROW_DOMAIN_NAME, DOMAIN_VERSION, chain_id, escrow)


def token_domain(token_name: str, chain_id: int, token: str, version: str = DOMAIN_VERSION) -> Domain:
    """A token's EIP-3009 domain. Tokens choose their version (USDC signs with "2"): read it from the token
    (PaymentToken.domain) rather than assume it."""
    return Domain(token_name, version, chain_id, token)


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

BATCH_SETTLEMENT_DOMAIN_NAME = "x402 Batch Settlement"
_CHANNEL_CONFIG_TYPEHASH = keccak(
    b"ChannelConfig(address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,"
    b"address token,uint40 withdrawDelay,bytes32 salt)"
)


def batch_channel_id(
    domain: Domain,
    *,
    payer: str,
    payer_authorizer: str,
    receiver: str,
    receiver_authorizer: str,
    token: str,
    withdraw_delay: int,
    salt: bytes,
) -> bytes:
    """An x402 batch-settlement channel's id: the EIP-712 hash of its ChannelConfig under the BatchSettlement
    contract's domain, encoded directly (every word is 32 bytes: addresses and the uint40 left-padded)."""

    def word(address: str) -> bytes:
        return bytes.fromhex(address[2:]).rjust(32, b"\0")

    struct = keccak(
        _CHANNEL_CONFIG_TYPEHASH
        + word(payer)
        + word(payer_authorizer)
        + word(receiver)
        + word(receiver_authorizer)
        + word(token)
        + withdraw_delay.to_bytes(32, "big")
        + salt
    )
    return keccak(b"\x19\x01" + _domain_separator(domain) + struct)


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
    return _address_of(public.format(compressed=False)[1:])


@functools.lru_cache(maxsize=4096)
def _address_of(public_key: bytes) -> str:
    """The checksummed address of a 64-byte public key. Cached: the same few keys sign every step of a route,
    and hashing and checksumming cost more than the recovery itself."""
    return to_checksum_address(keccak(public_key)[-20:])


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


class _Typed:
    """A message of one of the types above: ``TYPES`` names it, ``message()`` gives its fields."""

    TYPES: dict[str, list[dict[str, str]]]

    def message(self) -> dict[str, Any]:
        raise NotImplementedError

    def signable(self, domain: Domain) -> SignableMessage:
        return typed_message(domain, self.TYPES, self.message())

    def sign(self, account: LocalAccount, domain: Domain) -> bytes:
        return bytes(account.sign_message(self.signable(domain)).signature)

    def signer(self, signature: bytes, domain: Domain) -> str:
        """The address that signed it; raises ValueError on a malformed signature."""
        return recover_signer(self.signable(domain), signature)


@dataclass(frozen=True)
class HopTicket(_Typed):
    TYPES = HOP_TICKET_TYPES

    job_id: bytes
    session: bytes
    provider: str
    model_root: bytes
    layer_start: int
    layer_end: int
    previous: str
    next: str
    next_endpoint: str
    next_fingerprint: bytes
    max_positions: int
    expires_at: int

    def message(self) -> dict[str, Any]:
        return {
            "jobId": self.job_id,
            "session": self.session,
            "provider": to_checksum_address(self.provider),
            "modelRoot": self.model_root,
            "layerStart": self.layer_start,
            "layerEnd": self.layer_end,
            "previous": to_checksum_address(self.previous),
            "next": to_checksum_address(self.next),
            "nextEndpoint": self.next_endpoint,
            "nextFingerprint": self.next_fingerprint,
            "maxPositions": self.max_positions,
            "expiresAt": self.expires_at,
        }


@dataclass(frozen=True)
class FetchTicket(_Typed):
    TYPES = FETCH_TICKET_TYPES

    job_id: bytes
    session: bytes
    provider: str
    expires_at: int

    def message(self) -> dict[str, Any]:
        return {
            "jobId": self.job_id,
            "session": self.session,
            "provider": to_checksum_address(self.provider),
            "expiresAt": self.expires_at,
        }


@dataclass(frozen=True)
class HopReceipt(_Typed):
    TYPES = HOP_RECEIPT_TYPES

    job_id: bytes
    session: bytes
    gateway: str
    provider: str
    model_root: bytes
    layer_start: int
    layer_end: int
    positions: int
    transcript_root: bytes
    sampling_hash: bytes

    def message(self) -> dict[str, Any]:
        return {
            "jobId": self.job_id,
            "session": self.session,
            "gateway": to_checksum_address(self.gateway),
            "provider": to_checksum_address(self.provider),
            "modelRoot": self.model_root,
            "layerStart": self.layer_start,
            "layerEnd": self.layer_end,
            "positions": self.positions,
            "transcriptRoot": self.transcript_root,
            "samplingHash": self.sampling_hash,
        }


@dataclass(frozen=True)
class PeerAuth(_Typed):
    TYPES = PEER_AUTH_TYPES

    challenge: bytes
    server_fingerprint: bytes

    def message(self) -> dict[str, Any]:
        return {"challenge": self.challenge, "serverFingerprint": self.server_fingerprint}

    def digest(self, domain: Domain) -> bytes:
        """The EIP-712 hash its signature signs, computed directly: a provider checks one on every connection
        anyone opens, and the generic encoder costs several times the recovery itself."""
        struct = keccak(_PEER_AUTH_TYPEHASH + self.challenge + self.server_fingerprint)
        return keccak(b"\x19\x01" + _domain_separator(domain) + struct)


_PEER_AUTH_TYPEHASH = keccak(b"PeerAuth(bytes32 challenge,bytes32 serverFingerprint)")


@dataclass(frozen=True)
class HopReport(_Typed):
    TYPES = HOP_REPORT_TYPES

    entry: bytes
    next: bytes

    def message(self) -> dict[str, Any]:
        return {"entry": self.entry, "next": self.next}

    def digest(self, domain: Domain) -> bytes:
        """The EIP-712 hash its signature signs, computed directly: every hop signs one per step, and the relay
        before it and the gateway each recover its signer."""
        return keccak(
            b"\x19\x01" + _domain_separator(domain) + keccak(_HOP_REPORT_TYPEHASH + self.entry + self.next)
        )


_HOP_REPORT_TYPEHASH = keccak(b"HopReport(bytes32 entry,bytes32 next)")


@dataclass(frozen=True)
class EndpointProof(_Typed):
    TYPES = ENDPOINT_PROOF_TYPES

    challenge: bytes
    provider: str
    endpoint: str
    tls_fingerprint: bytes

    def message(self) -> dict[str, Any]:
        return {
            "challenge": self.challenge,
            "provider": to_checksum_address(self.provider),
            "endpoint": self.endpoint,
            "tlsFingerprint": self.tls_fingerprint,
        }


@dataclass(frozen=True)
class JobRead(_Typed):
    TYPES = JOB_READ_TYPES

    job_id: bytes
    expires_at: int

    def message(self) -> dict[str, Any]:
        return {"jobId": self.job_id, "expiresAt": self.expires_at}


@dataclass(frozen=True)
class Ask(_Typed):
    """A provider's offer to one gateway to serve layers ``[layer_start, layer_end)`` of model ``model_root``
    at ``endpoint``, whose TLS certificate hashes to ``tls_fingerprint``.

    ``price_per_million`` is in token base units per million token-layers; ``capacity`` is how many sessions it
    serves at once (0 withdraws the offer); ``retention_s`` how long after a session ends it keeps the session's
    steps for validators; ``nonce`` only grows per provider, so an old ask cannot be replayed over a newer one.
    """

    TYPES = ASK_TYPES

    provider: str
    gateway: str
    model_root: bytes
    layer_start: int
    layer_end: int
    price_per_million: int
    capacity: int
    retention_s: int
    endpoint: str
    tls_fingerprint: bytes
    nonce: int
    expires_at: int

    def message(self) -> dict[str, Any]:
        return {
            "provider": to_checksum_address(self.provider),
            "gateway": to_checksum_address(self.gateway),
            "modelRoot": self.model_root,
            "layerStart": self.layer_start,
            "layerEnd": self.layer_end,
            "pricePerMillion": self.price_per_million,
            "capacity": self.capacity,
            "retentionS": self.retention_s,
            "endpoint": self.endpoint,
            "tlsFingerprint": self.tls_fingerprint,
            "nonce": self.nonce,
            "expiresAt": self.expires_at,
        }


@dataclass(frozen=True)
class Heartbeat(_Typed):
    """A provider telling one gateway it is alive at ``timestamp`` (unix seconds)."""

    TYPES = HEARTBEAT_TYPES

    provider: str
    gateway: str
    timestamp: int

    def message(self) -> dict[str, Any]:
        return {
            "provider": to_checksum_address(self.provider),
            "gateway": to_checksum_address(self.gateway),
            "timestamp": self.timestamp,
        }


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


def sign_hash(key: PrivateKey, digest: bytes) -> bytes:
    """A 65-byte r‖s‖v signature (v 27 or 28, s in the lower half) of the 32-byte ``digest``, for the digests
    this module computes directly: several times quicker than going through eth_account."""
    signature = key.sign_recoverable(digest, hasher=None)  # libsecp256k1: s is always in the lower half
    return signature[:64] + bytes([27 + signature[64]])


__all__ = [
    "DOMAIN_VERSION",
    "VOUCHER_ESCROW_DOMAIN_NAME",
    "Ask",
    "Domain",
    "EndpointProof",
    "FetchTicket",
    "Heartbeat",
    "HopReceipt",
    "HopReport",
    "HopTicket",
    "JobRead",
    "PeerAuth",
    "TransferAuthorization",
    "Voucher",
    "compact_signature",
    "digest",
    "protocol_domain",
    "recover_signer",
    "sign_hash",
    "split_signature",
    "token_domain",
    "typed_message",
    "voucher_domain",
]
