"""Pulling a model's files into this machine's Hub cache: what to fetch, and fetching it.

`shoal pull` and the API's `POST /v1/pulls` (serving/pulls.py) both come here: a card's Hub
source (or a repo id), the files a layer range needs (config, tokenizer and template files, the
safetensors index, the shards holding those layers; a GGUF card's one file), each downloaded and
verified by `Hub.download` (continued by byte range where a `.part` is left). A file that fails
verification is fetched once more from the start.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import BadRequest, ModelNotFound
from shoal.models.catalog import Catalog
from shoal.models.hub import (
    INDEX_FILE,
    CorruptFile,
    Hub,
    RepoListing,
    files_for_layers,
    repo_dir,
    small_files,
)
from shoal.models.hub_card import card_from_config
from shoal.types.model_card import HubWeights, ModelCard

# (path, bytes of it done, its size), as each file moves
FileProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Source:
    """Where a model's files come from on the Hub: a repo, one file of it or all, a revision."""

    repo: str
    file: str | None
    revision: str


@dataclass(frozen=True)
class Pulled:
    """What a pull did: the files the model needs, how many were fetched now, where they are."""

    repo: str
    commit: str
    paths: tuple[str, ...]
    fetched: int
    directory: Path


def card_source(card: ModelCard, repo: str | None = None) -> Source:
    """The card's Hub source from `repo` (None: its first); BadRequest when it has none."""
    for where in card.weights:
        if isinstance(where, HubWeights) and repo in (None, where.repo):
            return Source(where.repo, where.file, where.revision)
    raise BadRequest(f"{card.id}'s card names no Hugging Face repo: nothing to pull", "model")


def source_of(model: str, catalog: Catalog) -> Source:
    """The Hub source a catalog id or a repo id (`org/name`) downloads from."""
    try:
        card = catalog.get(model)
    except ModelNotFound:
        if "/" not in model:
            raise
        return Source(model, None, "main")
    return card_source(card)


def parse_layers(spec: str) -> tuple[int, int]:
    """START-END (half-open) as a pair; BadRequest naming the form otherwise."""
    start, sep, end = spec.partition("-")
    if not (sep and start.isdigit() and end.isdigit() and int(start) < int(end)):
        raise BadRequest(f"layers {spec!r}: give START-END with START < END, e.g. 0-14", "layers")
    return int(start), int(end)


def paths_to_pull(
    hub: Hub, listing: RepoListing, file: str | None, layers: tuple[int, int] | None
) -> list[str]:
    """A card's one file, or the files of the layers (all of them), or every file of a repo
    that is no model directory."""
    if file is not None:
        return [*small_files(listing), file]
    if not listing.has("config.json"):
        return [f.path for f in listing.files]
    for path in [*small_files(listing), *([INDEX_FILE] if listing.has(INDEX_FILE) else [])]:
        hub.download(listing, path)
    directory = repo_dir(hub.root, listing.repo, listing.commit)
    config = json.loads((directory / "config.json").read_text())
    n_layers = card_from_config(listing.repo, config, listing).layers
    start, end = layers or (0, n_layers)
    if end > n_layers:
        raise BadRequest(f"layers {start}-{end}: {listing.repo} has {n_layers} layers", "layers")
    return files_for_layers(listing, directory, start, end, n_layers)


def missing(hub: Hub, listing: RepoListing, paths: list[str]) -> list[str]:
    """The paths not in the cache yet (verified)."""
    return [p for p in paths if hub.local(listing, p) is None]


def pull(
    hub: Hub,
    source: Source,
    *,
    revision: str | None = None,
    layers: tuple[int, int] | None = None,
    progress: FileProgress | None = None,
    planned: Callable[[list[str], RepoListing], None] | None = None,
) -> Pulled:
    """Fetch what the source's layers need that is not here yet (blocking). `planned` hears
    the files about to be fetched before the first byte moves."""
    listing = hub.listing(source.repo, revision or source.revision)
    paths = paths_to_pull(hub, listing, source.file, layers)
    todo = missing(hub, listing, paths)
    if planned is not None:
        planned(todo, listing)
    for path in todo:

        def moved(done: int, size: int, path: str = path) -> None:
            if progress is not None:
                progress(path, done, size)

        try:
            hub.download(listing, path, moved)
        except CorruptFile:  # a bad transfer: once more from the start
            hub.download(listing, path, moved)
    directory = repo_dir(hub.root, listing.repo, listing.commit)
    return Pulled(listing.repo, listing.commit, tuple(paths), len(todo), directory)
