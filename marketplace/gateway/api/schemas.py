"""Request and response bodies of the gateway's HTTP API.

The OpenAI-compatible bodies take the fields OpenAI's clients send, and vLLM's sampling additions (``top_k``,
``min_p``, ``repetition_penalty``). ``null`` means absent, and fields that do not change the output (``user``,
``metadata``, ``store`` …) are accepted and ignored; a field that would change the output in a way this network
does not serve is refused with ``unsupported_parameter`` rather than silently ignored. Strata's own addition:
``max_price`` (the most, in token base units, the client will pay for the request).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema, field_validator

from marketplace.gateway.errors import InvalidRequest
from marketplace.gateway.market import MAX_CAPACITY, MAX_PRICE_PER_MILLION
from worker import jsontext
from worker.grammar import json_grammar
from worker.sampling import (
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_TOKENS,
    MAX_PENALTY,
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_TOKENS_CAP,
    MAX_TOP_K,
    MAX_TOP_LOGPROBS,
    MIN_TEMPERATURE,
)

MAX_STOPS = 4
MAX_STOP_LENGTH = 256
# Bounds a JSON schema can state, checked as the body is parsed and before anything is tokenized; the document
# states them (maxItems, maxLength). A body is at most 4 MiB in any case (api.app.MAX_BODY_BYTES): these bound what
# one request can make the gateway hold and render. What depends on the model (its context) is checked after
# parsing, still before tokenizing: see api.routes.inference.check_prompt_chars.
MAX_MESSAGES = (
    1024  # turns in one conversation: each renders at least one token, and contexts are a few thousand
)
MAX_MESSAGE_CHARS = 1 << 20  # characters of one message's content, or of one text prompt
MAX_CONTENT_PARTS = 256  # text parts of one message
MAX_PROMPT_TOKEN_IDS = 1 << 20  # a prompt given as token ids: more than any context this network serves
MAX_TOOLS = 128
MAX_TOOL_NAME = 64
MAX_CHOICES = 8
# Two fields that cannot go together (top_logprobs without logprobs, tool_choice without tools, …): a rule between
# fields, which the request's JSON schema states only in part.
CONFLICTING = "conflicting_parameters"
MAX_PRICE = 2**63 - 1


class TextPart(BaseModel):
    type: Literal["text"]
    text: str  # bounded with the rest of the prompt (api.routes.inference.check_prompt_chars)


class FunctionCall(BaseModel):
    name: str = Field(min_length=1, max_length=MAX_TOOL_NAME)
    arguments: str = Field(max_length=MAX_MESSAGE_CHARS, description="the arguments as JSON text")


class ToolCall(BaseModel):
    """A call the assistant made in an earlier turn, sent back as part of the conversation."""

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # null only on an assistant turn that made tool calls.
    # The bound on the union, not a constrained str: pydantic's constrained strings refuse a lone surrogate as
    # invalid_request, which the tokenizer should refuse as unencodable_text. On a list it bounds the parts too.
    content: str | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] | None = Field(
        default=None, max_length=MAX_MESSAGE_CHARS
    )
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(
        default=None, max_length=256, description="on a tool message: the call answered"
    )

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def rendered(self) -> dict[str, Any]:
        """The message as chat templates take it."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _json_or_text(call.function.arguments),
                    },
                }
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message

    def characters(self) -> int:
        """The characters of the message the chat template will render: its text, name and tool calls."""
        calls = sum(len(call.function.name) + len(call.function.arguments) for call in self.tool_calls or [])
        return len(self.text()) + len(self.name or "") + calls


class StreamOptions(BaseModel):
    include_usage: bool | None = None


class FunctionDefinition(BaseModel):
    name: str = Field(min_length=1, max_length=MAX_TOOL_NAME, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = Field(default=None, max_length=MAX_MESSAGE_CHARS)
    parameters: dict[str, Any] | None = Field(default=None, description="a JSON schema for the arguments")
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition

    def characters(self) -> int:
        """About the characters a chat template renders of the tool: its name, description and parameters'
        schema as JSON (which the body bounds; measured by the JSON the client sent, not rendered again)."""
        function = self.function
        parameters = len(json.dumps(function.parameters)) if function.parameters else 0
        return len(function.name) + len(function.description or "") + parameters


class NamedFunction(BaseModel):
    name: str = Field(min_length=1, max_length=MAX_TOOL_NAME)


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    # "schema" is a BaseModel attribute: the field is read under its JSON name.
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = Field(default=None, description="ignored: the schema is always followed")


class TextFormat(BaseModel):
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(BaseModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")
]


def _only(*schemas: dict[str, Any], description: str) -> WithJsonSchema:
    """The document's word on a field OpenAI defines that this network does not serve: only its neutral values.
    The field itself takes anything, so that any other value is refused by name (``unsupported_parameter``)."""
    return WithJsonSchema({"anyOf": [{"type": "null"}, *schemas], "description": description})


_UNSERVED = "not served: only null or the neutral value is taken (else 400 unsupported_parameter)"
Stop = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_LENGTH)]
Bias = Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]
TokenKey = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,9}$")]
# Written out: pydantic's own leaves keys that fail the pattern allowed.
_BIAS_SCHEMA = {
    "type": "object",
    "maxProperties": MAX_LOGIT_BIAS_TOKENS,
    "patternProperties": {
        "^[0-9]{1,9}$": {"type": "number", "minimum": -MAX_LOGIT_BIAS, "maximum": MAX_LOGIT_BIAS}
    },
    "additionalProperties": False,
}
# Amounts travel as JSON integers or decimal strings (JSON numbers lose precision above 2**53).
_PRICE_LIMIT_SCHEMA = {
    "anyOf": [
        {"type": "integer", "minimum": 1, "maximum": MAX_PRICE},
        {
            "type": "string",
            "pattern": r"^0*[1-9][0-9]{0,17}$",
            "description": "base units, at most 2**63 - 1",
        },
    ]
}


class GenerationBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    # Fields OpenAI defines that change the output in ways this network does not serve, with their neutral values.
    # Fields that do not change the output (user, metadata, store, service_tier, …) are accepted and ignored.
    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = {
        "best_of": (None, 1),
        "functions": (None, []),
        "function_call": (None, "none"),
        "reasoning_effort": (None,),
        "prediction": (None,),
        "audio": (None,),
        "modalities": (None, ["text"]),
        "web_search_options": (None,),
    }

    model: str = Field(min_length=1, max_length=255)
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 (or under 1e-5) is greedy")
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOP_K, description="0 or -1 turns it off")
    min_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float | None = Field(default=None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float | None = Field(
        default=None, ge=1 / MAX_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY, description="1 turns it off"
    )
    logit_bias: Annotated[dict[TokenKey, Bias], WithJsonSchema(_BIAS_SCHEMA)] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS_TOKENS, description="token id (decimal) → bias"
    )
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES, description="choices to generate")
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # A request costs at least a base unit a hop (settlement.pricing): a max_price of 0 could never be paid.
    max_price: Annotated[int, WithJsonSchema(_PRICE_LIMIT_SCHEMA)] | None = Field(
        default=None, ge=1, le=MAX_PRICE, description="base units"
    )
    best_of: Annotated[Any, _only({"const": 1}, description=_UNSERVED)] = None
    functions: Annotated[
        Any, _only({"type": "array", "maxItems": 0}, description=_UNSERVED + "; use tools")
    ] = None
    function_call: Annotated[Any, _only({"const": "none"}, description=_UNSERVED + "; use tool_choice")] = (
        None
    )
    reasoning_effort: Annotated[Any, _only(description=_UNSERVED)] = None
    prediction: Annotated[Any, _only(description=_UNSERVED)] = None
    audio: Annotated[Any, _only(description=_UNSERVED)] = None
    modalities: Annotated[Any, _only({"const": ["text"]}, description=_UNSERVED)] = None
    web_search_options: Annotated[Any, _only(description=_UNSERVED)] = None

    @field_validator("max_price", mode="before")
    @classmethod
    def _decimal_string(cls, value: Any) -> Any:
        if isinstance(value, str) and value.isascii() and value.isdigit():
            return int(value)
        return value

    def refuse_unsupported(self) -> None:
        for name, neutral in self.unsupported.items():
            value = getattr(self, name, None)
            if value not in neutral:
                raise InvalidRequest(
                    "unsupported_parameter", f"{name}={value!r} is not supported", param=name
                )

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def choices(self) -> int:
        return self.n or 1

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or any(not 0 < len(s) <= MAX_STOP_LENGTH for s in stops):
            raise InvalidRequest(
                "invalid_request",
                f"stop takes up to {MAX_STOPS} strings of 1 to {MAX_STOP_LENGTH} characters",
                param="stop",
            )
        return tuple(stops)

    def alternatives(self) -> int | None:
        """Alternatives to report with each token's log probability; None for no log probabilities."""
        return None

    def grammar(self) -> str | None:
        """The grammar the answer must follow, from ``response_format``; None for free text."""
        form = self.response_format
        if form is None or form.type == "text":
            return None
        if isinstance(form, JsonObjectFormat):
            return json_grammar(None)
        assert isinstance(form, JsonSchemaResponseFormat)
        return json_grammar(form.json_schema.json_schema)

    def grammar_source(self) -> str:
        """The field the grammar comes from, for errors about it."""
        return "response_format"

    def sampling(self) -> dict[str, Any]:
        """What the last provider samples with: worker.sampling.SamplingParams' fields, the neutral ones left out
        (so that a request without them commits to what it always did). OpenAI's default temperature is 1; one
        below the sampler's least is greedy, which is what it means."""
        temperature = 1.0 if self.temperature is None else self.temperature
        sampling: dict[str, Any] = {
            "temperature": temperature if temperature >= MIN_TEMPERATURE else 0.0,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": max(self.top_k or 0, 0),
            "seed": self.seed,
        }
        optional = {
            "min_p": (self.min_p, 0.0),
            "presence_penalty": (self.presence_penalty, 0.0),
            "frequency_penalty": (self.frequency_penalty, 0.0),
            "repetition_penalty": (self.repetition_penalty, 1.0),
            "logit_bias": (self.logit_bias, {}),
            "logprobs": (self.alternatives(), None),
            "grammar": (self.grammar(), None),
        }
        for name, (value, neutral) in optional.items():
            if value is not None and value != neutral:
                sampling[name] = value
        return sampling


class ChatCompletionBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_CAP)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_CAP)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def alternatives(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest(CONFLICTING, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_mode(self) -> Literal["none", "auto", "forced"]:
        """How tool calls are made: not at all, when the model writes them (parsed from its text), or forced by
        a grammar (``required``, or a named function)."""
        choice = self.tool_choice
        if not self.tools:
            if choice not in (None, "none"):
                raise InvalidRequest(CONFLICTING, "tool_choice needs tools", param="tool_choice")
            return "none"
        if choice == "none":
            return "none"
        return "auto" if choice in (None, "auto") else "forced"

    def forced_tools(self) -> list[Tool]:
        """The tools a forced call chooses among: all of them, or the one named."""
        tools = self.tools or []
        if isinstance(self.tool_choice, NamedToolChoice):
            named = [tool for tool in tools if tool.function.name == self.tool_choice.function.name]
            if not named:
                raise InvalidRequest(
                    CONFLICTING,
                    f"tool_choice names {self.tool_choice.function.name!r}, which is not among the tools",
                    param="tool_choice",
                )
            return named
        return tools

    def grammar_source(self) -> str:
        return "tools" if self.tool_mode() == "forced" else "response_format"

    def grammar(self) -> str | None:
        if self.tool_mode() != "forced":
            return super().grammar()
        if self.response_format is not None and self.response_format.type != "text":
            raise InvalidRequest(
                CONFLICTING,
                "a forced tool call and a response_format cannot both apply",
                param="tool_choice",
            )
        return json_grammar(
            tool_call_schema([(t.function.name, t.function.parameters) for t in self.forced_tools()])
        )


class CompletionBody(GenerationBody):
    # echo with logprobs would need every prompt position's logits; the last span returns the last position's.
    model_config = ConfigDict(
        json_schema_extra={
            "not": {
                "required": ["echo", "logprobs"],
                "properties": {"echo": {"const": True}, "logprobs": {"type": "integer"}},
            }
        }
    )
    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = {**GenerationBody.unsupported, "suffix": (None, "")}

    prompt: (
        Annotated[str, StringConstraints(min_length=1, max_length=MAX_MESSAGE_CHARS)]
        | Annotated[
            list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_MESSAGE_CHARS)]],
            Field(min_length=1, max_length=1),
        ]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_PROMPT_TOKEN_IDS)]
    ) = Field(
        description="text, a one-element list of text, or token ids (each below the model's vocab_size)"
    )
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_CAP, description="16 when absent")
    logprobs: int | None = Field(
        default=None, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per token"
    )
    echo: bool | None = None
    suffix: Annotated[
        Any, _only({"const": ""}, description=_UNSERVED + ": no model here fills in the middle")
    ] = None

    def alternatives(self) -> int | None:
        return self.logprobs


class JobBody(GenerationBody):
    """A non-interactive request that may rest in the book until a route at or below ``max_price`` appears.
    Its result is text read back later: nothing to carry log probabilities, tool calls or several choices."""

    # Exactly one of prompt and messages.
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["prompt"],
                    "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}},
                },
                {
                    "required": ["messages"],
                    "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}},
                },
            ]
        }
    )
    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = {
        **GenerationBody.unsupported,
        "n": (None, 1),
        "stream": (None, False),
        "logprobs": (None, False),
        "top_logprobs": (None, 0),
        "tools": (None, []),
        "tool_choice": (None, "none"),
        "echo": (None, False),
        "suffix": (None, ""),
    }

    n: Annotated[Any, _only({"const": 1}, description=_UNSERVED + ": a job has one choice")] = None
    stream: Annotated[
        Any, _only({"const": False}, description=_UNSERVED + ": read the job at GET /v1/jobs/{id}")
    ] = None
    logprobs: Annotated[Any, _only({"const": False}, description=_UNSERVED)] = None
    top_logprobs: Annotated[Any, _only({"const": 0}, description=_UNSERVED)] = None
    tools: Annotated[Any, _only({"type": "array", "maxItems": 0}, description=_UNSERVED)] = None
    tool_choice: Annotated[Any, _only({"const": "none"}, description=_UNSERVED)] = None
    echo: Annotated[Any, _only({"const": False}, description=_UNSERVED)] = None
    suffix: Annotated[Any, _only({"const": ""}, description=_UNSERVED)] = None
    prompt: Annotated[str, StringConstraints(min_length=1, max_length=MAX_MESSAGE_CHARS)] | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int = Field(default=256, ge=1, le=MAX_TOKENS_CAP)
    ttl_s: int = Field(default=600, ge=1, description="seconds the job may rest in the book")


def tool_call_schema(tools: list[tuple[str, dict[str, Any] | None]]) -> dict[str, Any]:
    """The JSON schema of one call to one of ``tools`` (name, parameters schema): what a forced call generates."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": parameters or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, parameters in tools
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _json_or_text(arguments: str) -> Any:
    """A tool call's arguments as templates expect them: the decoded object when they are JSON."""
    try:
        return jsontext.loads(arguments)
    except ValueError:
        return arguments


# An ask's price travels as a JSON integer or a decimal string (as amounts do elsewhere in the API); the string's
# range, 1 to MAX_PRICE_PER_MILLION (10**12), is up to 12 digits or 10**12 itself.
_PRICE_SCHEMA = {
    "anyOf": [
        {"type": "integer", "minimum": 1, "maximum": MAX_PRICE_PER_MILLION},
        {"type": "string", "pattern": rf"^0*([1-9][0-9]{{0,11}}|{MAX_PRICE_PER_MILLION})$"},
    ]
}


class AskBody(BaseModel):
    """A provider's signed ask: the EIP-712 ``Ask`` fields and the signature over them."""

    model_config = ConfigDict(extra="forbid")

    provider: str = Field(pattern=r"^0x[0-9a-fA-F]{40}$", description="the staked address that signs the ask")
    gateway: str = Field(
        pattern=r"^0x[0-9a-fA-F]{40}$", description="the gateway the ask is for: this one's address"
    )
    tlsFingerprint: str = Field(
        pattern=r"^0x[0-9a-fA-F]{64}$", description="sha256 of the TLS certificate the endpoint presents"
    )
    modelRoot: str = Field(pattern=r"^0x[0-9a-fA-F]{64}$")
    layerStart: int = Field(ge=0, le=2**32 - 1)
    layerEnd: int = Field(ge=1, le=2**32 - 1)
    pricePerMillion: Annotated[int, WithJsonSchema(_PRICE_SCHEMA)] = Field(
        ge=1, le=MAX_PRICE_PER_MILLION, description="base units per million token-layers"
    )
    capacity: int = Field(ge=0, le=MAX_CAPACITY, description="sessions at once; 0 withdraws the span")
    retentionS: int = Field(
        ge=0,
        le=2**32 - 1,
        description="seconds a session's steps are kept for validators after it ends; at least the gateway's "
        "validation window and a margin",
    )
    endpoint: str = Field(min_length=3, max_length=255, description="host:port of the provider's hop server")
    nonce: int = Field(ge=1, le=2**64 - 1)
    expiresAt: int = Field(ge=1, le=2**64 - 1, description="unix seconds")
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$")

    @field_validator("pricePerMillion", mode="before")
    @classmethod
    def _decimal_string(cls, value: Any) -> Any:
        if isinstance(value, str) and value.isascii() and value.isdigit():
            return int(value)
        return value


class HeartbeatBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: str = Field(pattern=r"^0x[0-9a-fA-F]{40}$")
    gateway: str = Field(
        pattern=r"^0x[0-9a-fA-F]{40}$", description="the gateway the heartbeat is for: this one's address"
    )
    timestamp: int = Field(ge=0, le=2**64 - 1, description="unix seconds")
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$")
