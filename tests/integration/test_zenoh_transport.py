"""ZenohTransport on loopback: static peers + gossip, no multicast, liveliness, request/reply.

Every session listens on 127.0.0.1 only and multicast scouting stays off. Sessions run over
mutual TLS with certificates from one test CA, as nodes do; sessions without them get nothing.
"""

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import zenoh

from shoal.net.credentials import Credentials
from shoal.net.transport import DuplicateNodeId, PeerEvent, Transport
from shoal.net.zenoh_transport import ZenohTransport, zenoh_config
from shoal.types.ids import NodeId
from tests.helpers.nodes import free_port
from tests.helpers.trust import members

A, B, C = NodeId("12D3KooWA"), NodeId("12D3KooWB"), NodeId("12D3KooWC")
LEASE_MS = 1000
pytestmark = pytest.mark.timeout(30)


CREDS: dict[str, Credentials] = {}  # "A", "B", "C": members of one CA; "X": another CA's


@pytest.fixture(autouse=True, scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    root = tmp_path_factory.mktemp("creds")
    CREDS.update(zip("ABC", members(root / "ours", 3), strict=True))
    CREDS["X"] = members(root / "theirs", 1)[0]
    yield
    CREDS.clear()


def endpoint(port: int) -> str:
    return f"tls/127.0.0.1:{port}"


class Watch:
    """Records one node's messages and peer events; waits on them without polling."""

    def __init__(self, node: Transport) -> None:
        self.node = node
        self.messages: list[bytes] = []
        self.events: list[PeerEvent] = []
        self._changed = asyncio.Condition()
        node.subscribe("global_events", lambda p: self._record(self.messages, p))
        node.on_peer(lambda e: self._record(self.events, e))

    def _record(self, into: list[Any], item: object) -> None:
        into.append(item)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def sees(self, peers: set[NodeId]) -> Callable[[], bool]:
        """A predicate: the peer events so far leave exactly these peers up."""

        def check() -> bool:
            up: set[NodeId] = set()
            for e in self.events:
                (up.add if e.up else up.discard)(e.node_id)
            return up == peers

        return check

    async def until(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(predicate)


def transport(
    node_id: NodeId, port: int, peers: list[int], cluster: str = "t", creds: str = ""
) -> ZenohTransport:
    return ZenohTransport(
        node_id,
        cluster,
        listen=[endpoint(port)],
        connect=[endpoint(p) for p in peers],
        multicast=False,
        lease_ms=LEASE_MS,
        tls=CREDS[creds or node_id[-1]],
    )


@pytest.fixture
async def trio() -> AsyncIterator[dict[NodeId, ZenohTransport]]:
    """A, then B and C that know only A as a static peer."""
    pa, pb, pc = free_port(), free_port(), free_port()
    nodes = {A: transport(A, pa, []), B: transport(B, pb, [pa]), C: transport(C, pc, [pa])}
    try:
        for node in nodes.values():
            await node.start()
        yield nodes
    finally:
        for node in nodes.values():
            await node.close()


def test_config_pins_what_matters() -> None:
    tcp = ["tcp/127.0.0.1:7000"], ["tcp/127.0.0.1:7001"]
    config = zenoh_config(listen=tcp[0], connect=tcp[1], lease_ms=1500)
    got = {
        key: config.get_json(key)
        for key in (
            "mode",
            "scouting/multicast/enabled",
            "scouting/gossip/enabled",
            "transport/link/tx/lease",
            "transport/link/tx/keep_alive",
            "connect/timeout_ms",
            "connect/exit_on_failure",
            "listen/endpoints",
            "connect/endpoints",
        )
    }
    assert got == {
        "mode": '"peer"',
        "scouting/multicast/enabled": "false",
        "scouting/gossip/enabled": "true",
        "transport/link/tx/lease": "1500",
        "transport/link/tx/keep_alive": "4",
        "connect/timeout_ms": "-1",
        "connect/exit_on_failure": "false",
        "listen/endpoints": '["tcp/127.0.0.1:7000"]',
        "connect/endpoints": '["tcp/127.0.0.1:7001"]',
    }
    assert (
        zenoh_config(listen=[], connect=[], multicast=True).get_json("scouting/multicast/enabled")
        == "true"
    )


async def test_gossip_membership_pubsub_and_liveliness(
    trio: dict[NodeId, ZenohTransport],
) -> None:
    watch = {n: Watch(t) for n, t in trio.items()}
    for n, w in watch.items():  # B and C know only A: they meet through gossip
        await w.until(w.sees({A, B, C} - {n}))
        assert trio[n].peers() == {A, B, C} - {n}
    await asyncio.sleep(0.1)
    for w in watch.values():
        assert len(w.events) == 2  # no repeated ups

    await trio[C].publish("global_events", b"from C")
    await watch[A].until(lambda: watch[A].messages == [b"from C"])
    await watch[B].until(lambda: watch[B].messages == [b"from C"])
    await trio[B].publish("commands", b"another topic")
    await trio[A].publish("global_events", b"from A")
    await watch[C].until(lambda: watch[C].messages == [b"from A"])
    assert watch[C].messages == [b"from A"]  # never its own

    closed_at = time.monotonic()
    await trio[B].close()
    for n in (A, C):
        await watch[n].until(watch[n].sees({A, B, C} - {n, B}), within=1.0)
        assert watch[n].events[-1] == PeerEvent(node_id=B, up=False)
    assert time.monotonic() - closed_at < 1.0


async def test_request_reply(trio: dict[NodeId, ZenohTransport]) -> None:
    async def log_range(payload: bytes) -> bytes:
        return b"entries " + payload

    async def broken(payload: bytes) -> bytes:
        raise RuntimeError("boom")

    trio[B].serve("log", log_range)
    trio[B].serve("broken", broken)
    watch = Watch(trio[A])
    await watch.until(lambda: B in trio[A].peers())
    assert await trio[A].request(B, "log", b"3-9", timeout=2) == b"entries 3-9"
    big = bytes(range(256)) * 1024  # 256 KiB: fragmented by zenoh, whole at the other end
    trio[C].serve("echo", lambda p: _echo(p))
    assert await trio[A].request(C, "echo", big, timeout=2) == big
    with pytest.raises(TimeoutError, match="boom"):
        await trio[A].request(B, "broken", b"", timeout=2)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await trio[A].request(B, "unknown", b"", timeout=2)
    with pytest.raises(TimeoutError):
        await trio[A].request(NodeId("12D3KooWNobody"), "log", b"", timeout=2)
    assert time.monotonic() - started < 1.0  # no queryable / an error reply: no waiting out


async def _echo(payload: bytes) -> bytes:
    return payload


async def test_duplicate_id_refused() -> None:
    pa, pb = free_port(), free_port()
    original = transport(A, pa, [])
    twin = transport(A, pb, [pa])
    await original.start()
    try:
        with pytest.raises(DuplicateNodeId, match="copied data dir"):
            await twin.start()
        other = transport(B, pb, [pa])  # the twin released its port
        await other.start()
        await Watch(other).until(lambda: other.peers() == {A})
        await other.close()
    finally:
        await twin.close()
        await original.close()


async def test_burst_arrives_complete_and_in_order() -> None:
    pa, pb = free_port(), free_port()
    a, b = transport(A, pa, []), transport(B, pb, [pa])
    watch = Watch(b)
    await a.start()
    await b.start()
    try:
        await Watch(a).until(lambda: B in a.peers())
        payloads = [b"%04d" % i + bytes(2048) for i in range(200)]
        await asyncio.gather(*(a.publish("global_events", p) for p in payloads))
        await watch.until(lambda: len(watch.messages) == 200)
        assert watch.messages == payloads
    finally:
        await a.close()
        await b.close()


async def test_static_peer_started_later_is_reached() -> None:
    pa, pb = free_port(), free_port()
    b = transport(B, pb, [pa])  # A is not up yet: B keeps retrying in the background
    a = transport(A, pa, [])
    watch = Watch(b)
    await b.start()
    try:
        await asyncio.sleep(0.5)
        await a.start()
        await watch.until(lambda: b.peers() == {A}, within=4.0)
    finally:
        await a.close()
        await b.close()


async def test_clusters_do_not_mix() -> None:
    pa, pb = free_port(), free_port()
    a = transport(A, pa, [], cluster="one")
    b = transport(B, pb, [pa], cluster="two")
    watch = Watch(b)
    await a.start()
    await b.start()
    try:
        await a.publish("global_events", b"one")
        await asyncio.sleep(0.2)
        assert watch.messages == [] and b.peers() == frozenset()
    finally:
        await a.close()
        await b.close()


async def test_no_threads_left_after_close() -> None:
    before = set(threading.enumerate())
    pa, pb = free_port(), free_port()
    a, b = transport(A, pa, []), transport(B, pb, [pa])
    await a.start()
    await b.start()
    b.serve("echo", _echo)
    assert await a.request(B, "echo", b"x", timeout=2) == b"x"
    await a.publish("global_events", b"x")
    await a.close()
    await a.close()  # idempotent
    await b.close()
    with pytest.raises(RuntimeError):
        await a.publish("global_events", b"too late")
    leftover = set(threading.enumerate()) - before
    assert [t.name for t in leftover if not t.name.startswith("asyncio_")] == []


def test_tls_config_is_mutual_and_refuses_plain_endpoints() -> None:
    creds = CREDS["A"]
    config = zenoh_config(listen=[endpoint(7000)], connect=[], tls=creds)
    tls = json.loads(config.get_json("transport/link/tls"))
    assert tls["enable_mtls"] is True
    assert tls["root_ca_certificate"] == str(creds.paths.ca_cert)
    assert tls["listen_certificate"] == tls["connect_certificate"] == str(creds.paths.node_cert)
    with pytest.raises(ValueError, match="tls/"):
        zenoh_config(listen=["tcp/127.0.0.1:7000"], connect=[], tls=creds)


def _outsider(connect: str, creds: Credentials | None, ca: Credentials | None) -> zenoh.Session:
    """A plain zenoh session (no shoal code): tcp, or TLS with someone's CA and certificate."""
    settings: dict[str, Any] = {
        "mode": "peer",
        "connect/endpoints": [connect],
        "scouting/multicast/enabled": False,
        "connect/timeout_ms": 0,
        "connect/exit_on_failure": False,
    }
    if ca is not None:
        settings |= {
            "transport/link/tls/root_ca_certificate": str(ca.paths.ca_cert),
            "transport/link/tls/verify_name_on_connect": False,
        }
    if creds is not None:
        settings |= {
            "transport/link/tls/connect_private_key": str(creds.paths.node_key),
            "transport/link/tls/connect_certificate": str(creds.paths.node_cert),
            "transport/link/tls/enable_mtls": True,
        }
    config = zenoh.Config()
    for key, value in settings.items():
        config.insert_json5(key, json.dumps(value))
    return zenoh.open(config)


OUTSIDERS = {
    "plain tcp": ("tcp", None, None),
    "tls, no certificate": ("tls", None, "A"),
    "another CA's certificate": ("tls", "X", "X"),
    "another CA's certificate, trusting ours": ("tls", "X", "A"),
}


@pytest.mark.parametrize("how", OUTSIDERS.values(), ids=OUTSIDERS.keys())
async def test_a_session_without_a_members_certificate_gets_nothing(
    how: tuple[str, str | None, str | None],
) -> None:
    scheme, cert, ca = how
    pa, pb = free_port(), free_port()
    a, b = transport(A, pa, []), transport(B, pb, [pa])
    watch = Watch(a)
    await a.start()
    await b.start()
    heard: list[bytes] = []
    outsider = await asyncio.to_thread(
        _outsider,
        f"{scheme}/127.0.0.1:{pa}",
        CREDS[cert] if cert else None,
        CREDS[ca] if ca else None,
    )
    try:
        await watch.until(lambda: B in a.peers())
        sub = outsider.declare_subscriber(
            "shoal/**",
            lambda s: heard.append(s.payload.to_bytes()),
            allowed_origin=zenoh.Locality.REMOTE,  # not its own put
        )
        replies = await asyncio.to_thread(
            lambda: list(outsider.liveliness().get("shoal/**", timeout=1.0))
        )
        outsider.put("shoal/t/global_events", b"forged")
        outsider.liveliness().declare_token("shoal/t/nodes/12D3KooWIntruder")
        await b.publish("global_events", b"secret")
        await watch.until(lambda: b"secret" in watch.messages)
        await asyncio.sleep(0.3)
        assert [r for r in replies if r.ok is not None] == []  # it saw no node
        assert heard == []  # it read nothing
        assert watch.messages == [b"secret"] and a.peers() == {B}  # it published nothing
        sub.undeclare()
    finally:
        await asyncio.to_thread(outsider.close)
        await a.close()
        await b.close()


@pytest.mark.parametrize("cluster", ["", "a/b", "a*", "$x", "a?b", "a#b"])
def test_cluster_must_be_one_key_chunk(cluster: str) -> None:
    with pytest.raises(ValueError):
        transport(A, 1, [], cluster=cluster)
