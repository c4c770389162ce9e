"""The market: providers' asks and heartbeats, the order book's depth, providers, and payment channels."""

from __future__ import annotations

from typing import Annotated, Any

from eth_utils.address import to_checksum_address
from fastapi import APIRouter, Path, Query
from sqlalchemy import func, select

from marketplace.gateway.api.deps import GatewayDep
from marketplace.gateway.api.models import (
    ADDRESS_PATTERN,
    HASH_PATTERN,
    UNAVAILABLE,
    AskList,
    ChannelView,
    HeartbeatAccepted,
    OrderBook,
    PostedAsk,
    ProviderList,
    ProviderView,
    error,
)
from marketplace.gateway.api.schemas import AskBody, HeartbeatBody
from marketplace.gateway.errors import NotFound, chain_read
from marketplace.gateway.market import AskInput
from marketplace.gateway.orderbook import BookAsk
from settlement.contracts import payer_of
from settlement.db.schema import Channel, Hop, HopStatus, Provider

router = APIRouter(prefix="/v1", tags=["market"])

ProviderAddress = Annotated[str, Path(pattern=ADDRESS_PATTERN, description="the provider's address")]
ChannelId = Annotated[
    str,
    Path(pattern=HASH_PATTERN, description="32 bytes of 0x-prefixed hex, its first 20 the payer's address"),
]
UNKNOWN_MODEL = error("unknown model (`unknown_model`)")


def ask_view(ask: BookAsk) -> dict[str, Any]:
    return {
        "id": ask.id,
        "provider": ask.provider,
        "modelRoot": ask.model_root,
        "layers": [ask.start, ask.end],
        "pricePerMillion": str(ask.price_per_million),
        "capacity": ask.capacity,
        "retentionS": ask.retention_s,
        "inUse": ask.in_use,
        "endpoint": ask.endpoint,
        "tlsFingerprint": "0x" + ask.tls_fingerprint.hex(),
        "expiresAt": int(ask.expires_at),
    }


@router.post(
    "/asks",
    operation_id="postAsk",
    status_code=201,
    response_model=PostedAsk,
    responses={
        400: error(
            "a body that does not follow the API (`invalid_request`), or an ask this gateway does not take: "
            "`bad_span`, `bad_endpoint`, `bad_expiry`, `short_retention`, `plaintext_endpoint`"
        ),
        403: error(
            "an ask for another gateway (`wrong_gateway`), not signed by its provider (`invalid_signature`), "
            "from an unstaked provider (`provider_not_staked`), or whose endpoint did not prove to be the "
            "provider's (`endpoint_not_proven`)"
        ),
        404: error("this gateway serves no model with that root (`unknown_model`)"),
        409: error("a nonce not above the provider's last ask (`stale_nonce`)"),
    },
)
async def post_ask(body: AskBody, gateway: GatewayDep) -> dict[str, Any]:
    """Posts a provider's signed ask (EIP-712 `Ask`); capacity 0 withdraws the provider's ask for that span."""
    booked = await gateway.market.post_ask(
        AskInput(
            provider=body.provider,
            gateway=body.gateway,
            tls_fingerprint=body.tlsFingerprint,
            model_root=body.modelRoot.lower(),
            layer_start=body.layerStart,
            layer_end=body.layerEnd,
            price_per_million=body.pricePerMillion,
            capacity=body.capacity,
            retention_s=body.retentionS,
            endpoint=body.endpoint,
            nonce=body.nonce,
            expires_at=body.expiresAt,
            signature=body.signature,
        )
    )
    return {"ask": ask_view(booked) if booked else None, "withdrawn": booked is None}


@router.get("/asks", operation_id="listAsks", response_model=AskList, responses={404: UNKNOWN_MODEL})
async def list_asks(
    gateway: GatewayDep,
    model: str | None = Query(default=None, description="model name or root"),
    provider: str | None = Query(default=None, pattern=ADDRESS_PATTERN),
) -> dict[str, Any]:
    """Live asks, oldest first, optionally for one model (name or root) or one provider."""
    root = gateway.catalog.get(model).root if model else None
    address = to_checksum_address(provider) if provider else None
    return {"data": [ask_view(ask) for ask in gateway.book.asks(root, address)]}


@router.get(
    "/orderbook", operation_id="getOrderBook", response_model=OrderBook, responses={404: UNKNOWN_MODEL}
)
async def get_order_book(
    gateway: GatewayDep, model: str = Query(description="model name or root")
) -> dict[str, Any]:
    """Depth per layer span (price levels, cheapest first, of matchable providers) and the best route now."""
    served = gateway.catalog.get(model)
    route = gateway.book.route(served.root, served.num_layers)
    return {
        "model": served.name,
        "modelRoot": served.root,
        "layers": served.num_layers,
        "spans": [
            {
                "layers": [span.start, span.end],
                "levels": [
                    {
                        "pricePerMillion": str(level.price_per_million),
                        "asks": level.asks,
                        "capacity": level.capacity,
                        "free": level.free,
                    }
                    for level in span.levels
                ],
            }
            for span in gateway.book.depth(served.root)
        ],
        "bestRoute": None
        if route is None
        else {
            "asks": [ask_view(ask) for ask in route.asks],
            "pricePerMillionTokens": str(route.price_per_token),
        },
    }


@router.post(
    "/providers/heartbeat",
    operation_id="postHeartbeat",
    response_model=HeartbeatAccepted,
    responses={
        400: error(
            "a body that does not follow the API (`invalid_request`), or a timestamp too far from the gateway's "
            "clock (`bad_timestamp`)"
        ),
        403: error("a heartbeat for another gateway (`wrong_gateway`) or not signed by its provider"),
        404: error("a provider that has posted no ask (`unknown_provider`)"),
        409: error("a timestamp not above the provider's last (`stale_heartbeat`)"),
    },
)
async def post_heartbeat(body: HeartbeatBody, gateway: GatewayDep) -> dict[str, Any]:
    """A provider's signed heartbeat (EIP-712 `Heartbeat`): it stays matchable for the heartbeat TTL."""
    until = await gateway.market.heartbeat(body.provider, body.gateway, body.timestamp, body.signature)
    return {"provider": to_checksum_address(body.provider), "matchableUntil": int(until)}


@router.get("/providers", operation_id="listProviders", response_model=ProviderList)
async def list_providers(gateway: GatewayDep) -> dict[str, Any]:
    async with gateway.sessions() as session:
        rows = (await session.scalars(select(Provider).order_by(Provider.first_seen_at))).all()
        served = dict(
            (
                await session.execute(
                    select(Hop.provider, func.count())
                    .where(Hop.status == HopStatus.BILLED)
                    .group_by(Hop.provider)
                )
            ).all()
        )
    return {"data": [_provider_view(gateway, row, int(served.get(row.address, 0))) for row in rows]}


@router.get(
    "/providers/{address}",
    operation_id="getProvider",
    response_model=ProviderView,
    responses={404: error("a provider that has posted no ask (`unknown_provider`)")},
)
async def get_provider(address: ProviderAddress, gateway: GatewayDep) -> dict[str, Any]:
    checksummed = to_checksum_address(address)
    async with gateway.sessions() as session:
        row = await session.get(Provider, checksummed)
        if row is None:
            raise NotFound("unknown_provider", f"{checksummed} has posted no ask")
        served = await session.scalar(
            select(func.count())
            .select_from(Hop)
            .where(Hop.provider == checksummed, Hop.status == HopStatus.BILLED)
        )
    return _provider_view(gateway, row, int(served or 0))


def _provider_view(gateway: GatewayDep, row: Provider, sessions_served: int) -> dict[str, Any]:
    state = gateway.book.provider(row.address)
    return {
        "address": row.address,
        "active": state.active,
        "matchable": gateway.book.matchable(row.address),
        "lastHeartbeat": int(state.last_heartbeat) or None,
        "suspendedUntil": int(state.suspended_until) or None,
        "sessionsServed": sessions_served,
        "asks": [ask_view(ask) for ask in gateway.book.asks(provider=row.address)],
    }


@router.get(
    "/channels/{channel_id}",
    operation_id="getChannel",
    response_model=ChannelView,
    responses={
        404: error("no deposit and no vouchers for this channel (`unknown_channel`)"),
        503: UNAVAILABLE,
    },
)
async def get_channel(channel_id: ChannelId, gateway: GatewayDep) -> dict[str, Any]:
    """A payment channel: its deposit on chain and what this gateway accepted, charged and reserved on it."""
    channel = channel_id.lower()
    view = await chain_read(gateway.watcher.channel(bytes.fromhex(channel[2:])))
    async with gateway.sessions() as session:
        row = await session.get(Channel, channel)
    if row is None and view.deposit == 0 and not view.closed:
        raise NotFound("unknown_channel", f"channel {channel} has no deposit and no vouchers")
    voucher, charged, reserved = (row.voucher_amount, row.charged, row.reserved) if row else (0, 0, 0)
    return {
        "channelId": channel,
        "payer": payer_of(bytes.fromhex(channel[2:])),
        "deposit": str(view.deposit),
        "withdrawableAt": str(view.withdrawable_at),
        "exiting": view.exiting,
        "closed": view.closed,
        "voucherAmount": str(voucher),
        "charged": str(charged),
        "reserved": str(reserved),
        "available": str(max(0, view.deposit - charged - reserved)),
    }
