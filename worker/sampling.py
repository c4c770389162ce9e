"""Next-token selection on the last provider of a pipeline: the request's ``SamplingParams`` and a seeded
``Sampler`` that turns the LM head's logits for the last position into one token id.

The logits go through these steps, in this order (vLLM's and Hugging Face's where they have the step):

    1. grammar      tokens the request's grammar does not allow next get -inf  (worker.grammar; optional)
    2. logit_bias   add the request's bias to each named token                 (OpenAI's logit_bias)
    3. repetition   a token seen in the context or the output: a positive      (RepetitionPenaltyLogitsProcessor)
                    score divided by the penalty, a negative one multiplied
    4. frequency,   minus frequency_penalty × times generated, minus           (OpenAI's presence and frequency
       presence     presence_penalty once if generated at all                    penalties, over the output only)
    5. temperature  scores / temperature                                       (TemperatureLogitsWarper)
    6. top-k        drop every score below the k-th highest;                   (TopKLogitsWarper; off at 0)
                    ties with the k-th are kept, so more than k tokens may remain
    7. top-p        sort ascending, softmax, cumulative sum; drop tokens       (TopPLogitsWarper; off at 1)
                    whose cumulative probability is <= 1 - top_p, always
                    keeping the most probable
    8. min-p        drop tokens less probable than min_p × the most probable   (MinPLogitsWarper; off at 0)
    9. draw         softmax, then torch.multinomial with the sampler's own generator

Greedy (``temperature == 0``) takes steps 1–4 and then ``torch.argmax``: ties go to the lowest token id. Dropped
tokens get -inf, so they have probability exactly 0. ``Sampler.scores`` exposes steps 1–8, so a verifier can
check that a token a provider reports was one it was allowed to draw.

Steps 1, 3 and 4 depend on what came before: a session is opened with ``context`` (the ids it starts from,
whose last ``context_output`` were generated before it, by a route that failed over to this one) and the sampler
counts every token it emits after. ``session_sampling`` builds those fields the same way for the gateway that
opens a session and the ledger and validator that check it.

Log probabilities (``logprobs``) are the log-softmax of the raw logits, before any of the steps: the model's own
distribution, as vLLM reports it by default.

Everything is computed in float32 on the CPU, whatever the logits' dtype and device: the draw then depends
only on the logits and the seed, not on which accelerator, kernel or global RNG state the provider has.
The copy is one vocabulary-sized vector per token, small next to the forward pass that produced it.

A ``Sampler`` seeded with ``seed`` gives the same tokens for the same logits on every run; with
``seed=None`` it draws a seed from the OS and reports it as ``Sampler.seed``, so the generation can still
be replayed. A sampler is one generation's state and is not shared between threads.

Every refusal is a ``ValueError`` whose message names the field and the offending value; the API edge
turns it into a client error.
"""

from __future__ import annotations

import math
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

import torch

if TYPE_CHECKING:
    from worker.grammar import Vocabulary

__all__ = [
    "LOGITS_DTYPES",
    "MAX_LOGIT_BIAS",
    "MAX_PENALTY",
    "MAX_SEED",
    "MAX_TEMPERATURE",
    "MAX_TOKENS_CAP",
    "MAX_TOP_K",
    "MAX_TOP_LOGPROBS",
    "MIN_TEMPERATURE",
    "FinishReason",
    "Sampler",
    "SamplingParams",
    "TokenLogprobs",
    "session_sampling",
]

# Most tokens one request may ask for; longer generations are several requests.
MAX_TOKENS_CAP: Final = 32_768
# Seeds fit a signed 64-bit integer, so they survive JSON, SQL BIGINT and torch.Generator unchanged.
MAX_SEED: Final = 2**63 - 1
# A positive temperature must lie in [MIN_TEMPERATURE, MAX_TEMPERATURE] (dimensionless). Below the minimum,
# 0 (greedy) is what the caller means; the bounds also keep the temperature a normal float32, so dividing by
# it never turns -inf logits into NaN (inf / inf) or finite ones into inf / 0.
MIN_TEMPERATURE: Final = 1e-5
MAX_TEMPERATURE: Final = 1e5
LOGITS_DTYPES: Final = frozenset({torch.float32, torch.float16, torch.bfloat16})
# OpenAI's bounds: presence and frequency penalties in [-2, 2], a bias in [-100, 100], 20 alternatives a token.
MAX_PENALTY: Final = 2.0
MAX_LOGIT_BIAS: Final = 100.0
MAX_LOGIT_BIAS_TOKENS: Final = 1024
MAX_TOP_LOGPROBS: Final = 20
# top_k beyond any vocabulary keeps every token; the bound only keeps the number a number.
MAX_TOP_K: Final = 1 << 20
LOGPROB_FLOOR: Final = -9999.0
# repetition_penalty lies in [1 / MAX_REPETITION_PENALTY, MAX_REPETITION_PENALTY]; 1 is off.
MAX_REPETITION_PENALTY: Final = 10.0
# An llguidance grammar (JSON text): a large JSON schema fits; the compile time it can cost is bounded by the
# library's own limits.
MAX_GRAMMAR_BYTES: Final = 64 * 1024

FinishReason: TypeAlias = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; the defaults are greedy decoding of up to 16 tokens."""

    temperature: float = 0.0  # dimensionless; 0 = greedy, else MIN_TEMPERATURE..MAX_TEMPERATURE
    top_k: int = 0  # tokens kept by top-k filtering; 0 = off; more than the vocabulary keeps them all
    top_p: float = 1.0  # cumulative probability kept by nucleus filtering, in (0, 1]; 1 = off
    min_p: float = 0.0  # least probability kept, relative to the most probable token's, in [0, 1]; 0 = off
    seed: int | None = None  # generator seed, 0..MAX_SEED; None = drawn from the OS per Sampler
    max_tokens: int = 16  # tokens to generate at most, 1..MAX_TOKENS_CAP
    stop_token_ids: tuple[int, ...] = ()  # token ids (>= 0) that end the generation once emitted
    presence_penalty: float = 0.0  # -MAX_PENALTY..MAX_PENALTY; 0 = off
    frequency_penalty: float = 0.0  # -MAX_PENALTY..MAX_PENALTY; 0 = off
    repetition_penalty: float = 1.0  # 1 / MAX_REPETITION_PENALTY..MAX_REPETITION_PENALTY; 1 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs, ids ascending and distinct
    logprobs: int | None = None  # alternatives reported with each token's log probability; None = no logprobs
    grammar: str | None = None  # an llguidance grammar the output follows (worker.grammar); None = any text
    context: tuple[int, ...] = ()  # ids the session starts from, for steps 1, 3 and 4
    context_output: int = 0  # how many of the context's last ids were generated (counted by step 4)

    def __post_init__(self) -> None:
        # Types are checked here, not only in from_dict, because mypy accepts a bool wherever an int or a
        # float is declared, and a direct caller's mistake deserves the same clear error as a client's.
        temperature = _real("temperature", self.temperature)
        if not (
            math.isfinite(temperature)
            and (temperature == 0.0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE)
        ):
            raise ValueError(
                f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}, "
                f"got {self.temperature!r}"
            )
        if not 0 <= _integer("top_k", self.top_k) <= MAX_TOP_K:
            raise ValueError(f"top_k must be between 0 (off) and {MAX_TOP_K}, got {self.top_k!r}")
        top_p = _real("top_p", self.top_p)
        # Written so that NaN fails it too.
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p!r}")
        min_p = _real("min_p", self.min_p)
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 turns it off), got {self.min_p!r}")
        if self.seed is not None and not 0 <= _integer("seed", self.seed) <= MAX_SEED:
            raise ValueError(f"seed must be between 0 and {MAX_SEED}, or None, got {self.seed!r}")
        if not 1 <= _integer("max_tokens", self.max_tokens) <= MAX_TOKENS_CAP:
            raise ValueError(f"max_tokens must be between 1 and {MAX_TOKENS_CAP}, got {self.max_tokens!r}")
        _token_ids("stop_token_ids", self.stop_token_ids)
        penalties = {}
        for name in ("presence_penalty", "frequency_penalty"):
            penalties[name] = _real(name, getattr(self, name))
            if not -MAX_PENALTY <= penalties[name] <= MAX_PENALTY:
                raise ValueError(
                    f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {getattr(self, name)!r}"
                )
        repetition = _real("repetition_penalty", self.repetition_penalty)
        if not 1 / MAX_REPETITION_PENALTY <= repetition <= MAX_REPETITION_PENALTY:
            raise ValueError(
                f"repetition_penalty must be in [{1 / MAX_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}] "
                f"(1 turns it off), got {self.repetition_penalty!r}"
            )
        self._check_logit_bias()
        if self.logprobs is not None and not 0 <= _integer("logprobs", self.logprobs) <= MAX_TOP_LOGPROBS:
            raise ValueError(
                f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, or None, got {self.logprobs!r}"
            )
        if self.grammar is not None and (
            not isinstance(self.grammar, str) or not 0 < len(self.grammar.encode()) <= MAX_GRAMMAR_BYTES
        ):
            raise ValueError(f"grammar must be a string of 1 to {MAX_GRAMMAR_BYTES} bytes, or None")
        _token_ids("context", self.context)
        if not 0 <= _integer("context_output", self.context_output) <= len(self.context):
            raise ValueError(
                f"context_output must be between 0 and the context's {len(self.context)} ids, "
                f"got {self.context_output!r}"
            )
        # An int temperature (JSON's 1) is stored as 1.0, so the fields always hold what they declare.
        for name, value in (
            ("temperature", temperature),
            ("top_p", top_p),
            ("min_p", min_p),
            ("repetition_penalty", repetition),
            *penalties.items(),
        ):
            object.__setattr__(self, name, value)

    def _check_logit_bias(self) -> None:
        if not isinstance(self.logit_bias, tuple) or len(self.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(
                f"logit_bias must be a tuple of at most {MAX_LOGIT_BIAS_TOKENS} (token, bias) pairs"
            )
        previous = -1
        for pair in self.logit_bias:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise ValueError(f"logit_bias holds (token, bias) pairs, got {pair!r}")
            token = _integer("logit_bias token", pair[0])
            bias = _real("logit_bias value", pair[1])
            if token <= previous:
                raise ValueError(
                    f"logit_bias token ids must be ascending and distinct, got {token} after {previous}"
                )
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(
                    f"a logit_bias value must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {bias!r}"
                )
            previous = token

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> SamplingParams:
        """Parameters from decoded wire or HTTP input: absent keys take the defaults, unknown keys are refused
        (a misspelt ``top_P`` must not silently sample with top_p = 1), and types are strict: a bool is not a
        number, a float is not an int, ``null`` is only a seed, logprobs or grammar. JSON arrays of ids become
        tuples, and ``logit_bias`` is an object of decimal token ids to biases, as OpenAI sends it."""
        if not isinstance(data, Mapping):
            raise ValueError(f"sampling parameters must be an object, got {type(data).__name__}")
        known = {field.name for field in fields(cls)}
        unknown = sorted(repr(key) for key in data if key not in known)
        if unknown:
            raise ValueError(f"unknown sampling parameters {', '.join(unknown)}; known: {sorted(known)}")
        # Any: __post_init__ checks every value's type, with the same errors as for a direct caller.
        values: dict[str, Any] = dict(data)
        for name in ("stop_token_ids", "context"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        bias = values.get("logit_bias")
        if isinstance(bias, Mapping):
            values["logit_bias"] = tuple(sorted((_token_key(key), value) for key, value in bias.items()))
        return cls(**values)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_history(self) -> bool:
        """Whether the tokens before each step change its choice (steps 1, 3 and 4)."""
        return (
            self.grammar is not None
            or self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def session_sampling(
    sampling: Mapping[str, Any], prompt: Sequence[int], generated: Sequence[int]
) -> dict[str, Any]:
    """The parameters a last span's session is opened with (and its receipt commits to): the job's ``sampling``
    and, where a parameter depends on them, the ids the session starts from: the prompt (for the repetition
    penalty) and what earlier routes generated before a failover. Raises ValueError on parameters no sampler
    takes."""
    params = SamplingParams.from_dict(sampling)
    if not params.uses_history:
        return dict(sampling)
    context = [*prompt, *generated] if params.repetition_penalty != 1.0 else list(generated)
    if not context:
        return dict(sampling)
    return {**sampling, "context": context, "context_output": len(generated)}


@dataclass(frozen=True)
class TokenLogprobs:
    """An emitted token's log probability under the model, and the most probable alternatives, best first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"logprob": self.logprob, "top": [[token, value] for token, value in self.top]}

    @classmethod
    def from_json(cls, data: Any, *, vocab_size: int, limit: int) -> TokenLogprobs:
        """Raises ValueError unless ``data`` is one, with at most ``limit`` alternatives inside the vocabulary."""
        if not isinstance(data, Mapping) or set(data) != {"logprob", "top"}:
            raise ValueError("logprobs must be an object with logprob and top")
        top = data["top"]
        if not isinstance(top, list) or len(top) > limit:
            raise ValueError(f"logprobs.top must be a list of at most {limit} alternatives")
        pairs = []
        for pair in top:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ValueError("logprobs.top holds [token, logprob] pairs")
            token = _integer("logprobs token", pair[0])
            if not 0 <= token < vocab_size:
                raise ValueError(f"logprobs token {token} is outside the vocabulary of {vocab_size}")
            pairs.append((token, _logprob(pair[1])))
        return cls(_logprob(data["logprob"]), tuple(pairs))


class Sampler:
    """Picks the tokens of one generation. Its generator is its own, so the draws depend on the seed and
    the logits alone, not on ``torch.manual_seed`` or other users of the global RNG. ``vocabulary`` is the
    model's tokenizer as the grammar library sees it; a grammar needs one."""

    def __init__(self, params: SamplingParams, vocabulary: Vocabulary | None = None) -> None:
        self.params = params
        self._stop_token_ids = frozenset(params.stop_token_ids)
        # Drawn here rather than by Generator.seed(), whose 64-bit seeds can exceed MAX_SEED: every seed a
        # sampler reports can be sent back as SamplingParams.seed to replay the generation.
        self._seed = secrets.randbits(63) if params.seed is None else params.seed
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self._seed)
        output = params.context[len(params.context) - params.context_output :]
        self._seen = set(params.context)  # for the repetition penalty
        self._generated: Counter[int] = Counter(output)  # for the presence and frequency penalties
        self._grammar = None
        if params.grammar is not None:
            if vocabulary is None:
                raise ValueError("a grammar needs the model's tokenizer, and this sampler has none")
            self._grammar = vocabulary.matcher(params.grammar)
            for token in output:
                self._grammar.consume(token)

    @property
    def seed(self) -> int:
        """The seed in use: ``params.seed``, or the one drawn from the OS when that is None."""
        return self._seed

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The scores the next token is drawn from, as a (vocab,) float32 CPU tensor: steps 1–8 of the module
        docstring, dropped tokens at -inf. For greedy params only the argmax keeps its score."""
        scores = self._processed(_vocab_scores(logits))
        if self.params.greedy:
            best = int(torch.argmax(scores).item())
            kept = torch.full_like(scores, -math.inf)
            kept[best] = scores[best]
            return kept
        return _warp(scores, self.params)

    def next_token(self, logits: torch.Tensor) -> int:
        """The next token id from the last position's logits, shaped (vocab,), (1, vocab) or (1, 1, vocab); the
        sampler then counts it as emitted."""
        token = self.draw(logits)
        self.accept(token)
        return token

    def draw(self, logits: torch.Tensor) -> int:
        """The next token id, not yet counted as emitted (``accept`` does that): a verifier draws what the
        provider should have, then goes on from the token the provider did emit."""
        scores = self._processed(_vocab_scores(logits))
        if self.params.greedy:
            return int(torch.argmax(scores).item())
        probs = torch.softmax(_warp(scores, self.params), dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self._generator).item())

    def accept(self, token: int) -> None:
        """Counts ``token`` as emitted, for the steps that depend on history. ``next_token`` calls it; a verifier
        that checks tokens with ``scores`` calls it after each."""
        self._seen.add(token)
        self._generated[token] += 1
        if self._grammar is not None:
            self._grammar.consume(token)

    def logprobs(self, logits: torch.Tensor, token: int) -> TokenLogprobs | None:
        """``token``'s log probability and the ``params.logprobs`` most probable alternatives, from the raw
        logits; None when the request asked for none."""
        if self.params.logprobs is None:
            return None
        # -inf (a token the model itself masks) has no JSON form; OpenAI reports such tokens at -9999.
        logprobs = torch.log_softmax(_vocab_scores(logits), dim=-1).clamp(min=LOGPROB_FLOOR)
        top = (
            torch.topk(logprobs, min(self.params.logprobs, logprobs.numel()))
            if self.params.logprobs
            else None
        )
        pairs = () if top is None else tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        return TokenLogprobs(max(float(logprobs[token].item()), LOGPROB_FLOOR), pairs)

    def is_stop(self, token: int) -> bool:
        return token in self._stop_token_ids

    def finish_reason(self, tokens_generated: int, last_token: int) -> FinishReason | None:
        """Why the generation ends after ``last_token``, the ``tokens_generated``-th token, or None if it goes
        on. A stop token wins over the length limit when both fall on the same token."""
        if not 1 <= tokens_generated <= self.params.max_tokens:
            raise ValueError(
                f"tokens_generated must be between 1 and max_tokens ({self.params.max_tokens}), "
                f"got {tokens_generated}"
            )
        if self.is_stop(last_token):
            return "stop"
        if tokens_generated == self.params.max_tokens:
            return "length"
        return None

    def _processed(self, scores: torch.Tensor) -> torch.Tensor:
        """Steps 1–4 on checked (vocab,) float32 scores; never modifies them in place."""
        params = self.params
        if self._grammar is not None:
            allowed = self._grammar.allowed(scores.numel())
            scores = scores.masked_fill(~allowed, -math.inf)
        if params.logit_bias:
            ids = torch.tensor(
                [token for token, _ in params.logit_bias if token < scores.numel()], dtype=torch.long
            )
            bias = torch.tensor(
                [value for token, value in params.logit_bias if token < scores.numel()], dtype=torch.float32
            )
            scores = scores.index_add(0, ids, bias)
        if params.repetition_penalty != 1.0 and self._seen:
            seen = torch.tensor(sorted(t for t in self._seen if t < scores.numel()), dtype=torch.long)
            picked = scores[seen]
            penalized = torch.where(
                picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty
            )
            scores = scores.index_copy(0, seen, penalized)
        if (params.presence_penalty or params.frequency_penalty) and self._generated:
            ids = torch.tensor([t for t in self._generated if t < scores.numel()], dtype=torch.long)
            counts = torch.tensor([float(self._generated[t]) for t in ids.tolist()], dtype=torch.float32)
            scores = scores.index_add(0, ids, -(params.frequency_penalty * counts + params.presence_penalty))
        if not torch.isfinite(scores).any():
            raise ValueError("no token is allowed: the grammar and the bias leave every token at -inf")
        return scores


def _warp(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Steps 5–8 of the module docstring on (vocab,) float32 scores; never modifies them in place."""
    warped = scores / params.temperature
    if torch.isposinf(warped).any():
        # A small temperature pushed a large logit past float32's range, and softmax of +inf is NaN (HF would
        # fail here). Softmax and the filters depend only on differences between scores, so shift the
        # largest to 0 first; elsewhere the division is left exactly as HF does it, to keep its rounding.
        warped = (scores - scores.max()) / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, warped.numel())
        kth_highest = torch.topk(warped, k).values[-1]
        warped = warped.masked_fill(warped < kth_highest, -math.inf)
    if params.top_p < 1.0:
        ascending, order = torch.sort(warped, descending=False)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1.0 - params.top_p
        # HF's min_tokens_to_keep=1: the most probable token survives even when rounding puts the total
        # probability at or below 1 - top_p.
        drop_sorted[-1] = False
        drop = drop_sorted.scatter(0, order, drop_sorted)
        warped = warped.masked_fill(drop, -math.inf)
    if params.min_p > 0.0:
        probs = torch.softmax(warped, dim=-1)
        # The most probable token always survives: its probability is the threshold's own reference.
        warped = warped.masked_fill(probs < params.min_p * probs.max(), -math.inf)
    return warped


def _vocab_scores(logits: torch.Tensor) -> torch.Tensor:
    """Checked logits for one position as a (vocab,) float32 CPU tensor (possibly ``logits`` itself)."""
    if logits.dtype not in LOGITS_DTYPES:
        raise ValueError(
            f"logits must be one of {sorted(str(dtype) for dtype in LOGITS_DTYPES)}, got {logits.dtype}"
        )
    shape = tuple(logits.shape)
    # The last position only: (vocab,), (batch=1, vocab) or (batch=1, seq=1, vocab).
    if not (1 <= len(shape) <= 3 and all(dim == 1 for dim in shape[:-1]) and shape[-1] >= 1):
        raise ValueError(f"logits must be shaped (vocab,), (1, vocab) or (1, 1, vocab), got {shape}")
    scores = logits.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
    nan_count = int(torch.isnan(scores).sum().item())
    if nan_count:
        raise ValueError(f"logits contain NaN at {nan_count} of {scores.numel()} positions")
    # -inf is a masked token; +inf is an overflow upstream, and softmax would turn it into NaN.
    posinf_count = int(torch.isposinf(scores).sum().item())
    if posinf_count:
        raise ValueError(f"logits contain +inf at {posinf_count} of {scores.numel()} positions")
    if not torch.isfinite(scores).any():
        raise ValueError(f"logits are -inf at all {scores.numel()} positions; no token can be chosen")
    return scores


def _real(name: str, value: object) -> float:
    # JSON writes 1 and 1.0 alike, so an int is a real here; a bool is not.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a number, got an int too large for a float: {value!r}") from None


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return value


def _token_ids(name: str, ids: object) -> None:
    # A list would make this frozen dataclass unhashable, so only a tuple is taken.
    if not isinstance(ids, tuple):
        raise ValueError(f"{name} must be a tuple of ints, got {type(ids).__name__} {ids!r}")
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(
                f"{name} must be ints >= 0, got {type(token).__name__} {token!r} in {ids!r}"[:300]
            )


def _token_key(key: object) -> int:
    """A logit_bias key: JSON object keys are strings, so a token id arrives as a decimal string."""
    if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10:
        return int(key)
    raise ValueError(f"logit_bias keys must be token ids as decimal strings, got {key!r}")


def _logprob(value: object) -> float:
    number = _real("a log probability", value)
    if math.isnan(number) or not LOGPROB_FLOOR <= number <= 0.0:
        raise ValueError(f"a log probability must be <= 0, got {value!r}")
    return number
