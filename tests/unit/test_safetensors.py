"""SafetensorsSource: config, shard selection, tied heads, bf16, sharded checkpoints, tokenizer."""

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import AddedToken, models, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers import decoders as tk_decoders

from shoal.engines.packed import Packed
from shoal.errors import UnsupportedModel
from shoal.models.safetensors import SafetensorsSource
from shoal.models.source import open_weights
from shoal.types.ids import ModelId
from shoal.types.shard import Shard
from tests.helpers.mlx_repos import split_names, write_index

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 32, 64, 4, 2, 300


def shard(start: int, end: int, n: int) -> Shard:
    return Shard(model_id=ModelId("m"), start=start, end=end, n_layers=n)


def hf_config(layers: int, *, tied: bool = False, model_type: str = "llama") -> dict[str, Any]:
    return {
        "model_type": model_type,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "bos_token_id": 256,
        "eos_token_id": 257,
    }


def random_tensors(layers: int, *, tied: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    kv = HIDDEN // HEADS * KV_HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def write_tokenizer(path: Path) -> None:
    """A byte-level tokenizer.json (bytes only, ChatML specials) and tokenizer_config.json."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tk_decoders.ByteLevel()
    specials = ["<|im_start|>", "<|im_end|>"]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.save(str(path / "tokenizer.json"))
    template = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": template}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def write_dir(
    path: Path, tensors: dict[str, np.ndarray], config: dict[str, Any], *, files: int = 1
) -> Path:
    """A Hugging Face directory; with files > 1, a sharded checkpoint with an index."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    write_tokenizer(path)
    if files == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    names = sorted(tensors)
    weight_map: dict[str, str] = {}
    for k in range(files):
        part = f"model-{k + 1:05d}-of-{files:05d}.safetensors"
        save_file({n: tensors[n] for n in names[k::files]}, str(path / part))
        weight_map |= dict.fromkeys(names[k::files], part)
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns, rounded to nearest even."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_bf16_file(file: Path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file of BF16 tensors, written by hand (numpy has no bfloat16)."""
    header, blobs, offset = {}, [], 0
    for name, x in tensors.items():
        blob = to_bf16_bits(x).tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(x.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_shards_hold_only_their_layers(tmp_path: Path) -> None:
    expected = random_tensors(3)
    expected["model.layers.1.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    source = SafetensorsSource(write_dir(tmp_path, expected, hf_config(3)))
    assert source.config.num_hidden_layers == 3 and source.config.head_dim == HIDDEN // HEADS
    middle = source.tensors(shard(1, 2, 3))
    assert set(middle) == {
        n for n in expected if n.startswith("model.layers.1.") and "rotary" not in n
    }
    first, last = source.tensors(shard(0, 1, 3)), source.tensors(shard(2, 3, 3))
    assert "model.embed_tokens.weight" in first and "lm_head.weight" not in first
    assert {"model.norm.weight", "lm_head.weight"} <= set(last)
    assert "model.embed_tokens.weight" not in last
    for got in (first, middle, last):
        for name, x in got.items():
            assert isinstance(x, np.ndarray) and x.dtype == np.float32
            np.testing.assert_array_equal(x, expected[name])
    with pytest.raises(ValueError):
        source.tensors(shard(0, 2, 2))


def test_tied_head_is_the_embedding(tmp_path: Path) -> None:
    expected = random_tensors(2, tied=True)
    source = SafetensorsSource(write_dir(tmp_path, expected, hf_config(2, tied=True)))
    last = source.tensors(shard(1, 2, 2))
    assert "model.embed_tokens.weight" not in last
    np.testing.assert_array_equal(last["lm_head.weight"], expected["model.embed_tokens.weight"])
    whole = source.tensors(shard(0, 2, 2))
    assert whole["lm_head.weight"] is whole["model.embed_tokens.weight"]


def test_bf16(tmp_path: Path) -> None:
    expected = random_tensors(2)
    path = tmp_path / "bf16"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(hf_config(2)))
    write_bf16_file(path / "model.safetensors", expected)
    got = SafetensorsSource(path).tensors(shard(0, 2, 2))
    assert set(got) == set(expected)
    for name, x in expected.items():
        rounded = (to_bf16_bits(x).astype(np.uint32) << 16).view(np.float32)
        g = got[name]
        assert isinstance(g, np.ndarray) and g.dtype == np.float32
        np.testing.assert_array_equal(g, rounded)
        assert np.abs(g - x).max() <= 4e-3 * np.abs(x).max()


def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    expected = random_tensors(3)
    source = SafetensorsSource(write_dir(tmp_path, expected, hf_config(3), files=3))
    got = source.tensors(shard(0, 3, 3))
    assert set(got) == set(expected)
    for name, x in expected.items():
        np.testing.assert_array_equal(got[name], x)


def test_tokenizer_and_open_weights(tmp_path: Path) -> None:
    path = write_dir(tmp_path, random_tensors(1), hf_config(1))
    source = open_weights(path)
    assert isinstance(source, SafetensorsSource)
    tok = source.tokenizer()
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "<|im_start|>hi<|im_end|>"
    assert tok.encode("<|im_start|>hi") == [256, *tok.encode("hi")] and len(tok.encode("hi")) == 2
    assert 257 in tok.eos_token_ids and tok.decode(tok.encode("héllo")) == "héllo"


def test_unsupported(tmp_path: Path) -> None:
    write_dir(tmp_path / "a", random_tensors(1), hf_config(1, model_type="gpt2"))
    with pytest.raises(UnsupportedModel, match="gpt2"):
        SafetensorsSource(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps(hf_config(1)))
    with pytest.raises(UnsupportedModel, match="no \\*.safetensors"):
        SafetensorsSource(tmp_path / "b")


# --- a real transformers checkpoint ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,shard_size", [("float32", None), ("bfloat16", None), ("float32", "40KB")]
)
def test_transformers_checkpoint(tmp_path: Path, dtype: str, shard_size: str | None) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **{k: v for k, v in hf_config(3).items() if k != "model_type"}
    )
    model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype))
    extra = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(tmp_path, **extra)
    write_tokenizer(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file() == (shard_size is not None)
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    source = open_weights(tmp_path)
    assert source.config.vocab_size == VOCAB and source.config.num_key_value_heads == KV_HEADS
    for start, end in [(0, 1), (1, 2), (2, 3)]:
        got = source.tensors(shard(start, end, 3))
        want = {
            k
            for k in state
            if (k.startswith("model.layers.") and start <= int(k.split(".")[2]) < end)
            or (start == 0 and k == "model.embed_tokens.weight")
            or (end == 3 and k in ("model.norm.weight", "lm_head.weight"))
        }
        assert set(got) == want
        for name in want:
            np.testing.assert_array_equal(got[name], state[name], err_msg=name)


# --- MLX-quantized checkpoints and directories with only some shards (no mlx needed) ---------


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values [n, k] → MLX's uint32 words [n, k * bits / 32] (a little-endian bit stream)."""
    fields = np.unpackbits(q[..., None], axis=-1, bitorder="little")[..., :bits]  # [n, k, bits]
    stream = np.packbits(fields.reshape(q.shape[0], -1), axis=1, bitorder="little")
    return stream.view("<u4")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_mlx_packed_triples(tmp_path: Path, bits: int) -> None:
    tensors = random_tensors(2)
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 2**bits, (FFN, HIDDEN), dtype=np.uint8)
    scales = rng.uniform(-0.1, 0.1, (FFN, HIDDEN // 32)).astype(np.float16)
    biases = rng.uniform(-1, 1, (FFN, HIDDEN // 32)).astype(np.float16)
    up = "model.layers.1.mlp.up_proj"
    del tensors[f"{up}.weight"]
    tensors |= {f"{up}.weight": pack_bits(q, bits), f"{up}.scales": scales, f"{up}.biases": biases}
    config = hf_config(2) | {
        "quantization": {"group_size": 64, "bits": 4, up: {"group_size": 32, "bits": bits}}
    }
    got = SafetensorsSource(write_dir(tmp_path, tensors, config, files=2)).tensors(shard(0, 2, 2))
    packed = got[f"{up}.weight"]
    assert isinstance(packed, Packed) and (packed.bits, packed.group_size) == (bits, 32)
    assert packed.shape == (FFN, HIDDEN) and set(got) == set(tensors) - {
        f"{up}.scales",
        f"{up}.biases",
    }
    want = q.reshape(FFN, -1, 32) * scales[..., None].astype(np.float32) + biases[..., None]
    np.testing.assert_array_equal(packed.dequantize(), want.reshape(FFN, HIDDEN))
    assert packed.nbytes == q.size * bits // 8 + scales.nbytes + biases.nbytes


def test_only_some_shard_files_present(tmp_path: Path) -> None:
    """Files split by layer, as real checkpoints are; a stage downloads only its own."""
    expected = random_tensors(3)
    weight_map = split_names(sorted(expected), 3, 3)  # file k: layer k (+ embeddings, head)
    for file in set(weight_map.values()):
        save_file(
            {n: expected[n] for n, f in weight_map.items() if f == file}, str(tmp_path / file)
        )
    write_index(tmp_path, weight_map, 0)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(3)))
    (tmp_path / weight_map["model.layers.2.mlp.up_proj.weight"]).unlink()
    source = SafetensorsSource(tmp_path)
    assert source.files_for(shard(0, 2, 3)) == {
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
    }
    got = source.tensors(shard(0, 2, 3))
    assert len(got) == 1 + 2 * 9
    for name, x in got.items():
        np.testing.assert_array_equal(x, expected[name])
    with pytest.raises(UnsupportedModel, match="model-00003-of-00003.safetensors"):
        source.tensors(shard(2, 3, 3))


def test_foreign_quantization_is_refused(tmp_path: Path) -> None:
    config = hf_config(1) | {"quantization_config": {"quant_method": "awq", "bits": 4}}
    with pytest.raises(UnsupportedModel, match="awq"):
        SafetensorsSource(write_dir(tmp_path, random_tensors(1), config))
