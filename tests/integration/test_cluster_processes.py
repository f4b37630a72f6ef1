"""Real `shoal node` processes on loopback, joined by --peers: converge, fail over, catch up."""

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.nodes import NodeProcess, start_cluster_node
from tests.helpers.wait import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def converged(nodes: list[NodeProcess]) -> bool:
    states = [n.get("/state") for n in nodes]
    return (
        len({str(s) for s in states}) == 1
        and states[0]["master"] is not None
        and len(states[0]["nodes"]) == len(nodes)
        and all(r["connected"] and r["profile"] for r in states[0]["nodes"].values())
    )


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[list[NodeProcess]]:
    nodes: list[NodeProcess] = []
    try:
        first = start_cluster_node(tmp_path)
        nodes.append(first)
        nodes += [start_cluster_node(tmp_path, [first]) for _ in range(2)]
        for node in nodes:
            node.wait_ready()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


# what a node says of a model for its own machine: its Hub cache and its view of the memory
HERE = ("availability", "availability_kind", "download_bytes")


def catalog(node: NodeProcess) -> list[dict]:
    """The node's /v1/models without the fields about the node's own machine."""
    return [{k: v for k, v in m.items() if k not in HERE} for m in node.get("/v1/models")["data"]]


def test_three_nodes_converge_and_survive_a_master_kill(trio: list[NodeProcess]) -> None:
    until(lambda: converged(trio), 30, "three nodes to converge")
    ids = {n.node_id: n for n in trio}
    assert all(i.startswith("12D3KooW") for i in ids)
    # every node lists the same models (a reason's numbers follow the profiles: let them settle)
    until(lambda: len({repr(catalog(n)) for n in trio}) == 1, 10, "the nodes' catalogs to agree")
    nodes_view = trio[1].get("/v1/nodes")
    assert sum(r["is_master"] for r in nodes_view["nodes"]) == 1

    master = ids[trio[0].get("/state")["master"]]
    survivors = [n for n in trio if n is not master]
    before = master.get("/log")["entries"]
    master.kill9()
    took = until(
        lambda: (
            all(s.get("/state")["master"] not in (None, master.node_id) for s in survivors)
            and survivors[0].get("/state")["master"] == survivors[1].get("/state")["master"]
        ),
        10,
        "a new master",
    )
    assert took <= 3.0, f"new master after {took:.2f} s"
    until(lambda: converged_without(survivors, master), 10, "survivors to agree")
    after = survivors[0].get("/log")["entries"]
    assert after[: len(before)] == before  # no event lost or rewritten
    state = survivors[0].get("/state")
    assert state["nodes"][master.node_id]["connected"] is False

    master.start()  # same data dir, same ports: catches up from its journal and the master
    master.wait_ready()
    until(lambda: converged(trio), 30, "the restarted node to catch up")
    assert trio[0].get("/log")["entries"] == trio[2].get("/log")["entries"]


def converged_without(nodes: list[NodeProcess], gone: NodeProcess) -> bool:
    states = [n.get("/state") for n in nodes]
    return len({str(s) for s in states}) == 1 and states[0]["master"] != gone.node_id


def test_bad_messages_are_dropped_and_logged_once(tmp_path: Path) -> None:
    import json

    import zenoh

    from shoal.net.credentials import Credentials
    from shoal.types.wire import PROTOCOL_VERSION
    from tests.helpers.trust import signed_by

    node = start_cluster_node(tmp_path)
    try:
        node.wait_ready()
        until(lambda: node.get("/state")["master"] is not None, 10, "a cluster of one")
        # a holder of a certificate from the cluster's CA (else zenoh's TLS keeps it out)
        creds = signed_by(Credentials.load(node.data), tmp_path / "sender")
        config = zenoh.Config()
        for key, value in {
            "mode": "peer",
            "connect/endpoints": [f"tls/127.0.0.1:{node.control_port}"],
            "listen/endpoints": [],
            "scouting/multicast/enabled": False,
            "transport/link/tls/root_ca_certificate": str(creds.paths.ca_cert),
            "transport/link/tls/connect_private_key": str(creds.paths.node_key),
            "transport/link/tls/connect_certificate": str(creds.paths.node_cert),
            "transport/link/tls/enable_mtls": True,
            "transport/link/tls/verify_name_on_connect": False,
        }.items():
            config.insert_json5(key, json.dumps(value))
        good = {"v": PROTOCOL_VERSION, "cluster": "default", "sender": "12D3KooWEvil", "body": {}}
        payloads = [
            b"\x00\xff not json",
            b"x" * (2 << 20),
            json.dumps({**good, "v": 99}).encode(),
            json.dumps({**good, "body": {"kind": "campaign", "node_id": 5}}).encode(),
        ]
        with zenoh.open(config) as session:
            time.sleep(1.0)  # let the session connect
            for topic in ("global_events", "local_events", "commands", "election_messages"):
                for payload in payloads * 3:
                    session.put(f"shoal/default/{topic}", payload)
            time.sleep(1.0)
        assert node.get("/healthz")["status"] == "ok"
        log = node.log()
        assert log.count("not JSON") == 1
        assert log.count("1048576") == 1  # the oversized one, with the limit
        assert log.count("protocol v99") == 1
        assert log.count("invalid message") == 1
        assert node.get("/state")["master"] == node.node_id
    finally:
        node.stop()


def test_a_copied_data_dir_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    from tests.helpers.nodes import CLUSTER_FLAGS, free_port

    node = start_cluster_node(tmp_path)
    try:
        node.wait_ready()
        until(lambda: node.get("/state")["master"] is not None, 10, "a cluster of one")
        copy = tmp_path / "copy"
        shutil.copytree(node.data, copy, ignore=shutil.ignore_patterns("node.log", "state.db*"))
        twin = subprocess.run(
            [
                sys.executable,
                "-m",
                "shoal.cli",
                "node",
                "--host",
                "127.0.0.1",
                "--cluster-host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                "--control-port",
                str(free_port()),
                "--data-dir",
                str(copy),
                "--enrol-port",
                str(free_port()),
                "--peers",
                f"127.0.0.1:{node.control_port}",
                *CLUSTER_FLAGS,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert twin.returncode == 1
        last = twin.stderr.strip().splitlines()[-1]
        assert last.startswith("shoal: another node with id") and node.node_id in last
        assert node.get("/healthz")["status"] == "ok"
    finally:
        node.stop()
