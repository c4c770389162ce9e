"""Liveness and Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from marketplace.gateway.api.deps import GatewayDep
from settlement.errors import ChainError

router = APIRouter(tags=["health"])


@router.get(
    "/health", operation_id="getHealth", responses={503: {"description": "the database or chain is down"}}
)
async def get_health(gateway: GatewayDep) -> JSONResponse:
    """200 when the database and the chain answer; 503 with what is down otherwise."""
    checks: dict[str, Any] = {}
    try:
        async with gateway.sessions() as session:
            await session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any driver error means the same thing here: down
        checks["database"] = f"down: {type(exc).__name__}"
    chain = gateway.contracts.chain
    try:
        block = await asyncio.to_thread(chain.read, lambda: int(chain.w3.eth.block_number))
        checks["chain"] = {"id": gateway.terms.chain_id, "block": block}
    except ChainError as exc:
        checks["chain"] = f"down: {exc}"
    healthy = checks["database"] == "ok" and isinstance(checks["chain"], dict)
    body = {
        "status": "ok" if healthy else "degraded",
        "gateway": gateway.account.address,
        # The protocol's signing domain: a payer's JobRead proof is signed under it.
        "deployment": {"chainId": gateway.terms.chain_id, "stakeManager": gateway.contracts.stake.address},
        "models": [model.name for model in gateway.catalog],
        "asks": len(gateway.book.asks()),
        **checks,
    }
    return JSONResponse(body, status_code=200 if healthy else 503)


@router.get("/metrics", operation_id="getMetrics", response_class=Response)
async def get_metrics(gateway: GatewayDep) -> Response:
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)
