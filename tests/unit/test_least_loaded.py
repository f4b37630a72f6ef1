"""Routing a model's requests: the least-loaded ready instance, and ties taken in turn."""

from shoal.serving.service import least_loaded
from shoal.state.model import InstanceRecord
from shoal.types.ids import InstanceId, ModelId, NodeId
from shoal.types.instance import Instance, StagePlan


def record(iid: str) -> InstanceRecord:
    stage = StagePlan(node_id=NodeId("a"), start=0, end=30)
    instance = Instance(
        instance_id=InstanceId(iid), model_id=ModelId("m"), n_layers=30, stages=(stage,)
    )
    return InstanceRecord(instance=instance)


READY = [record("i-b"), record("i-a"), record("i-c")]


def test_a_burst_that_sees_equal_loads_goes_round_every_instance() -> None:
    picks = [least_loaded(READY, lambda _: 0, turn).instance.instance_id for turn in range(6)]
    assert picks == ["i-a", "i-b", "i-c", "i-a", "i-b", "i-c"]


def test_the_least_loaded_instance_wins_whatever_the_turn() -> None:
    loads = {"i-a": 2, "i-b": 0, "i-c": 1}
    for turn in range(4):
        assert least_loaded(READY, lambda i: loads[i], turn).instance.instance_id == "i-b"
    loads["i-c"] = 0  # two tied: they alternate
    picks = {least_loaded(READY, lambda i: loads[i], t).instance.instance_id for t in range(4)}
    assert picks == {"i-b", "i-c"}
