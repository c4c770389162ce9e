"""OpenAI-compatible inference: chat and text completions (streamed or whole), and the models served."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from marketplace.gateway.api.deps import GatewayDep, PaymentHeader, resource_url
from marketplace.gateway.api.models import (
    PAID,
    ChatCompletion,
    ModelCard,
    ModelList,
    TextCompletion,
    error,
    paid_answer,
)
from marketplace.gateway.api.responses import Answer, Shape
from marketplace.gateway.api.schemas import (
    ChatCompletionBody,
    ChatMessage,
    CompletionBody,
    GenerationBody,
    Tool,
)
from marketplace.gateway.catalog import ServedModel
from marketplace.gateway.errors import InvalidRequest
from marketplace.gateway.jobs import Request as JobRequest
from marketplace.gateway.service import Gateway
from worker.protocol import MAX_CONTROL_BYTES
from worker.sampling import SamplingParams

router = APIRouter(prefix="/v1", tags=["inference"])

DEFAULT_MAX_TOKENS = 256  # when a chat request names none: what the quote is for
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's, for a text completion
OPEN_MARGIN_BYTES = 8 * 1024  # the open message's ticket and framing around its sampling parameters
_COMPILING = threading.BoundedSemaphore(2)  # a thread's, not the event loop's: each gateway runs its own loop
TOKEN_OUT_OF_RANGE = "token_out_of_range"  # a token id at or past the model's vocab_size
# The most characters a prompt may have per position of the model's context, checked before it is tokenized. Text
# averages about 4 characters a token in English and 1 to 2 in code-heavy or CJK text; only text made of a
# vocabulary's longest tokens (runs of spaces or of one punctuation mark, which reach 16 to 80 characters in
# common BPE vocabularies) comes near 32 for a whole prompt. A prompt past the bound would all but surely be
# refused as prompt_too_long once tokenized: the bound makes the refusal cheap, before the chat template and the
# tokenizer spend their time on it.
CHARS_PER_TOKEN = 32


def check_prompt_chars(model: ServedModel, characters: int, param: str) -> None:
    """Refuses a prompt of more characters than ``model``'s context could hold, before it is tokenized."""
    limit = model.context_length * CHARS_PER_TOKEN
    if characters > limit:
        raise InvalidRequest(
            "prompt_too_long",
            f"the prompt has {characters} characters; {model.name}'s context of {model.context_length} tokens "
            f"takes at most {limit}",
            param=param,
            characters=characters,
            context_length=model.context_length,
        )


async def encode_chat(
    gateway: Gateway, model: ServedModel, messages: list[ChatMessage], tools: list[Tool] | None = None
) -> list[int]:
    """The conversation's token ids: sized first, then rendered and tokenized on the gateway's tokenizing threads
    (a long conversation takes the chat template and the tokenizer tens of milliseconds, which the event loop and
    every other request would otherwise wait out)."""
    tools = tools or []
    characters = sum(message.characters() for message in messages) + sum(tool.characters() for tool in tools)
    check_prompt_chars(model, characters, "messages")
    rendered = [message.rendered() for message in messages]
    described = [tool.model_dump(exclude_none=True) for tool in tools]
    return await gateway.tokenizers.run(model.encode_chat, rendered, described)


async def encode_prompt(gateway: Gateway, model: ServedModel, text: str) -> list[int]:
    """A text prompt's token ids: sized first, then tokenized on the gateway's tokenizing threads."""
    check_prompt_chars(model, len(text), "prompt")
    return await gateway.tokenizers.run(model.encode_prompt, text)


async def build_request(
    kind: str, model: ServedModel, prompt: list[int], requested: int | None, body: GenerationBody
) -> JobRequest:
    """Checks the prompt against the model's context and the sampling parameters against the providers', all
    before anything is paid."""
    body.refuse_unsupported()
    if not prompt:
        raise InvalidRequest("invalid_request", "the prompt is empty")
    room = model.context_length - len(prompt)
    max_tokens = requested if requested is not None else min(DEFAULT_MAX_TOKENS, room)
    if room < 1 or max_tokens > room:
        raise InvalidRequest(
            "prompt_too_long",
            f"{len(prompt)} prompt tokens and max_tokens {max_tokens} exceed {model.name}'s context of "
            f"{model.context_length}",
            prompt_tokens=len(prompt),
            context_length=model.context_length,
        )
    sampling = body.sampling()
    if sampling["seed"] is None:
        # Fixed here rather than left to the last provider: its receipt commits to the parameters, seed and all,
        # so a validator can replay its draws and check every token it emitted.
        sampling["seed"] = secrets.randbits(63)
    outside = [token for token in (body.logit_bias or {}) if int(token) >= model.vocab_size]
    if outside:
        message = f"logit_bias names token {outside[0]}, outside [0, {model.vocab_size})"
        raise InvalidRequest(TOKEN_OUT_OF_RANGE, message, param="logit_bias")
    try:
        params = SamplingParams.from_dict(
            sampling
        )  # the grammar's size among the rest, before it is compiled
    except ValueError as exc:
        param = body.grammar_source() if "grammar" in str(exc) else None
        raise InvalidRequest("invalid_request", str(exc), param=param) from exc
    _check_open_size(sampling, params, len(prompt) + max_tokens, model.vocab_size)
    if params.grammar is not None:
        # A large schema takes up to a second to compile: off the event loop, and two at a time.
        problem = await asyncio.to_thread(_compile_check, model, params.grammar)
        if problem is not None:
            message = f"the schema cannot be followed: {problem}"[:500]
            raise InvalidRequest("invalid_schema", message, param=body.grammar_source())
    return JobRequest(
        kind, model, prompt, max_tokens, sampling, body.stops(), body.max_price, choices=body.choices
    )


def _compile_check(model: ServedModel, grammar: str) -> str | None:
    with _COMPILING:
        return model.vocabulary.check(grammar)


def _check_open_size(
    sampling: dict[str, Any], params: SamplingParams, positions: int, vocab_size: int
) -> None:
    """Refuses a request whose last span could not be opened: with a penalty that counts the prompt, its session
    carries every id before it (worker.sampling.session_sampling), and the open message has a size limit. The
    providers would refuse it, and be taken for at fault."""
    if not params.uses_history:
        return
    worst = len(json.dumps(sampling)) + positions * (len(str(vocab_size)) + 1) + OPEN_MARGIN_BYTES
    if worst > MAX_CONTROL_BYTES:
        raise InvalidRequest(
            "prompt_too_long",
            f"with these sampling parameters a session carries its prompt and output ids, {positions} of them, "
            f"more than a provider takes in one message: shorten the prompt or max_tokens",
        )


async def answer(
    gateway: Gateway,
    request: Request,
    shape: Shape,
    job: JobRequest,
    body: GenerationBody,
    payment: str | None,
) -> JSONResponse | StreamingResponse:
    run = await gateway.runner.admit(job, payment, url=resource_url(request, gateway))
    shaped = Answer(shape, run, gateway.terms.network)
    if body.streaming:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return shaped.streamed(include_usage)
    return await shaped.whole()


@router.post(
    "/chat/completions",
    operation_id="createChatCompletion",
    responses={200: paid_answer(ChatCompletion, "the answer, whole or streamed"), **PAID},
)
async def create_chat_completion(
    body: ChatCompletionBody, request: Request, gateway: GatewayDep, payment: PaymentHeader = None
) -> Any:
    """A chat completion, paid per request over x402 (a voucher or an exact transfer)."""
    model = gateway.catalog.get(body.model)
    mode = body.tool_mode()
    prompt = await encode_chat(gateway, model, body.messages, body.tools)
    job = await build_request("chat", model, prompt, body.requested_tokens(), body)
    shape = Shape("chat", body.alternatives(), mode, [tool.function.name for tool in body.tools or []])
    return await answer(gateway, request, shape, job, body, payment)


@router.post(
    "/completions",
    operation_id="createCompletion",
    responses={200: paid_answer(TextCompletion, "the completion, whole or streamed"), **PAID},
)
async def create_completion(
    body: CompletionBody, request: Request, gateway: GatewayDep, payment: PaymentHeader = None
) -> Any:
    """A text completion of a prompt (text or token ids), paid per request over x402."""
    model = gateway.catalog.get(body.model)
    prompt = body.prompt
    if body.echo and body.logprobs is not None:
        # The prompt's log probabilities need every prompt position's logits; the last span returns the last one.
        raise InvalidRequest("unsupported_parameter", "echo with logprobs is not supported", param="echo")
    if isinstance(prompt, str):
        ids = await encode_prompt(gateway, model, prompt)
    elif isinstance(prompt[0], str):
        ids = await encode_prompt(gateway, model, str(prompt[0]))  # the schema takes one text in a list
    else:
        if len(prompt) > model.context_length:  # before the ids are looked at one by one
            raise InvalidRequest(
                "prompt_too_long",
                f"{len(prompt)} prompt tokens exceed {model.name}'s context of {model.context_length}",
                param="prompt",
                prompt_tokens=len(prompt),
                context_length=model.context_length,
            )
        ids = [int(token) for token in prompt]
        if any(token >= model.vocab_size for token in ids):
            message = f"token ids must be below {model.name}'s vocab_size, {model.vocab_size}"
            raise InvalidRequest(TOKEN_OUT_OF_RANGE, message, param="prompt")
    job = await build_request("completion", model, ids, body.max_tokens or DEFAULT_COMPLETION_TOKENS, body)
    echo = model.decode(ids) if body.echo else ""
    return await answer(gateway, request, Shape("completion", body.logprobs, echo=echo), job, body, payment)


@router.get("/models", operation_id="listModels", response_model=ModelList)
async def list_models(gateway: GatewayDep) -> dict[str, Any]:
    """The models this gateway serves, each named by its root, with the cheapest route's price now."""
    return {"object": "list", "data": [_describe(gateway, model) for model in gateway.catalog]}


@router.get(
    "/models/{model}",
    operation_id="retrieveModel",
    response_model=ModelCard,
    responses={404: error("unknown model (`unknown_model`)")},
)
async def retrieve_model(model: str, gateway: GatewayDep) -> dict[str, Any]:
    return _describe(gateway, gateway.catalog.get(model))


def _describe(gateway: Gateway, model: ServedModel) -> dict[str, Any]:
    described = model.describe()
    route = gateway.book.route(model.root, model.num_layers)
    described["price_per_million_tokens"] = str(route.price_per_token) if route else None
    return described
