"""Fetcher: peers first, the Hub only on a file's designated node, bounded retries (fakes)."""

import asyncio
from pathlib import Path
from typing import Any

import pytest

from shoal.models.hub import CorruptFile, RepoFile, RepoListing
from shoal.types.ids import InstanceId, ModelId, NodeId
from shoal.types.instance import Instance, StagePlan
from shoal.types.model_card import HubWeights, ModelCard
from shoal.worker.fetch import Fetcher

ME, PEER = NodeId("me"), NodeId("peer")
LISTING = RepoListing(
    "org/tiny",
    "c" * 40,
    (
        RepoFile("config.json", 10, None, "b" * 40),
        RepoFile("model.safetensors", 100, "a" * 64, None),
    ),
)
CARD = ModelCard(
    id=ModelId("org/tiny"),
    name="tiny",
    family="llama",
    architecture="llama",
    hf_repo="org/tiny",
    layers=2,
    hidden_size=64,
    heads=4,
    kv_heads=2,
    head_dim=16,
    vocab_size=128,
    context_length=256,
    storage_bytes=110,
    quantization="bf16",
    license="unknown",
    weights=(HubWeights(format="safetensors", repo="org/tiny"),),
)


class FakeHub:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.held: set[str] = set()
        self.downloads: list[str] = []
        self.corrupt_once: set[str] = set()

    def cached_listing(self, repo: str, revision: str = "main") -> RepoListing:
        return LISTING

    def local(self, listing: RepoListing, path: str) -> Path | None:
        return self.root / path if path in self.held else None

    def download(self, listing: RepoListing, path: str, progress: Any = None) -> Path:
        self.downloads.append(path)
        if path in self.corrupt_once:
            self.corrupt_once.discard(path)
            raise CorruptFile(f"{listing.repo}/{path}: sha256 mismatch")
        self.held.add(path)
        return self.root / path


class FakePeers:
    """A peer file server: holds `held`; `fetch` copies into the local FakeHub (or fails)."""

    def __init__(self, hub: FakeHub) -> None:
        self.local = hub
        self.held: set[str] = set()
        self.copied: list[str] = []
        self.bad = False

    async def listing(self, addr: str, repo: str, rev: str) -> tuple[RepoListing, set[str]]:
        return LISTING, set(self.held)

    async def fetch(self, addrs: list[str], repo: str, commit: str, file: RepoFile,
                    dest: Path, progress: Any = None) -> Path:  # fmt: skip
        self.copied.append(file.path)
        if self.bad:
            raise CorruptFile(f"{repo}/{file.path}: sha256 mismatch")
        self.local.held.add(file.path)
        return dest / file.path


def instance(*nodes: NodeId) -> Instance:
    stages = tuple(StagePlan(node_id=n, start=i, end=i + 1) for i, n in enumerate(nodes))
    return Instance(instance_id=InstanceId("i"), model_id=CARD.id, n_layers=2, stages=stages)


def fetcher(tmp_path: Path, peers: list[tuple[NodeId, str]]) -> tuple[Fetcher, FakeHub, FakePeers]:
    hub = FakeHub(tmp_path)
    files = FakePeers(hub)
    found = Fetcher(ME, hub, peers=lambda: peers, files=files, poll_s=0.01, wait_s=5)  # type: ignore[arg-type]
    return found, hub, files


async def test_the_designated_node_downloads_from_the_hub(tmp_path: Path) -> None:
    fetch, hub, peers = fetcher(tmp_path, [(PEER, "peer:1")])
    inst = instance(ME, PEER)
    await fetch.stage(CARD, inst, inst.stages[0])
    assert hub.downloads == ["config.json", "model.safetensors"] and peers.copied == []


async def test_another_node_waits_for_the_designated_one_and_copies(tmp_path: Path) -> None:
    fetch, hub, peers = fetcher(tmp_path, [(PEER, "peer:1")])
    inst = instance(PEER, ME)  # the peer's stage comes first: it takes the files from the Hub
    task = asyncio.create_task(fetch.stage(CARD, inst, inst.stages[1]))
    await asyncio.sleep(0.1)
    assert not task.done() and hub.downloads == []  # waiting for the peer
    peers.held = {"config.json", "model.safetensors"}
    await asyncio.wait_for(task, 5)
    assert hub.downloads == [] and peers.copied == ["config.json", "model.safetensors"]


@pytest.mark.parametrize(("mine", "downloads"), [("i2", False), ("i1", True)])
async def test_whole_instances_placed_at_once_take_each_file_from_the_hub_once(
    tmp_path: Path, mine: str, downloads: bool
) -> None:
    """Two whole-model instances of one model, on this node and on the peer: the instance
    first by id designates the downloader, so only one of the two nodes asks the Hub."""
    fetch, hub, peers = fetcher(tmp_path, [(PEER, "peer:1")])

    def whole(iid: str, node: NodeId) -> Instance:
        stages = (StagePlan(node_id=node, start=0, end=2),)
        return Instance(instance_id=InstanceId(iid), model_id=CARD.id, n_layers=2, stages=stages)

    ours, theirs = whole(mine, ME), whole("i1" if mine == "i2" else "i2", PEER)
    fetch.instances = lambda: (ours, theirs)
    task = asyncio.create_task(fetch.stage(CARD, ours, ours.stages[0]))
    await asyncio.sleep(0.1)
    if not downloads:  # the peer's instance comes first: wait for it, then copy
        assert not task.done() and hub.downloads == []
        peers.held = {"config.json", "model.safetensors"}
    await asyncio.wait_for(task, 5)
    assert (hub.downloads == ["config.json", "model.safetensors"]) is downloads
    assert (peers.copied == ["config.json", "model.safetensors"]) is not downloads


async def test_a_designated_node_that_is_gone_is_not_waited_for(tmp_path: Path) -> None:
    fetch, hub, peers = fetcher(tmp_path, [])  # PEER is not connected
    inst = instance(PEER, ME)
    await asyncio.wait_for(fetch.stage(CARD, inst, inst.stages[1]), 5)
    assert hub.downloads == ["config.json", "model.safetensors"]


async def test_a_peer_with_a_bad_copy_is_asked_once_then_the_hub(tmp_path: Path) -> None:
    fetch, hub, peers = fetcher(tmp_path, [(PEER, "peer:1")])
    peers.held, peers.bad = {"config.json", "model.safetensors"}, True
    inst = instance(ME, PEER)
    await asyncio.wait_for(fetch.stage(CARD, inst, inst.stages[0]), 5)
    assert peers.copied == ["config.json", "model.safetensors"]  # once each
    assert hub.downloads == ["config.json", "model.safetensors"]


async def test_a_corrupt_hub_download_is_tried_once_more(tmp_path: Path) -> None:
    fetch, hub, _ = fetcher(tmp_path, [])
    hub.corrupt_once = {"model.safetensors"}
    inst = Instance(
        instance_id=InstanceId("i"),
        model_id=CARD.id,
        n_layers=2,
        stages=(StagePlan(node_id=ME, start=0, end=2),),
    )
    path = await fetch.stage(CARD, inst, inst.stages[0])
    assert hub.downloads.count("model.safetensors") == 2 and path.name == "c" * 40


async def test_the_api_node_takes_only_config_and_tokenizer_files(tmp_path: Path) -> None:
    fetch, hub, _ = fetcher(tmp_path, [])
    await fetch.stage(CARD, None, None)
    assert hub.downloads == ["config.json"]


@pytest.fixture(autouse=True)
def _repo_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake hub keeps no directory tree: the stage's directory is root/commit."""
    monkeypatch.setattr("shoal.worker.fetch.repo_dir", lambda root, repo, commit: root / commit)
