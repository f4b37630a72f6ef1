"""The qwen3_moe decoder (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-480B) for one shard, in numpy.

qwen3 (llama.py's Attention with q/k RMSNorm, its Block and Model) with a routed feed-forward on
the layers `args.is_moe_layer(i)` names: a router `mlp.gate` (float32 in every format, so the
choice of experts does not move with the weights' format) and `mlp.experts.{e}.*` (moe.py). The
other layers (mlp_only_layers, decoder_sparse_step) keep llama's dense MLP.
"""

import numpy as np

from shoal.engines.args import ModelArgs
from shoal.engines.checkpoint import Checkpoint
from shoal.engines.numpy import llama
from shoal.engines.numpy.llama import FeedForward, Formats, Linear
from shoal.engines.numpy.moe import Experts, route_softmax


class SparseMoeBlock:
    """Router `gate` (softmax, top k), then the chosen `experts`."""

    def __init__(self, args: ModelArgs, ckpt: Checkpoint, name: str, formats: Formats) -> None:
        self.k, self.norm_topk_prob = args.experts_per_token, args.norm_topk_prob
        self.gate = Linear.take(ckpt, f"{name}.gate", args.hidden_size, args.num_experts)
        self.experts = Experts(args, ckpt, f"{name}.experts", formats)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        idx, weights = route_softmax(self.gate(x), self.k, self.norm_topk_prob)  # [N, k]
        return self.experts(x, idx, weights)  # [N, hidden]


class Model(llama.Model):
    """A qwen3_moe shard: llama's Model with SparseMoeBlock on the routed layers."""

    def layer_mlp(self, ckpt: Checkpoint, name: str, formats: Formats, layer: int) -> FeedForward:
        if self.args.is_moe_layer(layer):
            return SparseMoeBlock(self.args, ckpt, name, formats)
        return llama.MLP(self.args, ckpt, name, formats)
