"""Mixture-of-experts pieces of the numpy model files: the two routers and the routed experts.

The same math as engines/torch/moe.py. A router turns each row's logits over the E experts into
the k experts it uses and their weights; `Experts` runs each used expert once over the rows that
chose it (a decode step reads only the chosen experts' weights, a prefill groups its rows by
expert) and sums each row's k outputs by weight, in expert order whatever else is in the batch.
Int8/int4 experts are native block matrices (Formats), exactly as a dense layer's projections.
"""

import numpy as np

from shoal.engines.args import ModelArgs
from shoal.engines.checkpoint import Checkpoint
from shoal.engines.numpy.llama import MLP, Formats

F32 = np.float32


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices [N, k] of each row's k largest scores, largest first."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def route_softmax(
    logits: np.ndarray, k: int, norm_topk_prob: bool
) -> tuple[np.ndarray, np.ndarray]:
    """qwen3_moe: softmax over all experts, the top k, renormalised to sum 1 if norm_topk_prob.
    logits [N, E] → (idx [N, k] int64, weights [N, k] float32)."""
    logits = logits.astype(F32, copy=False)
    idx = _top(logits, k)  # [N, k]: softmax keeps the order, so the top k of the logits
    top = np.take_along_axis(logits, idx, axis=-1)  # [N, k], largest first
    weights = np.exp(top - top[:, :1])  # [N, k]: softmax numerators over the row's maximum
    # renormalised, the chosen weights are the softmax of the chosen logits alone
    total = weights if norm_topk_prob else np.exp(logits - top[:, :1])  # [N, k or E]
    return idx.astype(np.int64), weights / total.sum(axis=-1, keepdims=True)


def route_sigmoid(
    logits: np.ndarray,
    bias: np.ndarray,
    k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    scaling: float,
) -> tuple[np.ndarray, np.ndarray]:
    """deepseek_v3's "noaux_tc", as transformers computes it: experts chosen by sigmoid scores +
    bias [E] among the topk_group of n_group groups with the best sums of their top-2 biased
    scores; weighted by the unbiased scores (renormalised if norm_topk_prob) x scaling.
    logits [N, E] → (idx [N, k] int64, weights [N, k] float32)."""
    n, e = logits.shape
    scores = 1 / (1 + np.exp(-logits.astype(F32)))  # [N, E]
    choice = scores + bias.astype(F32)  # [N, E]
    grouped = choice.reshape(n, n_group, e // n_group)  # [N, G, E / G]
    group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(axis=-1)  # [N, G]
    kept = np.zeros((n, n_group), bool)  # [N, G]
    np.put_along_axis(kept, _top(group_scores, topk_group), True, axis=-1)
    mask = np.repeat(kept, e // n_group, axis=-1)  # [N, E]
    idx = _top(np.where(mask, choice, F32(-np.inf)), k)  # [N, k]
    weights = np.take_along_axis(scores, idx, axis=-1)  # [N, k]
    if norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + F32(1e-20))
    return idx.astype(np.int64), (weights * F32(scaling)).astype(F32)


class Experts:
    """E SwiGLU experts from `{name}.{e}.{gate,up,down}_proj`; each row's output is the
    weighted sum of its chosen experts' outputs."""

    def __init__(self, args: ModelArgs, ckpt: Checkpoint, name: str, formats: Formats) -> None:
        inner = args.moe_intermediate_size
        self.experts = [
            MLP(args, ckpt, f"{name}.{e}", formats, inner) for e in range(args.num_experts)
        ]

    def __call__(self, x: np.ndarray, idx: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """x [N, hidden], idx and weights [N, k] → Σ_k weights · expert_idx(x), [N, hidden]."""
        k = idx.shape[1]
        flat = idx.ravel()  # [N * k]
        order = np.argsort(flat, kind="stable")  # slots grouped by expert, in row order within one
        chosen = flat[order]  # [N * k] ascending
        starts = np.flatnonzero(np.diff(chosen)) + 1  # where each next expert's slots begin
        rows = order // k  # [N * k] the row of each slot
        scale = weights.ravel()[order].astype(F32)[:, None]  # [N * k, 1]
        out = np.zeros_like(x)  # [N, hidden]
        bounds = [0, *starts.tolist(), len(flat)]
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            mine = rows[lo:hi]  # [n_e]: distinct, as a row picks an expert once
            out[mine] += self.experts[int(chosen[lo])](x[mine]) * scale[lo:hi]  # [n_e, hidden]
        return out
