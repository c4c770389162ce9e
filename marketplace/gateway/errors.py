"""Errors the gateway raises. Each carries the stable ``code`` a client sees and the HTTP status it maps to.

    GatewayError                 every error below: ``code``, ``status``, message, ``details``
    ├── InvalidRequest    400    a body, header, query or argument that does not follow the API
    ├── Forbidden         403    a signed ask or heartbeat that cannot be accepted from its signer
    ├── NotFound          404    an unknown model, job, channel or provider
    ├── Conflict          409    the market cannot serve the request now: no route, prices above the bid
    ├── PaymentRejected   402    a payment that does not secure the request; answered with a fresh quote
    ├── ServiceFailed     502    providers failed and no other route could finish the job
    ├── Unavailable       503    the chain does not answer (with Retry-After)
    ├── RateLimited       429    too many requests from one client address or one payer (with Retry-After)
    └── TooManyResting    429    the book holds all the resting jobs it takes (marketplace.gateway.resting)

Codes are part of the API: clients branch on them, so they never change meaning. The codes in use are listed
on each raise site; :data:`PAYMENT_CODES` lists those of rejected payments. Nothing below the API edge knows
about HTTP beyond the status number carried here.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

from settlement.errors import ChainUnavailable

T = TypeVar("T")


class GatewayError(Exception):
    status = 500
    kind = "server_error"

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        """The error as OpenAI-compatible clients expect it: ``{"error": {message, type, code, ...}}``."""
        error: dict[str, Any] = {"message": self.message, "type": self.kind, "code": self.code}
        details = dict(self.details)
        if "param" in details:  # OpenAI's place for the field at fault
            error["param"] = details.pop("param")
        if details:
            error["details"] = details
        return {"error": error}


class InvalidRequest(GatewayError):
    status = 400
    kind = "invalid_request_error"


class Forbidden(GatewayError):
    status = 403
    kind = "permission_error"


class NotFound(GatewayError):
    status = 404
    kind = "not_found_error"


class Conflict(GatewayError):
    status = 409
    kind = "market_error"


class PaymentRejected(GatewayError):
    """The payment header was readable but does not pay for this request; the client may pay again."""

    status = 402
    kind = "payment_error"


class ServiceFailed(GatewayError):
    status = 502
    kind = "provider_error"


class Unavailable(GatewayError):
    """Something the gateway depends on (the chain) does not answer; the client may retry after
    ``retry_after_s`` (sent as Retry-After)."""

    status = 503
    kind = "service_unavailable"

    def __init__(self, code: str, message: str, *, retry_after_s: int = 5, **details: Any) -> None:
        super().__init__(code, message, **details)
        self.retry_after_s = retry_after_s


class RateLimited(GatewayError):
    """A client address or a payer sent more than its rate (marketplace.gateway.ratelimit); the client may retry
    after ``retry_after_s`` (sent as Retry-After)."""

    status = 429
    kind = "rate_limit_error"

    def __init__(self, code: str, message: str, *, retry_after_s: int, **details: Any) -> None:
        super().__init__(code, message, **details)
        self.retry_after_s = retry_after_s


PAYMENT_CODES = frozenset(
    {
        "unsupported_scheme",  # neither `voucher` nor `exact`
        "wrong_network",  # not eip155:<this chain's id>
        "wrong_asset",  # not the token this gateway is paid in
        "invalid_signature",  # not signed by the channel's payer / the authorization's sender
        "unknown_channel",  # no deposit on chain for this channel
        "channel_exiting",  # the payer started to withdraw
        "channel_closed",  # the payer withdrew
        "voucher_not_increasing",  # not above the channel's highest accepted voucher: a replay or a decrease
        "voucher_too_low",  # below what is charged and reserved on the channel plus this quote
        "insufficient_deposit",  # above what is deposited in the channel
        "amount_out_of_range",  # an amount this gateway does not account in (over 2**63 - 1)
        "wrong_recipient",  # an authorization paying someone else
        "amount_too_low",  # an authorization for less than the quote
        "authorization_not_yet_valid",
        "authorization_expired",  # validBefore passed, or too close to settle in time
        "authorization_used",  # its nonce was used on chain or is being settled
        "insufficient_balance",  # the payer's token balance does not cover the authorization
        "settlement_failed",  # the chain refused the transfer
    }
)


async def chain_read(read: Awaitable[T]) -> T:
    """A chain read an answer depends on; an unreachable chain is the client's 503 to retry, not a 500."""
    try:
        return await read
    except ChainUnavailable as exc:
        raise Unavailable("chain_unavailable", f"the chain cannot be read: {exc}") from exc
