"""The gateway's FastAPI application: routes, error responses, request metrics, and the lifespan that builds
and tears down the :class:`~marketplace.gateway.service.Gateway`.

Every error leaves as ``{"error": {"message", "type", "code", ...}}`` with the status its class names; a
rejected or missing payment also carries a fresh ``PAYMENT-REQUIRED`` quote. Operation ids are set by hand on
every route: clients generated from the OpenAPI document depend on them.

What one client may cost is bounded before its request is parsed: requests per client address
(:class:`RateLimits`, 429 ``rate_limited`` with Retry-After; see :mod:`marketplace.gateway.ratelimit`), then the
body's size and nesting (:class:`BodyLimits`). The body's schema bounds messages, characters and token ids
(:mod:`marketplace.gateway.api.schemas`), and the prompt's characters are checked against the model's context
before it is tokenized, on threads of a bounded pool (:mod:`marketplace.gateway.api.routes.inference`).

The OpenAPI document says what is answered: a request that fails validation gets 400 ``invalid_request`` with the
gateway's error body (FastAPI would document 422 and its own body), and every route declares its success body and
the other statuses it answers (see :mod:`marketplace.gateway.api.models`).
``tests/marketplace/gateway/test_openapi.py`` holds a running gateway to its document.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from marketplace.gateway.api.models import INVALID, RETRY_AFTER_HEADER, error
from marketplace.gateway.api.routes import health, inference, jobs, market, payments, payouts, slashes
from marketplace.gateway.config import GatewaySettings
from marketplace.gateway.errors import GatewayError, PaymentRejected, RateLimited, Unavailable
from marketplace.gateway.payments.x402 import PAYMENT_REQUIRED, encode_header
from marketplace.gateway.service import Gateway
from worker.jsontext import TooDeep, check_depth

log = logging.getLogger(__name__)


def _error(status: int, code: str, message: str, kind: str, **extra: Any) -> JSONResponse:
    error: dict[str, Any] = {"message": message, "type": kind, "code": code}
    error.update(extra)
    return JSONResponse({"error": error}, status_code=status)


async def _gateway_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GatewayError)
    return _answer(exc)


def _answer(exc: GatewayError) -> JSONResponse:
    required = exc.details.pop("required", None) if isinstance(exc, PaymentRejected) else None
    response = JSONResponse(exc.body(), status_code=exc.status)
    if required is not None:
        response.headers[PAYMENT_REQUIRED] = encode_header(required)
        response.headers["Access-Control-Expose-Headers"] = PAYMENT_REQUIRED
    if isinstance(exc, Unavailable | RateLimited):
        response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


# Codes of their own for the size limits a body's schema states, so that a client need not read ``param``.
_TOO_LONG = {"too_long", "string_too_long"}


def _validation_code(errors: Sequence[Any]) -> str:
    for problem in errors:
        location, kind = tuple(problem["loc"][1:]), problem["type"]
        if kind not in _TOO_LONG or not location:
            continue
        if location == ("messages",):
            return "too_many_messages"
        if location[0] == "prompt" or (location[0] == "messages" and "content" in location):
            return "prompt_too_long"
    return "invalid_request"


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [
        {"param": ".".join(str(part) for part in error["loc"][1:]), "message": error["msg"]}
        for error in exc.errors()
    ]
    first = problems[0] if problems else {"param": "", "message": "invalid request"}
    message = f"{first['param']}: {first['message']}" if first["param"] else first["message"]
    code = _validation_code(exc.errors())
    return _error(400, code, message, "invalid_request_error", param=first["param"], problems=problems)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    response = _error(exc.status_code, code, str(exc.detail), "invalid_request_error")
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:
        response.headers["Allow"] = _allowed(request)
    return response


def _allowed(request: Request) -> str:
    """Every method the requested path takes. Starlette's 405 names only the first route on the path, and
    ``/v1/asks`` (say) is two routes, GET and POST."""
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        if route.methods and route.path_regex.match(request.scope["path"]):
            methods |= route.methods
    return ", ".join(sorted(methods))


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return _error(500, "internal_error", "the gateway failed; nothing was charged", "server_error")


class RequestMetrics:
    """Counts and times every request by its route template, streamed bodies included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            gateway: Gateway | None = getattr(scope["app"].state, "gateway", None)
            route = getattr(scope.get("route"), "path", "unmatched")
            if gateway is not None:
                gateway.metrics.requests.labels(route=route, status=str(status)).inc()
                gateway.metrics.request_seconds.labels(route=route).observe(time.perf_counter() - started)


class GatewayApp(FastAPI):
    """The gateway's FastAPI app, whose OpenAPI document says what the gateway answers and takes, exactly."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            document = super().openapi()
            for route, path in document["paths"].items():
                for operation in path.values():
                    operation["responses"].pop("422", None)  # answered as 400: every route declares it
                    if route in UNLIMITED_PATHS:
                        operation["responses"].pop("429", None)
            schemas = document.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            # FastAPI passes every bound through a float, so 2**63 - 1 would be written 9.223372036854776e+18,
            # another number: the bodies' schemas are taken from pydantic as they are.
            schemas.update(
                (name, schema) for name, schema in _body_schemas(self.routes).items() if name in schemas
            )
        return self.openapi_schema or {}


# The largest request body read: a long conversation with tools and a schema fits many times over (a request's
# tokens are capped by the model's context in any case).
MAX_BODY_BYTES = 4 << 20


# Not limited per client address: how load balancers and Prometheus see the gateway. A probe refused because the
# clients behind the same address (a NAT, a proxy not listed in TRUSTED_PROXIES) spent its bucket would take a
# healthy gateway out of rotation. Both are cheap: a database query, and a chain read shared by every caller within
# a second (ChainWatcher.latest_block); neither reads anything a caller chooses.
UNLIMITED_PATHS = frozenset({"/health", "/metrics"})
RATE_LIMITED = error(
    "too many requests from this client address (`rate_limited`): try again after Retry-After seconds",
    headers={"Retry-After": RETRY_AFTER_HEADER},
)


class RateLimits:
    """Counts every request against its client address's rate (``UNLIMITED_PATHS`` aside) before its body is read,
    refusing one over it with 429 ``rate_limited`` and Retry-After."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway: Gateway | None = getattr(scope["app"].state, "gateway", None) if "app" in scope else None
        if scope["type"] == "http" and scope["path"] not in UNLIMITED_PATHS and gateway is not None:
            client = scope.get("client")
            try:
                await gateway.limiter.check_ip(
                    client[0] if client else None, Headers(scope=scope).get("x-forwarded-for")
                )
            except RateLimited as exc:
                await _answer(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimits:
    """Reads a request's body whole before anything else does, refusing one over ``MAX_BODY_BYTES`` (413
    ``body_too_large``) and JSON nested past ``worker.jsontext.MAX_DEPTH`` (400 ``invalid_request``): FastAPI's
    parser would recurse through it level by level, and deep enough nesting kills the process (see
    worker.jsontext). The body is then handed on as it came."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:  # refused before a byte of it is read
            await _too_large()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                await _too_large()(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            check_depth(body)
        except TooDeep as exc:
            await _error(400, "invalid_request", str(exc), "invalid_request_error")(scope, receive, send)
            return
        handed = False

        async def replay() -> Message:
            nonlocal handed
            if handed:
                return await receive()  # after the body: the disconnect a streamed answer listens for
            handed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _too_large() -> JSONResponse:
    return _error(
        413, "body_too_large", f"bodies are at most {MAX_BODY_BYTES} bytes", "invalid_request_error"
    )


def _body_schemas(routes: list[BaseRoute]) -> dict[str, Any]:
    """The JSON schema of every model the routes take or answer, by the name the document gives it."""
    models: list[tuple[Any, JsonSchemaMode]] = []
    for context in iter_route_contexts(routes):
        route = context.original_route
        if not isinstance(route, APIRoute):
            continue
        if route.body_field is not None:
            models.append((route.body_field.field_info.annotation, "validation"))
        models.extend(
            (model, "serialization")
            for model in (route.response_model, *(answer.get("model") for answer in route.responses.values()))
        )
    taken = [
        (model, mode) for model, mode in models if isinstance(model, type) and issubclass(model, BaseModel)
    ]
    _, schema = models_json_schema(taken, ref_template="#/components/schemas/{model}")
    definitions: dict[str, Any] = schema.get("$defs", {})
    return definitions


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The app; settings are read (from the environment, unless given) when it starts, not here."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = await Gateway.start(settings or GatewaySettings())
        app.state.gateway = gateway
        try:
            yield
        finally:
            await gateway.stop()

    app = GatewayApp(
        title="Strata gateway",
        summary="Pay-per-request LLM inference on pooled GPUs: OpenAI-compatible, paid with x402 v2.",
        version="0.1.0",
        lifespan=lifespan,
        responses={400: INVALID, 429: RATE_LIMITED},
    )
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(BodyLimits)
    app.add_middleware(
        RateLimits
    )  # outside BodyLimits: a client over its rate is refused before its body is read
    app.add_middleware(RequestMetrics)
    for module in (inference, jobs, market, payments, payouts, slashes, health):
        app.include_router(module.router)
    return app
