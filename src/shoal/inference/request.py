"""The one internal request type every API dialect translates into, and what generation yields."""

from dataclasses import dataclass, field
from typing import Literal

from shoal.types.ids import ModelId, RequestId

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token; temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    max_tokens: int | None = None  # None = until EOS or the context is full
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """A tokenized prompt for one model, and how to continue it."""

    request_id: RequestId
    model_id: ModelId
    prompt_tokens: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class TextDelta:
    """New text (never a broken UTF-8 sequence) and the token ids that produced it."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    """The end of a generation, with its usage and timing."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    decode_tok_s: float


GenerationEvent = TextDelta | Finished
