"""A shard: the half-open layer range [start, end) of one model that one stage runs."""

from pydantic import Field, model_validator

from shoal.types.ids import ModelId
from shoal.types.message import Document


class Shard(Document):
    """Layers [start, end) of n_layers; the first shard holds embeddings, the last the head."""

    model_id: ModelId
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    n_layers: int = Field(gt=0)

    @model_validator(mode="after")
    def _check_range(self) -> "Shard":
        if not self.start < self.end <= self.n_layers:
            raise ValueError(f"bad layer range [{self.start}, {self.end}) of {self.n_layers}")
        return self

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.n_layers

    @property
    def is_whole(self) -> bool:
        return self.is_first and self.is_last

    @classmethod
    def whole(cls, model_id: ModelId, n_layers: int) -> "Shard":
        return cls(model_id=model_id, start=0, end=n_layers, n_layers=n_layers)

    def __str__(self) -> str:
        return f"{self.model_id}[{self.start}:{self.end})/{self.n_layers}"
