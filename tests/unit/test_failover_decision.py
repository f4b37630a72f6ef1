"""failover.next_chain as a table: after a chain broke, use / place / wait / give up."""

import pytest

from shoal.models.catalog import Catalog
from shoal.placer import why_not_runnable
from shoal.serving.failover import (
    SAME_CHAIN_AFTER_S,
    Decision,
    GiveUp,
    Place,
    Use,
    Wait,
    next_chain,
)
from shoal.state.model import InstanceRecord, NodeRecord, RunnerRecord, State
from shoal.types.ids import InstanceId, ModelId, NodeId
from shoal.types.instance import Instance, StagePlan
from shoal.types.runner import Failed, Loading, Ready, RunnerStatus
from tests.helpers.state import profile

SMOL = Catalog().get("smollm2-135m")  # 30 layers, gguf + safetensors: runnable here
# an architecture no engine here runs
GPT2 = (
    Catalog()
    .get("smollm2-135m")
    .model_copy(update={"id": ModelId("org/gpt2"), "architecture": "gpt2"})
)
BROKEN = ("a:1", "b:1")
READY = Ready()


def record(
    iid: str, addrs: tuple[str, ...], status: RunnerStatus = READY, model: str = SMOL.id
) -> InstanceRecord:
    """An instance of `model` over len(addrs) stages on nodes a, b, ...; each runner `status`."""
    n = len(addrs)
    cuts = [30 * i // n for i in range(n + 1)]
    stages = tuple(
        StagePlan(node_id=NodeId("ab"[i]), start=cuts[i], end=cuts[i + 1]) for i in range(n)
    )
    instance = Instance(
        instance_id=InstanceId(iid), model_id=ModelId(model), n_layers=30, stages=stages
    )
    runners = {
        i: RunnerRecord(
            node_id=stages[i].node_id,
            status=status,
            data_addr=addr if status.kind == "ready" else None,
        )
        for i, addr in enumerate(addrs)
    }
    return InstanceRecord(instance=instance, runners=runners)


def state(*records: InstanceRecord, nodes: tuple[str, ...] = ("a", "b")) -> State:
    return State(
        nodes={
            NodeId(n): NodeRecord(node_id=NodeId(n), profile=profile(n), joined_index=1)
            for n in nodes
        },
        instances={r.instance.instance_id: r for r in records},
    )


OLD = record("old", BROKEN)  # the broken chain, still shown ready
NEW = record("new", ("a:2", "b:2"))  # re-placed or restarted on other ports
LOADING = record("new", ("a:2", "b:2"), Loading(done=3, total=15))
FAILED = record("new", ("a:2", "b:2"), Failed(reason="out of memory"))
OTHER = record("other", ("c:1",), model="llama-3.2-1b")


@pytest.mark.parametrize(
    ("st", "elapsed", "placed", "expected"),
    [
        # another ready chain is used at once, whether or not the broken one still shows ready
        (state(NEW), 0.0, False, Use((NEW,))),
        (state(OLD, NEW), 0.0, False, Use((NEW,))),
        (state(OLD, NEW), 10.0, True, Use((NEW,))),
        # only the broken chain: wait for a change or until it is worth a retry, then retry it
        (state(OLD), 1.0, False, Wait(SAME_CHAIN_AFTER_S - 1.0)),
        (state(OLD), SAME_CHAIN_AFTER_S + 0.1, False, Use((OLD,))),
        # an instance that is not ready yet: wait for the state
        (state(LOADING), 0.0, False, Wait()),
        (state(LOADING), 60.0, True, Wait()),
        (state(FAILED), 0.0, False, Wait()),  # the master re-places a failed stage
        # nothing of the model left: place one, once
        (state(), 0.0, False, Place()),
        (state(OTHER), 0.0, False, Place()),  # another model's instance does not count
        (state(), 5.0, True, Wait()),
    ],
)
def test_next_chain(st: State, elapsed: float, placed: bool, expected: Decision) -> None:
    assert next_chain(st, SMOL, BROKEN, elapsed, placed=placed) == expected


def test_nowhere_to_place_gives_up_with_the_reason() -> None:
    decision = next_chain(state(nodes=()), SMOL, BROKEN, 0.0, placed=False)
    assert isinstance(decision, GiveUp)
    assert decision.reason.startswith("cannot be re-placed: ")


def test_a_model_no_engine_runs_gives_up() -> None:
    decision = next_chain(state(), GPT2, BROKEN, 0.0, placed=False)
    assert decision == GiveUp(f"cannot be re-placed: {why_not_runnable(GPT2)}")
    assert "architecture gpt2 is not supported" in decision.reason


def test_the_broken_chain_is_matched_by_its_addresses() -> None:
    # the same instance restarted on a new port is a fresh chain
    restarted = record("old", ("a:1", "b:9"))
    assert next_chain(state(restarted), SMOL, BROKEN, 0.0, placed=False) == Use((restarted,))
