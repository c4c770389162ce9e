"""Non-interactive jobs: paid like any request, they may rest in the book until a route at or below their
``max_price`` appears, and their result is read back later."""

from __future__ import annotations

import re
import time
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Request
from fastapi.responses import JSONResponse

from marketplace.gateway.api.deps import GatewayDep, PaymentHeader, resource_url
from marketplace.gateway.api.models import (
    ADMISSION,
    HASH_PATTERN,
    PAYMENT_RESPONSE_HEADER,
    TOO_MANY_RESTING,
    JobView,
    error,
)
from marketplace.gateway.api.responses import ACCESS_CONTROL_EXPOSE, payment_document
from marketplace.gateway.api.routes.inference import build_request, encode_chat, encode_prompt
from marketplace.gateway.api.schemas import CONFLICTING, JobBody
from marketplace.gateway.errors import Forbidden, InvalidRequest, NotFound
from marketplace.gateway.payments.gate import NONE
from marketplace.gateway.payments.x402 import PAYMENT_RESPONSE, encode_header
from settlement.db.schema import Job
from settlement.eip712 import JobRead

router = APIRouter(prefix="/v1", tags=["jobs"])

# "<expiresAt>:<0x signature>" of JobRead(jobId, expiresAt) by the job's payer (the SDK sends it: client.http)
JOB_READ = "X-Strata-Job-Read"
READ_PROOF_PATTERN = r"^([0-9]{1,20}):0x([0-9a-fA-F]{130})$"
MAX_READ_LIFETIME_S = 3600

JobId = Annotated[str, Path(pattern=HASH_PATTERN, description="the job's id: 32 bytes of 0x-prefixed hex")]
ReadProof = Annotated[
    str | None,
    Header(
        alias=JOB_READ,
        description="`<expiresAt>:<signature>`: the payer's EIP-712 signature of `JobRead(jobId, expiresAt)`",
        # Checked by the route, which refuses a malformed proof as `invalid_read_proof`.
        json_schema_extra={"pattern": READ_PROOF_PATTERN},
    ),
]


def job_view(job: Job, *, with_output: bool = True) -> dict[str, Any]:
    """The job as its API shows it; ``output`` only to its payer (None otherwise)."""
    return {
        "id": job.id,
        "object": "job",
        "kind": job.kind,
        "model": job.model_name,
        "modelRoot": job.model_root,
        "status": job.status,
        "payer": job.payer,
        "scheme": job.scheme,
        "quote": str(job.quote),
        "charged": str(job.charged),
        "maxPrice": str(job.max_price) if job.max_price is not None else None,
        "output": job.output if with_output else None,
        "finishReason": job.finish_reason,
        "usage": {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens},
        "failovers": job.failovers,
        # Cleared: its sampled hops are validated, so an epoch may settle it. Voided: a validator found a hop
        # wrong, and the client pays nothing for the job (see settlement.validator).
        "cleared": job.cleared_at is not None,
        "voided": job.voided_at is not None,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "createdAt": job.created_at.isoformat(),
        "finishedAt": job.finished_at.isoformat() if job.finished_at else None,
        "expiresAt": job.expires_at.isoformat() if job.expires_at else None,
    }


@router.post(
    "/jobs",
    operation_id="createJob",
    status_code=202,
    responses={
        202: {
            "model": JobView,
            "description": "the job, running or resting in the book",
            "headers": {"PAYMENT-RESPONSE": PAYMENT_RESPONSE_HEADER},
        },
        **ADMISSION,
        429: TOO_MANY_RESTING,
    },
)
async def create_job(
    body: JobBody, request: Request, gateway: GatewayDep, payment: PaymentHeader = None
) -> Any:
    """Submits a job. With ``max_price`` it reserves that much and rests until a route at or below it appears
    (or ``ttl_s`` passes); without, it runs now at the cheapest route's quote or is refused."""
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequest(CONFLICTING, "give exactly one of prompt and messages", param="prompt")
    if body.ttl_s > gateway.settings.max_job_ttl_s:
        # MAX_JOB_TTL_S is this gateway's setting, which a fixed document cannot state.
        raise InvalidRequest(
            "ttl_too_long", f"ttl_s is at most {gateway.settings.max_job_ttl_s}", param="ttl_s"
        )
    if body.stream:
        raise InvalidRequest("unsupported_parameter", "jobs are not streamed: read them at GET /v1/jobs/{id}")
    model = gateway.catalog.get(body.model)
    if body.messages is not None:
        prompt = await encode_chat(gateway, model, body.messages)
    else:
        prompt = await encode_prompt(gateway, model, body.prompt or "")
    job = replace(await build_request("job", model, prompt, body.max_tokens, body), ttl_s=body.ttl_s)
    run = await gateway.runner.admit(job, payment, url=resource_url(request, gateway))
    row = await gateway.runner.job(run.job_id)
    assert row is not None
    headers = {}
    if run.reservation.scheme != NONE:
        headers = {
            PAYMENT_RESPONSE: encode_header(
                payment_document(run.job_id, run.reservation, gateway.terms.network)
            ),
            ACCESS_CONTROL_EXPOSE: PAYMENT_RESPONSE,
        }
    return JSONResponse(job_view(row), status_code=202, headers=headers)


@router.get(
    "/jobs/{job_id}",
    operation_id="getJob",
    response_model=JobView,
    responses={
        400: error("a malformed job id (`invalid_request`) or read proof (`invalid_read_proof`)"),
        403: error(
            "a read proof that is not the payer's (`not_the_payer`), or expired (`read_proof_expired`)"
        ),
        404: error("unknown job (`unknown_job`)"),
    },
)
async def get_job(job_id: JobId, gateway: GatewayDep, proof: ReadProof = None) -> dict[str, Any]:
    """A job's status, what it was charged, and its output once finished. The output is the payer's: it is
    shown only with an ``X-Strata-Job-Read`` header, ``<expiresAt>:<signature>``, the payer's EIP-712 signature
    of ``JobRead(jobId, expiresAt)`` under the protocol domain (providers see job ids in their tickets, so an id
    alone must not be enough). Jobs of a gateway without payments show it to anyone."""
    row = await gateway.runner.job(job_id.lower())
    if row is None:
        raise NotFound("unknown_job", f"no job {job_id}")
    if row.payer is None:
        return job_view(row)
    if proof is None:
        return job_view(row, with_output=False)
    parsed = re.fullmatch(READ_PROOF_PATTERN, proof)
    if parsed is None:
        raise InvalidRequest("invalid_read_proof", f"{JOB_READ} is not <expiresAt>:<0x signature>")
    expires_at, signature = int(parsed[1]), bytes.fromhex(parsed[2])
    now = int(time.time())
    if not now < expires_at <= now + MAX_READ_LIFETIME_S:
        raise Forbidden("read_proof_expired", f"the read proof expires at {expires_at}; now is {now}")
    try:
        signer = JobRead(bytes.fromhex(row.id[2:]), expires_at).signer(
            signature, gateway.contracts.protocol_domain()
        )
    except ValueError as exc:  # a signature that recovers no key
        raise InvalidRequest("invalid_read_proof", f"{JOB_READ} holds no valid signature: {exc}") from exc
    if signer != row.payer:
        raise Forbidden("not_the_payer", f"the read proof is signed by {signer}, not by the job's payer")
    return job_view(row)
