"""Request and response bodies of the gateway's HTTP API.

The OpenAI-compatible bodies take the fields OpenAI's clients send. Fields that would change what is generated
in ways this network does not do (several choices, log probabilities, penalties, tools, JSON mode) are refused
with ``unsupported_parameter`` rather than silently ignored; fields that do not change the output (``user``,
``metadata``, ``store`` …) are accepted and ignored. Strata's own additions: ``top_k`` and ``max_price`` (the
most, in token base units, the client will pay for the request).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from marketplace.gateway.errors import InvalidRequest
from marketplace.gateway.market import MAX_CAPACITY, MAX_PRICE_PER_MILLION
from worker.sampling import MAX_SEED, MAX_TOKENS_CAP

MAX_STOPS = 4
MAX_STOP_LENGTH = 256
MAX_PRICE = 2**63 - 1


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


# Fields OpenAI defines that change the output in ways the network does not serve, with their neutral values.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


class GenerationBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=255)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # A request costs at least a base unit a hop (settlement.pricing): a max_price of 0 could never be paid.
    max_price: int | None = Field(default=None, ge=1, le=MAX_PRICE, description="base units")

    @field_validator("max_price", mode="before")
    @classmethod
    def _decimal_string(cls, value: Any) -> Any:
        # Amounts travel as decimal strings elsewhere in the API (JSON numbers lose precision above 2**53).
        if isinstance(value, str) and value.isdigit():
            return int(value)
        return value

    def refuse_unsupported(self) -> None:
        for name, neutral in _UNSUPPORTED.items():
            value = (self.model_extra or {}).get(name)
            if value not in neutral:
                raise InvalidRequest(
                    "unsupported_parameter", f"{name}={value!r} is not supported", param=name
                )

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or any(not 0 < len(s) <= MAX_STOP_LENGTH for s in stops):
            raise InvalidRequest(
                "invalid_request",
                f"stop takes up to {MAX_STOPS} strings of 1 to {MAX_STOP_LENGTH} characters",
            )
        return tuple(stops)

    def sampling(self) -> dict[str, Any]:
        """What the last provider samples with. OpenAI's default temperature is 1."""
        return {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": self.top_k or 0,
            "seed": self.seed,
        }


class ChatCompletionBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_CAP)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_CAP)

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionBody(GenerationBody):
    prompt: str | list[str] | list[int] = Field(description="text, a one-element list of text, or token ids")
    max_tokens: int = Field(default=16, ge=1, le=MAX_TOKENS_CAP)


class JobBody(GenerationBody):
    """A non-interactive request that may rest in the book until a route at or below ``max_price`` appears."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=1024)
    max_tokens: int = Field(default=256, ge=1, le=MAX_TOKENS_CAP)
    ttl_s: int = Field(default=600, ge=1, description="seconds the job may rest in the book")


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
