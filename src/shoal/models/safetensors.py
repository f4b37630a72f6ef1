"""Weights from a Hugging Face model directory: config.json, *.safetensors, tokenizer files."""

import json
import logging
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from shoal.errors import UnsupportedModel
from shoal.models.tokenizer import Tokenizer
from shoal.types.model_config import LLAMA_FAMILY, ModelConfig
from shoal.types.shard import Shard

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


class SafetensorsSource:
    """A Hugging Face directory of a Llama-family model, as a WeightSource."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        hf = json.loads((self.path / "config.json").read_text())
        if hf.get("model_type") not in LLAMA_FAMILY:
            raise UnsupportedModel(
                f"{self.path}: model_type {hf.get('model_type')!r} is not supported "
                f"(supported: {sorted(LLAMA_FAMILY)})"
            )
        self._config = ModelConfig.from_hf(hf)
        self._headers = {f: _header(f) for f in _weight_files(self.path)}
        self._where = {name: f for f, (_, h) in self._headers.items() for name in h}

    @property
    def config(self) -> ModelConfig:
        return self._config

    def tokenizer(self) -> Tokenizer:
        """The tokenizer and chat template of the directory."""
        return Tokenizer.from_hf_dir(self.path)

    def tensors(self, shard: Shard) -> dict[str, np.ndarray]:
        """The shard's tensors, float32, under Hugging Face names (see WeightSource)."""
        cfg = self._config
        if shard.n_layers != cfg.num_hidden_layers:
            raise ValueError(
                f"shard {shard} does not fit a model of {cfg.num_hidden_layers} layers"
            )
        wanted = {n: n for n in self._where if _in_shard(n, shard)}
        if shard.is_last and (cfg.tie_word_embeddings or "lm_head.weight" not in self._where):
            wanted.pop("lm_head.weight", None)
            wanted["model.embed_tokens.weight"] = "model.embed_tokens.weight"
            if not cfg.tie_word_embeddings:
                log.warning("%s has no lm_head.weight: using the embeddings", self.path)
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in wanted:
            if name not in self._where:
                raise UnsupportedModel(f"{self.path}: no tensor {name}")
            by_file[self._where[name]].append(name)
        out: dict[str, np.ndarray] = {}
        for file, names in by_file.items():
            out.update(self._read(file, names))
        if shard.is_last and "lm_head.weight" not in out:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
            if not shard.is_first:
                del out["model.embed_tokens.weight"]
        log.debug("read %d tensors of %s from %s", len(out), shard, self.path)
        return out

    def _read(self, file: Path, names: list[str]) -> dict[str, np.ndarray]:
        """Float32 copies of the named tensors of one file."""
        data_start, header = self._headers[file]
        out: dict[str, np.ndarray] = {}
        with safe_open(str(file), framework="numpy") as f:
            for name in names:
                meta = header[name]
                if meta["dtype"] not in FLOAT_DTYPES:
                    raise UnsupportedModel(f"{file}: tensor {name} has dtype {meta['dtype']}")
                if meta["dtype"] == "BF16":  # numpy has no bfloat16: widen the raw bits
                    begin, end = meta["data_offsets"]
                    bits = np.fromfile(
                        file, dtype="<u2", count=(end - begin) // 2, offset=data_start + begin
                    )
                    out[name] = (
                        (bits.astype(np.uint32) << 16).view(np.float32).reshape(meta["shape"])
                    )
                else:
                    out[name] = f.get_tensor(name).astype(np.float32, copy=False)
        return out


def _in_shard(name: str, shard: Shard) -> bool:
    """Whether a checkpoint tensor belongs to the shard (rotary caches never do)."""
    if name.startswith("model.layers."):
        layer = int(name.split(".")[2])
        return shard.start <= layer < shard.end and not name.endswith("rotary_emb.inv_freq")
    if name == "model.embed_tokens.weight":
        return shard.is_first
    return shard.is_last and name in ("model.norm.weight", "lm_head.weight")


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a directory, from its index when there is one."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"{path}: no *.safetensors files")
    return files


def _header(file: Path) -> tuple[int, dict[str, Any]]:
    """Where the data of a safetensors file starts, and its tensor table (dtype, shape, offsets)."""
    with file.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header
