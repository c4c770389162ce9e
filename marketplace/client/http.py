"""Paying HTTP: an httpx transport that answers 402s from a :class:`ChannelWallet`, and a gateway client on it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from marketplace.client.wallet import ChannelWallet, PaymentFailed
from marketplace.gateway.payments.x402 import (
    PAYMENT_REQUIRED,
    PAYMENT_RESPONSE,
    PAYMENT_SIGNATURE,
    decode_header,
)
from settlement.eip712 import JobRead, protocol_domain
from worker import jsontext

JOB_READ = "X-Strata-Job-Read"  # the header a job's payer proves a read with
_RESIGN = {"voucher_not_increasing", "voucher_too_low"}
# While the gateway has not answered a paid request, how often the channel is read to see whether it took the
# voucher (first after 20 ms, then twice as long each time up to 250 ms), and for how long at most.
_ACCEPT_POLL_FIRST_S = 0.02
_ACCEPT_POLL_MAX_S = 0.25


class PayingTransport(httpx.AsyncBaseTransport):
    """An httpx transport that answers a 402 by paying with ``wallet`` and retrying once.

    Vouchers on a channel must reach the gateway in the order they were signed (each must be above the newest
    it took), so signing and sending are serialised on the wallet's lock: it is held from signing a voucher
    until the gateway has taken or refused it, that is until the response's headers arrive or, for an answer
    sent whole (whose headers come only at its end), until the channel shows the voucher taken, at most
    ``accept_wait_s``. The job itself then runs without the lock, concurrently with the next requests."""

    def __init__(
        self,
        wallet: ChannelWallet,
        gateway_url: str,
        inner: httpx.AsyncBaseTransport | None = None,
        *,
        accept_wait_s: float = 30.0,
    ) -> None:
        self.wallet = wallet
        self.gateway_url = gateway_url.rstrip("/")
        self.inner = inner or httpx.AsyncHTTPTransport()
        self.accept_wait_s = accept_wait_s

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        response = await self.inner.handle_async_request(request)
        if response.status_code != 402 or PAYMENT_SIGNATURE in request.headers:
            return response
        await response.aread()
        requirement = self._requirement(response)
        minimum = 0
        for attempt in range(2):
            quote = int(requirement["amount"])
            self.wallet.check_quote(quote)  # before anything is signed
            async with self.wallet.lock:
                if self.wallet.stale:
                    await self._resync()
                amount = await self.wallet.sign_locked(quote, minimum=minimum)
                sending = asyncio.create_task(
                    self._send_paid(request, self.wallet.header(amount, requirement))
                )
                try:
                    await self._until_taken(sending, amount)
                except BaseException:
                    sending.cancel()
                    self.wallet.settled(quote, None)  # it may have been taken: counted as unsettled
                    raise
            try:
                paid = await sending
            except BaseException:
                sending.cancel()
                self.wallet.settled(quote, None)  # sent, and maybe taken: counted as unsettled
                raise
            if (
                400 <= paid.status_code < 500
                and paid.status_code != 402
                and PAYMENT_RESPONSE not in paid.headers
            ):
                # Refused at admission (no route, a bad request, too many resting jobs): nothing was reserved.
                self.wallet.refused(quote)
                return paid
            if paid.status_code != 402:
                return self._observed(paid, quote, request)
            self.wallet.refused(quote)
            await paid.aread()
            error = _error(paid)
            if attempt == 0 and error.get("code") in _RESIGN:
                # The gateway's figures are only compared with the wallet's own: the next voucher is what the
                # wallet can account for, and a minimum above it is refused (SpendingCapExceeded).
                state = (error.get("details") or {}).get("channel") or {}
                minimum = int(state.get("minimum", 0))
                requirement = self._requirement(paid)
                continue
            return paid
        raise AssertionError("unreachable")

    async def _until_taken(self, sending: asyncio.Task[httpx.Response], amount: int) -> None:
        """Returns once the paid request has its response headers, or the channel shows a voucher of at least
        ``amount`` taken, or ``accept_wait_s`` has passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.accept_wait_s
        delay = _ACCEPT_POLL_FIRST_S
        while True:
            done, _ = await asyncio.wait({sending}, timeout=min(delay, max(0.0, deadline - loop.time())))
            if done or loop.time() >= deadline or await self._voucher_taken(amount):
                return
            delay = min(delay * 2, _ACCEPT_POLL_MAX_S)

    async def _voucher_taken(self, amount: int) -> bool:
        # Only releases the lock early: a gateway that misreports this costs one refused voucher, never money.
        try:
            state = await self._read_channel()
        except (httpx.HTTPError, PaymentFailed):
            return False
        try:
            return state is not None and int(state.get("voucherAmount", 0)) >= amount
        except (TypeError, ValueError):
            return False

    async def _read_channel(self) -> dict[str, Any] | None:
        url = httpx.URL(f"{self.gateway_url}/v1/channels/{self.wallet.channel_hex}")
        response = await self.inner.handle_async_request(httpx.Request("GET", url))
        await response.aread()
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise PaymentFailed(
                f"reading the channel failed: HTTP {response.status_code}", "channel_unreadable"
            )
        state = jsontext.loads(response.content)
        if not isinstance(state, dict):
            raise PaymentFailed("reading the channel failed: not a JSON object", "channel_unreadable")
        return state

    def _requirement(self, response: httpx.Response) -> dict[str, Any]:
        header = response.headers.get(PAYMENT_REQUIRED)
        if header is None:
            raise PaymentFailed("a 402 without a PAYMENT-REQUIRED header")
        required = decode_header(header)
        for requirement in required.get("accepts", []):
            if isinstance(requirement, dict) and self.wallet.accepts(requirement):
                return requirement
        raise PaymentFailed(
            f"the gateway offers no voucher payment on {self.wallet.escrow}", "no_requirement"
        )

    async def _send_paid(self, request: httpx.Request, header: str) -> httpx.Response:
        headers = httpx.Headers(request.headers)
        headers[PAYMENT_SIGNATURE] = header
        retry = httpx.Request(
            request.method,
            request.url,
            headers=headers,
            content=request.content,
            extensions=request.extensions,
        )
        return await self.inner.handle_async_request(retry)

    async def _resync(self) -> None:
        state = await self._read_channel()
        self.wallet.sync(state if state is not None else {"deposit": 0})

    def _observed(self, response: httpx.Response, quote: int, request: httpx.Request) -> httpx.Response:
        header = response.headers.get(PAYMENT_RESPONSE)
        payment = decode_header(header) if header else None
        if payment is not None and (payment.get("extra") or {}).get("status") == "settled":
            self.wallet.settled(quote, payment)
            return response
        # A stream: its last chunk says what it cost.
        stream = _WatchedStream(response.stream, lambda found: self.wallet.settled(quote, found))
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=stream,
            extensions=response.extensions,
            request=request,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


class _WatchedStream(httpx.AsyncByteStream):
    """Passes an SSE stream through, and reports the ``payment`` of its last chunk (None if it never came)."""

    def __init__(self, inner: Any, on_end: Callable[[dict[str, Any] | None], None]) -> None:
        self.inner = inner
        self.on_end = on_end
        self.payment: dict[str, Any] | None = None
        self._pending = b""
        self._reported = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            self._scan(chunk)
            yield chunk

    def _scan(self, chunk: bytes) -> None:
        self._pending += chunk
        *events, self._pending = self._pending.split(b"\n\n")
        for event in events:
            if b'"payment"' not in event:
                continue
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    data = jsontext.loads(line[5:])
                    if isinstance(data, dict) and isinstance(data.get("payment"), dict):
                        self.payment = data["payment"]

    async def aclose(self) -> None:
        if not self._reported:
            self._reported = True
            self.on_end(self.payment)
        await self.inner.aclose()


def _error(response: httpx.Response) -> dict[str, Any]:
    try:
        body = jsontext.loads(response.content)
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


class StrataClient:
    """A gateway client that pays per request from a channel. ``http`` is an httpx client that pays 402s."""

    def __init__(
        self,
        gateway_url: str,
        wallet: ChannelWallet,
        *,
        timeout_s: float = 300.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``transport`` carries the requests (default: httpx's own); the client pays over it."""
        self.gateway_url = gateway_url.rstrip("/")
        self.wallet = wallet
        paying = PayingTransport(wallet, self.gateway_url, inner=transport)
        self.http = httpx.AsyncClient(base_url=self.gateway_url, transport=paying, timeout=timeout_s)

    async def __aenter__(self) -> StrataClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.http.aclose()

    async def channel(self) -> dict[str, Any]:
        response = await self.http.get(f"/v1/channels/{self.wallet.channel_hex}")
        _raise_for_error(response)
        state: dict[str, Any] = response.json()
        self.wallet.sync(state)
        return state

    async def job(self, job_id: str, *, valid_s: int = 300) -> dict[str, Any]:
        """A job of this wallet's, output included: its read is proved with the payer's signature of
        ``JobRead(jobId, expiresAt)`` under the gateway's protocol domain (``GET /health`` names it)."""
        health = await self.http.get("/health")
        _raise_for_error(health)
        deployment = health.json()["deployment"]
        domain = protocol_domain(int(deployment["chainId"]), str(deployment["stakeManager"]))
        expires_at = int(time.time()) + valid_s
        signature = JobRead(bytes.fromhex(job_id.removeprefix("0x")), expires_at).sign(
            self.wallet.account, domain
        )
        response = await self.http.get(
            f"/v1/jobs/{job_id}", headers={JOB_READ: f"{expires_at}:0x{signature.hex()}"}
        )
        _raise_for_error(response)
        document: dict[str, Any] = response.json()
        return document

    async def chat(self, model: str, messages: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
        response = await self.http.post(
            "/v1/chat/completions", json={"model": model, "messages": messages, **options}
        )
        _raise_for_error(response)
        answer: dict[str, Any] = response.json()
        return answer

    async def stream_chat(
        self, model: str, messages: list[dict[str, Any]], **options: Any
    ) -> AsyncIterator[str]:
        """Yields the answer's text as it is generated."""
        body = {"model": model, "messages": messages, **options, "stream": True}
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                _raise_for_error(response)
            async for chunk in stream_chunks(response):
                for choice in chunk.get("choices", []):
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text


async def stream_chunks(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON chunks of a streamed answer (SSE ``data:`` lines); an error chunk raises PaymentFailed.

    The last chunk before ``[DONE]`` carries the settled ``payment``."""
    async for line in response.aiter_lines():
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        chunk: dict[str, Any] = jsontext.loads(line[5:])
        if "error" in chunk:
            raise PaymentFailed(chunk["error"].get("message", "the job failed"), chunk["error"].get("code"))
        yield chunk


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    error = _error(response)
    raise PaymentFailed(
        f"HTTP {response.status_code}: {error.get('message', response.text[:200])}", error.get("code")
    )
