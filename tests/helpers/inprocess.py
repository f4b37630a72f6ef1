"""The HTTP app in this process over one Scheduler: an InferenceService with one ready model."""

from shoal.errors import ModelNotFound
from shoal.inference.request import GenerationRequest
from shoal.inference.scheduler import RequestStream, Scheduler
from shoal.inference.service import ChatTokenizer, ModelStatus
from shoal.types.model_card import ModelCard


class SchedulerHandle:
    """A ModelHandle whose every request goes to one scheduler."""

    def __init__(
        self, card: ModelCard, tokenizer: ChatTokenizer, scheduler: Scheduler, context: int
    ) -> None:
        self.card = card
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.context_length = context
        self.instance_id = "inprocess"

    def generate(self, req: GenerationRequest) -> RequestStream:
        return self.scheduler.generate(req)


class OneModelService:
    """An InferenceService serving one card through `handle`; every other id is a 404."""

    def __init__(self, handle: SchedulerHandle) -> None:
        self.handle = handle

    def cards(self) -> list[ModelCard]:
        return [self.handle.card]

    def card(self, model_id: str) -> ModelCard:
        if model_id != self.handle.card.id:
            raise ModelNotFound(f"model {model_id!r} not found")
        return self.handle.card

    async def resolve(self, model_id: str) -> ModelCard:
        return self.card(model_id)

    def status(self, card: ModelCard) -> ModelStatus:
        return ModelStatus("ready")

    def active_requests(self) -> int:
        return self.handle.scheduler.load

    async def acquire(self, model_id: str) -> SchedulerHandle:
        self.card(model_id)
        return self.handle
