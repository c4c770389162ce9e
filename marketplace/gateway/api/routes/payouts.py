"""Providers' payouts: what the ledger says they earned, what the latest root lets them claim, and the proof."""

from __future__ import annotations

import asyncio
import re
from functools import lru_cache
from typing import Annotated, Any

from eth_utils.address import to_checksum_address
from fastapi import APIRouter, Path
from sqlalchemy import func, select

from marketplace.gateway.api.deps import GatewayDep
from marketplace.gateway.api.models import ADDRESS_PATTERN, UNAVAILABLE, Payout, error
from marketplace.gateway.errors import InvalidRequest, Unavailable
from settlement.db.schema import Epoch, EpochStatus, LedgerEntry
from settlement.errors import ChainError
from settlement.merkle import PayoutTree

router = APIRouter(prefix="/v1", tags=["payouts"])

# Checked by the route, which refuses anything else as `invalid_address`.
PayeeAddress = Annotated[
    str, Path(description="a provider or the treasury", json_schema_extra={"pattern": ADDRESS_PATTERN})
]


@lru_cache(maxsize=4)
def _tree(leaves: tuple[tuple[str, int], ...]) -> PayoutTree:
    return PayoutTree.build(dict(leaves))


@router.get(
    "/payouts/{address}",
    operation_id="getPayout",
    response_model=Payout,
    responses={400: error("not an address (`invalid_address`)"), 503: UNAVAILABLE},
)
async def get_payout(address: PayeeAddress, gateway: GatewayDep) -> dict[str, Any]:
    """A provider's (or the treasury's) payout: amounts in base units as decimal strings.

    ``earned`` counts every metered entry that no failed validation voided, settled or not; ``settled`` is its
    leaf in the latest posted root, ``claimed`` what the distributor already paid it, and ``claimable`` the
    difference, claimable with ``proof`` against ``root`` by anyone on its behalf.
    """
    if not re.fullmatch(ADDRESS_PATTERN, address):
        raise InvalidRequest("invalid_address", f"{address!r} is not an address")
    provider = to_checksum_address(address)
    async with gateway.sessions() as session:
        earned = await session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.provider_share), 0)).where(
                LedgerEntry.provider == provider, LedgerEntry.voided.is_(False)
            )
        )
        latest = await session.scalar(
            select(Epoch).where(Epoch.status == EpochStatus.POSTED).order_by(Epoch.number.desc()).limit(1)
        )
    try:
        claimed = await asyncio.to_thread(gateway.contracts.distributor.claimed, provider)
    except ChainError as exc:
        raise Unavailable("chain_unavailable", f"the chain did not answer: {exc}") from exc
    settled, proof = 0, []
    if latest is not None and provider in latest.leaves:
        settled = int(latest.leaves[provider])
        leaves = tuple(sorted((account, int(amount)) for account, amount in latest.leaves.items()))
        proof = ["0x" + node.hex() for node in _tree(leaves).proof(provider)]
    return {
        "provider": provider,
        "earned": str(int(earned or 0)),
        "settled": str(settled),
        "claimed": str(claimed),
        "claimable": str(max(0, settled - claimed)),
        "epoch": latest.number if latest else None,
        "root": latest.root if latest else None,
        "cumulativeAmount": str(settled),
        "proof": proof,
    }
