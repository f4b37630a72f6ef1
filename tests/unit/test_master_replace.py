"""The master re-places an instance whose stage failed, away from every node it failed on."""

from pathlib import Path

from shoal.master import Master
from shoal.models.catalog import Catalog
from shoal.net.codec import Sealer
from shoal.net.identity import Identity
from shoal.net.memory import MemoryNetwork, MemoryTransport
from shoal.placer import make_placer
from shoal.state.store import StateStore
from shoal.types.commands import PlaceModel
from shoal.types.events import InstancePlaced, NodeJoined, NodeProfiled, RunnerStatusChanged
from shoal.types.ids import InstanceId, ModelId, NodeId
from shoal.types.instance import Instance
from shoal.types.runner import Failed
from tests.helpers.state import profile


def fail(master: Master, instance: Instance) -> None:
    """Every stage of the instance reports that it cannot load."""
    master.append(
        [
            RunnerStatusChanged(
                instance_id=instance.instance_id,
                stage=i,
                node_id=stage.node_id,
                status=Failed(reason="cannot get the weights"),
            )
            for i, stage in enumerate(instance.stages)
        ]
    )


def test_a_model_that_fails_on_every_node_stops_being_re_placed(tmp_path: Path) -> None:
    identity = Identity.generate()
    a, b = identity.node_id, NodeId("b")
    placer = make_placer(Catalog())
    store = StateStore.open(tmp_path / "state.db")
    try:
        master = Master(
            store,
            MemoryTransport(MemoryNetwork(), a),
            Sealer(identity, "test"),
            lambda _: None,
            placer=placer,
        )
        master.become(1)
        master.append([NodeJoined(node_id=b)])
        master.append([NodeProfiled(profile=profile(n)) for n in (a, b)])
        command = PlaceModel(
            instance_id=InstanceId("i1"), model_id=ModelId("smollm2-135m"), layers=f"{a}:0-30"
        )
        first = placer(command, store.state)
        assert isinstance(first, Instance)
        master.append([InstancePlaced(instance=first)])

        fail(master, first)  # fails on a: re-placed on b, remembering a
        [second] = [r.instance for r in store.state.instances.values()]
        assert second.nodes == (b,) and second.avoid == (a,)

        fail(master, second)  # fails on b too: nowhere left, so it stops
        assert store.state.instances == {}
    finally:
        store.close()
