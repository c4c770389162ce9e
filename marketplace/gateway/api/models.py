"""Response bodies of the gateway's HTTP API, and the forms of the identifiers its paths and bodies take.

Request bodies live in :mod:`marketplace.gateway.api.schemas`. Amounts are token base units written as decimal
strings (JSON numbers lose precision above 2**53); counts, timestamps and sizes are JSON integers. Every error,
whatever its status, is an :class:`ErrorBody`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ADDRESS_PATTERN = r"^0x[0-9a-fA-F]{40}$"
HASH_PATTERN = r"^0x[0-9a-fA-F]{64}$"

Address = Annotated[str, Field(pattern=ADDRESS_PATTERN, description="0x-prefixed, EIP-55 checksummed")]
Hash = Annotated[str, Field(pattern=HASH_PATTERN, description="32 bytes, 0x-prefixed hex")]
Amount = Annotated[str, Field(pattern=r"^[0-9]+$", description="token base units, a decimal string")]
Timestamp = Annotated[str, Field(description="ISO 8601, UTC")]


# -- errors ------------------------------------------------------------------------------------------------


class Problem(BaseModel):
    param: str = Field(description="where in the request, dotted: `messages.0.role`")
    message: str


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    message: str
    type: str = Field(
        description="the error's class: invalid_request_error, payment_error, not_found_error, …"
    )
    code: str | None = Field(description="stable and machine-readable: clients branch on it")
    param: str | None = Field(default=None, description="the request field at fault, when one is")
    problems: list[Problem] | None = Field(
        default=None, description="every field that failed validation (invalid_request only)"
    )
    details: dict[str, Any] | None = Field(
        default=None, description="what the code needs said: a channel's figures, a context length, …"
    )


class ErrorBody(BaseModel):
    """Every error the gateway answers, OpenAI-compatible."""

    error: ErrorDetail


# -- inference ---------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCalled(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class ToolCalled(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCalled


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the answer is only tool calls")
    tool_calls: list[ToolCalled] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None = Field(description="`stop`, `length` or `tool_calls`")
    logprobs: ChatLogprobs | None = Field(description="with `logprobs: true`: each token's log probability")


class ChatCompletion(BaseModel):
    """A whole chat answer. Streamed (``stream: true``), the answer is ``text/event-stream``: ``data:`` lines of
    ``chat.completion.chunk`` objects (the same envelope, each choice with a ``delta`` holding ``role`` first,
    then ``content``), the last one with its ``finish_reason`` and the settled ``payment`` (the
    ``PAYMENT-RESPONSE`` document), then a ``usage`` chunk if ``stream_options.include_usage``, then
    ``data: [DONE]``. A job that fails mid-stream sends an ``{"error": …}`` chunk (with its ``payment``) instead
    of the last one."""

    id: str
    object: Literal["chat.completion"]
    created: int = Field(description="unix seconds")
    model: str
    system_fingerprint: Hash = Field(description="the model's root")
    choices: list[ChatChoice]
    usage: Usage


class TextLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = Field(description="`stop` or `length`")
    logprobs: TextLogprobs | None = Field(description="with `logprobs: N`: each token's and N alternatives'")


class TextCompletion(BaseModel):
    """A whole text completion. Streamed, ``text_completion`` chunks over ``text/event-stream`` as for chat
    completions (see ChatCompletion), each choice with its piece of ``text``."""

    id: str
    object: Literal["text_completion"]
    created: int = Field(description="unix seconds")
    model: str
    system_fingerprint: Hash = Field(description="the model's root")
    choices: list[TextChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str = Field(description="the name requests use")
    object: Literal["model"]
    created: int
    owned_by: str
    root: Hash = Field(description="sha256 over each layer's tensors and the config")
    layers: int
    context_length: int = Field(description="positions (prompt and max_tokens) a request may use")
    model_context_length: int = Field(description="the model's own context")
    price_per_million_tokens: Amount | None = Field(description="the cheapest route now; null with no route")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


# -- jobs --------------------------------------------------------------------------------------------------


class JobUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class JobError(BaseModel):
    code: str
    message: str | None


class JobView(BaseModel):
    id: Hash
    object: Literal["job"]
    kind: str = Field(description="chat, completion or job")
    model: str
    modelRoot: Hash
    status: str = Field(description="resting, paying, running, completed, failed, expired or cancelled")
    payer: Address | None = Field(description="null when the gateway serves without payments")
    scheme: str = Field(description="voucher, exact, or none (payments off)")
    quote: Amount
    charged: Amount
    maxPrice: Amount | None
    output: str | None = Field(description="the payer's only: shown with an X-Strata-Job-Read proof")
    finishReason: str | None
    usage: JobUsage
    failovers: int
    cleared: bool = Field(description="its sampled hops are validated: an epoch may settle it")
    voided: bool = Field(description="a validator found a hop wrong: the client pays nothing for it")
    error: JobError | None
    createdAt: Timestamp
    finishedAt: Timestamp | None
    expiresAt: Timestamp | None


# -- market ------------------------------------------------------------------------------------------------


class AskView(BaseModel):
    id: int
    provider: Address
    modelRoot: Hash
    layers: list[int] = Field(min_length=2, max_length=2, description="[start, end): the span served")
    pricePerMillion: Amount = Field(description="base units per million token-layers")
    capacity: int
    retentionS: int
    inUse: int = Field(description="sessions open now")
    endpoint: str
    tlsFingerprint: Hash
    expiresAt: int = Field(description="unix seconds")


class PostedAsk(BaseModel):
    ask: AskView | None = Field(description="the ask as booked; null when capacity 0 withdrew the span")
    withdrawn: bool


class AskList(BaseModel):
    data: list[AskView]


class BookLevel(BaseModel):
    pricePerMillion: Amount
    asks: int
    capacity: int
    free: int


class BookSpan(BaseModel):
    layers: list[int] = Field(min_length=2, max_length=2)
    levels: list[BookLevel] = Field(description="cheapest first")


class BestRoute(BaseModel):
    asks: list[AskView]
    pricePerMillionTokens: Amount


class OrderBook(BaseModel):
    model: str
    modelRoot: Hash
    layers: int
    spans: list[BookSpan]
    bestRoute: BestRoute | None


class HeartbeatAccepted(BaseModel):
    provider: Address
    matchableUntil: int = Field(description="unix seconds")


class ProviderView(BaseModel):
    address: Address
    active: bool = Field(description="staked at least the minimum in StakeManager")
    matchable: bool
    lastHeartbeat: int | None = Field(description="unix seconds")
    suspendedUntil: int | None = Field(description="unix seconds")
    sessionsServed: int
    asks: list[AskView]


class ProviderList(BaseModel):
    data: list[ProviderView]


class ChannelView(BaseModel):
    channelId: Hash
    payer: Address = Field(description="the first 20 bytes of the channel id")
    deposit: Amount
    withdrawableAt: Amount = Field(description="unix seconds the payer may withdraw after; 0 while it stays")
    exiting: bool
    closed: bool
    voucherAmount: Amount = Field(description="the highest voucher this gateway accepted")
    charged: Amount
    reserved: Amount = Field(description="held for requests still running")
    available: Amount


# -- payouts and slashes -----------------------------------------------------------------------------------


class Refunded(BaseModel):
    """A batch-settlement channel's cooperative refund, made."""

    channelId: str = Field(pattern=HASH_PATTERN)
    transaction: str | None = Field(
        description="the refund's transaction; null when nothing was left to refund"
    )
    balance: Amount = Field(description="what the channel holds now: what was charged and not yet claimed")


class Payout(BaseModel):
    provider: Address
    earned: Amount = Field(description="every metered entry no failed validation voided, settled or not")
    settled: Amount = Field(description="its leaf in the latest posted root")
    claimed: Amount
    claimable: Amount
    epoch: int | None
    root: Hash | None
    cumulativeAmount: Amount
    proof: list[Hash]


class SlashSummary(BaseModel):
    id: Hash = Field(description="keccak256 of the evidence document: the hash StakeManager.slash recorded")
    object: Literal["slash"]
    provider: Address
    job: Hash
    reason: str | None
    detail: str | None
    status: str | None = Field(description="pending, slashed, nothing (no stake was left), or suspended")
    slashed: Amount | None
    transaction: Hash | None
    decidedAt: Timestamp | None


class Slash(SlashSummary):
    evidence: str | None = Field(description="the JSON document whose keccak256 is the id")


class SlashList(BaseModel):
    object: Literal["list"]
    data: list[SlashSummary]


# -- health ------------------------------------------------------------------------------------------------


class Deployment(BaseModel):
    chainId: int
    stakeManager: Address


class ChainCheck(BaseModel):
    id: int
    block: int


class ValidationCheck(BaseModel):
    status: Literal["ok", "behind"]
    pending: int
    troubled: int
    overdue: int
    missedRecently: int


class WatcherCheck(BaseModel):
    lagBlocks: int | None
    secondsSinceSync: float | None
    failedRounds: int


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    gateway: Address
    deployment: Deployment = Field(
        description="the protocol's signing domain: a JobRead proof is signed under it"
    )
    models: list[str]
    asks: int
    database: str = Field(description="`ok`, or `down: …`")
    chain: ChainCheck | str = Field(description="the chain's id and head, or `down: …`")
    validation: ValidationCheck | str = Field(description="whether validation keeps up, or `unknown: …`")
    chainWatcher: WatcherCheck


# -- the statuses routes declare ---------------------------------------------------------------------------

PAYMENT_REQUIRED_HEADER = {
    "description": "base64 of the x402 v2 PaymentRequired JSON: the quote for this request on the route it would "
    "take, in `accepts` (a `voucher` and an `exact` requirement, each with its `amount` in base units)",
    "required": True,
    "schema": {"type": "string"},
}
PAYMENT_RESPONSE_HEADER = {
    "description": "base64 of the x402 v2 SettlementResponse JSON, on paid requests: what was charged (whole "
    "answers) or reserved (streams and jobs), and the channel's cumulative charge",
    "schema": {"type": "string"},
}
RETRY_AFTER_HEADER = {
    "description": "seconds to wait before trying again",
    "required": True,
    "schema": {"type": "integer", "minimum": 0},
}


def error(description: str, headers: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """A status a route answers with the gateway's error body, and the headers that come with it."""
    answer: dict[str, Any] = {"model": ErrorBody, "description": description}
    if headers:
        answer["headers"] = headers
    return answer


INVALID = error("a body, header, query or path parameter that does not follow the API (`invalid_request`, …)")
UNAVAILABLE = error(
    "the chain does not answer (`chain_unavailable`): try again", headers={"Retry-After": RETRY_AFTER_HEADER}
)
# What admitting a paid request may answer besides its success.
ADMISSION: dict[int | str, dict[str, Any]] = {
    400: INVALID,
    402: error(
        "payment required (`payment_required`), or the payment does not secure this request (`voucher_too_low`, "
        "`invalid_signature`, …): PAYMENT-REQUIRED holds a fresh quote",
        headers={"PAYMENT-REQUIRED": PAYMENT_REQUIRED_HEADER},
    ),
    404: error("unknown model (`unknown_model`)"),
    409: error(
        "no route covers the model (`no_route`), or it costs more than max_price (`max_price_exceeded`)"
    ),
    503: error(
        "the chain cannot be read (`chain_unavailable`), or an exact payment's outcome is not known yet "
        "(`settlement_pending`): try again",
        headers={"Retry-After": RETRY_AFTER_HEADER},
    ),
}
# An answer, besides: the job's own failures.
PAID: dict[int | str, dict[str, Any]] = {
    **ADMISSION,
    500: error("the job's outcome could not be recorded (`internal_error`); nothing was charged"),
    502: error(
        "providers failed and no other route could finish the job; only tokens already delivered are charged",
        headers={"PAYMENT-RESPONSE": PAYMENT_RESPONSE_HEADER},
    ),
}
TOO_MANY_RESTING = error(
    "the book holds all the resting jobs it takes, in all or of this payer (`too_many_resting_jobs`); nothing "
    "was paid"
)


# One server-sent event of a streamed answer (as Open API 3.2's `itemSchema` would say it; before 3.2 a stream's
# `schema` describes each of its events).
STREAM_EVENT = {
    "type": "object",
    "description": "one event of a streamed answer (`stream: true`): its `data` is a chunk as JSON, and `[DONE]` last",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
}


def paid_answer(model: type[BaseModel], description: str) -> dict[str, Any]:
    """A paid route's success: ``model`` as JSON, or the same answer streamed as server-sent events."""
    return {
        "model": model,
        "description": description,
        "headers": {"PAYMENT-RESPONSE": PAYMENT_RESPONSE_HEADER},
        "content": {"text/event-stream": {"schema": STREAM_EVENT}},
    }
