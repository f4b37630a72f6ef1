"""The one internal request type every API dialect translates into, and what generation yields."""

from dataclasses import dataclass, field
from typing import Literal

from shoal.inference.constraint import ConstraintFactory
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
    # OpenAI's: subtract p once from each token generated so far, f per time it was generated
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's / llama.cpp's: a token seen in the prompt or the output has its logit divided by r
    # when positive, multiplied when negative (1 = off)
    repetition_penalty: float = 1.0
    min_p: float = 0.0  # drop tokens below min_p × the most likely one's probability
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the top k

    @property
    def penalized(self) -> bool:
        """Whether the sampler needs the tokens seen so far."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )


@dataclass(frozen=True)
class GenerationRequest:
    """A tokenized prompt for one model, and how to continue it."""

    request_id: RequestId
    model_id: ModelId
    prompt_tokens: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1  # choices, sharing one prefill of the prompt
    constraint: ConstraintFactory | None = None  # one Constraint per choice (constrained decoding)


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability and the most likely tokens' at its position, from the
    engine's raw logits (before the mask, logit_bias, penalties and temperature: vLLM's
    default), so they are the model's own distribution."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class TextDelta:
    """New text (never a broken UTF-8 sequence) and the token ids that produced it."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when the request asked for them
    index: int = 0  # the choice


@dataclass(frozen=True)
class Finished:
    """The end of a generation, with its usage and timing."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    decode_tok_s: float
    index: int = 0  # the choice; a request of n choices ends with n Finished events
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache, not prefilled


GenerationEvent = TextDelta | Finished
