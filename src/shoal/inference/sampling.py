"""Next-token sampling from logits: greedy, temperature, top-k, top-p, min-p, seeded; logit_bias,
presence / frequency / repetition penalties, constrained-decoding masks, and logprobs.

The logits pass, in this order (vLLM's): logit_bias added; the repetition penalty over every
token seen (prompt and output), then presence and frequency penalties over the output only; the
mask (disallowed tokens to -inf); temperature; min-p, top-k, top-p. Logprobs are the log-softmax
of the raw logits, before all of it (vLLM's default `raw_logprobs`): the model's distribution.
"""

import numpy as np

from shoal.inference.request import SamplingParams, TokenLogprob

GREEDY_BELOW = 1e-5  # a temperature this small is greedy (1/T overflows near 1e-308)
MAX_TOP_LOGPROBS = 20  # OpenAI's cap on top_logprobs


def make_rng(params: SamplingParams, position: int | None = None) -> np.random.Generator:
    """A generator seeded from the request (or from the OS when no seed is given).

    With a position, a seeded request draws each token from (seed, position) alone, so a request
    replayed from its prompt (after a failover, or retried alone) samples what it sampled before.
    """
    if params.seed is not None and position is not None:
        return np.random.default_rng((params.seed, position))
    return np.random.default_rng(params.seed)


def allowed_tokens(mask: np.ndarray, vocab: int) -> np.ndarray:
    """bool [vocab] of a uint32 bitmask [ceil(vocab / 32)]; tokens past the mask are not allowed."""
    bits = np.unpackbits(mask.astype("<u4", copy=False).view(np.uint8), bitorder="little")
    allowed = np.zeros(vocab, dtype=bool)
    n = min(vocab, bits.shape[0])
    allowed[:n] = bits[:n].astype(bool)
    return allowed


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of logits [vocab]."""
    x = logits.astype(np.float64)
    top = x.max()
    return x - (top + np.log(np.exp(x - top).sum()))


def token_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """The token's raw log-probability and the k most likely tokens' (k <= MAX_TOP_LOGPROBS)."""
    x = logits.astype(np.float32, copy=False)
    top = float(x.max())
    lse = top + float(np.log(np.exp(x - top, dtype=np.float64).sum()))  # log of the partition
    best: tuple[tuple[int, float], ...] = ()
    if k > 0:
        ids = np.argpartition(x, -k)[-k:] if k < x.shape[0] else np.arange(x.shape[0])
        ids = ids[np.argsort(-x[ids], kind="stable")]
        best = tuple((int(i), float(x[i]) - lse) for i in ids)
    return TokenLogprob(token, float(x[token]) - lse, best)


def process(
    logits: np.ndarray,
    params: SamplingParams,
    history: np.ndarray | None = None,
    prompt_len: int = 0,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """The logits after logit_bias, penalties and the mask (float64 [vocab]; logits untouched).

    history: every token id before the sampled position (prompt first, prompt_len of them).
    """
    x = logits.astype(np.float64)  # a copy
    if params.logit_bias:
        ids = np.fromiter((t for t, _ in params.logit_bias), np.int64, len(params.logit_bias))
        x[ids] += np.fromiter((b for _, b in params.logit_bias), np.float64, ids.shape[0])
    if history is not None and history.size and params.penalized:
        if params.repetition_penalty != 1.0:
            seen = np.unique(history)
            vals, r = x[seen], params.repetition_penalty
            x[seen] = np.where(vals > 0, vals / r, vals * r)
        output = history[prompt_len:]
        if output.size and (params.presence_penalty or params.frequency_penalty):
            ids, counts = np.unique(output, return_counts=True)
            x[ids] -= params.frequency_penalty * counts + params.presence_penalty
    if mask is not None:
        allowed = allowed_tokens(mask, x.shape[0])
        if not allowed.any():
            raise ValueError("the constraint allows no token at all")
        x[~allowed] = -np.inf
    return x


def _plain(params: SamplingParams) -> bool:
    return not (params.logit_bias or params.penalized)


def sample(
    logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    *,
    history: np.ndarray | None = None,
    prompt_len: int = 0,
    mask: np.ndarray | None = None,
) -> int:
    """Pick one token id from logits [vocab] (history and mask as in `process`)."""
    if _plain(params) and mask is None:
        x = logits
    else:
        x = process(logits, params, history, prompt_len, mask)
    if params.temperature < GREEDY_BELOW:
        return int(np.argmax(x))
    scaled = x.astype(np.float64) / params.temperature
    if 0 < params.top_k < scaled.shape[0]:
        # keep the k largest: everything below the k-th value is cut
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.min_p > 0.0:
        probs = np.where(probs < params.min_p * probs.max(), 0.0, probs)
        probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        # smallest prefix whose mass reaches top_p (always at least one token)
        keep = order[: int(np.searchsorted(cumulative, params.top_p)) + 1]
        cut = np.zeros_like(probs)
        cut[keep] = probs[keep]
        probs = cut / cut.sum()
    return int(rng.choice(probs.shape[0], p=probs))
