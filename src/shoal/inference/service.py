"""What the API needs from the node: model cards, availability, and a handle to generate with."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from shoal.inference.request import GenerationRequest
from shoal.inference.scheduler import RequestStream
from shoal.types.model_card import ModelCard


class ChatTokenizer(Protocol):
    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...


class ModelHandle(Protocol):
    """A ready instance of one model."""

    @property
    def card(self) -> ModelCard: ...

    @property
    def tokenizer(self) -> ChatTokenizer: ...

    @property
    def context_length(self) -> int: ...

    @property
    def instance_id(self) -> str:
        """The instance serving it (reported as OpenAI's system_fingerprint)."""
        ...

    def generate(self, req: GenerationRequest) -> RequestStream:
        """Admit the request now (BadRequest, Overloaded); its events come from the stream."""
        ...


Availability = Literal["ready", "downloading", "loading", "available", "unavailable", "failed"]


@dataclass(frozen=True)
class ModelStatus:
    """Whether this node can run a model now, and if not, why."""

    status: Availability
    reason: str | None = None
    progress: tuple[int, int] | None = None  # (done, total): bytes downloading, layers loading

    @property
    def runnable(self) -> bool:
        return self.status in ("ready", "downloading", "loading", "available")


class InferenceService(Protocol):
    def cards(self) -> list[ModelCard]: ...

    def card(self, model_id: str) -> ModelCard: ...

    async def resolve(self, model_id: str) -> ModelCard:
        """`card`, or for a Hugging Face repo id (`org/name`) a card made from the repo."""
        ...

    def status(self, card: ModelCard) -> ModelStatus: ...

    def active_requests(self) -> int:
        """Requests generating or queued on this node now."""
        ...

    async def acquire(self, model_id: str) -> ModelHandle:
        """A ready handle for the model, loading it first if needed and allowed."""
        ...
