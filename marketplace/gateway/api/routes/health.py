"""Liveness and Prometheus metrics.

``/health`` also says whether validation keeps up (``settlement.db.validations.Backlog``): hops the validator
could not judge through its own trouble, hops still pending past the window, hops missed in the last hour. That
is the operator's to fix (weights, memory, workers), never a provider's fault, so it does not turn the answer
503: the gateway serves on.
"""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from marketplace.gateway.api.deps import GatewayDep
from marketplace.gateway.api.models import Health
from marketplace.gateway.service import Gateway
from settlement.db.schema import utcnow
from settlement.db.validations import Backlog, backlog_query
from settlement.errors import ChainError

router = APIRouter(tags=["health"])


@router.get(
    "/health",
    operation_id="getHealth",
    responses={
        200: {"model": Health, "description": "the database and the chain answer"},
        503: {"model": Health, "description": "the database or the chain is down: `status` is `degraded`"},
    },
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
    try:
        block = await gateway.watcher.latest_block()  # one RPC call a second at most, however often asked
        checks["chain"] = {"id": gateway.terms.chain_id, "block": block}
    except ChainError as exc:
        checks["chain"] = f"down: {exc}"
    try:
        backlog = await _validation_backlog(gateway)
        checks["validation"] = {
            "status": "behind" if backlog.behind else "ok",
            "pending": backlog.pending,
            "troubled": backlog.troubled,
            "overdue": backlog.overdue,
            "missedRecently": backlog.missed_recently,
        }
    except Exception as exc:  # the database being down is said above
        checks["validation"] = f"unknown: {type(exc).__name__}"
    watcher = gateway.watcher
    checks["chainWatcher"] = {
        "lagBlocks": watcher.lag_blocks,
        "secondsSinceSync": None
        if watcher.seconds_since_sync is None
        else round(watcher.seconds_since_sync, 1),
        "failedRounds": watcher.failures,
    }
    gateway.metrics.observe_watcher(watcher.lag_blocks, watcher.seconds_since_sync)
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


@router.get(
    "/metrics",
    operation_id="getMetrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus' text exposition format",
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
        }
    },
)
async def get_metrics(gateway: GatewayDep) -> Response:
    with contextlib.suppress(Exception):  # the gauges keep their last values while the database is down
        await _validation_backlog(gateway)
    gateway.metrics.observe_watcher(gateway.watcher.lag_blocks, gateway.watcher.seconds_since_sync)
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _validation_backlog(gateway: Gateway) -> Backlog:
    async with gateway.sessions() as session:
        row = (await session.execute(backlog_query(utcnow(), gateway.settings.validation_window_s))).one()
    backlog = Backlog(*(int(count) for count in row))
    gateway.metrics.observe_validation(backlog)
    return backlog
