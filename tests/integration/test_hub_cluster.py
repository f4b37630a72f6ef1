"""A Hub repo served by its id on a 2-node cluster: each node fetches only its stage's files,
the Hub sends each file once, peers copy from each other, and only members get files.

Real node processes on loopback; the Hub is the stand-in (tests/helpers/hub_server.py) serving a
tiny random MLX 4-bit llama made with mlx-lm, split over 4 files (one per layer; the embeddings
with the first, the norm and head with the last).
"""

import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shoal.models.hub import RepoListing, files_for_layers
from tests.helpers.hub_server import HubServer
from tests.helpers.mlx_repos import make_mlx_repo
from tests.helpers.nodes import NodeProcess, place, profiled, ready, start_cluster_node, start_node
from tests.helpers.wait import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = "shoal-test/tiny-llama-4bit"
LAYERS = 4
ARGS = ["--engine", "torch", "--quant", "int4", "--no-probe-engines"]
ASK = {"messages": [{"role": "user", "content": "hello there"}], "temperature": 0}


def chat(node: NodeProcess, model: str) -> str:
    body = {"model": model, "max_tokens": 12, **ASK}
    r = httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def held(node: NodeProcess, commit: str) -> set[str]:
    """The complete files a node holds of the repo (its Hub cache)."""
    folder = node.data / "hub" / REPO.replace("/", "--") / commit
    return {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("hub-cluster")
    repo = make_mlx_repo(tmp / "repo", 4, layers=LAYERS, files=LAYERS)
    with HubServer({REPO: repo}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
        nodes: list[NodeProcess] = []
        try:
            nodes.append(start_cluster_node(tmp, args=ARGS, env=env))
            nodes[0].wait_ready()
            nodes.append(start_cluster_node(tmp, [nodes[0]], args=ARGS, env=env))
            nodes[1].wait_ready()
            until(lambda: profiled(nodes), 60, "both nodes with their profiles")
            reference = start_node(tmp, ["--model-path", str(repo), *ARGS])
            nodes.append(reference)
            reference.wait_ready(model=repo.name, timeout=240)
            yield {"hub": hub, "repo": repo, "nodes": nodes[:2], "reference": reference, "tmp": tmp}
        finally:
            for node in nodes:
                node.stop()


def test_a_split_repo_fetches_only_each_stages_files_once_and_answers_as_the_whole(
    world: dict,
) -> None:
    hub: HubServer = world["hub"]
    a, b = world["nodes"]
    split = place(a, REPO, f"{a.node_id}:0-2,{b.node_id}:2-4")
    until(lambda: ready(a, split), 240, "the split instance")

    cache = a.data / "hub" / REPO.replace("/", "--")
    commit = (cache / "refs" / "main").read_text().strip()
    listing = RepoListing.from_json(
        json.loads((cache / commit / ".shoal/listing.json").read_text())
    )
    repo: Path = world["repo"]
    need_a = set(files_for_layers(listing, repo, 0, 2, LAYERS))
    need_b = set(files_for_layers(listing, repo, 2, 4, LAYERS))
    shards_a = {f for f in need_a if f.endswith(".safetensors")}
    shards_b = {f for f in need_b if f.endswith(".safetensors")}
    assert shards_a and shards_b and shards_a.isdisjoint(shards_b)
    # each node holds its stage's files and no other shard
    assert {f for f in held(a, listing.commit) if f.endswith(".safetensors")} == shards_a
    assert {f for f in held(b, listing.commit) if f.endswith(".safetensors")} == shards_b
    # the Hub sent each file once, whole, to the cluster (B took the small files from A)
    for f in need_a | need_b:
        gets = hub.downloads(REPO, f)
        assert sum(g.sent for g in gets) == listing.file(f).size, (f, gets)
    # the answers equal the whole model loaded from the same files on one node
    assert chat(a, REPO) == chat(b, REPO) == chat(world["reference"], world["repo"].name)
    world["split"], world["listing"] = split, listing


def test_with_the_hub_down_a_node_copies_from_its_peer(world: dict) -> None:
    hub: HubServer = world["hub"]
    a, b = world["nodes"]
    listing: RepoListing = world["listing"]
    before = len(hub.access())
    hub.down = True
    try:
        whole = place(b, REPO, f"{b.node_id}:0-4")  # B lacks layers 0-1: A has them
        until(lambda: ready(b, whole), 240, "the whole instance on B")
    finally:
        hub.down = False
    served = [x for x in hub.access()[before:] if x.status not in (0, 503)]
    assert served == [], served
    shards = {f.path for f in listing.files if f.path.endswith(".safetensors")}
    assert {f for f in held(b, listing.commit) if f.endswith(".safetensors")} == shards
    assert chat(b, whole) == chat(world["reference"], world["repo"].name)


def test_a_corrupted_file_is_found_and_fetched_again(world: dict) -> None:
    a, _ = world["nodes"]
    listing: RepoListing = world["listing"]
    folder = a.data / "hub" / REPO.replace("/", "--") / listing.commit
    victim = sorted(f for f in held(a, listing.commit) if f.endswith(".safetensors"))[0]
    data = bytearray((folder / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / victim).write_bytes(bytes(data))
    whole = place(a, REPO, f"{a.node_id}:0-4")
    until(lambda: ready(a, whole), 240, "the whole instance on A")
    assert (folder / victim).read_bytes() != bytes(data)  # replaced by a good copy
    assert victim in a.log()  # named when found
    assert chat(a, whole) == chat(world["reference"], world["repo"].name)


def test_only_members_get_files(world: dict) -> None:
    a, _ = world["nodes"]
    addr = next(
        n["profile"]["data_addr"]
        for n in a.get("/state")["nodes"].values()
        if n["node_id"] == a.node_id
    )
    listing: RepoListing = world["listing"]
    url = f"https://{addr}/v1/repos/{REPO}/{listing.commit}"
    stranger = ssl.create_default_context()
    stranger.check_hostname = False
    stranger.verify_mode = ssl.CERT_NONE  # no client certificate: the handshake must fail
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, verify=stranger, timeout=10)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{addr}/v1/repos/{REPO}/{listing.commit}", timeout=10)


def test_a_slow_download_shows_as_downloading_in_the_state_and_status(world: dict) -> None:
    """An 8-bit MLX repo through a throttled Hub: the runner reports Downloading(done, total)
    in bytes, `shoal status` shows it, and the instance then serves."""
    hub: HubServer = world["hub"]
    _, b = world["nodes"]
    repo = make_mlx_repo(world["tmp"] / "repo-8bit", 8, layers=LAYERS, files=LAYERS)
    name = "shoal-test/tiny-llama-8bit"
    hub.add(name, repo)
    hub.rate = 50_000  # bytes a second: about 16 s for the whole repo
    try:
        iid = place(b, name, f"{b.node_id}:0-4")
        seen: list[dict] = []

        def downloading() -> bool:
            found = [i for i in b.get("/v1/instances")["data"] if i["instance_id"] == iid]
            status = found[0]["runners"]["0"]["status"] if found else {}
            if status.get("kind") == "downloading":
                seen.append(status)
            return len(seen) >= 2

        until(downloading, 60, "Downloading reports")
        out = subprocess.run(
            [sys.executable, "-m", "shoal.cli", "status", "--api", b.url],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        hub.rate = None
    assert all(0 <= s["done"] <= s["total"] for s in seen) and seen[0]["total"] > 0
    assert out.returncode == 0, out.stderr
    assert "downloading" in out.stdout, out.stdout
    until(lambda: ready(b, iid), 240, "the 8-bit instance")
    assert chat(b, iid)


def test_a_node_started_with_a_repo_id_serves_it(world: dict) -> None:
    hub: HubServer = world["hub"]
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
    node = start_node(world["tmp"], ["--model", REPO, *ARGS], env=env)
    try:
        node.wait_ready(model=REPO, timeout=240)
        assert chat(node, REPO) == chat(world["reference"], world["repo"].name)
        listed = {m["id"] for m in node.get("/v1/models")["data"]}
        assert REPO in listed
    finally:
        node.stop()
