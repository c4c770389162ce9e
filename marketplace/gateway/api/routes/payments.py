"""The one payment route that is not a request for work: an x402 batch-settlement channel's cooperative refund.

x402's client (``BatchSettlementEvmScheme.refund(url)``) asks for it with a GET: without a payment, the answer is
a 402 whose requirement names the channel it would refund; with a refund payload (a voucher for what the payer
was told it was charged, and optionally an amount), the operator refunds the unspent deposit and the answer's
PAYMENT-RESPONSE says so (see marketplace.gateway.payments.gate.PaymentGate.refund and settlement.refunds).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from marketplace.gateway.api.deps import GatewayDep
from marketplace.gateway.api.models import ADMISSION, Refunded, error
from marketplace.gateway.errors import InvalidRequest, PaymentRejected
from marketplace.gateway.payments.x402 import (
    BATCH,
    PAYMENT_RESPONSE,
    PAYMENT_SIGNATURE,
    BatchPayment,
    decode_payment,
    encode_header,
    payment_required,
)

router = APIRouter(prefix="/v1", tags=["payments"])
REFUND_WAIT_S = 30.0  # how long the answer waits for the operator to make the refund


@router.get(
    "/batch-settlement/refund",
    operation_id="refundBatchChannel",
    response_model=Refunded,
    responses={
        **{status: ADMISSION[status] for status in (400, 402)},
        503: error(
            "the refund is asked for and not made yet (`refund_pending`): it will be; ask again to see it"
        ),
    },
)
async def refund(request: Request, gateway: GatewayDep) -> JSONResponse:
    """Refunds what an x402 batch-settlement channel holds and was never charged, to its payer, now."""
    terms, url = gateway.terms, str(request.url)
    header = request.headers.get(PAYMENT_SIGNATURE)
    try:
        if header is None:
            raise PaymentRejected(
                "payment_required", "sign a refund voucher for what this channel was charged"
            )
        payment = decode_payment(header)
        if not isinstance(payment, BatchPayment):
            raise InvalidRequest(
                "invalid_payment_header", "a refund is asked for with a batch-settlement payload"
            )
        await gateway.limiter.check_payer(payment.payer)
        metering = gateway.metering
        row = await gateway.runner.gate.refund(
            payment, ask=metering.refund if metering else _nobody, wait_s=REFUND_WAIT_S
        )
    except PaymentRejected as exc:
        state = exc.details.pop("batch_state", None)
        accepts = terms.accepts(0, route=[], tokens=0, batch_state=state)
        exc.details["required"] = payment_required(
            url=url,
            description="refund of a batch-settlement channel",
            accepts=[offer for offer in accepts if offer["scheme"] == BATCH],
            error=exc.code,
        )
        raise
    view = await gateway.runner.gate.batch_state(payment.channel_id, fresh=True)
    document: dict[str, Any] = {
        "success": True,
        "transaction": row.refund_tx or "",
        "network": terms.network,
        "payer": payment.payer,
        "extra": {"channelState": {**view.as_json(row.id), "chargedCumulativeAmount": str(row.acknowledged)}},
    }
    body = {"channelId": row.id, "transaction": row.refund_tx, "balance": str(view.deposit)}
    return JSONResponse(body, headers={PAYMENT_RESPONSE: encode_header(document)})


def _nobody(channel_id: str) -> None:
    """Without a broker no operator worker hears of the refund: it waits for one that looks for refunds asked."""
