"""The qwen3_moe decoder (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-480B) for one shard.

qwen3 (llama.py's Attention with q/k RMSNorm, its Block and Model) with a routed feed-forward on
the layers `args.is_moe_layer(i)` names: a router `mlp.gate` (softmax over the experts, the top
`experts_per_token`, renormalised if norm_topk_prob) and `mlp.experts.{e}.{gate,up,down}_proj`
(moe.py). The other layers (mlp_only_layers, decoder_sparse_step) keep llama's dense MLP.
"""

import torch
from torch import Tensor, nn

from shoal.engines.args import ModelArgs
from shoal.engines.torch import llama
from shoal.engines.torch.llama import FeedForward, Packs, below
from shoal.engines.torch.moe import Experts, route_softmax
from shoal.engines.torch.quant import Quant


class SparseMoeBlock(FeedForward):
    """Router `gate` (softmax, top k), then the chosen `experts`."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.k, self.norm_topk_prob = args.experts_per_token, args.norm_topk_prob
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.experts = Experts(args)

    def pack(
        self, quant: Quant, device: torch.device, dtype: torch.dtype, packed: Packs = None
    ) -> None:
        """Put the experts in the weight format; the router stays in the engine's dtype."""
        self.experts.pack(quant, device, dtype, below(packed, "experts."))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, hidden]
        idx, weights = route_softmax(self.gate(flat), self.k, self.norm_topk_prob)  # [N, k]
        return self.experts(flat, idx, weights).view(x.shape)  # [B, T, hidden]


class Model(llama.Model):
    """A qwen3_moe shard: llama's Model with SparseMoeBlock on the routed layers."""

    def layer_mlp(self, layer: int) -> FeedForward:
        if self.args.is_moe_layer(layer):
            return SparseMoeBlock(self.args)
        return llama.MLP(self.args)
