"""Weights from a GGUF file: its header, the model config, and one shard's tensors.

The header is parsed here rather than with `gguf.GGUFReader`, which takes seconds on a vocabulary
of 50k strings; the `gguf` package still supplies the constants and all dequantization math.
Tensors come back as float32 under Hugging Face names, in Hugging Face orientation ([out, in]).
"""

import logging
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from shoal.errors import UnsupportedModel
from shoal.models.tokenizer import Tokenizer
from shoal.types.model_config import ModelConfig
from shoal.types.shard import Shard

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType

# Tensor types whose dequantization gguf.quants implements.
SUPPORTED_TYPES = frozenset(
    {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0}
    | {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
)
ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "qwen3"})  # same names as HF model_type
# llama.cpp's converter reorders the q/k rows of these for its rope; qwen's converter does not.
PERMUTED_QK = frozenset({"llama", "mistral"})

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
_FIRST_NAMES = {"token_embd": "model.embed_tokens"}
_LAST_NAMES = {"output_norm": "model.norm", "output": "lm_head"}

_SCALAR_FORMATS = {
    V.UINT8: "B",
    V.INT8: "b",
    V.UINT16: "H",
    V.INT16: "h",
    V.UINT32: "I",
    V.INT32: "i",
    V.UINT64: "Q",
    V.INT64: "q",
    V.FLOAT32: "f",
    V.FLOAT64: "d",
    V.BOOL: "?",
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in the file; shape in numpy order (GGUF's dims reversed)."""

    name: str
    type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # absolute, in bytes
    nbytes: int


@dataclass(frozen=True)
class GGUFMetadata:
    """What a GGUF file says about itself."""

    name: str
    architecture: str
    quantization: str  # "Q4_1", "Q8_0", "F16", ...
    file_type: int | None
    context_length: int


class _Cursor:
    """Little-endian reads from a buffer, advancing a position."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        self.pos += n
        return self.buf[self.pos - n : self.pos].decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == V.STRING:
            return self.string()
        if vtype != V.ARRAY:
            return self.scalar(_SCALAR_FORMATS[V(vtype)])
        itype, count = self.scalar("I"), self.scalar("Q")
        if itype in (V.STRING, V.ARRAY):
            return [self.value(itype) for _ in range(count)]
        dtype = np.dtype("<" + _SCALAR_FORMATS[V(itype)])
        items = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * dtype.itemsize
        return items.tolist()


def read_header(path: Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """Metadata (key → value, arrays as lists) and tensor locations of a GGUF file."""
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse_header(path, buf)
    except (struct.error, ValueError, OverflowError, KeyError) as e:
        raise UnsupportedModel(f"{path}: not a readable GGUF file ({e})") from e


def _parse_header(path: Path, buf: mmap.mmap) -> tuple[dict[str, Any], list[TensorInfo]]:
    """The body of read_header, on a mapped file."""
    if buf[:4] != b"GGUF":
        raise UnsupportedModel(f"{path}: not a GGUF file (bad magic {buf[:4]!r})")
    c = _Cursor(buf)
    c.pos = 4
    version = c.scalar("I")
    if version not in (2, 3):
        raise UnsupportedModel(f"{path}: GGUF version {version} (need 2 or 3, little-endian)")
    n_tensors, n_fields = c.scalar("Q"), c.scalar("Q")
    fields: dict[str, Any] = {}
    for _ in range(n_fields):
        key = c.string()
        fields[key] = c.value(c.scalar("I"))
    raw = []
    for _ in range(n_tensors):
        name, n_dims = c.string(), c.scalar("I")
        dims = [c.scalar("Q") for _ in range(n_dims)]
        raw.append((name, dims, c.scalar("I"), c.scalar("Q")))
    align = int(fields.get("general.alignment", 32))
    data_start = -(-c.pos // align) * align
    infos = []
    for name, dims, type_id, offset in raw:
        try:
            qtype = Q(type_id)
        except ValueError:
            raise UnsupportedModel(f"{path}: tensor {name} has unknown type {type_id}") from None
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(dims, dtype=np.int64)) // block * size
        shape = tuple(reversed(dims))
        infos.append(TensorInfo(name, qtype, shape, data_start + offset, nbytes))
    return fields, infos


def dequantize(data: np.ndarray, info: TensorInfo) -> np.ndarray:
    """A float32 copy of one tensor from the file's bytes (a uint8 array of the whole file)."""
    raw = data[info.offset : info.offset + info.nbytes]
    if info.type == Q.F32:
        return np.array(raw.view(np.float32).reshape(info.shape))
    if info.type == Q.F16:
        return raw.view(np.float16).reshape(info.shape).astype(np.float32)
    rows = raw.reshape(*info.shape[:-1], -1)  # [..., bytes per row]
    return gguf.quants.dequantize(rows, info.type).astype(np.float32, copy=False)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rope row order: per head, interleaved pairs back to two halves."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name, or None for tensors the models do not use."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    names = _FIRST_NAMES | _LAST_NAMES
    if len(parts) == 2 and parts[0] in names:
        return f"{names[parts[0]]}.{parts[1]}"
    return None


def model_config(fields: dict[str, Any], tensors: dict[str, TensorInfo]) -> ModelConfig:
    """The ModelConfig a GGUF header describes (rope_freqs is read by the caller if present)."""
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModel(
            f"GGUF architecture {arch!r} is not supported (supported: {sorted(ARCHITECTURES)})"
        )

    def key(name: str, default: Any = None) -> Any:
        value = fields.get(f"{arch}.{name}", default)
        if value is None:
            raise UnsupportedModel(f"GGUF metadata lacks {arch}.{name}")
        if isinstance(value, list):  # per-layer values; the supported models keep them equal
            if len(set(value)) != 1:
                raise UnsupportedModel(f"{arch}.{name} differs between layers: {value}")
            value = value[0]
        return value

    if fields.get(f"{arch}.expert_count"):
        raise UnsupportedModel(
            f"{arch} with mixture-of-experts layers (e.g. Mixtral) is not supported"
        )
    hidden, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden // heads)
    theta = float(key("rope.freq_base", 10000.0))
    n_vocab = fields.get(f"{arch}.vocab_size") or len(fields.get("tokenizer.ggml.tokens", []))
    return ModelConfig(
        architecture=arch,
        num_hidden_layers=key("block_count"),
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_attention_heads=heads,
        num_key_value_heads=key("attention.head_count_kv", heads),
        head_dim=head_dim,
        vocab_size=n_vocab or tensors["token_embd.weight"].shape[0],
        max_position_embeddings=key("context_length", 4096),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(fields, arch),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
    )


def _rope_scaling(fields: dict[str, Any], arch: str) -> dict[str, Any] | None:
    """HF rope_scaling from the rope.scaling.* keys (llama3's rope_freqs tensor aside)."""
    kind = fields.get(f"{arch}.rope.scaling.type", "none")
    factor = fields.get(f"{arch}.rope.scaling.factor") or fields.get(f"{arch}.rope.scale_linear")
    if kind == "yarn":
        original = fields.get(f"{arch}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    if kind in ("linear", "none") and factor and factor != 1.0:
        return {"rope_type": "linear", "factor": factor}
    if kind not in ("linear", "none"):
        raise UnsupportedModel(f"rope scaling {kind!r} is not supported")
    return None


def llama3_rope_scaling(freqs: np.ndarray, head_dim: int, theta: float) -> dict[str, Any]:
    """HF's llama3 rope_scaling from llama.cpp's rope_freqs tensor (Meta's defaults, checked)."""
    scaling = {
        "rope_type": "llama3",
        "factor": float(freqs.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    if not np.allclose(llama3_rope_factors(scaling, head_dim, theta), freqs, rtol=1e-4):
        raise UnsupportedModel("rope_freqs.weight does not match Llama 3 rope scaling")
    return scaling


def llama3_rope_factors(scaling: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """What each rope frequency is divided by under HF's llama3 scaling, as llama.cpp stores it."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (original / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(
        wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, blended)
    ).astype(np.float32)


class GGUFSource:
    """A GGUF file of a llama, mistral, qwen2 or qwen3 model, as a WeightSource."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        fields, infos = read_header(self.path)
        self.fields = fields  # raw metadata: key → value, arrays as lists
        self._infos = {info.name: info for info in infos}
        unsupported = {
            i.name: i.type.name
            for i in infos
            if i.type not in SUPPORTED_TYPES and (hf_name(i.name) or i.name == "rope_freqs.weight")
        }
        if unsupported:
            raise UnsupportedModel(
                f"{self.path}: tensor types {sorted(set(unsupported.values()))} are not supported "
                f"(e.g. {next(iter(unsupported))}); supported: "
                f"{sorted(t.name for t in SUPPORTED_TYPES)}"
            )
        config = model_config(fields, self._infos)
        if "rope_freqs.weight" in self._infos and config.rope_scaling is None:
            freqs = dequantize(self._data(), self._infos["rope_freqs.weight"])
            scaling = llama3_rope_scaling(freqs, config.head_dim, config.rope_theta)
            config = config.model_copy(update={"rope_scaling": scaling})
        self._config = config

    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def metadata(self) -> GGUFMetadata:
        file_type = self.fields.get("general.file_type")
        return GGUFMetadata(
            name=self.fields.get("general.name") or self.path.stem,
            architecture=self._config.architecture,
            quantization=self._quantization(file_type),
            file_type=file_type,
            context_length=self._config.max_position_embeddings,
        )

    def tokenizer(self) -> Tokenizer:
        """The tokenizer and chat template stored in the file."""
        return Tokenizer.from_gguf(self.fields)

    def tensors(self, shard: Shard) -> dict[str, np.ndarray]:
        """The shard's tensors, float32, under Hugging Face names (see WeightSource)."""
        cfg = self._config
        if shard.n_layers != cfg.num_hidden_layers:
            raise ValueError(
                f"shard {shard} does not fit a model of {cfg.num_hidden_layers} layers"
            )
        data = self._data()
        out: dict[str, np.ndarray] = {}
        for info in self._infos.values():
            name = hf_name(info.name)
            if name is None or not self._wanted(info.name, shard):
                continue
            w = dequantize(data, info)
            if cfg.architecture in PERMUTED_QK and ".attn_q." in info.name:
                w = unpermute_qk(w, cfg.num_attention_heads)
            elif cfg.architecture in PERMUTED_QK and ".attn_k." in info.name:
                w = unpermute_qk(w, cfg.num_key_value_heads)
            out[name] = w
        if shard.is_last and cfg.tie_word_embeddings:
            embed = out.get("model.embed_tokens.weight")
            out["lm_head.weight"] = (
                embed if embed is not None else dequantize(data, self._infos["token_embd.weight"])
            )
        log.debug("read %d tensors of %s from %s", len(out), shard, self.path.name)
        return out

    def _wanted(self, gguf_name: str, shard: Shard) -> bool:
        """Whether a tensor belongs to the shard."""
        parts = gguf_name.split(".")
        if parts[0] == "blk":
            return shard.start <= int(parts[1]) < shard.end
        return (shard.is_first and parts[0] in _FIRST_NAMES) or (
            shard.is_last and parts[0] in _LAST_NAMES
        )

    def _data(self) -> np.ndarray:
        """The file as a read-only uint8 array (memory-mapped)."""
        return np.memmap(self.path, dtype=np.uint8, mode="r")

    def _quantization(self, file_type: int | None) -> str:
        """The file type's name ("Q4_1"), or the commonest matrix type if the file has none."""
        known = {t.value: t.name for t in gguf.LlamaFileType}
        if file_type in known:
            return known[file_type].removeprefix("MOSTLY_").removeprefix("ALL_")
        kinds = [i.type.name for i in self._infos.values() if len(i.shape) == 2]
        return max(set(kinds), key=kinds.count) if kinds else "unknown"
