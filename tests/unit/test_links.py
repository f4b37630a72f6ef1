"""Round trips to peers: measured in the background, in the profile, and costed by placement."""

import pytest

from shoal.placer import make_placer
from shoal.profile.actor import changed
from shoal.profile.links import LinkMonitor, hop_seconds, links_moved
from shoal.types.ids import NodeId
from shoal.types.profile import Link
from tests.helpers.state import profile

pytestmark = pytest.mark.timeout(30)

A, B, C = NodeId("a"), NodeId("b"), NodeId("c")


async def test_the_monitor_keeps_each_answering_peers_median() -> None:
    answers = {A: [0.4, 0.3, 9.0], B: [], C: [1.0, 1.2, 1.1]}

    async def ping(peer: NodeId, count: int) -> tuple[list[float], int]:
        assert count == 3
        if peer == C and answers[C] == ["boom"]:
            raise ConnectionError("gone")
        return answers[peer], count - len(answers[peer])

    monitor = LinkMonitor(ping, lambda: [C, A, B])
    assert monitor.links() == ()
    await monitor.measure()
    assert monitor.links() == (Link(peer=A, rtt_ms=0.4), Link(peer=C, rtt_ms=1.1))  # B lost all
    answers[C] = ["boom"]  # type: ignore[list-item]
    await monitor.measure()
    assert [link.peer for link in monitor.links()] == [A]


@pytest.mark.parametrize(
    ("old", "new", "moved"),
    [([(A, 0.4)], [(A, 1.9)], False),  # noise: under 2 ms
     ([(A, 3.0)], [(A, 5.5)], False),  # not doubled
     ([(A, 3.0)], [(A, 6.5)], True),
     ([(A, 8.0)], [(A, 3.0)], True),  # more than halved
     ([(A, 0.4)], [(A, 0.4), (B, 0.4)], True),  # a new peer
     ([(A, 0.4)], [], True)],
)  # fmt: skip
def test_links_count_as_changed_past_their_noise(
    old: list[tuple[NodeId, float]], new: list[tuple[NodeId, float]], moved: bool
) -> None:
    def links(pairs: list[tuple[NodeId, float]]) -> tuple[Link, ...]:
        return tuple(Link(peer=p, rtt_ms=ms) for p, ms in pairs)

    assert links_moved(links(old), links(new)) is moved
    before = profile("n", links=links(old))
    assert changed(before, before.model_copy(update={"links": links(new)})) is moved


def test_placement_costs_a_hop_at_half_the_measured_round_trip() -> None:
    from shoal.models.catalog import Catalog
    from shoal.state.model import NodeRecord, State
    from shoal.types.commands import PlaceModel
    from shoal.types.ids import InstanceId, ModelId

    far = (Link(peer=B, rtt_ms=40.0),)
    a = profile("a", links=far, ram_available=600 << 20, memory_bandwidth_gbs=20.0)
    b = profile("b", links=(Link(peer=A, rtt_ms=40.0),), ram_available=600 << 20,
                memory_bandwidth_gbs=20.0)  # fmt: skip
    assert hop_seconds([a, b]) == {(A, B): 0.02, (B, A): 0.02}
    records = {n.node_id: NodeRecord(node_id=n.node_id, joined_index=1, connected=True, profile=n)
               for n in (a, b)}  # fmt: skip
    state = State(nodes=records)
    command = PlaceModel(model_id=ModelId("smollm2-135m"), instance_id=InstanceId("i"))
    placed = make_placer(Catalog())(command, state)
    assert not isinstance(placed, str), placed
    # two stages, two hops of 20 ms a token: under 25 tok/s whatever the layers take
    assert len(placed.stages) == 2 and placed.predicted_tok_s is not None
    assert placed.predicted_tok_s < 25
