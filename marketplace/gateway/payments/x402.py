"""x402 v2 over HTTP: the three headers, as this gateway writes and reads them.

``PAYMENT-REQUIRED`` (on a 402), ``PAYMENT-SIGNATURE`` (the client's retry) and ``PAYMENT-RESPONSE`` (on the
answer) each carry base64 of one JSON object; networks are CAIP-2 ``eip155:<chainId>``; amounts are decimal
strings of token base units.

Two schemes are accepted:

``voucher``  ``payload = {channelId, maxClaimableAmount, signature}``: an EIP-712
             ``Voucher(bytes32 channelId, uint128 maxClaimableAmount)`` on VoucherEscrow, cumulative per channel.
``exact``    ``payload = {authorization: {from, to, value, validAfter, validBefore, nonce}, signature}``: an
             EIP-3009 ``TransferWithAuthorization`` on the token, as x402's own exact EVM client signs it.

``batch-settlement``  x402's channel scheme, as the PyPI ``x402`` client pays it:
             ``payload = {type: deposit | voucher | refund, channelConfig, voucher: {channelId, maxClaimableAmount,
             signature}, deposit?: {amount, authorization: {erc3009Authorization: {validAfter, validBefore, salt,
             signature}}}, amount?}``: the same cumulative ``Voucher`` on x402's BatchSettlement contract, whose
             channel id is the EIP-712 hash of the ``ChannelConfig``; a first payment carries the deposit.

Decoding checks the form of everything (base64, JSON, field types, hex lengths, amounts); whether the payment
pays for the request is for :mod:`marketplace.gateway.payments.gate` to decide.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from eth_utils.address import is_address, to_checksum_address

from marketplace.gateway.errors import InvalidRequest, PaymentRejected
from settlement.contracts import BatchChannelConfig, payer_of
from settlement.db.schema import PaymentScheme
from settlement.eip712 import TransferAuthorization
from worker import jsontext

X402_VERSION = 2
PAYMENT_REQUIRED = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE = "PAYMENT-SIGNATURE"
PAYMENT_RESPONSE = "PAYMENT-RESPONSE"
VOUCHER = PaymentScheme.VOUCHER
EXACT = PaymentScheme.EXACT
BATCH = PaymentScheme.BATCH
SCHEMES = (VOUCHER, EXACT, BATCH)
BATCH_KINDS = ("deposit", "voucher", "refund")
# The batch-settlement refusals x402's client acts on, with the codes its scheme gives them: on the second it
# resynchronises from the state the 402's requirement carries.
CHANNEL_BUSY = "invalid_batch_settlement_evm_channel_busy"
CUMULATIVE_MISMATCH = "invalid_batch_settlement_evm_cumulative_amount_mismatch"
REFUND_NO_BALANCE = "invalid_batch_settlement_evm_refund_no_balance"
REFUND_AMOUNT_INVALID = "invalid_batch_settlement_evm_refund_amount_invalid"

MAX_HEADER_BYTES = 8 * 1024  # a payment is a few hundred bytes; anything far larger is not one
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,77}")


def network_of(chain_id: int) -> str:
    return f"eip155:{chain_id}"


def _malformed(message: str) -> InvalidRequest:
    return InvalidRequest("invalid_payment_header", f"{PAYMENT_SIGNATURE}: {message}")


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _malformed(f"{where} must be a JSON object")
    return value


def _string(data: dict[str, Any], name: str, where: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise _malformed(f"{where}.{name} must be a string")
    return value


def _hex(data: dict[str, Any], name: str, where: str, size: int) -> bytes:
    text = _string(data, name, where)
    if not text.startswith("0x"):
        raise _malformed(f"{where}.{name} must be 0x-prefixed hex")
    try:
        raw = bytes.fromhex(text[2:])
    except ValueError as exc:
        raise _malformed(f"{where}.{name} is not hex") from exc
    if len(raw) != size:
        raise _malformed(f"{where}.{name} must be {size} bytes, got {len(raw)}")
    return raw


def _amount(data: dict[str, Any], name: str, where: str) -> int:
    value = data.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if not isinstance(value, str) or not _DECIMAL.fullmatch(value):
        raise _malformed(f"{where}.{name} must be a non-negative integer as a decimal string")
    return int(value)


def _address(data: dict[str, Any], name: str, where: str) -> str:
    text = _string(data, name, where)
    if not is_address(text):
        raise _malformed(f"{where}.{name} is not an address")
    return to_checksum_address(text)


@dataclass(frozen=True)
class VoucherPayment:
    network: str
    asset: str
    channel_id: bytes
    amount: int  # the voucher's cumulative maxClaimableAmount
    signature: bytes

    @property
    def payer(self) -> str:
        return payer_of(self.channel_id)


@dataclass(frozen=True)
class ExactPayment:
    network: str
    asset: str
    authorization: TransferAuthorization
    signature: bytes

    @property
    def payer(self) -> str:
        return self.authorization.sender


def _channel_config(data: dict[str, Any], where: str = "payload.channelConfig") -> BatchChannelConfig:
    delay = data.get("withdrawDelay")
    if not isinstance(delay, int) or isinstance(delay, bool) or not 0 <= delay < 2**40:
        raise _malformed(f"{where}.withdrawDelay must be an integer below 2^40")
    return BatchChannelConfig(
        payer=_address(data, "payer", where),
        payer_authorizer=_address(data, "payerAuthorizer", where),
        receiver=_address(data, "receiver", where),
        receiver_authorizer=_address(data, "receiverAuthorizer", where),
        token=_address(data, "token", where),
        withdraw_delay=delay,
        salt=_hex(data, "salt", where, 32),
    )


@dataclass(frozen=True)
class DepositAuthorization:
    """An ERC-3009 ReceiveWithAuthorization of ``amount`` from the payer to the deposit collector; its nonce is
    keccak256(abi.encode(channelId, salt)), which binds it to the channel."""

    amount: int
    valid_after: int
    valid_before: int
    salt: bytes
    signature: bytes


@dataclass(frozen=True)
class BatchPayment:
    network: str
    asset: str
    kind: str  # deposit, voucher or refund
    config: BatchChannelConfig
    channel_id: bytes
    amount: int  # the voucher's cumulative maxClaimableAmount
    signature: bytes
    deposit: DepositAuthorization | None = None
    refund_amount: int | None = None  # a refund's, when not the whole unclaimed balance

    @property
    def payer(self) -> str:
        return self.config.payer


Payment = VoucherPayment | ExactPayment | BatchPayment


def _uint256(data: dict[str, Any], name: str, where: str) -> int:
    """A decimal string or integer below 2^256, or a 0x hex string of at most 32 bytes (x402 writes salts as
    hex): what the contracts take as a uint256."""
    value = data.get(name)
    if isinstance(value, str) and value.startswith("0x") and 2 < len(value) <= 66:
        try:
            return int(value, 16)
        except ValueError as exc:
            raise _malformed(f"{where}.{name} is not hex") from exc
    number = _amount(data, name, where)
    if number >= 2**256:
        raise _malformed(f"{where}.{name} must be below 2^256")
    return number


def _batch_payment(network: str, asset: str, payload: dict[str, Any]) -> BatchPayment:
    kind = payload.get("type")
    if kind not in BATCH_KINDS:
        raise _malformed(f"payload.type must be one of {', '.join(BATCH_KINDS)}")
    config = _channel_config(_object(payload.get("channelConfig"), "payload.channelConfig"))
    voucher = _object(payload.get("voucher"), "payload.voucher")
    deposit = None
    if kind == "deposit":
        fields = _object(payload.get("deposit"), "payload.deposit")
        authorization = _object(fields.get("authorization"), "payload.deposit.authorization")
        if "erc3009Authorization" not in authorization:
            raise PaymentRejected(
                "unsupported_deposit_method", "deposits are taken as ERC-3009 authorizations (eip3009) only"
            )
        erc3009 = _object(
            authorization["erc3009Authorization"], "payload.deposit.authorization.erc3009Authorization"
        )
        where = "payload.deposit.authorization.erc3009Authorization"
        deposit = DepositAuthorization(
            amount=_amount(fields, "amount", "payload.deposit"),
            valid_after=_uint256(erc3009, "validAfter", where),
            valid_before=_uint256(erc3009, "validBefore", where),
            salt=_uint256(erc3009, "salt", where).to_bytes(32, "big"),
            signature=_hex(erc3009, "signature", where, 65),
        )
    refund_amount = None
    if kind == "refund" and payload.get("amount") is not None:
        refund_amount = _amount(payload, "amount", "payload")
        if refund_amount == 0:  # x402's client leaves the amount out for a whole refund
            raise PaymentRejected(REFUND_AMOUNT_INVALID, "a refund's amount, when given, is above zero")
    return BatchPayment(
        network,
        asset,
        kind,
        config,
        _hex(voucher, "channelId", "payload.voucher", 32),
        _amount(voucher, "maxClaimableAmount", "payload.voucher"),
        _hex(voucher, "signature", "payload.voucher", 65),
        deposit,
        refund_amount,
    )


def decode_payment(header: str) -> Payment:
    """Reads a ``PAYMENT-SIGNATURE`` header; refuses anything that is not a well-formed v2 payment."""
    if len(header) > MAX_HEADER_BYTES:
        raise _malformed(f"longer than {MAX_HEADER_BYTES} bytes")
    try:
        document = jsontext.loads(base64.b64decode(header.strip(), validate=True))
    # JSONDecodeError and UnicodeDecodeError are ValueErrors; RecursionError is nesting deeper than json's stack.
    except (binascii.Error, ValueError, RecursionError) as exc:
        raise _malformed("not base64 of a JSON object") from exc
    document = _object(document, "payment")
    version = document.get("x402Version")
    if version != X402_VERSION:
        raise InvalidRequest(
            "unsupported_x402_version", f"x402Version {version!r} is not supported; this gateway speaks 2"
        )
    accepted = _object(document.get("accepted"), "accepted")
    payload = _object(document.get("payload"), "payload")
    scheme = accepted.get("scheme")
    network = _string(accepted, "network", "accepted")
    asset = _address(accepted, "asset", "accepted")
    if scheme == VOUCHER:
        return VoucherPayment(
            network,
            asset,
            _hex(payload, "channelId", "payload", 32),
            _amount(payload, "maxClaimableAmount", "payload"),
            _hex(payload, "signature", "payload", 65),
        )
    if scheme == EXACT:
        authorization = _object(payload.get("authorization"), "payload.authorization")
        where = "payload.authorization"
        return ExactPayment(
            network,
            asset,
            TransferAuthorization(
                sender=_address(authorization, "from", where),
                recipient=_address(authorization, "to", where),
                value=_amount(authorization, "value", where),
                valid_after=_amount(authorization, "validAfter", where),
                valid_before=_amount(authorization, "validBefore", where),
                nonce=_hex(authorization, "nonce", where, 32),
            ),
            _hex(payload, "signature", "payload", 65),
        )
    if scheme == BATCH:
        return _batch_payment(network, asset, payload)
    raise PaymentRejected(
        "unsupported_scheme", f"scheme {scheme!r} is not accepted; pay with one of {', '.join(SCHEMES)}"
    )


def encode_header(document: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(document, separators=(",", ":")).encode()).decode()


def decode_header(header: str) -> dict[str, Any]:
    """Reads a base64 JSON header this gateway wrote (for clients: PAYMENT-REQUIRED, PAYMENT-RESPONSE)."""
    document = jsontext.loads(base64.b64decode(header, validate=True))
    if not isinstance(document, dict):
        raise ValueError("the header is not a JSON object")
    return document


def requirement(
    scheme: str,
    *,
    chain_id: int,
    asset: str,
    amount: int,
    pay_to: str,
    timeout_s: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    return {
        "scheme": scheme,
        "network": network_of(chain_id),
        "asset": asset,
        "amount": str(amount),
        "payTo": pay_to,
        "maxTimeoutSeconds": timeout_s,
        "extra": extra,
    }


def payment_required(
    *, url: str, description: str, accepts: list[dict[str, Any]], error: str | None = None
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "x402Version": X402_VERSION,
        "resource": {"url": url, "description": description, "mimeType": "application/json"},
        "accepts": accepts,
    }
    if error is not None:
        document["error"] = error
    return document
