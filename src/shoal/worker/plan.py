"""What this node's worker should run, decided from the state alone (pure)."""

from dataclasses import dataclass

from shoal.state.model import State
from shoal.types.ids import InstanceId, NodeId
from shoal.types.instance import Instance, StagePlan


@dataclass(frozen=True)
class StageKey:
    """One stage of one instance: the unit a runner process serves."""

    instance_id: InstanceId
    stage: int

    def __str__(self) -> str:
        return f"{self.instance_id}/{self.stage}"


@dataclass(frozen=True)
class Assignment:
    """A stage this node should run, and where its output goes (None: back to the requester)."""

    key: StageKey
    instance: Instance
    plan: StagePlan
    next_addr: str | None
    last: bool


def plan(state: State, me: NodeId) -> dict[StageKey, Assignment]:
    """Every stage placed on `me`, with the next stage's data address once it is known."""
    wanted: dict[StageKey, Assignment] = {}
    for instance_id, record in state.instances.items():
        stages = record.instance.stages
        for i, stage in enumerate(stages):
            if stage.node_id != me:
                continue
            last = i == len(stages) - 1
            nxt = None if last else record.runners.get(i + 1)
            addr = nxt.data_addr if nxt is not None and nxt.status.kind == "ready" else None
            key = StageKey(instance_id, i)
            wanted[key] = Assignment(key, record.instance, stage, addr, last)
    return wanted
