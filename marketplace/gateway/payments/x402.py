"""x402 v2 over HTTP: the three headers, as this gateway writes and reads them.

``PAYMENT-REQUIRED`` (on a 402), ``PAYMENT-SIGNATURE`` (the client's retry) and ``PAYMENT-RESPONSE`` (on the
answer) each carry base64 of one JSON object; networks are CAIP-2 ``eip155:<chainId>``; amounts are decimal
strings of token base units.

Two schemes are accepted:

``voucher``  ``payload = {channelId, maxClaimableAmount, signature}``: an EIP-712
             ``Voucher(bytes32 channelId, uint128 maxClaimableAmount)`` on VoucherEscrow, cumulative per channel.
``exact``    ``payload = {authorization: {from, to, value, validAfter, validBefore, nonce}, signature}``: an
             EIP-3009 ``TransferWithAuthorization`` on the token, as x402's own exact EVM client signs it.

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
from settlement.eip712 import TransferAuthorization
from worker import jsontext

X402_VERSION = 2
PAYMENT_REQUIRED = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE = "PAYMENT-SIGNATURE"
PAYMENT_RESPONSE = "PAYMENT-RESPONSE"
VOUCHER = "voucher"
EXACT = "exact"
SCHEMES = (VOUCHER, EXACT)

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


@dataclass(frozen=True)
class ExactPayment:
    network: str
    asset: str
    authorization: TransferAuthorization
    signature: bytes


Payment = VoucherPayment | ExactPayment


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
