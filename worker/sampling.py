"""Next-token selection on the last provider of a pipeline: the request's ``SamplingParams`` and a seeded
``Sampler`` that turns the LM head's logits for the last position into one token id.

Greedy (``temperature == 0``) is ``torch.argmax``: ties go to the lowest token id. Otherwise the logits go
through the same steps, in the same order and with the same edge cases, as Hugging Face ``generate`` with
``do_sample=True`` and one sequence:

    1. temperature  scores / temperature                      (TemperatureLogitsWarper)
    2. top-k        drop every score below the k-th highest;   (TopKLogitsWarper; skipped when top_k == 0)
                    ties with the k-th are kept, so more than k tokens may remain
    3. top-p        sort ascending, softmax, cumulative sum;    (TopPLogitsWarper, min_tokens_to_keep=1;
                    drop tokens whose cumulative probability    skipped when top_p == 1)
                    is <= 1 - top_p, but always keep the most probable token
    4. draw         softmax, then torch.multinomial with the sampler's own generator

Dropped tokens get -inf, so they have probability exactly 0. ``warp_logits`` exposes steps 1–3, so a
verifier can check that a token a provider reports was one it was allowed to draw.

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
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Final, Literal, TypeAlias

import torch

__all__ = [
    "LOGITS_DTYPES",
    "MAX_SEED",
    "MAX_TEMPERATURE",
    "MAX_TOKENS_CAP",
    "MIN_TEMPERATURE",
    "FinishReason",
    "Sampler",
    "SamplingParams",
    "warp_logits",
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

FinishReason: TypeAlias = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; the defaults are greedy decoding of up to 16 tokens."""

    temperature: float = 0.0  # dimensionless; 0 = greedy, else MIN_TEMPERATURE..MAX_TEMPERATURE
    top_k: int = 0  # tokens kept by top-k filtering; 0 = off; more than the vocabulary keeps them all
    top_p: float = 1.0  # cumulative probability kept by nucleus filtering, in (0, 1]; 1 = off
    seed: int | None = None  # generator seed, 0..MAX_SEED; None = drawn from the OS per Sampler
    max_tokens: int = 16  # tokens to generate at most, 1..MAX_TOKENS_CAP
    stop_token_ids: tuple[int, ...] = ()  # token ids (>= 0) that end the generation once emitted

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
        if _integer("top_k", self.top_k) < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k!r}")
        top_p = _real("top_p", self.top_p)
        # Written so that NaN fails it too.
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p!r}")
        if self.seed is not None and not 0 <= _integer("seed", self.seed) <= MAX_SEED:
            raise ValueError(f"seed must be between 0 and {MAX_SEED}, or None, got {self.seed!r}")
        if not 1 <= _integer("max_tokens", self.max_tokens) <= MAX_TOKENS_CAP:
            raise ValueError(f"max_tokens must be between 1 and {MAX_TOKENS_CAP}, got {self.max_tokens!r}")
        # A list would make this frozen dataclass unhashable, so only a tuple is taken.
        if not isinstance(self.stop_token_ids, tuple):
            raise ValueError(
                f"stop_token_ids must be a tuple of ints, got {type(self.stop_token_ids).__name__} "
                f"{self.stop_token_ids!r}"
            )
        for token in self.stop_token_ids:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(
                    f"stop_token_ids must be ints >= 0, got {type(token).__name__} {token!r} "
                    f"in {self.stop_token_ids!r}"
                )
        # An int temperature (JSON's 1) is stored as 1.0, so the fields always hold what they declare.
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_p", top_p)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> SamplingParams:
        """Parameters from decoded wire or HTTP input: absent keys take the defaults, unknown keys are refused
        (a misspelt ``top_P`` must not silently sample with top_p = 1), and types are strict: a bool is not a
        number, a float is not an int, ``null`` is only a seed. A JSON array of stop ids becomes a tuple."""
        if not isinstance(data, Mapping):
            raise ValueError(f"sampling parameters must be an object, got {type(data).__name__}")
        known = {field.name for field in fields(cls)}
        unknown = sorted(repr(key) for key in data if key not in known)
        if unknown:
            raise ValueError(f"unknown sampling parameters {', '.join(unknown)}; known: {sorted(known)}")
        # Any: __post_init__ checks every value's type, with the same errors as for a direct caller.
        values: dict[str, Any] = dict(data)
        stop_token_ids = values.get("stop_token_ids")
        if isinstance(stop_token_ids, list):
            values["stop_token_ids"] = tuple(stop_token_ids)
        return cls(**values)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Picks the tokens of one generation. Its generator is its own, so the draws depend on the seed and
    the logits alone, not on ``torch.manual_seed`` or other users of the global RNG."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._stop_token_ids = frozenset(params.stop_token_ids)
        # Drawn here rather than by Generator.seed(), whose 64-bit seeds can exceed MAX_SEED: every seed a
        # sampler reports can be sent back as SamplingParams.seed to replay the generation.
        self._seed = secrets.randbits(63) if params.seed is None else params.seed
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self._seed)

    @property
    def seed(self) -> int:
        """The seed in use: ``params.seed``, or the one drawn from the OS when that is None."""
        return self._seed

    def next_token(self, logits: torch.Tensor) -> int:
        """The next token id from the last position's logits, shaped (vocab,), (1, vocab) or (1, 1, vocab)."""
        scores = _vocab_scores(logits)  # (vocab,) float32, CPU
        if self.params.greedy:
            return int(torch.argmax(scores).item())
        probs = torch.softmax(_warp(scores, self.params), dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self._generator).item())

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


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The scores ``Sampler.next_token`` draws from, as a (vocab,) float32 CPU tensor: temperature, top-k
    and top-p applied, dropped tokens at -inf. For greedy params only the argmax keeps its score."""
    scores = _vocab_scores(logits)
    if params.greedy:
        best = int(torch.argmax(scores).item())
        kept = torch.full_like(scores, -math.inf)
        kept[best] = scores[best]
        return kept
    return _warp(scores, params)


def _warp(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Steps 1–3 of the module docstring on checked (vocab,) float32 scores; never modifies them in place."""
    warped = scores / params.temperature
    if torch.isposinf(warped).any():
        # A small temperature pushed a large logit past float32's range, and softmax of +inf is NaN (HF would
        # fail here). Softmax and both filters depend only on differences between scores, so shift the
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
