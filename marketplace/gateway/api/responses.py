"""Turning a job's run into OpenAI-compatible answers, streamed over SSE or whole, with x402's
``PAYMENT-RESPONSE``.

A whole answer carries the metered charge in its ``PAYMENT-RESPONSE`` header. A stream's headers leave before
the charge is known, so its header reports the reservation (``extra.status = "reserved"``) and the final chunk,
the one with ``finish_reason``, carries the settled payment in a ``payment`` field of the same shape.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from marketplace.gateway.jobs import Delta, Finished, JobRun, Unrecorded
from marketplace.gateway.payments.gate import NONE, Reservation, Settled
from marketplace.gateway.payments.x402 import EXACT, PAYMENT_RESPONSE, encode_header
from settlement.db.schema import Job, JobStatus

ACCESS_CONTROL_EXPOSE = "Access-Control-Expose-Headers"


def payment_document(
    job_id: str, reservation: Reservation, network: str, settled: Settled | None = None
) -> dict[str, Any]:
    """PAYMENT-RESPONSE's body: what is reserved while a job runs, what was charged once it is settled."""
    extra: dict[str, Any] = {
        "status": "reserved" if settled is None else "settled",
        "scheme": reservation.scheme,
        "jobId": job_id,
        "quote": str(reservation.quote),
    }
    if settled is not None:
        extra["charged"] = str(settled.charged)
        if reservation.scheme == EXACT:
            extra["refund"] = str(settled.refund)
    if reservation.channel_id is not None:
        extra["channelId"] = reservation.channel_id
        extra["voucherAmount"] = str(reservation.voucher_amount)
        if settled is not None:
            extra["cumulativeCharged"] = str(settled.channel_charged)
    document: dict[str, Any] = {
        "success": True,
        "transaction": reservation.tx_hash or "",
        "network": network,
        "payer": reservation.payer,
    }
    if settled is not None:
        document["amount"] = str(settled.charged)
    return {**document, "extra": extra}


def _payment_headers(document: dict[str, Any] | None) -> dict[str, str]:
    if document is None:
        return {}
    return {PAYMENT_RESPONSE: encode_header(document), ACCESS_CONTROL_EXPOSE: PAYMENT_RESPONSE}


def _usage(job: Job) -> dict[str, int]:
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": job.completion_tokens,
        "total_tokens": job.prompt_tokens + job.completion_tokens,
    }


def _failure(job: Job, headers: dict[str, str]) -> JSONResponse:
    body = {"error": {"message": job.error_message, "type": "provider_error", "code": job.error_code}}
    return JSONResponse(body, status_code=502, headers=headers)


class Answer:
    """Shapes one job's output as a chat completion or a text completion."""

    def __init__(self, kind: str, run: JobRun, network: str) -> None:
        self.kind = kind
        self.run = run
        self.network = network
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + run.job_id[2:]
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.paid = run.reservation.scheme != NONE

    def _choice(self, text: str, finish: str | None, *, delta: bool) -> dict[str, Any]:
        if self.kind == "chat":
            key = "delta" if delta else "message"
            content: dict[str, Any] = {"content": text} if delta else {"role": "assistant", "content": text}
            return {"index": 0, key: content, "finish_reason": finish, "logprobs": None}
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    def _envelope(self, choices: list[dict[str, Any]], *, chunk: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object + (".chunk" if chunk and self.kind == "chat" else ""),
            "created": self.created,
            "model": self.run.request.model.name,
            "system_fingerprint": self.run.request.model.root,
            "choices": choices,
        }

    async def whole(self) -> JSONResponse:
        parts: list[str] = []
        finished: Finished | Unrecorded | None = None
        try:
            while finished is None:
                event = await self.run.events.get()
                if isinstance(event, Delta):
                    parts.append(event.text)
                else:
                    finished = event
        finally:
            if finished is None:
                self.run.halt()  # the client went away before the answer was complete
        if isinstance(finished, Unrecorded):
            return JSONResponse(_unrecorded(finished), status_code=500)
        job = finished.job
        headers = _payment_headers(
            payment_document(job.id, finished.settled.reservation, self.network, finished.settled)
            if self.paid
            else None
        )
        if job.status == JobStatus.FAILED:
            return _failure(job, headers)
        body = self._envelope([self._choice("".join(parts), job.finish_reason, delta=False)], chunk=False)
        body["usage"] = _usage(job)
        return JSONResponse(body, headers=headers)

    def streamed(self, include_usage: bool) -> StreamingResponse:
        headers = _payment_headers(
            payment_document(self.run.job_id, self.run.reservation, self.network) if self.paid else None
        )
        headers["Cache-Control"] = "no-cache"
        return StreamingResponse(self._events(include_usage), media_type="text/event-stream", headers=headers)

    async def _events(self, include_usage: bool) -> AsyncIterator[str]:
        finished: Finished | Unrecorded | None = None
        try:
            if self.kind == "chat":
                first = self._choice("", None, delta=True)
                first["delta"]["role"] = "assistant"
                yield _sse(self._envelope([first], chunk=True))
            while finished is None:
                event = await self.run.events.get()
                if isinstance(event, Delta):
                    if event.text:
                        yield _sse(self._envelope([self._choice(event.text, None, delta=True)], chunk=True))
                else:
                    finished = event
            if isinstance(finished, Unrecorded):
                yield _sse(_unrecorded(finished))
                yield "data: [DONE]\n\n"
                return
            job = finished.job
            if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
                error: dict[str, Any] = {
                    "error": {"message": job.error_message, "type": "provider_error", "code": job.error_code}
                }
                if self.paid:
                    error["payment"] = payment_document(
                        job.id, finished.settled.reservation, self.network, finished.settled
                    )
                yield _sse(error)
            else:
                last = self._envelope([self._choice("", job.finish_reason, delta=True)], chunk=True)
                if self.paid:
                    last["payment"] = payment_document(
                        job.id, finished.settled.reservation, self.network, finished.settled
                    )
                yield _sse(last)
                if include_usage:
                    usage = self._envelope([], chunk=True)
                    usage["usage"] = _usage(job)
                    yield _sse(usage)
            yield "data: [DONE]\n\n"
        finally:
            if finished is None:
                self.run.halt()  # the client disconnected mid-stream: stop generating, bill what was computed


def _unrecorded(event: Unrecorded) -> dict[str, Any]:
    return {"error": {"message": event.message, "type": "server_error", "code": "internal_error"}}


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
