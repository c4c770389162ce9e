"""Judging one provider's span of one job: its retained steps against its signed transcript, then against the
same span re-executed on reference weights.

The provider kept each step's input and output (``worker.runtime``); the gateway recorded each step's
(input hash, output hash), which the provider's HopReceipt signs through the transcript root and which link
hop to hop. So the tensors the provider hands over must hash to the transcript, and then the only question
left is whether the output is what the span computes from the input. The validator concatenates every step's
input and runs the span once, as a single prefill from an empty KV cache; the causal mask makes each position
see exactly the positions before it, as the provider's incremental steps did. On the last span the provider
handed on only each step's last-position logits, so those positions are compared.

Floating point differs between hardware, kernels and dtypes, so outputs are compared with tolerance, by the
dtype the provider computed in (the dtype of its outputs). The exact outputs are the span run in fp32 on the
reference weights. Below fp32 the validator also runs the span in the provider's dtype itself, with two attention
kernels (``NOISE_KERNELS``), and measures how far its own runs land from the exact outputs on this very input:
that noise, per position and over the hop, calibrates the bounds, since honest rounding error depends on the
span, the model and the input, and a fixed bound is either loose enough for int8 weights or too tight for
someone's honest hop.

    at every position      relative error ‖c − r‖ / ‖r‖ at most the dtype's ``position`` (below fp32, or
                           ``POSITION_NOISE_RATIO`` times the validator's own error there, if that is more), and
                           cosine similarity at least the dtype's: catches a step that was made up, replayed or
                           copied, even one step among many
    over the whole hop     the mean relative error: catches a systematic shortcut (int8 weights, noise) whose
                           error at each position hides among honest rounding. In fp32 a fixed bound; below, at
                           most ``noise_ratio`` times the noise (past ``FULL_RATIO`` times it, an output mismatch;
                           between the two, an ``excess_error``, which costs less)
    last span              the top token of the provider's logits is the reference's top token, or a near-tie:
                           its reference logit within ``tie`` standard deviations of the reference's top

Mixtures of experts. Below fp32 a router's choice can flip at single positions in any honest run, the
validator's own included, moving that position's output by 10% to 35% (tiny Mixtral and Qwen2-MoE, bf16). On
such a span up to ``MOE_OUTLIERS`` of positions (at least one) may be off, if none by ``GROSS_ERROR`` or more,
and the hop mean leaves out its worst ``MOE_TRIM`` of positions, for the provider's error and the noise alike.
On a last span such a position's top token may be up to ``MOE_FLIP_TIE`` behind, no further: the allowance is
not a licence to choose tokens. What it does leave a cheater is up to ``MOE_OUTLIERS`` of a hop's positions
computed some other way within ``GROSS_ERROR``: a saving of a few percent, on mixtures of experts only.

A second opinion. A hop that fails on output, mean or top token is judged again against the exact outputs
computed in float64, and fails only if it fails both, by the milder verdict: so an fp32 hop is never blamed for
the float32 rounding of the validator's own kernels.

Emitted tokens. The last span's transcript commits to the token it emitted at every step, and its receipt to
the sampling parameters it was opened with (seed included: the gateway fixes one when the client gives none).
Before anything is re-executed, each token is checked against the provider's own retained logits, which hash
to the transcript: under greedy decoding it must be their argmax (ties to the lowest id, as the sampler
breaks them: the provider's own logits leave no near-tie to allow for), under sampling the token that
``worker.sampling.Sampler``, seeded alike and fed the same logits in step order, draws. The provider signed
both the logits and the token, so the check is exact and needs no tolerance; whether the logits themselves
are right is the re-execution's question. A sampling commitment without a seed (older jobs) leaves only the
weaker check that the token was one the parameters allowed.

Measured with ``benchmarks/validation.py`` (tiny Llama, Mixtral and Qwen2-MoE checkpoints): an honest bf16
hop's mean error comes to the validator's own noise within about 1% whichever kernel it ran; the same weights
quantized to int8 and served in bf16 to about twice it or more; noise added at 0.5% of each position's RMS to
1.2 to 1.5 times it, at 0.2% to 1.1 times, within the spread of honest kernels and hardware, and not caught.
Honest fp32 comes to about 5e-7. A provider computing in a dtype not in the table is judged as fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from settlement.errors import CannotJudge
from worker.client import RetainedStep
from worker.sampling import LOGITS_DTYPES, Sampler, SamplingParams
from worker.shard import Shard
from worker.transcript import StepHashes
from worker.wire import payload_sha256

TRANSCRIPT_MISMATCH = "transcript_mismatch"  # the tensors handed over are not the ones the transcript signs
BAD_TENSORS = "bad_tensors"  # shapes or dtypes no honest span produces
OUTPUT_MISMATCH = "output_mismatch"
# Below fp32: a hop's mean error above the calibrated bound but within ``FULL_RATIO`` times the noise. A
# systematic shortcut, or hardware noisier than any the calibration saw: penalised less (settlement.validator).
EXCESS_ERROR = "excess_error"
TOKEN_MISMATCH = "token_mismatch"  # the provider's logits pick another top token than the reference's
WRONG_TOKEN = "wrong_token"  # the emitted token is not what the provider's own logits and sampling give


@dataclass(frozen=True)
class Tolerance:
    position: float  # largest relative error at any one position
    cosine: float  # smallest cosine similarity at any one position
    tie: float  # last span: reference standard deviations a differing top token may be behind
    mean: float  # largest mean relative error over the hop's positions (the floor, below fp32)
    noise_ratio: float | None = None  # below fp32: the mean may be this many times the dtype's measured noise

    def as_json(self) -> dict[str, float | None]:
        return {
            "position": self.position,
            "cosine": self.cosine,
            "tie": self.tie,
            "mean": self.mean,
            "noiseRatio": self.noise_ratio,
        }


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(position=1e-3, cosine=0.99999, tie=1e-3, mean=1e-4),
    torch.float16: Tolerance(position=1e-2, cosine=0.9999, tie=0.02, mean=1e-4, noise_ratio=1.15),
    torch.bfloat16: Tolerance(position=3e-2, cosine=0.999, tie=0.1, mean=1e-4, noise_ratio=1.15),
}
NOISE_KERNELS = ("sdpa", "eager")  # the attention implementations the validator measures its own noise with
POSITION_NOISE_RATIO = (
    3.0  # below fp32, a position may be off by this many times the validator's own error there
)
FULL_RATIO = 1.4  # below fp32, a hop mean past this many times the noise is an output mismatch
MOE_TRIM = 0.1  # of a mixture of experts' positions, the worst left out of its hop mean
MOE_OUTLIERS = 0.05  # of a mixture of experts' positions, how many may be off (at least one)
GROSS_ERROR = 0.5  # a position off by this much is no router flip: made up, replayed or garbage
# The top token of a flipped last-span position may be this many reference standard deviations behind (honest
# flips measured at most 0.07 on tiny Mixtral and Qwen2-MoE in bf16; a chosen token is typically several).
MOE_FLIP_TIE = 0.5
# How bad each failure is, for picking the milder of two opinions.
SEVERITY = {EXCESS_ERROR: 1, TOKEN_MISMATCH: 2, OUTPUT_MISMATCH: 3}


class ReferenceSpan:
    """A span's reference weights in fp32, and in a provider's lower-precision dtype when it is needed."""

    def __init__(self, load: Callable[[torch.dtype], Shard]) -> None:
        self._load = load
        self._shards: dict[torch.dtype, Shard] = {}

    def shard(self, dtype: torch.dtype = torch.float32) -> Shard:
        if dtype not in self._shards:
            self._shards[dtype] = self._load(dtype)
        return self._shards[dtype]


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str | None = None  # a code above when it did not pass
    detail: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failed(cls, reason: str, detail: str, **metrics: Any) -> Verdict:
        return cls(False, reason, detail, metrics)


def judge_span(
    reference: ReferenceSpan,
    steps: Sequence[RetainedStep],
    transcript: Sequence[StepHashes],
    *,
    sampling: Mapping[str, Any] | None = None,
) -> Verdict:
    """The verdict on a provider's retained ``steps`` of one session, given the ``transcript`` its receipt signs
    and, on the last span, the ``sampling`` parameters it committed to.

    ``reference`` holds the same span's weights, loaded from the same model root.
    """
    problem = _transcript_problem(steps, transcript)
    if problem is not None:
        return Verdict.failed(TRANSCRIPT_MISMATCH, problem)
    shard = reference.shard()
    problem = _shape_problem(shard, steps)
    if problem is not None:
        return Verdict.failed(BAD_TENSORS, problem)
    if shard.span.last:
        tokens = [entry.token for entry in transcript]
        if any(token is None for token in tokens):
            return Verdict.failed(
                TRANSCRIPT_MISMATCH, "the last span's transcript does not commit to its tokens"
            )
        verdict = check_tokens(steps, [int(t) for t in tokens if t is not None], sampling, shard)
        if verdict is not None:
            return verdict
    dtype = steps[0].output.dtype
    tolerance = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    moe = is_moe(shard)
    exact = _per_step(shard, steps, reexecute(shard, steps))
    noise = (
        measure_noise(reference, steps, exact, dtype, moe=moe) if tolerance.noise_ratio is not None else None
    )
    verdict = compare(shard, steps, exact, tolerance, noise, moe=moe)
    if verdict.passed or verdict.reason not in (OUTPUT_MISMATCH, EXCESS_ERROR, TOKEN_MISMATCH):
        return verdict
    # A second opinion before anyone is blamed: the exact outputs again in float64, which no kernel's float32
    # rounding (another ISA's, another library's) can sway. The hop fails only if it fails both, and by the milder.
    try:
        exact64 = _per_step(shard, steps, reexecute(reference.shard(torch.float64), steps))
    except (torch.OutOfMemoryError, MemoryError):
        raise  # the validator's own trouble (settlement.validator): not a reason to let the first opinion stand
    except (RuntimeError, NotImplementedError, ValueError) as exc:  # no float64 kernels (grouped experts)
        metrics = {**verdict.metrics, "secondOpinion": f"float64 unavailable: {exc}"[:200]}
        return Verdict(False, verdict.reason, verdict.detail, metrics)
    second = compare(shard, steps, exact64, tolerance, noise, moe=moe)
    metrics = {**verdict.metrics, "secondOpinion": {"reference": "float64", **second.metrics}}
    if second.passed:
        return Verdict(
            True, None, f"passed on a float64 reference after failing on float32: {verdict.detail}", metrics
        )
    milder = second if SEVERITY[second.reason or ""] < SEVERITY[verdict.reason or ""] else verdict
    return Verdict(False, milder.reason, milder.detail, metrics)


def check_tokens(
    steps: Sequence[RetainedStep], tokens: Sequence[int], sampling: Mapping[str, Any] | None, shard: Shard
) -> Verdict | None:
    """None when every emitted token is the one the step's retained logits and ``sampling`` give (see the module
    docstring), else the failed verdict naming the steps that are not. ``shard`` is the reference's last span,
    whose tokenizer serves a grammar."""
    try:
        params = SamplingParams.from_dict(sampling or {})
        vocabulary = shard.vocabulary() if params.grammar is not None else None
        sampler = Sampler(params, vocabulary)
    except ValueError as exc:  # the gateway chose them and the provider only followed: not its fault
        raise CannotJudge(f"the job's sampling parameters are not ones this validator takes: {exc}") from exc
    replay = params.greedy or params.seed is not None
    off: list[int] = []
    drawn: list[int] = []
    for kept, token in zip(steps, tokens, strict=True):
        logits = kept.output[:, -1, :]
        if not 0 <= token < logits.shape[-1]:
            off.append(kept.step)
            break
        try:
            scores = sampler.scores(logits)
            # Every step, in order: the draws advance one generator. The history that penalties and the grammar
            # depend on is the provider's own tokens, so one wrong token does not make every later one look wrong.
            expected = sampler.draw(logits) if replay else None
        except ValueError:  # the grammar took a token it did not allow, and allows nothing after it
            off.append(kept.step)
            break
        if expected is not None:
            drawn.append(expected)
            if token != expected:
                off.append(kept.step)
        elif scores[token] == -math.inf:
            off.append(kept.step)
        sampler.accept(token)
    if not off:
        return None
    how = "drawn under its committed seed" if replay and not params.greedy else "one its parameters allow"
    how = "their argmax" if params.greedy else how
    detail = f"steps {_few(off)} emitted a token other than {how} from the provider's own logits"
    return Verdict.failed(
        WRONG_TOKEN, detail, emitted=list(tokens), expected=drawn or None, greedy=params.greedy
    )


def _transcript_problem(steps: Sequence[RetainedStep], transcript: Sequence[StepHashes]) -> str | None:
    if len(steps) != len(transcript):
        return f"{len(steps)} steps retained, the transcript has {len(transcript)}"
    for kept, entry in zip(steps, transcript, strict=True):
        step, input_hash, output_hash = entry.step, entry.input, entry.output
        if kept.step != step:
            return f"step {kept.step} retained where the transcript has step {step}"
        # Hashed again here: the frame digests were checked on receipt, but only against the frame's own header.
        if payload_sha256(kept.input) != input_hash:
            return f"step {step}'s input does not hash to the transcript's"
        if payload_sha256(kept.output) != output_hash:
            return f"step {step}'s output does not hash to the transcript's"
        if kept.input.dim() < 2 or int(kept.input.shape[1]) != entry.positions:
            return f"step {step}'s input does not hold the {entry.positions} positions the transcript says"
    return None


def _shape_problem(shard: Shard, steps: Sequence[RetainedStep]) -> str | None:
    span, hidden = shard.span, shard.hidden_size
    dtypes = {kept.output.dtype for kept in steps}
    if not steps:
        return "no steps"
    if len(dtypes) != 1 or next(iter(dtypes)) not in LOGITS_DTYPES:
        return f"outputs in {sorted(str(d) for d in dtypes)}: one of float32, float16 or bfloat16 expected"
    for kept in steps:
        if not bool(torch.isfinite(kept.output).all()):
            return f"step {kept.step}: its output is not finite"
    for kept in steps:
        inputs, outputs = kept.input, kept.output
        if span.first:
            if (
                inputs.dtype != torch.int64
                or inputs.dim() != 2
                or inputs.shape[0] != 1
                or inputs.shape[1] == 0
            ):
                return f"step {kept.step}: input {inputs.dtype} {tuple(inputs.shape)} is not token ids (1, n)"
            if int(inputs.min()) < 0 or int(inputs.max()) >= shard.vocab_size:
                return f"step {kept.step}: token ids outside the vocabulary"
        elif (
            not inputs.is_floating_point()
            or inputs.dim() != 3
            or inputs.shape[0] != 1
            or inputs.shape[2] != hidden
            or not bool(torch.isfinite(inputs).all())
        ):
            return f"step {kept.step}: input {inputs.dtype} {tuple(inputs.shape)} is not hidden states"
        positions = int(inputs.shape[1])
        expected = (1, 1, shard.vocab_size) if span.last else (1, positions, hidden)
        if tuple(outputs.shape) != expected:
            return f"step {kept.step}: output {tuple(outputs.shape)}, the span gives {expected}"
    return None


@torch.inference_mode()
def reexecute(shard: Shard, steps: Sequence[RetainedStep]) -> torch.Tensor:
    """The span over every step's input at once: hidden states (1, n, hidden), or logits (1, n, vocab)."""
    inputs = torch.cat([kept.input for kept in steps], dim=1).to(shard.device)
    cache = shard.new_cache()
    if shard.span.first:
        return shard.forward(cache=cache, input_ids=inputs, all_logits=True)
    return shard.forward(cache=cache, hidden=inputs.to(shard.dtype), all_logits=True)


def _per_step(shard: Shard, steps: Sequence[RetainedStep], reference: torch.Tensor) -> list[torch.Tensor]:
    """``reference``'s positions that each step's output covers, as float32."""
    parts, position = [], 0
    for kept in steps:
        count = int(kept.input.shape[1])
        start = position + count - 1 if shard.span.last else position
        parts.append(reference[:, start : position + count].float())
        position += count
    return parts


def _relative_error(claimed: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    error = (claimed - wanted).norm(dim=-1) / wanted.norm(dim=-1).clamp_min(1e-30)
    return torch.nan_to_num(error, nan=float("inf"))


def is_moe(shard: Shard) -> bool:
    """Whether the span routes tokens to experts: its outputs may then jump at single positions in any honest
    run below fp32, where rounding flips a router's choice."""
    config = shard.config
    experts = max(
        int(getattr(config, name, 0) or 0)
        for name in ("num_local_experts", "num_experts", "n_routed_experts")
    )
    return experts > 1


def hop_mean(errors: torch.Tensor, *, moe: bool) -> float:
    """A hop's mean relative error; on a mixture of experts, over all but its worst ``MOE_TRIM`` of positions,
    so that a few router flips (anyone's) do not move it."""
    flat = errors.flatten().float()
    if moe and flat.numel() > 1:
        keep = max(1, math.ceil(flat.numel() * (1 - MOE_TRIM)))
        flat = flat.sort().values[:keep]
    return float(flat.mean())


@dataclass(frozen=True)
class Noise:
    """The validator's own rounding error in the provider's dtype, run with two attention kernels: per position,
    the larger of the two; over the hop, the larger of their ``hop_mean``s."""

    per_step: list[torch.Tensor]
    level: float


@contextmanager
def _attention(shard: Shard, implementation: str) -> Iterator[bool]:
    """Runs ``shard`` with another attention implementation for a while; yields whether the model takes it
    (some families support only their own)."""
    before = shard.model.config._attn_implementation
    if implementation == before:
        yield True
        return
    try:
        shard.model.set_attn_implementation(implementation)
    except (ValueError, ImportError):
        yield False
        return
    try:
        yield True
    finally:
        shard.model.set_attn_implementation(before)


def measure_noise(
    reference: ReferenceSpan,
    steps: Sequence[RetainedStep],
    exact: Sequence[torch.Tensor],
    dtype: torch.dtype,
    *,
    moe: bool,
) -> Noise:
    """How far the span run in ``dtype`` lands from ``exact`` (its per-step float32 outputs) on this very input,
    by the validator's own runs with each of ``NOISE_KERNELS``."""
    low = reference.shard(dtype)
    runs = []
    for implementation in NOISE_KERNELS:
        with _attention(low, implementation) as supported:
            if supported:
                rounded = _per_step(low, steps, reexecute(low, steps))
                # A position where the validator's own run overflowed says nothing of the noise: it is held to
                # the fixed bounds alone, and left out of the level (else one crafted input would lift every bound).
                errors = [_relative_error(r, w) for r, w in zip(rounded, exact, strict=True)]
                runs.append([torch.where(torch.isfinite(e), e, torch.zeros_like(e)) for e in errors])
    if not runs:
        raise CannotJudge(f"the model runs with none of the attention kernels {NOISE_KERNELS}")
    per_step = [torch.stack(errors).amax(dim=0) for errors in zip(*runs, strict=True)]
    level = max(hop_mean(torch.cat([e.flatten() for e in run]), moe=moe) for run in runs)
    return Noise(per_step, level)


def compare(
    shard: Shard,
    steps: Sequence[RetainedStep],
    exact: Sequence[torch.Tensor],
    tolerance: Tolerance,
    noise: Noise | None = None,
    *,
    moe: bool = False,
) -> Verdict:
    """Each step's output against ``exact`` (the reference's positions it covers, per step); ``noise`` is the
    validator's own error in the provider's dtype (required when ``tolerance`` has a noise ratio).

    A position fails above the dtype's relative error (or, below fp32, ``POSITION_NOISE_RATIO`` times the
    validator's own error there, if more) or below its cosine. On a mixture of experts up to ``MOE_OUTLIERS``
    of positions may, short of ``GROSS_ERROR``: router flips. Over the hop, ``hop_mean`` may be at most the
    dtype's floor or ``noise_ratio`` times the noise level: past ``FULL_RATIO`` times it, an output mismatch;
    between the two, an excess error (a milder penalty, see settlement.validator)."""
    last = shard.span.last
    per_step: list[dict[str, Any]] = []
    errors: list[torch.Tensor] = []
    failing: list[int] = []
    outliers = 0
    gross = False
    tokens_off: list[int] = []
    for index, (kept, wanted) in enumerate(zip(steps, exact, strict=True)):
        wanted = wanted.to(shard.device)
        claimed = kept.output.to(wanted.device).float()
        error = _relative_error(claimed, wanted)
        cosine = torch.nan_to_num(torch.nn.functional.cosine_similarity(claimed, wanted, dim=-1), nan=-1.0)
        errors.append(error.flatten())
        allowed_error = torch.full_like(error, tolerance.position)
        if noise is not None:
            own = noise.per_step[index].to(error.device)
            allowed_error = torch.maximum(allowed_error, POSITION_NOISE_RATIO * own)
        off = (error > allowed_error) | (cosine < tolerance.cosine)
        entry: dict[str, Any] = {
            "step": kept.step,
            "positions": int(kept.input.shape[1]),
            "maxRelErr": _round(float(error.max())),
            "minCosine": _round(float(cosine.min())),
        }
        if bool(off.any()):
            outliers += int(off.sum())
            gross = gross or bool((error[off] > GROSS_ERROR).any())
            failing.append(kept.step)
        if last:
            top, gap = _top_token(claimed.flatten(), wanted.flatten())
            entry.update(
                {"token": top, "referenceToken": int(wanted.flatten().argmax()), "tieGap": _round(gap)}
            )
            # A router flip moves its position's logits too: its top token may be a little further behind.
            tie = MOE_FLIP_TIE if moe and bool(off.any()) else tolerance.tie
            if gap > tie:
                tokens_off.append(kept.step)
        per_step.append(entry)
    every = torch.cat(errors)
    allowed = max(1, math.floor(MOE_OUTLIERS * every.numel())) if moe and tolerance.noise_ratio else 0
    mean = hop_mean(every, moe=moe)
    bound = tolerance.mean
    full = tolerance.mean
    if tolerance.noise_ratio is not None:
        assert noise is not None, "a lower-precision dtype is judged against its measured noise"
        bound = max(bound, tolerance.noise_ratio * noise.level)
        full = max(full, FULL_RATIO * noise.level)
    dtype = steps[0].output.dtype
    metrics = {
        "dtype": str(dtype).removeprefix("torch."),
        "tolerance": tolerance.as_json(),
        "moe": moe,
        "positions": int(every.numel()),
        "outliers": outliers,
        "outliersAllowed": allowed,
        "meanRelErr": _round(mean),
        "meanBound": _round(bound),
        "dtypeNoise": None if noise is None else _round(noise.level),
        "maxRelErr": _round(float(every.max())),
        "minCosine": min(entry["minCosine"] for entry in per_step),
        "steps": per_step,
    }
    if gross or outliers > allowed:
        detail = f"steps {_few(failing)} differ from the reference beyond {dtype} tolerance"
        return Verdict(False, OUTPUT_MISMATCH, detail, metrics)
    if tokens_off:
        return Verdict(False, TOKEN_MISMATCH, f"steps {_few(tokens_off)} pick another top token", metrics)
    if mean > full:
        detail = f"mean relative error {mean:.3g} over the hop, above {full:.3g} for {dtype}"
        return Verdict(False, OUTPUT_MISMATCH, detail, metrics)
    if mean > bound:
        detail = f"mean relative error {mean:.3g} over the hop, above the bound {bound:.3g} for {dtype}"
        return Verdict(False, EXCESS_ERROR, detail, metrics)
    return Verdict(True, None, "", metrics)


def _top_token(claimed: torch.Tensor, wanted: torch.Tensor) -> tuple[int, float]:
    """The provider's top token and how far behind the reference's top it is, in reference standard deviations."""
    top = int(claimed.argmax())
    spread = float(wanted.std()) or 1.0
    return top, float(wanted.max() - wanted[top]) / spread


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def _few(items: list[int]) -> str:
    shown = ", ".join(str(i) for i in items[:8])
    return shown + (f" and {len(items) - 8} more" if len(items) > 8 else "")


__all__ = [
    "BAD_TENSORS",
    "EXCESS_ERROR",
    "OUTPUT_MISMATCH",
    "TOKEN_MISMATCH",
    "TOLERANCES",
    "TRANSCRIPT_MISMATCH",
    "WRONG_TOKEN",
    "ReferenceSpan",
    "Tolerance",
    "Verdict",
    "check_tokens",
    "compare",
    "hop_mean",
    "is_moe",
    "judge_span",
    "measure_noise",
    "reexecute",
]
