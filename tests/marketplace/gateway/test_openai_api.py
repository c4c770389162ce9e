"""The OpenAI API through the real ``openai`` package, paid from a channel, against real provider processes:
every sampling parameter gives what the same model gives in this process under the same parameters, log
probabilities are the model's log-softmax, structured output parses and validates, tool calls round-trip, and
what the network cannot do is refused by name.

One database backend is enough here: nothing below depends on which one the gateway writes to.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import jsonschema_rs
import pytest
import torch
from eth_account.signers.local import LocalAccount

from marketplace.client import ChannelWallet
from marketplace.gateway.payments.x402 import PAYMENT_RESPONSE, decode_header
from settlement.deploy import ONE_TOKEN
from tests.marketplace.harness import GatewayServer, Market, open_channel, post, strata_client, wallet_for
from worker.grammar import vocabulary_at
from worker.runtime import SpanRuntime
from worker.sampling import Sampler, SamplingParams, session_sampling
from worker.shard import load_shard

pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)

T = TypeVar("T")
PROMPT = [72, 101, 108, 108, 111, 44, 32]  # "Hello, " in the byte vocabulary
EOS = 257


def replay(
    model_dir: Path, prompt: list[int], sampling: dict[str, Any], max_tokens: int
) -> tuple[list[int], Sampler]:
    """The tokens the whole model, in this process, gives under ``sampling``: what a route of providers owes."""
    shard = load_shard(model_dir, "0:6", device=torch.device("cpu"))
    params = SamplingParams.from_dict(session_sampling(sampling, prompt, []))
    sampler = Sampler(params, vocabulary_at(model_dir, shard.vocab_size) if params.grammar else None)
    runtime = SpanRuntime(shard)
    runtime.open(b"r" * 16, b"j" * 32)
    inputs, tokens = torch.tensor([prompt]), []
    for step in range(max_tokens):
        logits, _ = runtime.step(b"r" * 16, step, inputs)
        tokens.append(sampler.next_token(logits[:, -1, :]))
        if tokens[-1] == EOS:
            break
        inputs = torch.tensor([[tokens[-1]]])
    return tokens, sampler


def model_logprobs(model_dir: Path, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """The model's log-softmax over the vocabulary before each of ``tokens``."""
    shard = load_shard(model_dir, "0:6", device=torch.device("cpu"))
    runtime = SpanRuntime(shard)
    runtime.open(b"l" * 16, b"j" * 32)
    inputs, logprobs = [*prompt], []
    for step, token in enumerate(tokens):
        logits, _ = runtime.step(b"l" * 16, step, torch.tensor([inputs]))
        logprobs.append(torch.log_softmax(logits[0, -1].float(), dim=-1))
        inputs = [token]
    return logprobs


def text_of(tokens: list[int]) -> str:
    return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")


def paying(
    gateway: GatewayServer, market: Market, client: LocalAccount, run: Callable[[Any], Awaitable[T]]
) -> T:
    """Runs ``run`` with an ``openai.AsyncOpenAI`` that pays from a fresh channel of ``client``'s."""
    from openai import AsyncOpenAI

    wallet: ChannelWallet = wallet_for(market, client, open_channel(market, client, 10 * ONE_TOKEN))

    async def main() -> T:
        async with strata_client(gateway.url, wallet) as strata:
            openai = AsyncOpenAI(base_url=gateway.url + "/v1", api_key="unused", http_client=strata.http)
            return await run(openai)

    return asyncio.run(main())


async def streamed_completion(openai: Any, **request: Any) -> tuple[str, list[Any]]:
    stream = await openai.completions.create(stream=True, **request)
    chunks = [chunk async for chunk in stream]
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


# -- sampling ------------------------------------------------------------------------------------------------

CASES: list[dict[str, Any]] = [
    {"temperature": 0.0, "presence_penalty": 1.5, "frequency_penalty": 0.7},
    {"temperature": 0.0, "extra_body": {"repetition_penalty": 1.4}},
    {"temperature": 0.0, "logit_bias": {"65": 6.0, "32": -100.0}},
    {"temperature": 1.0, "seed": 11, "extra_body": {"min_p": 0.2}},
    {"temperature": 0.8, "seed": 12, "extra_body": {"top_k": 5}, "frequency_penalty": -0.5},
]


def sampling_of(case: dict[str, Any]) -> dict[str, Any]:
    """The case as the last provider takes it."""
    flat = {**{k: v for k, v in case.items() if k != "extra_body"}, **case.get("extra_body", {})}
    return {"top_p": 1.0, "top_k": 0, **flat}


def test_every_sampling_parameter_gives_what_the_model_gives_here(
    gateway: GatewayServer, market: Market, model_dir: Path
) -> None:
    async def run(openai: Any) -> list[tuple[str, str]]:
        answers = []
        for i, case in enumerate(CASES):
            request = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, **case}
            if i % 2:
                text, _ = await streamed_completion(openai, **request)
            else:
                text = (await openai.completions.create(**request)).choices[0].text
            answers.append((text, text))
        return answers

    answers = paying(gateway, market, market.clients[0], run)
    for case, (text, _) in zip(CASES, answers, strict=True):
        expected, _ = replay(model_dir, PROMPT, sampling_of(case), 12)
        assert text == text_of(expected), case
    # The bias was applied: token 32 (a space) never appears, though the prompt ends in one.
    assert " " not in answers[2][0]


def test_n_choices_each_draw_under_their_own_seed_and_their_usage_adds_up(
    gateway: GatewayServer, market: Market, model_dir: Path
) -> None:
    sampling = {"temperature": 1.0, "seed": 21}
    request = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, **sampling}

    async def run(openai: Any) -> tuple[Any, list[Any], Any]:
        whole = await openai.completions.with_raw_response.create(n=2, **request)
        stream = await openai.completions.create(
            n=2, stream=True, stream_options={"include_usage": True}, **request
        )
        chunks = [chunk async for chunk in stream]
        single = await openai.completions.with_raw_response.create(**request)
        return whole, chunks, single

    raw_whole, chunks, raw_single = paying(gateway, market, market.clients[2], run)
    whole, single = raw_whole.parse(), raw_single.parse()
    expected = [replay(model_dir, PROMPT, sampling_of({**sampling, "seed": 21 + i}), 8)[0] for i in range(2)]
    assert [c.index for c in whole.choices] == [0, 1]
    assert [c.text for c in whole.choices] == [text_of(tokens) for tokens in expected]
    assert whole.choices[0].text == single.choices[0].text  # choice 0 is what one choice would be
    assert whole.usage.prompt_tokens == len(PROMPT)
    assert whole.usage.completion_tokens == sum(len(tokens) for tokens in expected)
    streamed = [
        "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in (0, 1)
    ]
    assert streamed == [c.text for c in whole.choices]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finishes = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(f.index for f in finishes) == [0, 1]
    # Each choice computed its own prefill and decode, and is billed for it.
    charged = [int(decode_header(raw.headers[PAYMENT_RESPONSE])["amount"]) for raw in (raw_whole, raw_single)]
    assert charged[0] > 1.5 * charged[1]


def test_logprobs_are_the_models_log_softmax(gateway: GatewayServer, market: Market, model_dir: Path) -> None:
    async def run(openai: Any) -> tuple[Any, list[Any], Any]:
        messages = [{"role": "user", "content": "Hi"}]
        chat = await openai.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
        )
        stream = await openai.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=6,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
        completion = await openai.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2
        )
        return chat, chunks, completion

    chat, chunks, completion = paying(gateway, market, market.clients[1], run)
    from marketplace.gateway.catalog import load_model

    prompt = load_model(model_dir).encode_chat([{"role": "user", "content": "Hi"}])
    content = chat.choices[0].logprobs.content
    streamed = [
        entry
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for entry in c.choices[0].logprobs.content
    ]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    tokens = [entry.bytes[0] for entry in content]
    expected = model_logprobs(model_dir, prompt, tokens)
    assert len(content) == 6 and "".join(e.token for e in content) == chat.choices[0].message.content
    for entry, logprobs in zip(content, expected, strict=True):
        assert math.isclose(entry.logprob, float(logprobs[entry.bytes[0]]), abs_tol=1e-5)
        top = torch.topk(logprobs, 3)
        assert [alt.bytes[0] for alt in entry.top_logprobs] == top.indices.tolist()
        for alternative, value in zip(entry.top_logprobs, top.values.tolist(), strict=True):
            assert math.isclose(alternative.logprob, value, abs_tol=1e-5)
    legacy = completion.choices[0].logprobs
    assert len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.top_logprobs) == 6
    assert "".join(legacy.tokens) == completion.choices[0].text
    assert all(len(top) <= 2 for top in legacy.top_logprobs)
    assert legacy.text_offset == [sum(len(t) for t in legacy.tokens[:i]) for i in range(6)]
    reference = model_logprobs(model_dir, PROMPT, [ord(t) for t in legacy.tokens])
    for value, logprobs, token in zip(legacy.token_logprobs, reference, legacy.tokens, strict=True):
        assert math.isclose(value, float(logprobs[ord(token)]), abs_tol=1e-5)


def test_an_unfinished_character_at_the_end_comes_back_as_a_replacement(
    gateway: GatewayServer, market: Market
) -> None:
    """0xC3 opens a two-byte character; generation ends after it, and the client sees U+FFFD, not nothing."""

    async def run(openai: Any) -> tuple[Any, str]:
        request = {
            "model": "tiny",
            "prompt": PROMPT,
            "max_tokens": 1,
            "temperature": 0,
            "logit_bias": {"195": 100},
        }
        whole = await openai.completions.create(**request)
        text, _ = await streamed_completion(openai, **request)
        return whole, text

    whole, streamed = paying(gateway, market, market.clients[2], run)
    assert whole.choices[0].text == streamed == "\ufffd"
    assert whole.usage.completion_tokens == 1


# -- structured output ---------------------------------------------------------------------------------------

SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["ok", "count"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 4}},
        },
        "required": ["color", "tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -9, "maximum": 9},
                    "y": {"type": "integer", "minimum": -9, "maximum": 9},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "required": ["point"],
        "additionalProperties": False,
    },
]


def test_json_schema_answers_parse_and_validate(gateway: GatewayServer, market: Market) -> None:
    """20 prompts and schemas, sampled (so each answer differs), half of them streamed; and json_object."""

    async def run(openai: Any) -> list[tuple[dict[str, Any], str, str]]:
        answers = []
        for i in range(20):
            schema = SCHEMAS[i % len(SCHEMAS)]
            request = {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"Answer {i} in JSON, please."}],
                "max_tokens": 80,
                "temperature": 1.0,
                "seed": i,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": f"answer_{i}", "schema": schema, "strict": True},
                },
            }
            if i % 2:
                stream = await openai.chat.completions.create(stream=True, **request)
                chunks = [chunk async for chunk in stream]
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                finish = next(
                    c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
                )
            else:
                answer = await openai.chat.completions.create(**request)
                text, finish = answer.choices[0].message.content, answer.choices[0].finish_reason
            answers.append((schema, text, finish))
        anything = await openai.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "JSON"}], max_tokens=60, temperature=0,
            response_format={"type": "json_object"},
        )  # fmt: skip
        answers.append(
            ({"type": "object"}, anything.choices[0].message.content, anything.choices[0].finish_reason)
        )
        return answers

    answers = paying(gateway, market, market.clients[0], run)
    for schema, text, finish in answers:
        assert finish == "stop", text  # the grammar ended it, not max_tokens
        assert jsonschema_rs.is_valid(schema, json.loads(text)), text
    assert len({text for _, text, _ in answers}) > 10


# -- tools ---------------------------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


def test_tool_calls_round_trip_through_a_tool_message(gateway: GatewayServer, market: Market) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]

    async def run(openai: Any) -> tuple[Any, list[Any], Any, Any, Any]:
        named = await openai.chat.completions.create(
            model="tiny", messages=messages, tools=[WEATHER, TIME], max_tokens=60, temperature=0,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )  # fmt: skip
        stream = await openai.chat.completions.create(
            model="tiny", messages=messages, tools=[WEATHER, TIME], tool_choice="required", max_tokens=60,
            temperature=1.0, seed=4, stream=True,
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
        call = named.choices[0].message.tool_calls[0]
        follow_up = [
            *messages,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 21})},
        ]
        answer = await openai.chat.completions.create(
            model="tiny", messages=follow_up, tools=[WEATHER, TIME], max_tokens=8, temperature=0
        )
        declined = await openai.chat.completions.create(
            model="tiny", messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=8, temperature=0
        )
        return named, chunks, answer, declined, follow_up

    named, chunks, answer, declined, _ = paying(gateway, market, market.clients[1], run)
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert jsonschema_rs.is_valid(WEATHER["function"]["parameters"], arguments), arguments
    # Streamed: the call arrives as a tool_calls delta, then the finish.
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    [streamed] = [call for delta in deltas for call in delta.tool_calls]
    assert streamed.index == 0 and streamed.function.name in ("get_weather", "get_time")
    schema = (WEATHER if streamed.function.name == "get_weather" else TIME)["function"]["parameters"]
    assert jsonschema_rs.is_valid(schema, json.loads(streamed.function.arguments))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]
    # The tool's answer went back through the template, and the model answered in text.
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason in (
        "stop",
        "length",
    )
    assert declined.choices[0].message.tool_calls is None


# -- refusals ------------------------------------------------------------------------------------------------

REFUSED = [
    ("/v1/jobs", {"n": 2}, "n"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"reasoning_effort": "low"}, "reasoning_effort"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"echo": True, "logprobs": 1}, "echo"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/jobs", {"logprobs": True}, "logprobs"),
    ("/v1/jobs", {"tools": [WEATHER]}, "tools"),
]


@pytest.mark.parametrize(("path", "extra", "param"), REFUSED, ids=[p for _, _, p in REFUSED])
def test_what_cannot_work_is_refused_by_name_before_payment(
    gateway: GatewayServer, path: str, extra: dict[str, Any], param: str
) -> None:
    base: dict[str, Any] = {"model": "tiny", "max_tokens": 4}
    base |= (
        {"prompt": "hi"}
        if path != "/v1/chat/completions"
        else {"messages": [{"role": "user", "content": "hi"}]}
    )
    response = post(gateway.url, path, {**base, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported_parameter", param)


def test_null_means_absent_and_unknown_fields_are_ignored(gateway: GatewayServer) -> None:
    nulls = dict.fromkeys(
        ["temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "presence_penalty",
         "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
         "max_tokens", "max_completion_tokens", "user", "parallel_tool_calls"]
    )  # fmt: skip
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi", "name": None}], **nulls,
            "some_future_field": {"x": 1}}  # fmt: skip
    completion = {"model": "tiny", "prompt": "hi", "max_tokens": None, "echo": None, "suffix": None, "logprobs": None,
                  "best_of": None, "n": None, "stream": None}  # fmt: skip
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
        response = httpx.post(gateway.url + path, json=body, timeout=30)
        assert response.status_code == 402, response.text  # valid: it only lacks a payment


def test_a_schema_the_grammar_cannot_follow_is_refused_before_payment(gateway: GatewayServer) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}},
    }
    response = post(gateway.url, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "response_format"


# -- hostile bodies ------------------------------------------------------------------------------------------


def test_hostile_bodies_are_refused_cheaply_and_the_gateway_lives(gateway: GatewayServer) -> None:
    """Nesting that would overflow the parser's stack (in the body, or in a tool call's arguments text), a body
    past the size limit, a schema past the grammar limit, a lone surrogate, a huge top_k: each a 4xx before any
    payment, and the gateway still answers."""
    chat: dict[str, Any] = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    deep_arguments = {
        **chat,
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[" * 300_000}}]},
        ],
    }  # fmt: skip
    cases: list[tuple[bytes, int, str]] = [
        # The arguments are text: too deep to read as JSON, they go to the template as text, and are too long.
        (json.dumps(deep_arguments).encode(), 400, "prompt_too_long"),
        (b'{"model": "tiny", "metadata": ' + b"[" * 300_000 + b"]" * 300_000 + b"}", 400, "invalid_request"),
        (b'{"model": "tiny", "user": "' + b"x" * (5 << 20) + b'"}', 413, "body_too_large"),
        (
            json.dumps(
                {
                    **chat,
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {
                            "name": "big",
                            "schema": {
                                "type": "object",
                                "properties": {
                                    f"p{i}": {"type": "string", "pattern": "^[a-z]{3}$"} for i in range(4000)
                                },
                            },
                        },
                    },
                }
            ).encode(),
            400,
            "invalid_request",
        ),
        (json.dumps(chat).replace('"hi"', '"a\\ud800"').encode(), 400, "unencodable_text"),
        (json.dumps({**chat, "top_k": 10**30}).encode(), 400, "invalid_request"),
    ]
    for body, status, code in cases:
        response = httpx.post(
            gateway.url + "/v1/chat/completions",
            content=body,
            headers={"content-type": "application/json"},
            timeout=60,
        )
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text[:300]
    assert httpx.get(gateway.url + "/v1/models", timeout=10).status_code == 200
