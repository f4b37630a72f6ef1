"""Instances: one deployment of one model over ordered stages, each a layer range on a node."""

from typing import Literal

from pydantic import Field, model_validator

from shoal.types.ids import InstanceId, ModelId, NodeId
from shoal.types.message import Message
from shoal.types.model_card import ModelCard

Policy = Literal["latency", "throughput"]


class StagePlan(Message):
    """Layers [start, end) of the model on node_id, run by `engine`."""

    node_id: NodeId
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    engine: str = "torch"

    @property
    def layers(self) -> int:
        return self.end - self.start


class Instance(Message):
    """A model placed over stages that together cover [0, n_layers) in order."""

    instance_id: InstanceId
    model_id: ModelId
    n_layers: int = Field(gt=0)
    stages: tuple[StagePlan, ...] = Field(min_length=1)
    policy: Policy = "latency"
    predicted_tok_s: float | None = None
    # The card itself when the model is not in every node's catalog (a Hugging Face repo id
    # resolved by the node that placed it): workers fetch and load by it.
    card: ModelCard | None = None
    # Nodes where an earlier incarnation of this instance failed to run a stage: re-placement
    # keeps away from all of them, so a model no node can load stops instead of bouncing.
    avoid: tuple[NodeId, ...] = ()

    @model_validator(mode="after")
    def _contiguous(self) -> "Instance":
        at = 0
        for stage in self.stages:
            if stage.start != at or stage.end <= stage.start:
                raise ValueError(f"stages must tile [0, {self.n_layers}) in order")
            at = stage.end
        if at != self.n_layers:
            raise ValueError(f"stages cover [0, {at}), the model has {self.n_layers} layers")
        return self

    @property
    def nodes(self) -> tuple[NodeId, ...]:
        return tuple(s.node_id for s in self.stages)
