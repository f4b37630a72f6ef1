"""Dequantized shard tensors cached on disk, so a runner (re)starts in a fraction of a second.

Dequantizing a GGUF file costs seconds per load; failover restarts runners under time pressure.
The first load of a shard writes its float32 tensors as .npy files beside an index; later loads
memory-map them (copy-on-write: the engine may take them as they are). The cache key covers the
weights file's path, size and modification time, so a changed file is never served stale.
"""

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from shoal.engines.base import WeightSource
from shoal.engines.packed import Packed
from shoal.types.model_config import ModelConfig
from shoal.types.shard import Shard

log = logging.getLogger(__name__)


def _key(weights: Path) -> str:
    stat = weights.stat()
    ident = f"{weights.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


class CachedWeights:
    """A WeightSource that serves shards from the disk cache, filling it on a miss."""

    def __init__(self, source: WeightSource, weights: Path, cache_dir: Path) -> None:
        self._source = source
        self._dir = cache_dir / _key(weights)

    @property
    def config(self) -> ModelConfig:
        return self._source.config

    def __getattr__(self, name: str) -> object:  # tokenizer(), metadata, ... of the source
        return getattr(self._source, name)

    def tensors(self, shard: Shard) -> Mapping[str, np.ndarray | Packed]:
        parts = [f"layer-{i}" for i in range(shard.start, shard.end)]
        parts += ["first"] if shard.is_first else []
        parts += ["last"] if shard.is_last else []
        try:  # a hit needs every part, from whichever earlier shards cached them
            files: dict[str, str] = {}
            for part in parts:
                files.update(json.loads((self._dir / f"{part}.json").read_text()))
            return {name: np.load(self._dir / f, mmap_mode="c") for name, f in files.items()}
        except (OSError, ValueError):
            pass  # a miss (or a torn write): fill it
        tensors = self._source.tensors(shard)
        floats = {name: t for name, t in tensors.items() if isinstance(t, np.ndarray)}
        if len(floats) < len(tensors):
            return tensors  # MLX-packed: compact already and quick to read, nothing to cache
        try:
            self._store(floats, shard)
        except OSError as exc:  # a full disk only costs speed
            log.warning("cannot cache weights in %s: %s", self._dir, exc)
        return floats

    def _store(self, tensors: dict[str, np.ndarray], shard: Shard) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        parts: dict[str, dict[str, str]] = {}
        written: dict[int, str] = {}  # one file for arrays shared by two names (tied head)
        for name, array in tensors.items():
            if id(array) not in written:
                written[id(array)] = f"{name}.npy"
                tmp = self._dir / f"{name}.npy.tmp"
                with tmp.open("wb") as out:
                    np.save(out, np.ascontiguousarray(array, dtype=np.float32))
                os.replace(tmp, self._dir / f"{name}.npy")
            parts.setdefault(_part(name), {})[name] = written[id(array)]
        for part, files in parts.items():  # indexes last: a reader never sees half a part
            tmp_index = self._dir / f"{part}.json.tmp"
            tmp_index.write_text(json.dumps(files))
            os.replace(tmp_index, self._dir / f"{part}.json")


def _part(name: str) -> str:
    """Which index a tensor belongs to: its layer, or the first/last stage's extras."""
    if name.startswith("model.layers."):
        return f"layer-{name.split('.')[2]}"
    return "first" if name == "model.embed_tokens.weight" else "last"
