"""Next-token sampling from logits: greedy, temperature, top-k, top-p, seeded."""

import numpy as np

from shoal.inference.request import SamplingParams


def make_rng(params: SamplingParams) -> np.random.Generator:
    """A generator seeded from the request (or from the OS when no seed is given)."""
    return np.random.default_rng(params.seed)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick one token id from logits [vocab]."""
    if params.temperature <= 0.0:
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
