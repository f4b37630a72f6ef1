"""Next-token sampling from logits: greedy, temperature, top-k, top-p, seeded."""

import numpy as np

from shoal.inference.request import SamplingParams

GREEDY_BELOW = 1e-5  # a temperature this small is greedy (1/T overflows near 1e-308)


def make_rng(params: SamplingParams, position: int | None = None) -> np.random.Generator:
    """A generator seeded from the request (or from the OS when no seed is given).

    With a position, a seeded request draws each token from (seed, position) alone, so a request
    replayed from its prompt (after a failover, or retried alone) samples what it sampled before.
    """
    if params.seed is not None and position is not None:
        return np.random.default_rng((params.seed, position))
    return np.random.default_rng(params.seed)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick one token id from logits [vocab]."""
    if params.temperature < GREEDY_BELOW:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < scaled.shape[0]:
        # keep the k largest: everything below the k-th value is cut
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        # smallest prefix whose mass reaches top_p (always at least one token)
        keep = order[: int(np.searchsorted(cumulative, params.top_p)) + 1]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.shape[0], p=probs))
