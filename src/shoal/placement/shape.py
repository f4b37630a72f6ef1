"""A decoder layer's weights by part, counted from a card's shape: what a layer holds, and what
one token reads of it.

Per layer, with h the hidden size (norms are a few vectors and left out):

    attention   q h x heads*head_dim, k and v 2 x h x kv_heads*head_dim, o heads*head_dim x h;
                latent (MLA): q h x q_lora + q_lora x heads*(nope + rope) (h x heads*(nope + rope)
                without q_lora), kv h x (kv_lora + rope) + kv_lora x heads*(nope + head_dim)
    dense MLP   3 x h x intermediate_size (gate, up, down)
    sparse MLP  (experts + shared) x 3 x h x expert width + experts x h (the router)

A token runs the attention and, in a sparse layer, the router, the shared experts and
experts_per_token routed ones: a layer's active share. A mixture-of-experts card that gives no
dense width has its dense layers sized as a token's share of a sparse one (shared + routed
experts per token, DeepSeek's and Kimi's exact design: 18432 = 9 x 2048). A dense model's layers
are all alike: placement sizes them from the file alone, and a token reads every weight.
"""

from dataclasses import dataclass

from shoal.types.model_card import ModelCard


@dataclass(frozen=True)
class LayerShape:
    """Weights of one layer's parts; for a dense model only `attention` and `dense_mlp`."""

    attention: int
    dense_mlp: int  # a layer without experts
    sparse_mlp: int  # a layer with experts: every routed and shared expert and the router
    sparse_active: int  # what one token runs of it: router, shared and per-token experts

    @property
    def dense(self) -> int:
        return self.attention + self.dense_mlp

    @property
    def sparse(self) -> int:
        return self.attention + self.sparse_mlp

    @property
    def sparse_token(self) -> int:
        return self.attention + self.sparse_active


def attention_params(card: ModelCard) -> int:
    """Weights of one layer's attention projections."""
    h, heads, d = card.hidden_size, card.heads, card.head_dim
    if not card.mla:
        return 2 * h * heads * d + 2 * h * card.kv_heads * d
    qk = card.qk_nope_head_dim + card.qk_rope_head_dim
    q = h * card.q_lora_rank + card.q_lora_rank * heads * qk if card.q_lora_rank else h * heads * qk
    kv = h * (card.kv_lora_rank + card.qk_rope_head_dim)
    kv += card.kv_lora_rank * heads * (card.qk_nope_head_dim + d)
    return q + kv + heads * d * h


def layer_shape(card: ModelCard) -> LayerShape:
    """The card's layer by part (weights, not bytes)."""
    h = card.hidden_size
    expert = 3 * h * card.expert_intermediate_size
    router = card.experts * h
    active = router + (card.shared_experts + card.experts_per_token) * expert
    return LayerShape(
        attention=attention_params(card),
        dense_mlp=3 * h * card.intermediate_size if card.intermediate_size else active,
        sparse_mlp=router + (card.shared_experts + card.experts) * expert,
        sparse_active=active if card.moe else 0,
    )


def sparse_layers(card: ModelCard) -> int:
    """Layers with experts (the ones after the card's dense_layers); 0 for a dense model."""
    return card.layers - card.dense_layers if card.moe else 0


def model_params(card: ModelCard) -> tuple[int, int]:
    """(all, active per token) weights of the card's layers, without embeddings and head;
    (0, 0) for a dense card (sized from its file alone)."""
    if not card.moe:
        return 0, 0
    shape, sparse = layer_shape(card), sparse_layers(card)
    dense = card.layers - sparse
    return (
        sparse * shape.sparse + dense * shape.dense,
        sparse * shape.sparse_token + dense * shape.dense,
    )
