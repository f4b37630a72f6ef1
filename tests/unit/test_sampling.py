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
