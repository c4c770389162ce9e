"""Slashes: the evidence behind every failed validation, by the hash StakeManager.slash recorded on chain.

Anyone who sees a ``Slashed`` event can fetch its evidence here and check it: ``evidence`` is the exact JSON
document whose keccak256 is the event's evidence hash, naming the job, the hop (provider, layers, session, the
transcript its receipt signs) and the validator's metrics against the reference weights.

False receipts are listed here too, with status ``suspended``: the provider was suspended, not slashed, and the
evidence is the receipt it signed beside the gateway's record of the hop (``reason`` ``false_receipt``).
"""

from __future__ import annotations

import re
from typing import Any

from eth_utils.address import is_address, to_checksum_address
from fastapi import APIRouter, Query
from sqlalchemy import select

from marketplace.gateway.api.deps import GatewayDep
from marketplace.gateway.errors import InvalidRequest, NotFound
from settlement.db.schema import Validation, ValidationStatus

router = APIRouter(prefix="/v1", tags=["slashes"])

_HASH = re.compile(r"0x[0-9a-fA-F]{64}")


def slash_view(validation: Validation, *, evidence: bool) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": validation.evidence_hash,
        "object": "slash",
        "provider": validation.provider,
        "job": validation.job_id,
        "reason": validation.reason,
        "detail": validation.detail,
        # pending, slashed, nothing (no stake was left), or suspended (a false receipt: no slash)
        "status": validation.slash_status,
        "slashed": str(validation.slashed) if validation.slashed is not None else None,
        "transaction": validation.slash_tx,
        "decidedAt": validation.decided_at.isoformat() if validation.decided_at else None,
    }
    if evidence:
        view["evidence"] = validation.evidence
    return view


@router.get("/slashes", operation_id="listSlashes", responses={400: {"description": "not an address"}})
async def list_slashes(
    gateway: GatewayDep,
    provider: str | None = Query(default=None, description="only this provider's"),
    limit: int = Query(default=100, ge=1, le=1000),
) -> dict[str, Any]:
    """Failed validations, newest first, without their evidence documents."""
    query = select(Validation).where(Validation.status == ValidationStatus.FAILED)
    if provider is not None:
        if not is_address(provider):
            raise InvalidRequest("invalid_address", f"{provider!r} is not an address")
        query = query.where(Validation.provider == to_checksum_address(provider))
    async with gateway.sessions() as session:
        rows = (await session.scalars(query.order_by(Validation.id.desc()).limit(limit))).all()
    return {"object": "list", "data": [slash_view(row, evidence=False) for row in rows]}


@router.get(
    "/slashes/{evidence_hash}",
    operation_id="getSlash",
    responses={400: {"description": "not a hash"}, 404: {"description": "no slash with this evidence"}},
)
async def get_slash(evidence_hash: str, gateway: GatewayDep) -> dict[str, Any]:
    """One slash and its evidence document."""
    if not _HASH.fullmatch(evidence_hash):
        raise InvalidRequest("invalid_request", "an evidence hash is 32 bytes of 0x-prefixed hex")
    async with gateway.sessions() as session:
        row = await session.scalar(
            select(Validation).where(
                Validation.evidence_hash == evidence_hash.lower(),
                Validation.status == ValidationStatus.FAILED,
            )
        )
    if row is None:
        raise NotFound("unknown_slash", f"no slash with evidence {evidence_hash}")
    return slash_view(row, evidence=True)
