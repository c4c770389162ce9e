"""Dependencies the routes share."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from marketplace.gateway.payments.x402 import PAYMENT_SIGNATURE
from marketplace.gateway.service import Gateway


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def resource_url(request: Request, gateway: Gateway) -> str:
    """The URL a 402 quote names: the public base URL if one is configured, else the one the client used."""
    base = gateway.settings.public_url
    if base:
        return base.rstrip("/") + request.url.path
    return str(request.url.replace(query=None))


GatewayDep = Annotated[Gateway, Depends(_gateway)]
PaymentHeader = Annotated[
    str | None,
    Header(
        alias=PAYMENT_SIGNATURE,
        description="x402 v2 payment: base64 JSON of a `voucher` or `exact` payment for the quoted amount",
    ),
]
