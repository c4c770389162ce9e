"""Turning a job's run into OpenAI-compatible answers, streamed over SSE or whole, with x402's
``PAYMENT-RESPONSE``.

A whole answer carries the metered charge in its ``PAYMENT-RESPONSE`` header. A stream's headers leave before
the charge is known, so its header reports the reservation (``extra.status = "reserved"``) and the final chunk,
the one with ``finish_reason``, carries the settled payment in a ``payment`` field of the same shape.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi.responses import JSONResponse, StreamingResponse

from marketplace.gateway.jobs import Delta, Finished, JobRun, Unrecorded
from marketplace.gateway.payments.gate import NONE, Reservation, Settled
from marketplace.gateway.payments.x402 import BATCH, EXACT, PAYMENT_RESPONSE, encode_header
from settlement.db.schema import Job, JobStatus
from worker import jsontext
from worker.sampling import TokenLogprobs

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
    if reservation.scheme == BATCH:
        extra.update(_batch_extra(reservation))
    document: dict[str, Any] = {
        "success": True,
        "transaction": reservation.tx_hash or "",
        "network": network,
        "payer": reservation.payer,
    }
    if settled is not None:
        document["amount"] = str(settled.charged)
    return {**document, "extra": extra}


def _batch_extra(reservation: Reservation) -> dict[str, Any]:
    """What x402's batch-settlement client reads: ``chargedAmount``, which it adds to its cumulative, and
    ``channelState.chargedCumulativeAmount``, the total it should now hold. Both count this request's whole quote,
    as the channel does (settlement.db.channels.RESERVE_ONE says why): a stream's headers, sent before anything is
    metered, then say what its end does. What was metered is ``charged``, and only that is ever claimed."""
    assert reservation.voucher_amount is not None
    cumulative = (
        reservation.voucher_amount
    )  # what was acknowledged before, and this quote: the voucher, exactly
    state = {**(reservation.chain_state or {}), "chargedCumulativeAmount": str(cumulative)}
    return {"chargedAmount": str(reservation.quote), "channelState": state}


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


@dataclass(frozen=True)
class Shape:
    """What the client asked the answer to look like, beyond its text."""

    kind: Literal["chat", "completion"]
    logprobs: int | None = None  # alternatives reported with each token's log probability; None: no logprobs
    tools: Literal["none", "auto", "forced"] = (
        "none"  # how tool calls are made (ChatCompletionBody.tool_mode)
    )
    tool_names: list[str] = field(default_factory=list)
    echo: str = ""  # a completion's prompt, put before its text


class Answer:
    """Shapes one job's output as a chat completion or a text completion.

    With tools, the text is held until the end: only the whole of it says whether it is a call (Hermes
    ``<tool_call>`` blocks when the model chooses, the grammar's JSON when the call is forced). A stream then
    ends with the calls as ``tool_calls`` deltas, or the text as one content delta.
    """

    def __init__(self, shape: Shape, run: JobRun, network: str) -> None:
        self.shape = shape
        self.run = run
        self.network = network
        self.id = ("chatcmpl-" if self.shape.kind == "chat" else "cmpl-") + run.job_id[2:]
        self.created = int(time.time())
        self.object = "chat.completion" if self.shape.kind == "chat" else "text_completion"
        self.paid = run.reservation.scheme != NONE
        self.choices = run.request.choices
        # Per choice, the characters of text before its next delta: a completion's logprobs.text_offset.
        self._offsets = [len(shape.echo)] * self.choices

    def _choice(
        self,
        index: int,
        text: str | None,
        finish: str | None,
        *,
        delta: bool,
        logprobs: Sequence[tuple[int, TokenLogprobs]] = (),
        calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        described = self._logprobs(index, logprobs, text or "") if self.shape.logprobs is not None else None
        if self.shape.kind == "chat":
            key = "delta" if delta else "message"
            content: dict[str, Any] = {"content": text} if delta else {"role": "assistant", "content": text}
            if calls:
                content["tool_calls"] = calls
            return {"index": index, key: content, "finish_reason": finish, "logprobs": described}
        return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": described}

    def _logprobs(self, index: int, tokens: Sequence[tuple[int, TokenLogprobs]], text: str) -> dict[str, Any]:
        model = self.run.request.model

        def described(token: int) -> tuple[str, list[int]]:
            raw = model.token_bytes(token)
            return raw.decode("utf-8", errors="replace"), list(raw)

        if self.shape.kind == "chat":
            content = []
            for token, logprobs in tokens:
                name, raw = described(token)
                top = []
                for alternative, value in logprobs.top:
                    alt_name, alt_raw = described(alternative)
                    top.append({"token": alt_name, "logprob": value, "bytes": alt_raw})
                content.append(
                    {"token": name, "logprob": logprobs.logprob, "bytes": raw, "top_logprobs": top}
                )
            return {"content": content, "refusal": None}
        names, values, tops, offsets = [], [], [], []
        offset = self._offsets[index]
        for token, logprobs in tokens:
            name, _ = described(token)
            names.append(name)
            values.append(logprobs.logprob)
            tops.append({described(alternative)[0]: value for alternative, value in logprobs.top})
            offsets.append(offset)
            offset += len(name)
        self._offsets[index] += len(text)
        return {"tokens": names, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _envelope(self, choices: list[dict[str, Any]], *, chunk: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object + (".chunk" if chunk and self.shape.kind == "chat" else ""),
            "created": self.created,
            "model": self.run.request.model.name,
            "system_fingerprint": self.run.request.model.root,
            "choices": choices,
        }

    def _tool_calls(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """The text outside tool calls (None when nothing is left) and the calls in ``text``."""
        if self.shape.tools == "none":
            return text, []
        calls = parse_tool_calls(text, self.shape.tool_names, forced=self.shape.tools == "forced")
        if not calls:
            return text, []
        rest = "" if self.shape.tools == "forced" else TOOL_CALL.sub("", text).strip()
        return rest or None, calls

    def _finish_of(self, finished: Finished, index: int) -> str | None:
        return finished.finishes[index] if index < len(finished.finishes) else finished.job.finish_reason

    async def whole(self) -> JSONResponse:
        parts: list[list[str]] = [[] for _ in range(self.choices)]
        logprobs: list[list[tuple[int, TokenLogprobs]]] = [[] for _ in range(self.choices)]
        finished: Finished | Unrecorded | None = None
        try:
            while finished is None:
                event = await self.run.events.get()
                if isinstance(event, Delta):
                    parts[event.choice].append(event.text)
                    logprobs[event.choice] += event.logprobs
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
        choices = []
        for index in range(self.choices):
            text, calls = self._tool_calls("".join(parts[index]))
            finish = self._finish_of(finished, index)
            finish = "tool_calls" if calls and finish == "stop" else finish
            if self.shape.echo:
                text = self.shape.echo + (text or "")
            choices.append(
                self._choice(index, text, finish, delta=False, logprobs=logprobs[index], calls=calls or None)
            )
        body = self._envelope(choices, chunk=False)
        body["usage"] = _usage(job)
        return JSONResponse(body, headers=headers)

    def streamed(self, include_usage: bool) -> StreamingResponse:
        headers = _payment_headers(
            payment_document(self.run.job_id, self.run.reservation, self.network) if self.paid else None
        )
        headers["Cache-Control"] = "no-cache"
        return StreamingResponse(self._events(include_usage), media_type="text/event-stream", headers=headers)

    def _chunk(self, index: int, text: str | None, finish: str | None = None, **parts: Any) -> str:
        return _sse(self._envelope([self._choice(index, text, finish, delta=True, **parts)], chunk=True))

    async def _events(self, include_usage: bool) -> AsyncIterator[str]:
        finished: Finished | Unrecorded | None = None
        # With tools: everything, until the end says whether it is a call.
        held: list[list[Delta]] = [[] for _ in range(self.choices)]
        try:
            for index in range(self.choices):
                if self.shape.kind == "chat":
                    first = self._envelope([self._choice(index, "", None, delta=True)], chunk=True)
                    first["choices"][0]["delta"]["role"] = "assistant"
                    yield _sse(first)
                if self.shape.echo:
                    yield self._chunk(index, self.shape.echo)
            while finished is None:
                event = await self.run.events.get()
                if isinstance(event, Delta):
                    if self.shape.tools != "none":
                        held[event.choice].append(event)
                    elif event.text or event.logprobs:
                        yield self._chunk(event.choice, event.text, logprobs=event.logprobs)
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
                for index in range(self.choices):
                    finish = self._finish_of(finished, index)
                    if held[index]:
                        text, calls = self._tool_calls("".join(event.text for event in held[index]))
                        logprobs = [pair for event in held[index] for pair in event.logprobs]
                        streamed = [{"index": i, **call} for i, call in enumerate(calls)] or None
                        finish = "tool_calls" if calls and finish == "stop" else finish
                        yield self._chunk(index, text, logprobs=logprobs, calls=streamed)
                    last = self._envelope([self._choice(index, None, finish, delta=True)], chunk=True)
                    last["choices"][0]["logprobs"] = None
                    if self.paid and index == self.choices - 1:
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


# A call as the Hermes format writes it, which the tiny checkpoints' chat template teaches.
TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_tool_calls(text: str, names: Sequence[str], *, forced: bool) -> list[dict[str, Any]]:
    """OpenAI ``tool_calls`` from a model's text: the whole text is one call's JSON when the call was forced,
    else each ``<tool_call>`` block is one. A block that is not JSON naming one of ``names`` with object
    arguments is left as text."""
    blocks = [text] if forced else TOOL_CALL.findall(text)
    calls = []
    for block in blocks:
        try:
            call = jsontext.loads(block)
        except ValueError:
            continue
        if not (
            isinstance(call, dict) and call.get("name") in names and isinstance(call.get("arguments"), dict)
        ):
            continue
        calls.append(
            {
                "id": "call_" + secrets.token_hex(12),
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
            }
        )
    return calls


def _unrecorded(event: Unrecorded) -> dict[str, Any]:
    return {"error": {"message": event.message, "type": "server_error", "code": "internal_error"}}


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
