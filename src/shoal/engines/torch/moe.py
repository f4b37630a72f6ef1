"""Mixture-of-experts pieces of the torch model files: the two routers and the routed experts.

A router turns each row's logits over the E experts into the k experts it uses and their
weights; `Experts` then runs each used expert once over the rows that chose it (one matmul per
used expert: a decode step reads only the chosen experts' weights, a prefill groups its rows)
and sums each row's k outputs by weight. Rows are independent, and a row's outputs are summed in
expert order whatever else is in the batch, so batching never changes a request's result.
"""

from typing import cast

import torch
from torch import Tensor, nn

from shoal.engines.args import ModelArgs
from shoal.engines.torch.llama import MLP, Packs, below
from shoal.engines.torch.quant import Quant


def route_softmax(logits: Tensor, k: int, norm_topk_prob: bool) -> tuple[Tensor, Tensor]:
    """qwen3_moe: softmax over all experts, the top k, renormalised to sum 1 if norm_topk_prob.
    logits [N, E] → (idx [N, k] int64, weights [N, k] float32)."""
    probs = logits.float().softmax(dim=-1)  # [N, E]
    weights, idx = probs.topk(k, dim=-1)  # [N, k] each
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return idx, weights


def route_sigmoid(
    logits: Tensor,
    bias: Tensor,
    k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    scaling: float,
) -> tuple[Tensor, Tensor]:
    """deepseek_v3's "noaux_tc", as transformers computes it: experts chosen by sigmoid scores +
    bias [E] among the topk_group of n_group groups with the best sums of their top-2 biased
    scores; weighted by the unbiased scores (renormalised if norm_topk_prob) x scaling.
    logits [N, E] → (idx [N, k] int64, weights [N, k] float32)."""
    n, e = logits.shape
    scores = logits.float().sigmoid()  # [N, E]
    choice = scores + bias.float()  # [N, E]
    grouped = choice.view(n, n_group, e // n_group)  # [N, G, E / G]
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
    groups = group_scores.topk(topk_group, dim=-1, sorted=False).indices  # [N, topk_group]
    kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)  # [N, G]
    mask = kept[:, :, None].expand(n, n_group, e // n_group).reshape(n, e)  # [N, E]
    idx = choice.masked_fill(~mask, float("-inf")).topk(k, dim=-1, sorted=False).indices
    weights = scores.gather(1, idx)  # [N, k]
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, weights * scaling


class Experts(nn.ModuleList):
    """E SwiGLU experts, `experts.{e}.{gate,up,down}_proj` as in the checkpoint; each row's
    output is the weighted sum of its chosen experts' outputs."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(MLP(args, args.moe_intermediate_size) for _ in range(args.num_experts))

    def pack(
        self, quant: Quant, device: torch.device, dtype: torch.dtype, packed: Packs = None
    ) -> None:
        """Put every expert in the weight format; packed: MLX-packed ones under `{e}.gate_proj`."""
        for e in range(len(self)):
            self.expert(e).pack(quant, device, dtype, below(packed, f"{e}."))

    def expert(self, e: int) -> MLP:
        """Expert e (ModuleList's items are untyped)."""
        return cast(MLP, self[e])

    def forward(self, x: Tensor, idx: Tensor, weights: Tensor) -> Tensor:
        """x [N, hidden], idx and weights [N, k] → Σ_k weights · expert_idx(x), [N, hidden]."""
        k = idx.shape[1]
        flat = idx.flatten()  # [N * k]
        order = flat.argsort(stable=True)  # slots grouped by expert, in row order within one
        counts = torch.bincount(flat, minlength=len(self)).tolist()  # [E]: the groups' sizes
        rows = order // k  # [N * k] the row of each slot
        scale = weights.flatten()[order].to(x.dtype)[:, None]  # [N * k, 1]
        out = torch.zeros_like(x)  # [N, hidden]
        start = 0
        for e, count in enumerate(counts):
            if count:
                mine = rows[start : start + count]  # [n_e]
                y = self.expert(e)(x[mine]) * scale[start : start + count]  # [n_e, hidden]
                out.index_add_(0, mine, y)
                start += count
        return out
