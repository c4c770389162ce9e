"""Token sampling: greedy, seeded reproducibility, filters that match transformers' warpers, and refusals."""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from worker.sampling import (
    MAX_SEED,
    MAX_TEMPERATURE,
    MAX_TOKENS_CAP,
    MAX_TOP_K,
    MIN_TEMPERATURE,
    Sampler,
    SamplingParams,
    TokenLogprobs,
    session_sampling,
)

VOCAB = 1_000


def random_logits(seed: int, vocab: int = VOCAB, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale


def draw(sampler: Sampler, logits: torch.Tensor, n: int) -> list[int]:
    return [sampler.next_token(logits) for _ in range(n)]


def hf_finite(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> set[int]:
    """The tokens transformers' generate(do_sample=True) leaves finite, built the way it builds them."""
    scores = logits.to(torch.float32).reshape(1, -1)
    input_ids = torch.zeros((1, 1), dtype=torch.long)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(input_ids, scores)
    if top_k != 0:
        scores = TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1)(input_ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1)(input_ids, scores)
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


def our_finite(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    return set(torch.isfinite(Sampler(params).scores(logits)).nonzero().flatten().tolist())


# --- greedy -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax(seed: int) -> None:
    logits = random_logits(seed)
    assert Sampler(SamplingParams()).next_token(logits) == int(torch.argmax(logits))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_logits_on_the_accelerator_give_the_same_tokens() -> None:
    logits = random_logits(8).to(torch.float16)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=6)
    assert draw(Sampler(params), logits.cuda(), 20) == draw(Sampler(params), logits, 20)


def test_greedy_tie_goes_to_lowest_index() -> None:
    logits = torch.tensor([0.0, 5.0, 1.0, 5.0, 5.0])
    assert Sampler(SamplingParams()).next_token(logits) == 1


@pytest.mark.parametrize("shape", [(VOCAB,), (1, VOCAB), (1, 1, VOCAB)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_accepted_shapes_and_dtypes(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    logits = random_logits(7).to(dtype)
    expected_greedy = int(torch.argmax(logits.to(torch.float32)))
    assert Sampler(SamplingParams()).next_token(logits.reshape(shape)) == expected_greedy
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=3)
    flat = draw(Sampler(params), logits.to(torch.float32), 5)
    assert draw(Sampler(params), logits.reshape(shape), 5) == flat


@pytest.mark.parametrize("temperature", [MIN_TEMPERATURE, 0.1, 1.0, 10.0, 1_000.0, MAX_TEMPERATURE])
def test_top_k_1_is_greedy_at_any_temperature(temperature: float) -> None:
    for seed in range(5):
        logits = random_logits(seed)
        sampler = Sampler(SamplingParams(temperature=temperature, top_k=1, seed=seed))
        assert set(draw(sampler, logits, 20)) == {int(torch.argmax(logits))}


def test_tiny_top_p_keeps_only_the_top_token() -> None:
    logits = random_logits(3, scale=0.1)  # nearly flat, so anything but the top token would show up
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=1e-9, seed=0))
    assert set(draw(sampler, logits, 200)) == {int(torch.argmax(logits))}
    assert our_finite(logits, SamplingParams(temperature=1.0, top_p=1e-9)) == {int(torch.argmax(logits))}


def test_tiny_temperature_with_huge_logits_does_not_overflow() -> None:
    # 3e38 / 1e-5 is past float32's range; the sampler must still pick the top token, not fail on NaN.
    logits = torch.tensor([1e38, 3e38, -3e38, 0.0, -math.inf])
    sampler = Sampler(SamplingParams(temperature=MIN_TEMPERATURE, seed=0))
    assert draw(sampler, logits, 10) == [1] * 10


def test_masked_tokens_are_never_drawn() -> None:
    logits = torch.zeros(10)
    logits[::2] = -math.inf
    sampler = Sampler(SamplingParams(temperature=1.0, seed=5))
    assert set(draw(sampler, logits, 300)) == {1, 3, 5, 7, 9}


# --- seeds --------------------------------------------------------------------------------------------------


def test_same_seed_same_tokens_whatever_the_global_rng() -> None:
    params = SamplingParams(temperature=1.0, top_k=200, top_p=0.95, seed=1234)
    logits = [random_logits(seed, scale=1.0) for seed in range(30)]
    first = Sampler(params)
    expected = [first.next_token(step) for step in logits]

    second = Sampler(params)
    got = []
    for i, step in enumerate(logits):
        torch.manual_seed(i)
        torch.rand(100)
        got.append(second.next_token(step))
    assert got == expected
    assert len(set(expected)) > 1  # the test would prove nothing if every step had one possible token


def test_different_seeds_give_different_tokens() -> None:
    flat = torch.zeros(VOCAB)
    runs = {
        seed: tuple(draw(Sampler(SamplingParams(temperature=1.0, seed=seed)), flat, 8)) for seed in range(4)
    }
    # Two runs of 8 uniform draws from 1,000 tokens agree by chance with probability 1e-24.
    assert len(set(runs.values())) == len(runs)


def test_unseeded_samplers_draw_their_own_replayable_seed() -> None:
    params = SamplingParams(temperature=1.0)
    a, b = Sampler(params), Sampler(params)
    assert a.seed != b.seed
    assert 0 <= a.seed <= MAX_SEED
    flat = torch.zeros(VOCAB)
    tokens = draw(a, flat, 8)
    assert draw(Sampler(SamplingParams(temperature=1.0, seed=a.seed)), flat, 8) == tokens


def test_seed_is_the_given_one() -> None:
    assert Sampler(SamplingParams(seed=MAX_SEED)).seed == MAX_SEED


# --- agreement with transformers --------------------------------------------------------------------------


def test_filters_match_transformers_warpers() -> None:
    rng = random.Random(20240601)
    for case in range(400):
        vocab = rng.choice([1, 2, 3, 10, 57, 256])
        logits = random_logits(case, vocab=vocab, scale=rng.choice([0.1, 1.0, 5.0, 30.0]))
        if rng.random() < 0.3:
            # Rounded logits tie often: top-k keeps every tie with the k-th score, and top-p must agree too.
            logits = logits.round()
        if rng.random() < 0.3 and vocab > 1:
            masked = torch.rand(vocab, generator=torch.Generator().manual_seed(case)) < 0.3
            masked[int(torch.argmax(logits))] = False
            logits = logits.masked_fill(masked, -math.inf)
        temperature = rng.choice([MIN_TEMPERATURE, 0.05, 0.7, 1.0, 1.5, 100.0])
        top_k = rng.choice([0, 1, 2, 5, 40, 1_000])
        top_p = rng.choice([1e-6, 0.1, 0.5, 0.9, 0.95, 0.999, 1.0])
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        assert our_finite(logits, params) == hf_finite(logits, temperature, top_k, top_p), (
            f"case {case}: vocab={vocab} temperature={temperature} top_k={top_k} top_p={top_p}"
        )


def test_warp_logits_values_match_transformers() -> None:
    logits = random_logits(9)
    params = SamplingParams(temperature=0.7, top_k=100, top_p=0.9)
    scores = logits.reshape(1, -1)
    input_ids = torch.zeros((1, 1), dtype=torch.long)
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(100), TopPLogitsWarper(0.9)):
        scores = warper(input_ids, scores)
    assert torch.equal(Sampler(params).scores(logits), scores[0])


def test_greedy_warp_keeps_only_the_argmax() -> None:
    logits = random_logits(4)
    best = int(torch.argmax(logits))
    warped = Sampler(SamplingParams()).scores(logits)
    assert our_finite(logits, SamplingParams()) == {best}
    assert warped[best] == logits[best]


def test_sampled_frequencies_follow_the_distribution() -> None:
    probs = [0.7, 0.2, 0.1]
    logits = torch.tensor(probs).log()
    n = 5_000
    counts = Counter(draw(Sampler(SamplingParams(temperature=1.0, seed=42, max_tokens=1)), logits, n))
    for token, p in enumerate(probs):
        assert abs(counts[token] / n - p) <= 0.03, (token, counts)


# --- stop and length -----------------------------------------------------------------------------------------


def test_is_stop() -> None:
    sampler = Sampler(SamplingParams(stop_token_ids=(2, 7)))
    assert sampler.is_stop(2)
    assert sampler.is_stop(7)
    assert not sampler.is_stop(3)
    assert not Sampler(SamplingParams()).is_stop(0)


def test_finish_reason() -> None:
    sampler = Sampler(SamplingParams(max_tokens=3, stop_token_ids=(2,)))
    assert sampler.finish_reason(1, 5) is None
    assert sampler.finish_reason(2, 5) is None
    assert sampler.finish_reason(1, 2) == "stop"
    assert sampler.finish_reason(3, 5) == "length"
    assert sampler.finish_reason(3, 2) == "stop"  # a stop token on the last allowed step is still a stop


@pytest.mark.parametrize("tokens_generated", [0, -1, 4])
def test_finish_reason_refuses_impossible_counts(tokens_generated: int) -> None:
    sampler = Sampler(SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match=f"tokens_generated .* got {tokens_generated}"):
        sampler.finish_reason(tokens_generated, 0)


# --- logits refused ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0, seed=0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_logits_are_refused(params: SamplingParams, dtype: torch.dtype) -> None:
    logits = random_logits(0).to(dtype)
    logits[17] = math.nan
    with pytest.raises(ValueError, match="NaN at 1 of 1000"):
        Sampler(params).next_token(logits)


def test_positive_infinity_is_refused() -> None:
    logits = torch.zeros(4)
    logits[2] = math.inf
    with pytest.raises(ValueError, match=r"\+inf at 1 of 4"):
        Sampler(SamplingParams(temperature=1.0)).next_token(logits)


def test_all_masked_is_refused() -> None:
    with pytest.raises(ValueError, match="-inf at all 4 positions"):
        Sampler(SamplingParams()).next_token(torch.full((4,), -math.inf))


@pytest.mark.parametrize("shape", [(), (0,), (2, 10), (1, 2, 10), (2, 1, 10), (1, 1, 1, 10)])
def test_bad_shapes_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="logits must be shaped"):
        Sampler(SamplingParams()).next_token(torch.zeros(shape))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.bool])
def test_bad_dtypes_are_refused(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match=f"got {dtype}"):
        Sampler(SamplingParams()).next_token(torch.zeros(10, dtype=dtype))


# --- params -------------------------------------------------------------------------------------------------


def test_defaults_are_greedy() -> None:
    params = SamplingParams()
    assert params.greedy
    assert (params.temperature, params.top_k, params.top_p, params.seed) == (0.0, 0, 1.0, None)
    assert (params.max_tokens, params.stop_token_ids) == (16, ())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, "temperature must be 0"),
        ("temperature", math.inf, "temperature must be 0"),
        ("temperature", math.nan, "temperature must be 0"),
        ("temperature", MIN_TEMPERATURE / 2, "temperature must be 0"),
        ("temperature", MAX_TEMPERATURE * 2, "temperature must be 0"),
        ("temperature", True, "temperature must be a number, got bool"),
        ("temperature", "0.5", "temperature must be a number, got str"),
        ("temperature", 10**400, "too large for a float"),
        ("top_k", -1, "top_k must be between 0"),
        ("top_k", MAX_TOP_K + 1, "top_k must be between 0"),
        ("top_k", 1.0, "top_k must be an int, got float"),
        ("top_k", True, "top_k must be an int, got bool"),
        ("top_p", 0.0, "top_p must be in"),
        ("top_p", -0.5, "top_p must be in"),
        ("top_p", 1.0001, "top_p must be in"),
        ("top_p", math.nan, "top_p must be in"),
        ("top_p", False, "top_p must be a number, got bool"),
        ("seed", -1, "seed must be between"),
        ("seed", MAX_SEED + 1, "seed must be between"),
        ("seed", 1.0, "seed must be an int, got float"),
        ("seed", False, "seed must be an int, got bool"),
        ("max_tokens", 0, "max_tokens must be between"),
        ("max_tokens", MAX_TOKENS_CAP + 1, "max_tokens must be between"),
        ("max_tokens", 16.0, "max_tokens must be an int, got float"),
        ("max_tokens", None, "max_tokens must be an int, got NoneType"),
        ("stop_token_ids", [1, 2], "stop_token_ids must be a tuple"),
        ("stop_token_ids", (1, -2), "stop_token_ids must be ints >= 0, got int -2"),
        ("stop_token_ids", (1, True), "stop_token_ids must be ints >= 0, got bool"),
        ("stop_token_ids", (1, "2"), "stop_token_ids must be ints >= 0, got str"),
    ],
)
def test_bad_params_are_refused(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        SamplingParams(**{field: value})
    if not (isinstance(value, int) and value > 10**300):
        assert repr(value)[:20] in str(raised.value)


def test_boundary_params_are_accepted() -> None:
    SamplingParams(temperature=MIN_TEMPERATURE, top_p=1e-12, seed=0, max_tokens=1)
    SamplingParams(
        temperature=MAX_TEMPERATURE, top_k=MAX_TOP_K, top_p=1.0, seed=MAX_SEED, max_tokens=MAX_TOKENS_CAP
    )
    SamplingParams(stop_token_ids=(0,))


def test_int_temperature_and_top_p_are_stored_as_floats() -> None:
    params = SamplingParams(temperature=1, top_p=1)
    assert isinstance(params.temperature, float)
    assert isinstance(params.top_p, float)
    assert params == SamplingParams(temperature=1.0, top_p=1.0)


def test_params_are_frozen_and_hashable() -> None:
    params = SamplingParams(stop_token_ids=(1,))
    with pytest.raises(AttributeError):
        params.top_k = 3  # type: ignore[misc]
    assert hash(params) == hash(SamplingParams(stop_token_ids=(1,)))


def test_from_dict_reads_json_types() -> None:
    params = SamplingParams.from_dict(
        {"temperature": 1, "top_k": 40, "top_p": 0.9, "seed": 7, "max_tokens": 64, "stop_token_ids": [2, 0]}
    )
    assert params == SamplingParams(
        temperature=1.0, top_k=40, top_p=0.9, seed=7, max_tokens=64, stop_token_ids=(2, 0)
    )
    assert SamplingParams.from_dict({}) == SamplingParams()
    assert SamplingParams.from_dict({"seed": None}) == SamplingParams()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"top_P": 0.9}, "unknown sampling parameters 'top_P'"),
        ({"temperature": 1.0, "beam": 2, "n": 1}, "unknown sampling parameters 'beam', 'n'"),
        ({1: 2}, "unknown sampling parameters 1"),
        ({"temperature": True}, "temperature must be a number, got bool"),
        ({"temperature": None}, "temperature must be a number, got NoneType"),
        ({"temperature": "1"}, "temperature must be a number, got str"),
        ({"top_k": 5.0}, "top_k must be an int, got float"),
        ({"top_k": False}, "top_k must be an int, got bool"),
        ({"top_p": "0.9"}, "top_p must be a number, got str"),
        ({"seed": 1.5}, "seed must be an int, got float"),
        ({"seed": "7"}, "seed must be an int, got str"),
        ({"seed": True}, "seed must be an int, got bool"),
        ({"max_tokens": 1e3}, "max_tokens must be an int, got float"),
        ({"max_tokens": None}, "max_tokens must be an int, got NoneType"),
        ({"stop_token_ids": 2}, "stop_token_ids must be a tuple of ints, got int"),
        ({"stop_token_ids": "2"}, "stop_token_ids must be a tuple of ints, got str"),
        ({"stop_token_ids": {"a": 1}}, "stop_token_ids must be a tuple of ints, got dict"),
        ({"stop_token_ids": [1, False]}, "stop_token_ids must be ints >= 0, got bool"),
        ({"stop_token_ids": [1, 2.0]}, "stop_token_ids must be ints >= 0, got float"),
        ({"stop_token_ids": [1, None]}, "stop_token_ids must be ints >= 0, got NoneType"),
        ({"stop_token_ids": [-1]}, "stop_token_ids must be ints >= 0, got int -1"),
        ({"max_tokens": MAX_TOKENS_CAP + 1}, "max_tokens must be between"),
        ({"temperature": -1}, "temperature must be 0"),
    ],
)
def test_from_dict_refuses(data: dict[Any, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams.from_dict(data)


@pytest.mark.parametrize("data", [[("temperature", 1.0)], "temperature=1", None])
def test_from_dict_refuses_non_objects(data: Any) -> None:
    with pytest.raises(ValueError, match="sampling parameters must be an object"):
        SamplingParams.from_dict(data)


# -- what depends on history: penalties, bias, min-p, a grammar -----------------------------------------------


def test_repetition_penalty_and_min_p_match_transformers() -> None:
    logits = random_logits(21)
    context = (3, 7, 7, 500, 999)
    params = SamplingParams(temperature=0.8, repetition_penalty=1.3, min_p=0.05, context=context)
    input_ids = torch.tensor([context])
    scores = RepetitionPenaltyLogitsProcessor(1.3)(input_ids, logits.reshape(1, -1))
    for warper in (TemperatureLogitsWarper(0.8), MinPLogitsWarper(0.05)):
        scores = warper(input_ids, scores)
    assert torch.allclose(Sampler(params).scores(logits), scores[0])


def test_presence_and_frequency_penalties_count_only_generated_tokens() -> None:
    logits = torch.zeros(VOCAB)
    # 4 and 5 were generated before this session (a failover), 9 is in the prompt only.
    params = SamplingParams(
        temperature=1.0, presence_penalty=0.5, frequency_penalty=0.25, context=(9, 4, 5, 4), context_output=3
    )
    sampler = Sampler(params)
    scores = sampler.scores(logits)
    assert scores[9] == 0.0
    assert scores[4] == -(0.5 + 2 * 0.25) and scores[5] == -(0.5 + 0.25)
    sampler.accept(5)
    assert sampler.scores(logits)[5] == -(0.5 + 2 * 0.25)


def test_logit_bias_is_added_before_greedy_choice() -> None:
    logits = random_logits(5)
    worst = int(torch.argmin(logits))
    params = SamplingParams.from_dict({"logit_bias": {str(worst): 100.0}})
    assert params.logit_bias == ((worst, 100.0),)
    assert Sampler(params).next_token(logits) == worst


def test_a_grammar_masks_every_token_it_does_not_allow() -> None:
    from worker.grammar import Vocabulary, json_grammar
    from worker.testing.tiny import EOS, byte_tokenizer

    vocabulary = Vocabulary(byte_tokenizer(), 300)
    schema = {"type": "object", "properties": {"a": {"enum": [1, 22]}}, "required": ["a"]}
    params = SamplingParams(temperature=1.0, seed=3, grammar=json_grammar(schema), max_tokens=40)
    sampler = Sampler(params, vocabulary)
    generator = torch.Generator().manual_seed(0)
    tokens = []
    while not tokens or tokens[-1] != EOS:
        tokens.append(sampler.next_token(torch.randn(300, generator=generator)))
    assert bytes(tokens[:-1]).decode() in ('{"a":1}', '{"a":22}')
    # Without the tokenizer, a grammar cannot be followed.
    with pytest.raises(ValueError, match="tokenizer"):
        Sampler(params)


def test_session_sampling_carries_only_the_history_a_parameter_needs() -> None:
    greedy = {"temperature": 0.0}
    assert session_sampling(greedy, [1, 2], [3]) == greedy
    assert session_sampling({"presence_penalty": 1.0}, [1, 2], [3]) == {
        "presence_penalty": 1.0,
        "context": [3],
        "context_output": 1,
    }
    assert session_sampling({"repetition_penalty": 1.2}, [1, 2], [3])["context"] == [1, 2, 3]
    assert session_sampling({"presence_penalty": 1.0}, [1, 2], []) == {"presence_penalty": 1.0}


def test_logprobs_are_the_raw_log_softmax_and_their_wire_form_is_checked() -> None:
    logits = random_logits(8)
    sampler = Sampler(SamplingParams(logprobs=3, repetition_penalty=2.0, context=(1,)))
    token = sampler.next_token(logits)
    logprobs = sampler.logprobs(logits, token)
    assert logprobs is not None
    reference = torch.log_softmax(logits, dim=-1)
    assert logprobs.logprob == pytest.approx(float(reference[token]))
    assert [t for t, _ in logprobs.top] == torch.topk(reference, 3).indices.tolist()
    assert TokenLogprobs.from_json(logprobs.to_json(), vocab_size=VOCAB, limit=3) == logprobs
    for bad in (
        {"logprob": 0.5, "top": []},  # a probability above 1
        {"logprob": -1.0, "top": [[VOCAB, -1.0]]},  # outside the vocabulary
        {"logprob": -1.0, "top": [[1, -1.0]] * 4},  # more alternatives than asked for
        {"logprob": float("nan"), "top": []},
        {"logprob": -1.0},
    ):
        with pytest.raises(ValueError):
            TokenLogprobs.from_json(bad, vocab_size=VOCAB, limit=3)
