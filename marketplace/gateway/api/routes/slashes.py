"""Slashes: the evidence behind every failed validation, by the hash StakeManager.slash recorded on chain.

Anyone who sees a ``Slashed`` event can fetch its evidence here and check it: ``evidence`` is the exact JSON
document whose keccak256 is the event's evidence hash, naming the job, the hop (provider, layers, session, the
transcript its receipt signs) and the validator's metrics against the reference weights.

False receipts are listed here too, with status ``suspended``: the provider was suspended, not slashed, and the
evidence is the receipt it signed beside the gateway's record of the hop (``reason`` ``false_receipt``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from eth_utils.address import to_checksum_address
from fastapi import APIRouter, Path, Query
from sqlalchemy import select

from marketplace.gateway.api.deps import GatewayDep
from marketplace.gateway.api.models import ADDRESS_PATTERN, HASH_PATTERN, Slash, SlashList, error
from marketplace.gateway.errors import InvalidRequest, NotFound
from settlement.db.schema import Validation, ValidationStatus

router = APIRouter(prefix="/v1", tags=["slashes"])

EvidenceHash = Annotated[str, Path(pattern=HASH_PATTERN, description="keccak256 of the evidence document")]


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


@router.get(
    "/slashes",
    operation_id="listSlashes",
    response_model=SlashList,
    responses={400: error("a provider that is not an address (`invalid_address`), or a limit out of range")},
)
async def list_slashes(
    gateway: GatewayDep,
    provider: str | None = Query(
        default=None,
        description="only this provider's",
        # Checked below, which refuses anything else as `invalid_address`.
        json_schema_extra={"pattern": ADDRESS_PATTERN},
    ),
    limit: int = Query(default=100, ge=1, le=1000),
) -> dict[str, Any]:
    """Failed validations, newest first, without their evidence documents."""
    query = select(Validation).where(Validation.status == ValidationStatus.FAILED)
    if provider is not None:
        if not re.fullmatch(ADDRESS_PATTERN, provider):
            raise InvalidRequest("invalid_address", f"{provider!r} is not an address")
        query = query.where(Validation.provider == to_checksum_address(provider))
    async with gateway.sessions() as session:
        rows = (await session.scalars(query.order_by(Validation.id.desc()).limit(limit))).all()
    return {"object": "list", "data": [slash_view(row, evidence=False) for row in rows]}


@router.get(
    "/slashes/{evidence_hash}",
    operation_id="getSlash",
    response_model=Slash,
    responses={404: error("no slash with this evidence (`unknown_slash`)")},
)
async def get_slash(evidence_hash: EvidenceHash, gateway: GatewayDep) -> dict[str, Any]:
    """One slash and its evidence document."""
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
