"""The in-memory transport: delivery, membership, partitions, crashes, request/reply."""

import asyncio
from collections.abc import AsyncIterator

import pytest

from shoal.net.memory import MemoryNetwork, MemoryTransport
from shoal.net.transport import DuplicateNodeId, PeerEvent, Transport
from shoal.types.ids import NodeId

A, B, C = NodeId("12D3KooWA"), NodeId("12D3KooWB"), NodeId("12D3KooWC")
pytestmark = pytest.mark.timeout(10)


async def settle() -> None:
    """Let every delivery already posted (no delay) run."""
    for _ in range(5):
        await asyncio.sleep(0)


class Recorder:
    """Collects what one node receives."""

    def __init__(self, node: Transport) -> None:
        self.messages: list[bytes] = []
        self.events: list[PeerEvent] = []
        node.subscribe("global_events", self.messages.append)
        node.on_peer(self.events.append)

    def changes(self) -> list[tuple[NodeId, bool]]:
        return [(e.node_id, e.up) for e in self.events]


@pytest.fixture
def network() -> MemoryNetwork:
    return MemoryNetwork()


@pytest.fixture
async def nodes(network: MemoryNetwork) -> AsyncIterator[dict[NodeId, MemoryTransport]]:
    started = {n: MemoryTransport(network, n) for n in (A, B, C)}
    for node in started.values():
        await node.start()
    await settle()
    yield started
    for node in started.values():
        await node.close()


def test_is_a_transport(network: MemoryNetwork) -> None:
    node: Transport = MemoryTransport(network, A)
    assert node.node_id == A


async def test_delivery_to_all_others_in_order_never_to_self(
    nodes: dict[NodeId, MemoryTransport],
) -> None:
    rec = {n: Recorder(t) for n, t in nodes.items()}
    for i in range(50):
        await nodes[A].publish("global_events", b"%d" % i)
    await nodes[A].publish("commands", b"other topic")
    assert rec[B].messages == []  # never delivered synchronously: always via the loop
    await settle()
    expected = [b"%d" % i for i in range(50)]
    assert rec[B].messages == expected
    assert rec[C].messages == expected
    assert rec[A].messages == []


async def test_existing_peers_come_as_up_and_membership_follows_start_close(
    network: MemoryNetwork, nodes: dict[NodeId, MemoryTransport]
) -> None:
    rec = Recorder(nodes[A])
    await settle()
    assert sorted(rec.changes()) == [(B, True), (C, True)]
    assert nodes[A].peers() == {B, C}
    d = MemoryTransport(network, NodeId("12D3KooWD"))
    await d.start()
    await settle()
    assert d.peers() == {A, B, C}
    await nodes[B].close()
    await d.close()
    await settle()
    assert rec.changes()[2:] == [("12D3KooWD", True), (B, False), ("12D3KooWD", False)]
    assert nodes[A].peers() == {C}


async def test_partition_and_heal(
    network: MemoryNetwork, nodes: dict[NodeId, MemoryTransport]
) -> None:
    rec = {n: Recorder(t) for n, t in nodes.items()}
    await settle()
    for r in rec.values():
        r.events.clear()
    network.partition([A], [B, C])
    await settle()
    assert sorted(rec[A].changes()) == [(B, False), (C, False)]  # order within a cut: any
    assert rec[B].changes() == [(A, False)]
    assert nodes[B].peers() == {C}
    await nodes[A].publish("global_events", b"lost")
    await nodes[B].publish("global_events", b"b only to c")
    await settle()
    assert rec[A].messages == [] and rec[B].messages == []
    assert rec[C].messages == [b"b only to c"]
    with pytest.raises(TimeoutError):
        await nodes[A].request(B, "log", b"", timeout=0.5)
    network.heal()
    await settle()
    assert sorted(rec[A].changes()[2:]) == [(B, True), (C, True)]
    assert rec[B].changes() == [(A, False), (A, True)]
    assert nodes[A].peers() == {B, C}
    await nodes[A].publish("global_events", b"back")
    await settle()
    assert rec[B].messages == [b"back"]


async def test_kill_is_seen_as_down_and_the_dead_hear_nothing(
    network: MemoryNetwork, nodes: dict[NodeId, MemoryTransport]
) -> None:
    rec = {n: Recorder(t) for n, t in nodes.items()}
    await settle()
    network.kill(C)
    await nodes[A].publish("global_events", b"after the crash")
    await nodes[C].publish("global_events", b"from the grave")  # goes nowhere, raises nothing
    await settle()
    assert rec[A].changes()[-1] == (C, False)
    assert rec[B].changes()[-1] == (C, False)
    assert rec[C].messages == [] and rec[C].changes() == [(A, True), (B, True)]
    assert rec[B].messages == [b"after the crash"]
    # the id is free again: the crashed node can be restarted
    again = MemoryTransport(network, C)
    await again.start()
    await settle()
    assert rec[A].changes()[-1] == (C, True)
    await again.close()


async def test_request_reply(network: MemoryNetwork, nodes: dict[NodeId, MemoryTransport]) -> None:
    async def echo(payload: bytes) -> bytes:
        return b"echo:" + payload

    async def broken(payload: bytes) -> bytes:
        raise RuntimeError("boom")

    nodes[B].serve("log", echo)
    nodes[B].serve("broken", broken)
    assert await nodes[A].request(B, "log", b"1-5", timeout=1) == b"echo:1-5"
    with pytest.raises(TimeoutError):
        await nodes[A].request(B, "nothing", b"", timeout=1)
    with pytest.raises(TimeoutError, match="boom"):
        await nodes[A].request(B, "broken", b"", timeout=1)
    with pytest.raises(TimeoutError):
        await nodes[A].request(NodeId("12D3KooWNobody"), "log", b"", timeout=1)


async def test_request_times_out_on_a_slow_handler(nodes: dict[NodeId, MemoryTransport]) -> None:
    async def slow(payload: bytes) -> bytes:
        await asyncio.sleep(5)
        return b""

    nodes[B].serve("slow", slow)
    with pytest.raises(TimeoutError):
        await nodes[A].request(B, "slow", b"", timeout=0.05)


async def test_duplicate_id_refused(
    network: MemoryNetwork, nodes: dict[NodeId, MemoryTransport]
) -> None:
    twin = MemoryTransport(network, A)
    with pytest.raises(DuplicateNodeId, match=A):
        await twin.start()
    await settle()
    assert nodes[B].peers() == {A, C}  # the original is untouched
    await nodes[A].close()
    await twin.start()  # free once the original left
    await twin.close()


async def test_injected_delay_keeps_order(network: MemoryNetwork) -> None:
    network.delay_s = 0.05
    a, b = MemoryTransport(network, A), MemoryTransport(network, B)
    rec = Recorder(b)
    all_in = asyncio.Event()

    def count(_: bytes) -> None:
        if len(rec.messages) == 20:
            all_in.set()

    b.subscribe("global_events", count)
    await a.start()
    await b.start()
    loop = asyncio.get_running_loop()
    sent = loop.time()
    for i in range(20):
        await a.publish("global_events", b"%d" % i)
    await settle()
    assert rec.messages == []
    async with asyncio.timeout(2):
        await all_in.wait()
    assert loop.time() - sent >= 0.05
    assert rec.messages == [b"%d" % i for i in range(20)]
    await a.close()
    await b.close()


async def test_two_networks_do_not_mix() -> None:
    one, two = MemoryNetwork(), MemoryNetwork()
    a1, a2 = MemoryTransport(one, A), MemoryTransport(two, A)  # same id, different clusters
    b1 = MemoryTransport(one, B)
    rec = Recorder(b1)
    for node in (a1, a2, b1):
        await node.start()
    await a2.publish("global_events", b"cluster two")
    await a1.publish("global_events", b"cluster one")
    await settle()
    assert rec.messages == [b"cluster one"]
    assert a2.peers() == frozenset()
    for node in (a1, a2, b1):
        await node.close()


async def test_a_failing_handler_does_not_stop_the_others(
    nodes: dict[NodeId, MemoryTransport],
) -> None:
    got: list[bytes] = []

    def bad(payload: bytes) -> None:
        raise ValueError("bug")

    nodes[B].subscribe("commands", bad)
    nodes[B].subscribe("commands", got.append)
    await nodes[A].publish("commands", b"x")
    await nodes[A].publish("commands", b"y")
    await settle()
    assert got == [b"x", b"y"]
