"""A stage's weight files onto this node: from the peers that hold them, else from the Hub.

A card names its weights as Hugging Face repos (`HubWeights`). A stage needs only some of a
repo's files: config and tokenizer files, the safetensors index, and the shards that hold its
layers (`models.hub.files_for_layers`). For each missing file the Fetcher asks, in order:

1. this node's Hub cache (`<data_dir>/hub`, complete and verified files only);
2. the peers' file servers (`net/files.py`, members only): every peer that holds the file
   serves a part of it, by byte range;
3. the Hub, but only if this node is the file's designated downloader: of every placed
   instance of the model that reads the same repo (ordered by instance id, so every node
   agrees), the node of the first stage that needs the file. The others wait for that node to
   hold it and copy it from there, so the Hub sends each file once per cluster, however many
   instances of the model are placed at once. A designated node that is gone, or does not get
   the file within `wait_s`, is not waited for.

Whatever the source, a file is checked against the repo listing (size, and sha256 of LFS files)
before it is used; progress is (bytes done, bytes to fetch) over the whole stage.
"""

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shoal.errors import ModelUnavailable, ShoalError
from shoal.models.catalog import find_local_weights
from shoal.models.hub import (
    INDEX_FILE,
    CorruptFile,
    Hub,
    RepoFile,
    RepoListing,
    files_for_layers,
    repo_dir,
    small_files,
)
from shoal.models.hub_card import card_from_config
from shoal.net.files import PeerFiles
from shoal.types.ids import NodeId
from shoal.types.instance import Instance, StagePlan
from shoal.types.model_card import HubWeights, ModelCard

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes to fetch)
Peers = Callable[[], Sequence[tuple[NodeId, str]]]  # connected peers and their file servers


def hub_weights(card: ModelCard, engine: str | None) -> HubWeights | None:
    """The first Hub source of the card that the engine reads (llamacpp: GGUF only; a
    source may name its engines); engine None: the first any engine here reads."""
    for where in card.weights:
        if not isinstance(where, HubWeights):
            continue
        if where.engines and engine is not None and engine not in where.engines:
            continue
        if engine == "llamacpp" and where.format != "gguf":
            continue
        return where
    return None


@dataclass(frozen=True)
class _Layers:
    """A stage's layers [start, end) of a model of n_layers."""

    start: int
    end: int
    n_layers: int


@dataclass
class _Progress:
    total: int = 0
    done: int = 0
    report: ProgressFn | None = None

    def add(self, n: int) -> None:
        self.done += n
        if self.report is not None:
            self.report(self.done, self.total)


@dataclass
class _Moved:
    """Bytes one transfer moved, from its (done, total) reports: the first report is what was on
    disk already (a resumed part), and a report below the last one is a transfer starting over."""

    last: int | None = None

    def delta(self, done: int) -> int:
        moved = 0 if self.last is None else max(0, done - self.last)
        self.last = done
        return moved


@dataclass
class Fetcher:
    """Fetches weight files for this node; one transfer of a file at a time."""

    me: NodeId
    hub: Hub
    peers: Peers = lambda: ()
    files: PeerFiles | None = None
    # every placed instance (the replicated state's): who else fetches the same files
    instances: Callable[[], Sequence[Instance]] = tuple
    wait_s: float = 600.0  # longest wait for a designated peer to finish a file
    poll_s: float = 0.5
    _locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    # bytes this process moved (resumed parts not counted again), for /metrics
    hub_bytes: int = field(default=0, init=False)
    peer_bytes: int = field(default=0, init=False)

    async def stage(
        self,
        card: ModelCard,
        instance: Instance | None,
        stage: StagePlan | None,
        progress: ProgressFn | None = None,
    ) -> Path:
        """The path the stage loads from (a file, or a repo directory holding its files).

        instance/stage None: only the config and tokenizer files (what an API node needs).
        """
        found = find_local_weights(card)
        engine = stage.engine if stage is not None else None
        if found is not None and (engine != "llamacpp" or found[0] == "gguf"):
            return found[1]
        where = hub_weights(card, engine)
        if where is None:
            raise ModelUnavailable(f"{card.id} has no weights on this node and no Hub source")
        listing = await self.listing(where.repo, where.revision)
        directory = repo_dir(self.hub.root, where.repo, listing.commit)
        readers = self._readers(card, instance, where.repo)
        if where.file is not None:
            await self._fetch_all(listing, [where.file], [(n, None) for n, _ in readers], progress)
            return directory / where.file
        small = small_files(listing) + ([INDEX_FILE] if listing.has(INDEX_FILE) else [])
        await self._fetch_all(listing, small, [(n, None) for n, _ in readers], None)
        if instance is None or stage is None:
            return directory
        needs = [
            (node, set(files_for_layers(listing, directory, s.start, s.end, s.n_layers)))
            for node, s in readers
        ]
        wanted = files_for_layers(listing, directory, stage.start, stage.end, instance.n_layers)
        await self._fetch_all(listing, wanted, needs, progress)
        return directory

    def _readers(
        self, card: ModelCard, instance: Instance | None, repo: str
    ) -> list[tuple[NodeId, _Layers]]:
        """The stages that read this repo, in the order that designates each file's Hub
        downloader: every placed instance of the model (by id; this one too), stages in order,
        those whose engine reads another source (a GGUF for llamacpp) left out."""
        if instance is None:
            return []
        same = {i.instance_id: i for i in self.instances() if i.model_id == instance.model_id}
        same[instance.instance_id] = instance
        return [
            (s.node_id, _Layers(s.start, s.end, i.n_layers))
            for _, i in sorted(same.items())
            for s in i.stages
            if (w := hub_weights(card, s.engine)) is not None and w.repo == repo
        ]

    async def card(self, repo: str, revision: str = "main") -> ModelCard:
        """The card of a Hub repo id, made from its config.json (from a peer, else the Hub)."""
        listing = await self.listing(repo, revision)
        await self._fetch_all(listing, ["config.json"], [], None)
        path = repo_dir(self.hub.root, repo, listing.commit) / "config.json"
        return card_from_config(repo, json.loads(path.read_text()), listing)

    async def listing(self, repo: str, revision: str = "main") -> RepoListing:
        """The repo's file list at a revision: cached here, else from a peer, else the Hub."""
        cached = self.hub.cached_listing(repo, revision)
        if cached is not None:
            return cached
        if self.files is not None:
            for _, addr in self.peers():
                with contextlib.suppress(Exception):
                    answer = await self.files.listing(addr, repo, revision)
                    if answer is not None:
                        self.hub.save_listing(answer[0], revision)
                        return answer[0]
        return await asyncio.to_thread(self.hub.listing, repo, revision)

    async def _fetch_all(
        self,
        listing: RepoListing,
        paths: Sequence[str],
        needs: Sequence[tuple[NodeId, set[str] | None]],
        report: ProgressFn | None,
    ) -> None:
        """Fetch the missing ones of paths; needs: the readers in order, each with the files it
        needs (None: all of them), which designates each file's Hub downloader."""
        missing = [p for p in dict.fromkeys(paths) if self.hub.local(listing, p) is None]
        progress = _Progress(sum(listing.file(p).size for p in missing), 0, report)
        if report is not None:
            report(0, progress.total)
        for path in missing:
            designated = next(
                (node for node, files in needs if files is None or path in files), self.me
            )
            await self._fetch(listing, listing.file(path), designated, progress)

    async def _fetch(
        self, listing: RepoListing, file: RepoFile, designated: NodeId, progress: _Progress
    ) -> None:
        lock = self._locks.setdefault((listing.commit, file.path), asyncio.Lock())
        async with lock:
            if self.hub.local(listing, file.path) is not None:  # another stage fetched it
                progress.add(file.size)
                return
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.wait_s
            failed: set[str] = set()  # peers that could not give a good copy: not asked again
            while True:
                holders = [a for a in await self._holders(listing, file.path) if a not in failed]
                if holders and self.files is not None:
                    try:
                        await self._from_peers(listing, file, holders, progress)
                        return
                    except (ShoalError, OSError) as exc:
                        log.warning("copying %s from peers failed: %s", file.path, exc)
                        failed.update(holders)
                        continue
                if designated == self.me or not self._connected(designated):
                    break
                if loop.time() > deadline:
                    log.warning(
                        "%s did not get %s in time: fetching it here", designated, file.path
                    )
                    break
                await asyncio.sleep(self.poll_s)
            await self._from_hub(listing, file, progress)

    def _connected(self, node: NodeId) -> bool:
        return any(n == node for n, _ in self.peers())

    async def _holders(self, listing: RepoListing, path: str) -> list[str]:
        """File-server addresses of the connected peers that hold the file, verified."""
        if self.files is None:
            return []
        files = self.files

        async def holds(addr: str) -> str | None:
            with contextlib.suppress(Exception):
                answer = await files.listing(addr, listing.repo, listing.commit)
                if answer is not None and path in answer[1]:
                    return addr
            return None

        found = await asyncio.gather(*(holds(a) for n, a in self.peers() if n != self.me))
        return [a for a in found if a is not None]

    async def _from_peers(
        self, listing: RepoListing, file: RepoFile, holders: list[str], progress: _Progress
    ) -> None:
        assert self.files is not None
        start = progress.done
        log.info("copying %s (%d B) from %d peer(s)", file.path, file.size, len(holders))
        counted = _Moved()

        def moved(done: int, _total: int) -> None:
            self.peer_bytes += counted.delta(done)
            progress.done = start
            progress.add(done)

        directory = repo_dir(self.hub.root, listing.repo, listing.commit)
        try:
            await self.files.fetch(holders, listing.repo, listing.commit, file, directory, moved)
        except BaseException:
            progress.done = start
            raise
        progress.done = start
        progress.add(file.size)

    async def _from_hub(self, listing: RepoListing, file: RepoFile, progress: _Progress) -> None:
        start = progress.done
        loop = asyncio.get_running_loop()
        log.info("downloading %s from the Hub (%s, %d B)", file.path, listing.repo, file.size)
        counted = _Moved()

        def moved(done: int, _total: int) -> None:
            def update() -> None:
                self.hub_bytes += counted.delta(done)
                progress.done = start
                progress.add(done)

            loop.call_soon_threadsafe(update)

        try:
            await asyncio.to_thread(self.hub.download, listing, file.path, moved)
        except CorruptFile as exc:  # deleted and named: one more try, then it is the Hub's
            log.warning("%s: fetching it again", exc)
            await asyncio.to_thread(self.hub.download, listing, file.path, moved)
        progress.done = start
        progress.add(file.size)
