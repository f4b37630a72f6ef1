"""The control-plane attacks of issue 16, replayed: each must change nothing and crash nothing.

In-process clusters (memory transport, the same signature and membership checks as real nodes)
take forged messages from a stranger with a valid key, from a member lying about who it is, and
from a removed member. Real `shoal node` processes on loopback take a raw zenoh session without
credentials, a holder of a leaked certificate who is no member, a node that knows only the
cluster name, and a removed node trying to come back.
"""

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from shoal.cluster import ClusterNode
from shoal.net.codec import Sealer
from shoal.net.identity import Identity
from shoal.net.memory import MemoryTransport
from shoal.net.transport import Topic
from shoal.types.commands import AdmitMember, RemoveMember
from shoal.types.events import IndexedEvent, InstanceDeleted, InstancePlaced, RunnerStatusChanged
from shoal.types.ids import InstanceId, ModelId, NodeId
from shoal.types.instance import Instance, StagePlan
from shoal.types.runner import Ready
from shoal.types.wire import Body, Campaign, CommandMessage, GlobalEvent, LocalEvent
from tests.helpers.cluster import MemoryCluster, memory_cluster

if TYPE_CHECKING:
    from collections.abc import Callable

    import zenoh

    from shoal.net.credentials import Credentials

pytestmark = pytest.mark.timeout(60)

IID = InstanceId("m-1")
EVIL_ADDR = "127.0.0.1:6666"


async def _with_instance(c: MemoryCluster) -> ClusterNode:
    """A converged 3-node cluster with one instance on n1, stage ready at its real address."""
    await c.until(c.converged)
    master = c.node("n0")
    stage = StagePlan(node_id=c.id("n1"), start=0, end=4)
    instance = Instance(instance_id=IID, model_id=ModelId("m"), n_layers=4, stages=(stage,))
    master.master.append([InstancePlaced(instance=instance)])
    await c.node("n1").report(
        RunnerStatusChanged(
            instance_id=IID, stage=0, node_id=c.id("n1"), status=Ready(), data_addr="10.0.0.1:1"
        )
    )
    await c.until(lambda: c.converged() and _addr(master) == "10.0.0.1:1")
    return master


def _addr(node: ClusterNode) -> str | None:
    record = node.state.instances.get(IID)
    return record.runners[0].data_addr if record and 0 in record.runners else None


async def _intruder(c: MemoryCluster, identity: Identity) -> MemoryTransport:
    transport = MemoryTransport(c.network, identity.node_id)
    await transport.start()
    return transport


def _ready_at(node: NodeId, addr: str) -> RunnerStatusChanged:
    return RunnerStatusChanged(
        instance_id=IID, stage=0, node_id=node, status=Ready(), data_addr=addr
    )


async def _settle(c: MemoryCluster) -> None:
    await asyncio.sleep(0.3)
    await c.until(c.converged)


async def test_a_stranger_cannot_reroute_prompts(tmp_path: Path) -> None:
    async with memory_cluster(tmp_path, 3) as c:
        master = await _with_instance(c)
        stranger = Identity.generate()
        evil = await _intruder(c, stranger)
        seal = Sealer(stranger, "test").seal
        victim = c.id("n1")
        forged: list[tuple[Topic, Body]] = [
            ("local_events", LocalEvent(origin=victim, seq=1, event=_ready_at(victim, EVIL_ADDR))),
            (
                "local_events",
                LocalEvent(origin=stranger.node_id, seq=2, event=_ready_at(victim, EVIL_ADDR)),
            ),
            (
                "commands",
                CommandMessage(command_id="x", command=AdmitMember(node_id=stranger.node_id)),
            ),
        ]
        for topic, body in forged:
            await evil.publish(topic, seal(body))
        # the same, claiming to come from the master, signed with the stranger's key
        raw = json.loads(seal(forged[0][1]))
        raw["sender"] = master.node_id
        await evil.publish("local_events", json.dumps(raw).encode())
        await _settle(c)
        assert all(_addr(n) == "10.0.0.1:1" for n in c.nodes.values())
        assert stranger.node_id not in master.state.members
        assert stranger.node_id not in master.state.nodes  # its liveliness is ignored too
        await evil.close()


async def test_a_member_cannot_speak_for_another(tmp_path: Path) -> None:
    async with memory_cluster(tmp_path, 3) as c:
        master = await _with_instance(c)
        liar = c.node("n2")  # a member: signed by n2, about n1's stage
        seal = Sealer(c.identities["n2"], "test").seal
        victim = c.id("n1")
        for body in (
            LocalEvent(origin=victim, seq=7, event=_ready_at(victim, EVIL_ADDR)),
            LocalEvent(origin=liar.node_id, seq=8, event=_ready_at(victim, EVIL_ADDR)),
            LocalEvent(
                origin=liar.node_id, seq=9, event=InstanceDeleted(instance_id=IID, reason="x")
            ),
        ):
            await liar.transport.publish("local_events", seal(body))
        await _settle(c)
        assert all(_addr(n) == "10.0.0.1:1" for n in c.nodes.values())
        assert IID in master.state.instances


async def test_a_forged_master_or_term_changes_nothing(tmp_path: Path) -> None:
    async with memory_cluster(tmp_path, 3) as c:
        master = await _with_instance(c)
        term = master.state.term
        stranger = Identity.generate()
        evil = await _intruder(c, stranger)
        seal = Sealer(stranger, "test").seal
        claim, huge = _master_claim(stranger, seal)
        for _ in range(3):
            await evil.publish("election_messages", seal(claim))
            await evil.publish("election_messages", json.dumps(huge).encode())
        entry = IndexedEvent(
            index=master.state.index + 1,
            term=2**53 - 1,
            prev_term=term,
            event=InstanceDeleted(instance_id=IID, reason="forged"),
        )
        await evil.publish("global_events", seal(GlobalEvent(entry=entry)))
        await _settle(c)
        assert c.masters() == {master.node_id} and master.state.term == term
        assert all(IID in n.state.instances for n in c.nodes.values())
        assert all(n.election.term < 2**53 - 1 for n in c.nodes.values())
        await evil.close()


async def test_a_forged_log_entry_to_one_follower_is_refused(tmp_path: Path) -> None:
    async with memory_cluster(tmp_path, 3) as c:
        master = await _with_instance(c)
        follower, other = c.node("n1"), c.node("n2")
        entry = IndexedEvent(
            index=master.state.index + 1,
            term=master.state.term,
            prev_term=master.state.term,
            event=InstanceDeleted(instance_id=IID, reason="forged"),
        )
        # a member that is not the master sends it, signed as itself
        await other.transport.publish(
            "global_events", Sealer(c.identities["n2"], "test").seal(GlobalEvent(entry=entry))
        )
        await _settle(c)
        assert follower.state == master.state and IID in follower.state.instances
        assert follower.state.model_dump_json() == other.state.model_dump_json()


async def test_a_removed_member_is_cut_off_and_cannot_come_back(tmp_path: Path) -> None:
    async with memory_cluster(tmp_path, 3) as c:
        master = await _with_instance(c)
        gone = c.id("n2")
        result = await master.command(RemoveMember(node_id=gone))
        assert result.ok
        await c.until(lambda: all(not n.trust(gone) for n in c.nodes.values() if n.node_id != gone))
        await c.until(lambda: not master.state.nodes[gone].connected)
        assert gone not in master.transport.peers()
        # its messages are dropped from now on
        seal = Sealer(c.identities["n2"], "test").seal
        await c.node("n2").transport.publish(
            "local_events", seal(LocalEvent(origin=gone, seq=99, event=_ready_at(gone, EVIL_ADDR)))
        )
        # and it cannot be admitted again (what enrolment asks on a join)
        again = await master.command(AdmitMember(node_id=gone))
        assert not again.ok and "removed" in again.message
        await asyncio.sleep(0.3)
        assert gone in master.state.revoked and gone not in master.state.members
        assert _addr(master) == "10.0.0.1:1"
        # a new master (n1 after n0 stops) keeps it out: the revocation is in the log
        await c.stop("n0")
        await c.until(lambda: c.node("n1").master.active)
        assert gone not in c.node("n1").transport.peers()


# --- real processes on loopback ------------------------------------------------------------------


def _session(port: int, creds: "Credentials | None", scheme: str = "tls") -> "zenoh.Session":
    """A plain zenoh session (no shoal code), with or without a certificate from some CA."""
    import zenoh

    settings: dict[str, object] = {
        "mode": "peer",
        "connect/endpoints": [f"{scheme}/127.0.0.1:{port}"],
        "listen/endpoints": [],
        "scouting/multicast/enabled": False,
        "connect/timeout_ms": 0,
        "connect/exit_on_failure": False,
    }
    if creds is not None:
        settings |= {
            "transport/link/tls/root_ca_certificate": str(creds.paths.ca_cert),
            "transport/link/tls/connect_private_key": str(creds.paths.node_key),
            "transport/link/tls/connect_certificate": str(creds.paths.node_cert),
            "transport/link/tls/enable_mtls": True,
            "transport/link/tls/verify_name_on_connect": False,
        }
    config = zenoh.Config()
    for key, value in settings.items():
        config.insert_json5(key, json.dumps(value))
    return zenoh.open(config)


def _recorder(into: list[bytes]) -> "Callable[[zenoh.Sample], None]":
    return lambda sample: into.append(sample.payload.to_bytes())


def _master_claim(
    stranger: Identity, seal: Callable[[Body], bytes]
) -> tuple[Campaign, dict[str, Any]]:
    """A stranger's claim to rule at the highest term the types take, and a copy of it sealed
    and then edited to 2**63 - 1 (which overflowed the journal before)."""
    claim = Campaign(
        node_id=stranger.node_id,
        term=2**53 - 1,
        last_index=2**53 - 1,
        last_term=2**53 - 1,
        started_at=0.0,
        master=stranger.node_id,
        quorum=True,
    )
    huge = json.loads(seal(claim))
    huge["body"]["term"] = huge["body"]["last_term"] = 2**63 - 1
    return claim, huge


def _forgeries(master: str, stranger: Identity) -> list[tuple[str, bytes]]:
    """What the intruders sent: a stage ready at their server, a master claim, huge terms."""
    seal = Sealer(stranger, "default").seal
    ready = LocalEvent(origin=NodeId(master), seq=1, event=_ready_at(NodeId(master), EVIL_ADDR))
    claim, huge = _master_claim(stranger, seal)
    unsigned = {"v": 2, "cluster": "default", "sender": master, "body": huge["body"]}
    return [
        ("local_events", seal(ready)),
        ("election_messages", seal(claim)),
        ("election_messages", json.dumps(huge).encode()),
        ("election_messages", json.dumps(unsigned).encode()),
        (
            "commands",
            seal(CommandMessage(command_id="x", command=RemoveMember(node_id=NodeId(master)))),
        ),
    ]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_intruders_on_the_wire_change_nothing(tmp_path: Path) -> None:
    """No credentials: no session. A leaked certificate but no membership: every message dropped."""
    import zenoh

    from shoal.net.credentials import Credentials
    from tests.helpers.nodes import start_cluster_node
    from tests.helpers.trust import signed_by
    from tests.helpers.wait import until

    node = start_cluster_node(tmp_path)
    try:
        node.wait_ready()
        until(lambda: node.get("/state")["master"] is not None, 10, "a cluster of one")
        before = node.get("/state")
        leaked = signed_by(Credentials.load(node.data), tmp_path / "leaked")  # a CA-signed cert
        stranger = Identity.load_or_create(tmp_path / "leaked")
        for creds, scheme in ((None, "tcp"), (None, "tls"), (leaked, "tls")):
            heard: list[bytes] = []
            session = _session(node.control_port, creds, scheme)
            try:
                session.declare_subscriber(
                    "shoal/**", _recorder(heard), allowed_origin=zenoh.Locality.REMOTE
                )
                time.sleep(1.0)
                nodes = list(session.liveliness().get("shoal/**", timeout=1.0))
                for topic, payload in _forgeries(node.node_id, stranger) * 3:
                    session.put(f"shoal/default/{topic}", payload)
                time.sleep(1.0)
            finally:
                session.close()
            seen = [r for r in nodes if r.ok is not None]
            if creds is None:  # zenoh's mutual TLS kept it out altogether
                assert seen == [] and heard == []
            else:  # in the mesh, but nobody takes its word
                assert seen and heard
        after = node.get("/state")
        assert node.get("/healthz")["status"] == "ok" and node.proc.poll() is None
        assert after["master"] == before["master"] == node.node_id
        assert after["term"] == before["term"] and after["members"] == before["members"]
        assert stranger.node_id not in after["nodes"]
        log = node.log()
        assert log.count(f"dropping a message from {stranger.node_id}: not a member") == 1
        assert "Traceback" not in log
    finally:
        node.stop()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_node_needs_a_token_and_a_removed_one_cannot_come_back(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    from tests.helpers.nodes import NodeProcess, start_cluster_node, start_node
    from tests.helpers.wait import until

    nodes: list[NodeProcess] = []
    try:
        founder = start_cluster_node(tmp_path)
        nodes.append(founder)
        member = start_cluster_node(tmp_path, [founder])
        nodes.append(member)
        # knows the cluster's name and address, but has no token: makes its own CA, sees nobody
        loner = start_node(tmp_path, ["--peers", f"127.0.0.1:{founder.control_port}",
                                      "--no-microbench", "--lease-ms", "1000"])  # fmt: skip
        nodes.append(loner)
        for n in nodes:
            n.wait_ready()
        until(lambda: len(founder.get("/state")["members"]) == 2, 30, "the member to join")
        time.sleep(2.0)
        assert loner.node_id not in founder.get("/state")["nodes"]
        assert set(loner.get("/state")["nodes"]) <= {loner.node_id}

        shoal = [sys.executable, "-m", "shoal.cli"]
        done = subprocess.run(
            [*shoal, "remove", member.node_id, "--data-dir", str(founder.data)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        until(lambda: member.node_id in founder.get("/state")["revoked"], 10, "the revocation")
        until(lambda: not founder.get("/state")["nodes"][member.node_id]["connected"], 10, "lost")

        # its old credentials: it runs, but nobody listens
        member.stop()
        member.start()
        member.wait_ready()
        time.sleep(2.0)
        assert not founder.get("/state")["nodes"][member.node_id]["connected"]

        # a fresh token, the same key: refused
        token = subprocess.run(
            [*shoal, "invite", "--data-dir", str(founder.data)],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout.strip()  # fmt: skip
        again = tmp_path / "again"
        again.mkdir()
        shutil.copy(member.data / "identity.key", again / "identity.key")
        member.stop()
        back = subprocess.run(
            [*shoal, "node", "--host", "127.0.0.1", "--cluster-host", "127.0.0.1",
             "--data-dir", str(again), "--join", token,
             "--port", "0", "--control-port", "0", "--enrol-port", "0"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert back.returncode == 1 and "was removed" in back.stderr, back.stderr[-2000:]
        # and the token it burned does not let anyone else in either
        used = subprocess.run(
            [*shoal, "node", "--host", "127.0.0.1", "--cluster-host", "127.0.0.1",
             "--data-dir", str(tmp_path / "other"),
             "--join", token, "--port", "0", "--control-port", "0", "--enrol-port", "0"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert used.returncode == 1 and "already used" in used.stderr, used.stderr[-2000:]
    finally:
        for n in nodes:
            n.stop()
