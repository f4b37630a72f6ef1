"""GGUFSource: header parsing, config, dequantization of every supported type, shard selection."""

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from shoal.errors import ModelNotFound, UnsupportedModel
from shoal.models.gguf import (
    GGUFSource,
    llama3_rope_factors,
    read_header,
)
from shoal.models.source import open_weights
from shoal.types.ids import ModelId
from shoal.types.shard import Shard
from tests.helpers.smollm2 import SMOLLM

Q = gguf.GGMLQuantizationType


def shard(start: int, end: int, n: int) -> Shard:
    return Shard(model_id=ModelId("m"), start=start, end=end, n_layers=n)


# --- small quantizers for the types gguf.quants can only dequantize --------------------------


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Rows of x as Q4_K blocks: per 32 values a 6-bit scale and min, 4-bit codes."""
    b = x.reshape(-1, 8, 32).astype(np.float32)
    nb = b.shape[0]
    lo, hi = np.minimum(b.min(-1), 0), b.max(-1)
    scale, mins = (hi - lo) / 15, -lo
    d16, dmin16 = (scale.max(-1) / 63).astype(np.float16), (mins.max(-1) / 63).astype(np.float16)
    d, dmin = d16.astype(np.float32)[:, None], dmin16.astype(np.float32)[:, None]
    sc = np.clip(np.round(scale / np.where(d == 0, 1, d)), 0, 63).astype(np.uint8)
    m = np.clip(np.round(mins / np.where(dmin == 0, 1, dmin)), 0, 63).astype(np.uint8)
    step = (d * sc)[..., None]
    q = np.round((b + (dmin * m)[..., None]) / np.where(step == 0, 1, step))
    q = np.clip(q, 0, 15).astype(np.uint8)
    scales = np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            m[:, :4] | ((m[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4),
        ],
        axis=1,
    )
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(nb, 128)
    parts = [d16.view(np.uint8).reshape(nb, 2), dmin16.view(np.uint8).reshape(nb, 2), scales, qs]
    return np.concatenate(parts, axis=1).reshape(x.shape[0], -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Rows of x as Q6_K blocks: per 16 values an 8-bit scale, 6-bit codes."""
    b = x.reshape(-1, 16, 16).astype(np.float32)
    nb = b.shape[0]
    scale = np.abs(b).max(-1) / 31
    d16 = (scale.max(-1) / 127).astype(np.float16)
    d = d16.astype(np.float32)[:, None]
    sc = np.clip(np.round(scale / np.where(d == 0, 1, d)), -128, 127).astype(np.int8)
    step = (d * sc)[..., None]
    q = (np.clip(np.round(b / np.where(step == 0, 1, step)), -32, 31) + 32).astype(np.uint8)
    low, high = (q & 0xF).reshape(nb, 2, 2, 64), (q >> 4).reshape(nb, 2, 4, 32)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)
    qh = high[:, :, 0] | high[:, :, 1] << 2 | high[:, :, 2] << 4 | high[:, :, 3] << 6
    parts = [ql, qh.reshape(nb, 64), sc.view(np.uint8), d16.view(np.uint8).reshape(nb, 2)]
    return np.concatenate(parts, axis=1).reshape(x.shape[0], -1)


def encode(x: np.ndarray, qtype: Q) -> np.ndarray:
    """x in the file's representation of qtype."""
    if qtype == Q.Q4_K:
        return quantize_q4_k(x)
    if qtype == Q.Q6_K:
        return quantize_q6_k(x)
    return gguf.quants.quantize(x, qtype)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows (per head: two halves → interleaved pairs)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


# --- a tiny model file ----------------------------------------------------------------------

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, FFN, VOCAB = 4, 2, 64, 256, 256, 64


def write_model(
    path: Path,
    *,
    arch: str = "llama",
    qtype: Q = Q.F32,
    layers: int = 2,
    tied: bool = False,
    seed: int = 0,
    fields: dict[str, float | str] | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Write a random model as GGUF; return its tensors under HF names, HF orientation."""
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    hf: dict[str, tuple[str, np.ndarray]] = {
        "model.embed_tokens.weight": ("token_embd", rand(VOCAB, HIDDEN))
    }
    hf["model.norm.weight"] = ("output_norm", rand(HIDDEN))
    if not tied:
        hf["lm_head.weight"] = ("output", rand(VOCAB, HIDDEN))
    for i in range(layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        hf[p + "self_attn.q_proj.weight"] = (b + "attn_q", rand(HEADS * HEAD_DIM, HIDDEN))
        hf[p + "self_attn.k_proj.weight"] = (b + "attn_k", rand(KV_HEADS * HEAD_DIM, HIDDEN))
        hf[p + "self_attn.v_proj.weight"] = (b + "attn_v", rand(KV_HEADS * HEAD_DIM, HIDDEN))
        hf[p + "self_attn.o_proj.weight"] = (b + "attn_output", rand(HIDDEN, HEADS * HEAD_DIM))
        hf[p + "mlp.gate_proj.weight"] = (b + "ffn_gate", rand(FFN, HIDDEN))
        hf[p + "mlp.up_proj.weight"] = (b + "ffn_up", rand(FFN, HIDDEN))
        hf[p + "mlp.down_proj.weight"] = (b + "ffn_down", rand(HIDDEN, FFN))
        hf[p + "input_layernorm.weight"] = (b + "attn_norm", rand(HIDDEN))
        hf[p + "post_attention_layernorm.weight"] = (b + "ffn_norm", rand(HIDDEN))
        if arch == "qwen2":
            hf[p + "self_attn.q_proj.bias"] = (b + "attn_q", rand(HEADS * HEAD_DIM))
            hf[p + "self_attn.k_proj.bias"] = (b + "attn_k", rand(KV_HEADS * HEAD_DIM))
            hf[p + "self_attn.v_proj.bias"] = (b + "attn_v", rand(KV_HEADS * HEAD_DIM))
        if arch == "qwen3":
            hf[p + "self_attn.q_norm.weight"] = (b + "attn_q_norm", rand(HEAD_DIM))
            hf[p + "self_attn.k_norm.weight"] = (b + "attn_k_norm", rand(HEAD_DIM))

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    for key, value in (fields or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_float32(key, value)
    for name, x in (extra or {}).items():
        w.add_tensor(name, x)
    for hf_name, (base, x) in hf.items():
        name = base + "." + hf_name.rsplit(".", 1)[1]
        if arch == "llama" and base.endswith(("attn_q", "attn_k")):
            x = permute(x, HEADS if base.endswith("attn_q") else KV_HEADS)
        if x.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, x)
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, encode(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {name: x for name, (_, x) in hf.items()}


# Largest error allowed, relative to the tensor's largest magnitude.
TOLERANCE = {
    Q.F32: 0.0,
    Q.F16: 1e-3,
    Q.BF16: 4e-3,
    Q.Q8_0: 6e-3,
    Q.Q4_0: 0.13,  # the far side of a block can clip a whole step: |max| / 8
    Q.Q4_1: 0.07,
    Q.Q4_K: 0.1,
    Q.Q6_K: 0.03,
}


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_every_supported_type_dequantizes_within_its_error(tmp_path: Path, qtype: Q) -> None:
    expected = write_model(tmp_path / "m.gguf", qtype=qtype)
    source = GGUFSource(tmp_path / "m.gguf")
    got = source.tensors(shard(0, 2, 2))
    assert set(got) == set(expected)
    for name, x in expected.items():
        y = got[name]
        assert y.dtype == np.float32 and y.shape == x.shape, name
        error = float(np.abs(y - x).max()) / float(np.abs(x).max())
        assert error <= TOLERANCE[qtype] if x.ndim == 2 else error == 0.0, (name, error)


def test_header_matches_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model(path, qtype=Q.Q8_0, fields={"general.name": "tiny"})
    fields, infos = read_header(path)
    reader = gguf.GGUFReader(path)
    theirs = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields == pytest.approx(theirs)
    assert [(i.name, i.type, i.offset, i.nbytes) for i in infos] == [
        (t.name, t.tensor_type, t.data_offset, t.n_bytes) for t in reader.tensors
    ]


def test_config_from_header(tmp_path: Path) -> None:
    write_model(tmp_path / "m.gguf", tied=True)
    cfg = GGUFSource(tmp_path / "m.gguf").config
    assert (cfg.architecture, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 2, HIDDEN)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (HEADS, KV_HEADS, 64)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings) == (FFN, VOCAB, 512)
    assert cfg.rope_theta == 50000.0 and cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.tie_word_embeddings and not cfg.attention_bias and not cfg.qk_norm
    assert cfg.rope_scaling is None


def test_shards_hold_only_their_layers(tmp_path: Path) -> None:
    expected = write_model(tmp_path / "m.gguf", layers=3)
    source = GGUFSource(tmp_path / "m.gguf")
    middle = source.tensors(shard(1, 2, 3))
    assert set(middle) == {n for n in expected if n.startswith("model.layers.1.")}
    first = source.tensors(shard(0, 1, 3))
    assert "model.embed_tokens.weight" in first and "lm_head.weight" not in first
    assert {n for n in first if n.startswith("model.layers.")} == {
        n for n in expected if n.startswith("model.layers.0.")
    }
    last = source.tensors(shard(2, 3, 3))
    assert {"model.norm.weight", "lm_head.weight"} <= set(last)
    assert "model.embed_tokens.weight" not in last
    np.testing.assert_array_equal(last["lm_head.weight"], expected["lm_head.weight"])
    with pytest.raises(ValueError):
        source.tensors(shard(0, 2, 2))


def test_tied_head_is_the_embedding(tmp_path: Path) -> None:
    expected = write_model(tmp_path / "m.gguf", tied=True)
    last = GGUFSource(tmp_path / "m.gguf").tensors(shard(1, 2, 2))
    assert "model.embed_tokens.weight" not in last
    np.testing.assert_array_equal(last["lm_head.weight"], expected["model.embed_tokens.weight"])


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_is_not_unpermuted_and_has_its_extras(tmp_path: Path, arch: str) -> None:
    expected = write_model(tmp_path / "m.gguf", arch=arch)
    source = GGUFSource(tmp_path / "m.gguf")
    assert source.config.architecture == arch
    assert source.config.attention_bias == (arch == "qwen2")
    assert source.config.qk_norm == (arch == "qwen3")
    got = source.tensors(shard(0, 2, 2))
    assert set(got) == set(expected)
    for name, x in expected.items():
        np.testing.assert_array_equal(got[name], x, err_msg=name)


def test_rope_scaling(tmp_path: Path) -> None:
    write_model(
        tmp_path / "a.gguf",
        fields={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0},
    )
    assert GGUFSource(tmp_path / "a.gguf").config.rope_scaling == {
        "rope_type": "linear",
        "factor": 4.0,
    }
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    freqs = llama3_rope_factors(scaling, HEAD_DIM, 500000.0)
    write_model(
        tmp_path / "b.gguf",
        fields={"llama.rope.freq_base": 500000.0},
        extra={"rope_freqs.weight": freqs},
    )
    assert GGUFSource(tmp_path / "b.gguf").config.rope_scaling == scaling
    write_model(tmp_path / "c.gguf", extra={"rope_freqs.weight": freqs})  # wrong theta for them
    with pytest.raises(UnsupportedModel, match="rope_freqs"):
        GGUFSource(tmp_path / "c.gguf")


def test_unsupported_architecture_and_tensor_type(tmp_path: Path) -> None:
    write_model(tmp_path / "a.gguf", fields={"general.architecture": "gpt2"})
    with pytest.raises(UnsupportedModel, match="architecture 'gpt2'"):
        GGUFSource(tmp_path / "a.gguf")
    write_model(tmp_path / "moe.gguf", fields={"llama.expert_count": 8.0})
    with pytest.raises(UnsupportedModel, match="mixture-of-experts"):
        GGUFSource(tmp_path / "moe.gguf")
    unused = {"blk.0.odd.weight": np.arange(8, dtype=np.int32)}
    write_model(tmp_path / "b.gguf", tied=True, extra=unused)
    assert GGUFSource(tmp_path / "b.gguf").config.tie_word_embeddings  # unused: no matter
    used = unused | {"output.weight": np.zeros((VOCAB, HIDDEN), np.int32)}
    write_model(tmp_path / "b.gguf", tied=True, extra=used)
    with pytest.raises(UnsupportedModel, match="I32"):
        GGUFSource(tmp_path / "b.gguf")
    (tmp_path / "c.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(UnsupportedModel, match="GGUF"):
        GGUFSource(tmp_path / "c.gguf")


def test_open_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no such file") as missing:
        open_weights(tmp_path / "absent.gguf")
    assert "absent.gguf" in str(missing.value)
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).bytes(100))
    with pytest.raises(ModelNotFound, match="not a GGUF file.*expected"):
        open_weights(tmp_path / "random.bin")
    with pytest.raises(ModelNotFound, match="without config.json"):
        open_weights(tmp_path)
    write_model(tmp_path / "m.gguf")
    assert isinstance(open_weights(tmp_path / "m.gguf"), GGUFSource)


# --- the real default model -----------------------------------------------------------------


def test_smollm2_header() -> None:
    source = GGUFSource(SMOLLM)
    cfg = source.config
    assert (cfg.architecture, cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim) == (
        "llama",
        30,
        576,
        64,
    )
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert (cfg.intermediate_size, cfg.max_position_embeddings, cfg.rope_theta) == (
        1536,
        8192,
        100000.0,
    )
    assert cfg.tie_word_embeddings
    meta = source.metadata
    assert (meta.architecture, meta.quantization, meta.file_type, meta.context_length) == (
        "llama",
        "Q4_1",
        3,
        8192,
    )


def test_smollm2_middle_shard() -> None:
    got = GGUFSource(SMOLLM).tensors(shard(10, 20, 30))
    layers = {int(n.split(".")[2]) for n in got}
    assert layers == set(range(10, 20)) and len(got) == 10 * 9
    assert got["model.layers.10.self_attn.k_proj.weight"].shape == (192, 576)
    assert got["model.layers.19.mlp.down_proj.weight"].shape == (576, 1536)


@pytest.fixture(scope="module")
def transformers_state(hf_smollm2: Any) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in hf_smollm2.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("start,end", [(0, 10), (10, 20), (20, 30)])
def test_smollm2_equals_transformers(
    transformers_state: dict[str, np.ndarray], start: int, end: int
) -> None:
    ours = GGUFSource(SMOLLM).tensors(shard(start, end, 30))
    theirs = {
        k: v
        for k, v in transformers_state.items()
        if (k.startswith("model.layers.") and start <= int(k.split(".")[2]) < end)
        or (start == 0 and k == "model.embed_tokens.weight")
        or (end == 30 and k in ("model.norm.weight", "lm_head.weight"))
    }
    assert set(ours) == set(theirs)
    for name, x in theirs.items():
        assert ours[name].shape == x.shape, name
        assert float(np.abs(ours[name] - x).max()) <= 1e-6, name
