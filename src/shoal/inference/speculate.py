"""Speculative decoding by prompt lookup: drafts are the tokens that followed the latest earlier
occurrence of the last few tokens (in the prompt or the output so far), as llama.cpp's and vLLM's
n-gram speculators draft; the target model verifies them all in one pass.

A verify step feeds the last token and the drafts; the last stage answers the greedy token at
each position; the scheduler keeps the drafts up to the first the model disagrees with, plus the
model's own token there, so greedy output is exactly plain greedy's. What the caches hold past
the accepted tokens is dropped at the start of the request's next step (`rewind`). A verify step
costs more than a decode step (its positions are a small prefill), so it pays only where drafts
are kept: a request whose verify kept nothing drafts nothing for its next SKIP_AFTER_MISS steps,
and drafts come from two or more tokens seen before, not one. Only plain
greedy requests speculate (no penalties, bias, logprobs or constraint), and only in steps without
a prompt chunk (a verify step's logits come out at every position).
"""

from collections.abc import Sequence

import numpy as np

MAX_NGRAM = 3  # the longest suffix looked up; shorter ones after it
MIN_NGRAM = 2  # one token seen before predicts too little: drafts from it were mostly rejected
WINDOW = 4096  # tokens of history searched
SKIP_AFTER_MISS = 4  # decode steps a request drafts nothing after a verify that kept nothing


def prompt_lookup(
    history: Sequence[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM
) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of history's last n tokens,
    the longest n first (down to min_ngram); [] when there is none."""
    if k < 1 or len(history) < 2:
        return []
    arr = np.asarray(history[-WINDOW:], dtype=np.int64)
    size = arr.shape[0]
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        key = arr[-n:]
        found = np.ones(size - n, dtype=bool)  # starts i < size - n: not the suffix itself
        for j in range(n):
            found &= arr[j : size - n + j] == key[j]
        starts = np.flatnonzero(found)
        if starts.size:
            at = int(starts[-1]) + n
            return [int(t) for t in arr[at : at + k]]
    return []
