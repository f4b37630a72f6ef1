"""Weights from a Hugging Face model directory: config.json, *.safetensors, tokenizer files.

Dense checkpoints (float32, float16, bfloat16) come back as float32 arrays. MLX checkpoints
(config.json `quantization`, or the same under `quantization_config`) store each quantized module
as `weight` (uint32, packed), `scales` and `biases`; those come back as one `Packed` under the
module's `weight` name, embeddings and heads included, with the module's bits and group size
(a per-module entry in `quantization` overrides the default; False means not quantized).

Experts come back one 2-D tensor per expert, `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj
.weight`, whatever the file stacks (`split_experts`): mlx-lm's `mlp.switch_mlp.{gate,up,down}_proj`
[E, out, ...] (a quantized one as E Packed; its `quantization` entries name switch_mlp modules)
and transformers 5's fused `mlp.experts.gate_up_proj` [E, 2 * inner, hidden] and
`mlp.experts.down_proj` [E, hidden, inner] (save_pretrained(save_original_format=False), a
state_dict) become views of the stacked arrays, never copies.

The directory may hold only some of the checkpoint's files (a stage downloads only its own):
headers are read from the files present, the index names the rest, and a shard that needs a
tensor of an absent file is refused naming that file.
"""

import json
import logging
import re
import struct
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np

from shoal.engines.packed import Packed, dense
from shoal.errors import UnsupportedModel
from shoal.models.tokenizer import Tokenizer
from shoal.types.model_config import ARCHITECTURES, ModelConfig
from shoal.types.shard import Shard

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
# numpy dtypes of the raw data; BF16 is kept as its uint16 bit patterns (numpy has no bfloat16)
RAW = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "U32": "<u4"}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
Tensor = np.ndarray | Packed


class Quantization:
    """config.json's MLX `quantization`: the default bits and group size, per-module overrides."""

    def __init__(self, hf: dict[str, Any], where: Path) -> None:
        q = hf.get("quantization")
        if q is None:
            q = hf.get("quantization_config")
            if q is not None and "quant_method" in q:
                raise UnsupportedModel(
                    f"{where}: {q['quant_method']} quantization is not supported "
                    "(MLX affine quantization and dense checkpoints are)"
                )
        self.rules: dict[str, Any] = dict(q or {})

    def of(self, module: str) -> tuple[int, int] | None:
        """(bits, group_size) of a module, or None when it is not quantized."""
        rule = self.rules.get(module, True)
        if rule is False:
            return None
        params = rule if isinstance(rule, dict) else self.rules
        mode = params.get("mode", "affine")
        if mode != "affine":
            raise UnsupportedModel(f"{module}: MLX quantization mode {mode!r} is not supported")
        return int(params.get("bits", 4)), int(params.get("group_size", 64))


class SafetensorsSource:
    """A Hugging Face directory of a Llama-family model, as a WeightSource."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        hf = json.loads((self.path / "config.json").read_text())
        if hf.get("model_type") not in ARCHITECTURES | {"kimi_k2"}:  # Kimi K2: deepseek_v3
            raise UnsupportedModel(
                f"{self.path}: model_type {hf.get('model_type')!r} is not supported "
                f"(supported: {sorted(ARCHITECTURES)})"
            )
        self._config = ModelConfig.from_hf(hf)
        self._quant = Quantization(hf, self.path)
        # name → file, for every tensor the checkpoint has; headers only of the files present
        self._file_of = _weight_map(self.path)
        self._headers = {f: _header(f) for f in set(self._file_of.values()) if f.is_file()}

    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def quantized(self) -> bool:
        """Whether the checkpoint holds MLX-quantized (packed) tensors."""
        return any(n.endswith(".scales") for n in self._file_of)

    def tokenizer(self) -> Tokenizer:
        """The tokenizer and chat template of the directory."""
        return Tokenizer.from_hf_dir(self.path)

    def files_for(self, shard: Shard) -> set[str]:
        """The names of the weight files the shard's tensors are in."""
        return {self._file_of[n].name for n in self._stored_names(shard)}

    def tensors(self, shard: Shard) -> dict[str, Tensor]:
        """The shard's tensors under Hugging Face names (see WeightSource): float32 arrays, and
        `Packed` for MLX-quantized modules."""
        names = self._stored_names(shard)
        absent = sorted({self._file_of[n].name for n in names} - {f.name for f in self._headers})
        if absent:
            raise UnsupportedModel(
                f"{self.path}: shard {shard} needs {', '.join(absent)}, which is not there "
                "(download it, or load a shard whose files are present)"
            )
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self._file_of[name]].append(name)
        raw: dict[str, np.ndarray] = {}
        for file, in_file in by_file.items():
            raw.update(self._read(file, in_file))
        out = self._assemble(raw)
        if shard.is_last and "lm_head.weight" not in out:
            if "model.embed_tokens.weight" not in out:
                raise UnsupportedModel(f"{self.path}: no tensor lm_head.weight or embeddings")
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
            if not shard.is_first:
                del out["model.embed_tokens.weight"]
        log.debug("read %d tensors of %s from %s", len(out), shard, self.path)
        return out

    def _stored_names(self, shard: Shard) -> list[str]:
        """The names stored in the checkpoint that the shard needs (scales and biases too)."""
        cfg = self._config
        if shard.n_layers != cfg.num_hidden_layers:
            raise ValueError(
                f"shard {shard} does not fit a model of {cfg.num_hidden_layers} layers"
            )
        names = [n for n in self._file_of if _in_shard(n, shard)]
        has_head = "lm_head.weight" in self._file_of
        if shard.is_last and (cfg.tie_word_embeddings or not has_head):
            names = [n for n in names if not n.startswith("lm_head.")]
            names += [n for n in self._file_of if n.startswith("model.embed_tokens.")]
            if not cfg.tie_word_embeddings:
                log.warning("%s has no lm_head.weight: using the embeddings", self.path)
        return sorted(set(names))

    def _assemble(self, raw: dict[str, np.ndarray]) -> dict[str, Tensor]:
        """Float tensors to float32; each MLX `weight`/`scales`/`biases` triple to one Packed
        (one per expert if stacked); stacked experts split (split_experts)."""
        out: dict[str, Tensor | Stacked] = {}
        for name, array in raw.items():
            module, _, leaf = name.rpartition(".")
            if leaf in ("scales", "biases") and f"{module}.scales" in raw:
                continue
            dtype = self._dtype(name)
            if leaf == "weight" and f"{module}.scales" in raw:
                out[name] = self._packed(module, array, raw)
            elif dtype not in FLOAT_DTYPES:
                raise UnsupportedModel(f"{self.path}: tensor {name} has dtype {dtype}")
            elif dtype == "BF16":
                out[name] = (array.astype(np.uint32) << 16).view(np.float32)
            else:  # a copy: aligned and writable, not a view of the mapped file
                out[name] = np.array(array, dtype=np.float32)
        return split_experts(join_latent_heads(out))

    def _packed(
        self, module: str, weight: np.ndarray, raw: dict[str, np.ndarray]
    ) -> Packed | list[Packed]:
        """The module's Packed matrix; of stacked experts' [E, out, ...], one per expert."""
        if weight.ndim == 3:
            scales, biases = raw[f"{module}.scales"], raw[f"{module}.biases"]
            matrices = [  # 2-D each: Packed
                self._packed(module, w, {f"{module}.scales": s, f"{module}.biases": b})
                for w, s, b in zip(weight, scales, biases, strict=True)
            ]
            return cast(list[Packed], matrices)
        params = self._quant.of(module)
        if params is None:
            raise UnsupportedModel(f"{self.path}: {module} has scales but is not quantized")
        bits, group = params
        scale_dtype = self._dtype(f"{module}.scales")
        if (
            self._dtype(f"{module}.weight") != "U32"
            or self._dtype(f"{module}.biases") != scale_dtype
            or scale_dtype not in ("F16", "BF16", "F32")
        ):
            raise UnsupportedModel(f"{self.path}: {module} is not MLX affine-quantized")
        try:
            return Packed(
                weight, raw[f"{module}.scales"], raw[f"{module}.biases"], bits, group, scale_dtype
            )
        except (KeyError, ValueError) as e:
            raise UnsupportedModel(f"{self.path}: {module}: {e}") from None

    def _dtype(self, name: str) -> str:
        return str(self._headers[self._file_of[name]][1][name]["dtype"])

    def _read(self, file: Path, names: list[str]) -> dict[str, np.ndarray]:
        """The named tensors of one file as stored (BF16 as uint16 bit patterns), as read-only
        views of the file mapped into memory: what stays packed is never copied, and its pages
        are the file's (the OS reads them on first use and may drop them again)."""
        data_start, header = self._headers[file]
        mapped = np.memmap(file, dtype=np.uint8, mode="r")
        out: dict[str, np.ndarray] = {}
        for name in names:
            meta = header[name]
            if meta["dtype"] not in RAW:
                raise UnsupportedModel(f"{file}: tensor {name} has dtype {meta['dtype']}")
            begin, end = meta["data_offsets"]
            data = mapped[data_start + begin : data_start + end]
            out[name] = data.view(RAW[meta["dtype"]]).reshape(meta["shape"])
        return out


Stacked = list[Packed]  # a quantized stacked matrix, already one Packed per expert
# mlx-lm's switch_mlp.{p}.weight and transformers 5's fused experts.{gate_up,down}_proj
_STACKED = re.compile(
    r"(?P<mlp>.*\.mlp)\.(?:switch_mlp\.(?P<mlx>gate_proj|up_proj|down_proj)\.weight"
    r"|experts\.(?P<hf>gate_up_proj|down_proj))"
)


def split_experts(tensors: Mapping[str, Tensor | Stacked]) -> dict[str, Tensor]:
    """The tensors with every stacked expert matrix split into one 2-D tensor per expert under
    `{mlp}.experts.{e}.{gate,up,down}_proj.weight` (views of the stacked arrays); the others as
    they are."""
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        match = _STACKED.fullmatch(name)
        if match is None:
            assert not isinstance(tensor, list), name
            out[name] = tensor
            continue
        experts = f"{match['mlp']}.experts"
        if match["hf"] == "gate_up_proj":  # rows gate then up, as transformers concatenates
            assert isinstance(tensor, np.ndarray), name
            inner = tensor.shape[1] // 2
            for e, w in enumerate(tensor):  # [2 * inner, hidden]
                out[f"{experts}.{e}.gate_proj.weight"] = w[:inner]
                out[f"{experts}.{e}.up_proj.weight"] = w[inner:]
            continue
        proj = match["mlx"] or match["hf"]
        assert not isinstance(tensor, Packed), name  # stacked: [E, out, in] or E Packed
        for e, w in enumerate(tensor):  # [out, in] (or its Packed)
            out[f"{experts}.{e}.{proj}.weight"] = w
    return out


def join_latent_heads(tensors: Mapping[str, Tensor | Stacked]) -> dict[str, Tensor | Stacked]:
    """mlx-lm's deepseek_v3 attention as the checkpoint's: its per-head `self_attn.embed_q`
    [H, kv_lora_rank, qk_nope] and `self_attn.unembed_out` [H, v_head, kv_lora_rank] (float, or
    one Packed a head) joined back into `self_attn.kv_b_proj.weight` [H * (qk_nope + v_head),
    kv_lora_rank], float32 (packed heads dequantized exactly); the other tensors as they are."""
    out = dict(tensors)
    for name in [n for n in out if n.endswith(".self_attn.embed_q.weight")]:
        attn = name.removesuffix(".embed_q.weight")
        k, v = out.pop(name), out.pop(f"{attn}.unembed_out.weight")
        assert not isinstance(k, Packed) and not isinstance(v, Packed), attn  # 3-D: never one
        w_k = np.stack([dense(h) for h in k])  # [H, rank, nope]
        w_v = np.stack([dense(h) for h in v])  # [H, v, rank]
        kv_b = np.concatenate([w_k.transpose(0, 2, 1), w_v], axis=1)  # [H, nope + v, rank]
        out[f"{attn}.kv_b_proj.weight"] = kv_b.reshape(-1, kv_b.shape[-1])
    return out


def _in_shard(name: str, shard: Shard) -> bool:
    """Whether a checkpoint tensor belongs to the shard (rotary caches never do)."""
    if name.startswith("model.layers."):
        layer = int(name.split(".")[2])
        return shard.start <= layer < shard.end and not name.endswith("rotary_emb.inv_freq")
    if name.startswith("model.embed_tokens."):
        return shard.is_first
    return shard.is_last and name.startswith(("model.norm.", "lm_head."))


def _weight_map(path: Path) -> dict[str, Path]:
    """Tensor name → its file, from the index when there is one (files may be absent), else
    from the headers of the directory's *.safetensors files."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return {name: path / f for name, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"{path}: no *.safetensors files")
    return {name: f for f in files for name in _header(f)[1]}


def _header(file: Path) -> tuple[int, dict[str, Any]]:
    """Where the data of a safetensors file starts, and its tensor table (dtype, shape, offsets)."""
    with file.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header
