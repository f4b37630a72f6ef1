"""The master's placer (shoal.placer): runnable cards, connected profiles, placing commands."""

import pytest

from shoal.models.catalog import Catalog
from shoal.placer import make_placer, profiles_of, why_not_runnable, why_unplaceable
from shoal.state.model import NodeRecord, State
from shoal.types.commands import PlaceModel
from shoal.types.ids import InstanceId, ModelId, NodeId, new_instance_id
from shoal.types.instance import Instance
from tests.helpers.state import GIB, profile

CATALOG = Catalog()
SMOL = ModelId("smollm2-135m")


def state(**free_gib: float) -> State:
    """Connected nodes with `free_gib` GiB of RAM each; a node named lost_* is disconnected."""
    return State(
        nodes={
            NodeId(n): NodeRecord(
                node_id=NodeId(n),
                profile=profile(n, ram_available=int(gib * GIB)),
                connected=not n.startswith("lost"),
                joined_index=1,
            )
            for n, gib in free_gib.items()
        }
    )


def command(**fields: object) -> PlaceModel:
    return PlaceModel(instance_id=InstanceId("i1"), model_id=SMOL, **fields)  # type: ignore[arg-type]


def test_profiles_of_takes_connected_profiled_nodes_only() -> None:
    st = state(a=8, lost_b=8)
    st = st.model_copy(
        update={"nodes": {**st.nodes, NodeId("c"): NodeRecord(node_id=NodeId("c"), joined_index=2)}}
    )
    assert [p.node_id for p in profiles_of(st)] == ["a"]


@pytest.mark.parametrize(
    ("model_id", "runnable"),
    # every seed architecture runs (granite, phi3, qwen3_moe, deepseek_v3 too); llama-3.2-1b's
    # MLX weights are read by torch and numpy
    [
        ("smollm2-135m", True),
        ("phi-3-mini", True),
        ("llama-3.2-1b", True),
        ("granite-3.3-2b", True),
        ("qwen3-30b", True),
        ("deepseek-v3.1-4bit", True),
        ("kimi-k2-thinking", True),
    ],
)
def test_why_not_runnable(model_id: str, runnable: bool) -> None:
    assert (why_not_runnable(CATALOG.get(model_id)) is None) is runnable


def test_why_unplaceable() -> None:
    card = CATALOG.get(SMOL)
    assert why_unplaceable(card, state(a=8)) is None
    assert why_unplaceable(card, state()) is not None  # no nodes
    assert why_unplaceable(card, state(lost_a=8)) is not None  # only a lost one


def test_the_placer_places_on_the_nodes_not_avoided() -> None:
    placer = make_placer(CATALOG)
    placed = placer(command(), state(a=8, b=8))
    assert isinstance(placed, Instance) and placed.instance_id == "i1"
    assert {s.node_id for s in placed.stages} <= {"a", "b"}
    again = placer(command(avoid=(NodeId("a"),)), state(a=8, b=8))
    assert isinstance(again, Instance) and {s.node_id for s in again.stages} == {"b"}


def test_the_placer_says_why_not() -> None:
    placer = make_placer(CATALOG)
    assert isinstance(placer(command(), state()), str)
    assert isinstance(placer(command(avoid=(NodeId("a"),)), state(a=8)), str)
    gpt2 = CATALOG.get(SMOL).model_copy(update={"id": ModelId("org/gpt2"), "architecture": "gpt2"})
    odd = PlaceModel(instance_id=InstanceId("i2"), model_id=gpt2.id, card=gpt2)
    reason = placer(odd, state(a=8))
    assert reason == why_not_runnable(gpt2)
    assert isinstance(reason, str) and "architecture gpt2 is not supported yet" in reason


@pytest.mark.parametrize(
    ("model_id", "free_gib", "stages"),
    # (the model, each node's free RAM, the stages it takes): torch holds int4 as Q4_1 (5 bits)
    [("phi-3-mini", 8, 1), ("granite-3.3-2b", 16, 1), ("qwen3-30b", 32, 1),
     ("qwen3-30b", 12, 2), ("deepseek-v3.1-4bit", 256, 2)],
)  # fmt: skip
def test_the_placer_places_the_new_architectures(
    model_id: str, free_gib: float, stages: int
) -> None:
    placer = make_placer(CATALOG)
    command = PlaceModel(instance_id=InstanceId("i4"), model_id=ModelId(model_id))
    placed = placer(command, state(a=free_gib, b=free_gib))
    assert isinstance(placed, Instance), placed
    assert len(placed.stages) == stages


def test_new_instance_ids_name_the_model_and_differ() -> None:
    ids = {new_instance_id("smollm2-135m") for _ in range(100)}
    assert len(ids) == 100
    assert all(i.startswith("smollm2-135m-") and len(i) == len("smollm2-135m-") + 8 for i in ids)


def test_a_card_sent_with_the_command_is_placed_and_kept_on_the_instance() -> None:
    """A Hub repo id is in no catalog: the card rides on the command and the instance."""
    card = CATALOG.get(SMOL).model_copy(update={"id": ModelId("org/tiny"), "hf_repo": "org/tiny"})
    placer = make_placer(CATALOG)
    placed = placer(
        PlaceModel(instance_id=InstanceId("i3"), model_id=card.id, card=card), state(a=8)
    )
    assert isinstance(placed, Instance) and placed.card == card
    assert placed.model_id == "org/tiny"


def test_instance_ids_of_repo_ids_are_one_path_segment() -> None:
    assert new_instance_id("org/name").startswith("org--name-")
