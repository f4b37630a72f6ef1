"""Instances: one deployment of one model over ordered stages, each a layer range on a node."""

from typing import Literal

from pydantic import Field, model_validator

from shoal.types.ids import InstanceId, ModelId, NodeId
from shoal.types.message import Message
from shoal.types.model_card import ModelCard

Policy = Literal["latency", "throughput"]


class StagePlan(Message):
    """Layers [start, end) of the model on node_id, run by `engine` on `device`.

    device: "cuda:1" (one GPU of the node), "cuda" (llamacpp: the node's GPUs, `gpu_split`),
    "cpu"; None: the node's default (its --device, else the best there is).
    cpu_layers: the stage's last layers run on the node's CPU, the first ones on `device`
    (a model a little too big for a GPU: llama.cpp's partial offload).
    gpu_split: llamacpp only, layers per GPU by index (its tensor_split)."""

    node_id: NodeId
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    engine: str = "torch"
    device: str | None = None
    cpu_layers: int = Field(default=0, ge=0)
    gpu_split: tuple[int, ...] = Field(default=(), strict=False)  # a list from JSON too

    @property
    def layers(self) -> int:
        return self.end - self.start

    @property
    def device_layers(self) -> int:
        """The layers that run on `device` (the rest, `cpu_layers`, on the CPU)."""
        return self.layers - self.cpu_layers

    @model_validator(mode="after")
    def _some_on_device(self) -> "StagePlan":
        if self.cpu_layers and self.cpu_layers >= self.end - self.start:
            raise ValueError("a stage's cpu_layers must leave at least one layer on its device")
        if any(n < 0 for n in self.gpu_split) or (
            self.gpu_split and sum(self.gpu_split) != self.end - self.start - self.cpu_layers
        ):
            raise ValueError("gpu_split must count the layers on the GPUs")
        return self

    def where(self) -> str:
        """The devices, for people: "cuda:0", "cuda:0 + cpu 3 layers", "cuda 10/12"."""
        text = self.device or "default device"
        if self.gpu_split:
            text += " " + "/".join(str(n) for n in self.gpu_split)
        return text + (f" + cpu {self.cpu_layers} layers" if self.cpu_layers else "")


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
