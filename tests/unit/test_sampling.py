"""Sampling and stop strings: pure table tests."""

import numpy as np
import pytest

from shoal.inference.request import SamplingParams
from shoal.inference.sampling import make_rng, sample
from shoal.inference.stops import StopMatcher

LOGITS = np.array([0.1, 3.0, 2.9, -1.0, 0.5], dtype=np.float32)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(temperature=0.0), 1),
        (SamplingParams(temperature=1.0, top_k=1), 1),
        (SamplingParams(temperature=1.0, top_p=1e-6), 1),
        (SamplingParams(temperature=1e-4), 1),
    ],
)
def test_deterministic_settings_pick_the_argmax(params: SamplingParams, expected: int) -> None:
    for seed in range(5):
        assert sample(LOGITS, params, np.random.default_rng(seed)) == expected


def test_top_k_two_only_ever_picks_the_two_best() -> None:
    params = SamplingParams(temperature=5.0, top_k=2, seed=3)
    rng = make_rng(params)
    picks = {sample(LOGITS, params, rng) for _ in range(200)}
    assert picks == {1, 2}


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    params = SamplingParams(temperature=1.0, top_p=0.6, seed=1)
    rng = make_rng(params)
    assert {sample(LOGITS, params, rng) for _ in range(200)} == {1, 2}


def test_same_seed_same_tokens_different_seed_differs() -> None:
    logits = np.zeros(1000, dtype=np.float32)
    a = [
        sample(logits, SamplingParams(seed=7), rng)
        for rng in [make_rng(SamplingParams(seed=7))]
        for _ in range(20)
    ]
    b = [
        sample(logits, SamplingParams(seed=7), rng)
        for rng in [make_rng(SamplingParams(seed=7))]
        for _ in range(20)
    ]
    c = [
        sample(logits, SamplingParams(seed=8), rng)
        for rng in [make_rng(SamplingParams(seed=8))]
        for _ in range(20)
    ]
    assert a == b
    assert a != c


@pytest.mark.parametrize(
    ("stops", "pieces", "emitted", "stopped"),
    [
        ((), ["Hello", " world"], "Hello world", False),
        (("\n\n",), ["a\n", "\nb"], "a", True),
        (("END",), ["xE", "N", "D tail"], "x", True),
        (("END",), ["xE", "N", "o"], "xENo", False),
        (("ab", "b"), ["xab"], "x", True),
        (("Paris",), ["The capital is Par", "is."], "The capital is ", True),
    ],
)
def test_stop_matcher(
    stops: tuple[str, ...], pieces: list[str], emitted: str, stopped: bool
) -> None:
    matcher = StopMatcher(stops)
    out, hit = "", False
    for piece in pieces:
        text, hit = matcher.push(piece)
        out += text
        if hit:
            break
    if not hit:
        out += matcher.flush()
    assert (out, hit) == (emitted, stopped)


# ---- logit_bias, penalties, min_p, masks, logprobs ----

GREEDY = SamplingParams(temperature=0.0)


def bitmask(allowed: set[int], vocab: int) -> np.ndarray:
    words = np.zeros(-(-vocab // 32), dtype=np.uint32)
    for t in allowed:
        words[t // 32] |= np.uint32(1 << (t % 32))
    return words


def test_logit_bias_forces_and_bans_a_token() -> None:
    forced = SamplingParams(temperature=0.0, logit_bias=((3, 100.0),))
    assert sample(LOGITS, forced, np.random.default_rng(0)) == 3
    banned = SamplingParams(temperature=0.0, logit_bias=((1, -100.0),))
    assert sample(LOGITS, banned, np.random.default_rng(0)) == 2
    hot = SamplingParams(temperature=1.0, seed=0, logit_bias=((1, -100.0),))
    rng = make_rng(hot)
    assert 1 not in {sample(LOGITS, hot, rng) for _ in range(300)}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # token 1 (3.0) was generated: penalties push greedy to token 2 (2.9)
        (SamplingParams(temperature=0.0, presence_penalty=0.2), 2),
        (SamplingParams(temperature=0.0, frequency_penalty=0.1), 2),
        (SamplingParams(temperature=0.0, repetition_penalty=1.1), 2),
        (SamplingParams(temperature=0.0), 1),
    ],
)
def test_penalties_push_away_from_generated_tokens(params: SamplingParams, expected: int) -> None:
    history = np.array([0, 3, 1, 4, 4])  # prompt [0, 3], then generated 1, 4, 4
    got = sample(LOGITS, params, np.random.default_rng(0), history=history, prompt_len=2)
    assert got == expected


def test_a_negative_penalty_rewards_repeating() -> None:
    history = np.array([0, 4, 4])  # generated token 4 (0.5) twice: 0.5 + 2 × 1.5 > 3.0
    params = SamplingParams(temperature=0.0, frequency_penalty=-1.5)
    assert sample(LOGITS, params, np.random.default_rng(0), history=history, prompt_len=1) == 4


def test_presence_and_frequency_count_only_the_output() -> None:
    # token 1 only in the prompt: presence/frequency leave it alone, repetition does not
    history = np.array([1, 1, 1])
    rng = np.random.default_rng(0)
    pres = SamplingParams(temperature=0.0, presence_penalty=2.0)
    assert sample(LOGITS, pres, rng, history=history, prompt_len=3) == 1
    rep = SamplingParams(temperature=0.0, repetition_penalty=1.1)
    assert sample(LOGITS, rep, rng, history=history, prompt_len=3) == 2


def test_repetition_penalty_makes_negative_logits_more_negative() -> None:
    logits = np.array([-1.0, -1.05], dtype=np.float32)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    # -1.0 seen: becomes -1.2, below -1.05
    assert sample(logits, params, np.random.default_rng(0), history=np.array([0])) == 1


def test_min_p_cuts_tokens_far_below_the_best() -> None:
    # probabilities at T=1: 1 and 2 are close, the rest are < 0.1 of the best
    params = SamplingParams(temperature=1.0, min_p=0.5, seed=2)
    rng = make_rng(params)
    assert {sample(LOGITS, params, rng) for _ in range(300)} == {1, 2}
    loose = SamplingParams(temperature=1.0, min_p=0.0, seed=2)
    rng = make_rng(loose)
    assert len({sample(LOGITS, loose, rng) for _ in range(300)}) > 2


def test_a_mask_allows_only_its_tokens_greedy_and_sampled() -> None:
    logits = np.random.default_rng(0).normal(size=100).astype(np.float32)
    allowed = {5, 37, 64, 99}
    mask = bitmask(allowed, 100)
    assert sample(logits, GREEDY, np.random.default_rng(0), mask=mask) == max(
        allowed, key=lambda t: logits[t]
    )
    params = SamplingParams(temperature=2.0, seed=1)
    rng = make_rng(params)
    picks = {sample(logits, params, rng, mask=mask) for _ in range(300)}
    assert picks == allowed


def test_a_mask_shorter_than_the_vocabulary_bans_the_rest() -> None:
    logits = np.zeros(70, dtype=np.float32)
    logits[69] = 10.0  # past a one-word mask
    assert sample(logits, GREEDY, np.random.default_rng(0), mask=bitmask({3}, 32)) == 3


def test_an_empty_mask_is_an_error_not_a_nan_draw() -> None:
    with pytest.raises(ValueError, match="no token"):
        sample(LOGITS, GREEDY, np.random.default_rng(0), mask=np.zeros(1, np.uint32))


def test_logprobs_are_the_raw_log_softmax_with_the_top_k_in_order() -> None:
    from shoal.inference.sampling import token_logprob

    lp = token_logprob(LOGITS, 2, 3)
    expected = np.log(np.exp(LOGITS.astype(np.float64)) / np.exp(LOGITS.astype(np.float64)).sum())
    assert lp.token == 2 and lp.logprob == pytest.approx(expected[2], abs=1e-6)
    assert [t for t, _ in lp.top] == [1, 2, 4]
    assert [v for _, v in lp.top] == pytest.approx(list(expected[[1, 2, 4]]), abs=1e-6)
    assert token_logprob(LOGITS, 2, 0).top == ()
    assert len(token_logprob(LOGITS, 2, 20).top) == 5  # no more than the vocabulary


def test_the_sampler_rebuilds_penalty_state_from_replayed_tokens() -> None:
    """Penalties count what the steps carried: a replay from position 0 gives the same state."""
    from shoal.inference.pipeline import Sampler
    from shoal.types.ids import RequestId

    rid = RequestId("r")
    params = SamplingParams(temperature=0.0, frequency_penalty=0.2)
    sampler = Sampler()
    sampler.observe(rid, 0, [0, 3], prompt_len=2)
    sampler.observe(rid, 2, [1], prompt_len=2)  # generated: token 1
    first = sampler(rid, LOGITS, params, 3)
    sampler.free(rid)
    sampler.observe(rid, 0, [0, 3, 1], prompt_len=2)  # the replay, in one chunk
    assert sampler(rid, LOGITS, params, 3) == first == 2
    # a step retried from an earlier position rewrites what follows it
    sampler.observe(rid, 2, [4], prompt_len=2)
    assert sampler(rid, LOGITS, params, 3) == 1
