"""Whether a model runs here: now, after a download of N GB, or not at all, and why.

`availability` is the decision, a pure function of the card, the architectures and engines there
are, what this machine holds of each weights source, and the memory the cluster offers each
engine. `local_copies` and `machine_memory` gather the inputs on this machine (the file system and
psutil, never the network); the caller works out the memory a model needs (placement's memory
model), since models sit below placement.
"""

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from shoal.models.catalog import locate
from shoal.types.model_card import HubWeights, ModelCard, WeightsLocation

log = logging.getLogger(__name__)

# Engines that read each format. The torch, numpy and native engines read GGUF files, Hugging
# Face safetensors and MLX's quantized safetensors; shoal's MLX engine reads what a
# SafetensorsSource gives it; llama.cpp reads whole GGUF files only.
FORMAT_READERS: dict[str, frozenset[str]] = {
    "gguf": frozenset({"llamacpp", "torch", "numpy", "native"}),
    "safetensors": frozenset({"torch", "numpy", "native", "mlx"}),
    "mlx": frozenset({"torch", "numpy", "native", "mlx"}),
}
# Safetensors checkpoints the readers take: dense floats, and MLX's affine 2-8 bit ("4bit").
# Block-scaled fp8 (DeepSeek V3.1, Kimi K2) and compressed-tensors int4 (Kimi K2 Thinking) are not
# read yet.
_DENSE = frozenset({"bf16", "fp16", "f16", "fp32", "f32", "bfloat16", "float16", "float32"})
_MLX_BITS = re.compile(r"[2-8]_?bits?")
_WEIGHT_SUFFIXES = (".safetensors", ".gguf")
GB = 1_000_000_000  # the Hub's sizes are decimal


# --- the answers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunsHere:
    """Its weights are on this machine, in a format an engine here reads."""

    format: str
    path: Path

    @property
    def line(self) -> str:
        return f"runs here now ({self.format})"


@dataclass(frozen=True)
class NeedsDownload:
    """It runs once `size` more bytes of one Hub source are here."""

    size: int
    repo: str
    file: str | None = None
    needs_token: bool = False  # the repo is gated and no HF_TOKEN is set

    @property
    def line(self) -> str:
        where = f"{self.repo}/{self.file}" if self.file else self.repo
        line = f"runs after a download of {fmt_gb(self.size)} from {where}"
        return line + ("; gated: set HF_TOKEN" if self.needs_token else "")


@dataclass(frozen=True)
class CannotRun:
    """No engine here can run it, or the cluster has too little memory."""

    reason: str

    @property
    def line(self) -> str:
        return f"cannot run here: {self.reason}"


Availability = RunsHere | NeedsDownload | CannotRun


@dataclass(frozen=True)
class Local:
    """What this machine holds of one weights source."""

    path: Path | None = None  # where it loads from, when complete
    held: int = 0  # bytes already here: complete files and partial downloads


def fmt_gb(n_bytes: int) -> str:
    """Decimal gigabytes, as the Hub shows sizes: "0.81 GB", "42.5 GB", "688 GB"."""
    gb = n_bytes / GB
    return f"{gb:.2f} GB" if gb < 10 else f"{gb:.1f} GB" if gb < 100 else f"{gb:.0f} GB"


# --- the decision --------------------------------------------------------------------------------


def readers(where: WeightsLocation, card: ModelCard) -> frozenset[str]:
    """The engines that read one weights source (a Hub source may name them itself)."""
    if isinstance(where, HubWeights) and where.engines:
        return frozenset(where.engines)
    label = (where.quantization if isinstance(where, HubWeights) else None) or card.quantization
    label = label.strip().lower().replace("-", "_")
    if where.format == "safetensors" and label not in _DENSE:
        return frozenset()
    if where.format == "mlx" and label not in _DENSE and not _MLX_BITS.fullmatch(label):
        return frozenset()
    return FORMAT_READERS[where.format]


def _label(where: WeightsLocation, card: ModelCard) -> str:
    own = where.quantization if isinstance(where, HubWeights) else None
    return f"{where.format} {own or card.quantization}"


def availability(
    card: ModelCard,
    *,
    architectures: Iterable[str],
    engines: Iterable[str],
    local: Mapping[int, Local],
    need: Mapping[str, int],
    memory: Mapping[str, int] | None,
    token: bool = False,
) -> Availability:
    """Whether `card` runs here, given the architectures the engines implement, the engines
    installed, what is held of each of `card.weights` (by index), the bytes the model needs on
    each engine and the bytes the cluster offers each engine (None: not known, not checked)."""
    supported = sorted(set(architectures))
    if card.architecture not in supported:
        return CannotRun(f"no engine runs architecture {card.architecture} yet")
    installed = set(engines) - {"fake"}
    if not installed:
        return CannotRun("no inference engine is installed (numpy, torch, llama-cpp-python, mlx)")
    readable = [(i, w, readers(w, card) & installed) for i, w in enumerate(card.weights)]
    readable = [(i, w, e) for i, w, e in readable if e]
    if not readable:
        kinds = ", ".join(dict.fromkeys(_label(w, card) for w in card.weights)) or "none listed"
        return CannotRun(
            f"no engine here reads its weights ({kinds}; engines: {', '.join(sorted(installed))})"
        )

    def fits(usable: frozenset[str]) -> bool:
        return memory is None or any(need.get(e, 0) <= memory.get(e, 0) for e in usable)

    fitting = [(i, w) for i, w, e in readable if fits(e)]
    if not fitting:
        engine = min((e for _, _, usable in readable for e in usable), key=lambda e: need.get(e, 0))
        have = 0 if memory is None else memory.get(engine, 0)
        return CannotRun(
            f"needs {fmt_gb(need.get(engine, 0))} of memory ({engine}), {fmt_gb(have)} available"
        )
    for i, where in fitting:
        held = local.get(i, Local())
        if held.path is not None:
            return RunsHere(where.format, held.path)
    for i, where in fitting:
        if isinstance(where, HubWeights):
            size = where.storage_bytes or card.storage_bytes
            return NeedsDownload(
                max(0, size - local.get(i, Local()).held),
                where.repo,
                where.file,
                needs_token=where.gated and not token,
            )
    return CannotRun("its weights are not on this machine and the card names no Hub repo")


# --- gathering the inputs on this machine --------------------------------------------------------


def _listed_files(snapshot: Path) -> list[tuple[str, int]] | None:
    """(path, size) of the repo's weight files and config.json, from the saved listing."""
    try:
        data = json.loads((snapshot / ".shoal" / "listing.json").read_text(encoding="utf-8"))
        files = [(str(f["path"]), int(f["size"])) for f in data["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [(p, s) for p, s in files if p.endswith(_WEIGHT_SUFFIXES) or p == "config.json"]


def _indexed_files(snapshot: Path) -> list[str]:
    """The weight files a snapshot without a listing needs: its index's shards, or one file."""
    index = snapshot / "model.safetensors.index.json"
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        shards = ["model.safetensors"]
    return ["config.json", *shards]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def hub_copy(root: Path, where: HubWeights) -> Local:
    """What `<root>/<org>--<name>/<commit>/` holds of a Hub source (the shoal Hub cache)."""
    repo_root = root / where.repo.replace("/", "--")
    ref = repo_root / "refs" / where.revision
    try:
        commit = ref.read_text(encoding="utf-8").strip()
    except OSError:
        commit = where.revision  # a pinned commit has no ref file
    snapshot = repo_root / commit
    if not commit or not snapshot.is_dir():
        return Local()
    needed: list[tuple[str, int | None]]
    if where.file is not None:
        needed = [(where.file, None)]
    else:
        listed = _listed_files(snapshot)
        needed = (
            list(listed) if listed is not None else [(p, None) for p in _indexed_files(snapshot)]
        )
    held, complete = 0, True
    for name, size in needed:
        done = _size(snapshot / name)
        if done and (size is None or done == size):
            held += done
        else:
            complete = False
            held += _size(snapshot / ".shoal" / f"{name}.part")
    path = snapshot / where.file if where.file is not None else snapshot
    return Local(path if complete else None, held)


def local_copies(
    card: ModelCard, hub_root: Path, hf_cache_dir: Path | None = None
) -> dict[int, Local]:
    """What this machine holds of each of the card's weights sources, by index; no network.

    Hub sources are looked up in shoal's Hub cache (`hub_root`), then in the Hugging Face cache.
    """
    found: dict[int, Local] = {}
    for i, where in enumerate(card.weights):
        held = hub_copy(hub_root, where) if isinstance(where, HubWeights) else Local()
        if held.path is None and (path := locate(where, hf_cache_dir)) is not None:
            held = Local(path, _size(path) if path.is_file() else held.held)
        if held.path is not None or held.held:
            found[i] = held
    return found


def machine_memory() -> int:
    """Bytes of RAM available on this machine now."""
    import psutil

    return int(psutil.virtual_memory().available)
