"""Whether a model runs here: the pure decision over a table of cases, and the local lookups."""

import json
from pathlib import Path
from typing import Any

import pytest

from shoal.models.availability import (
    Availability,
    CannotRun,
    Local,
    NeedsDownload,
    RunsHere,
    availability,
    fmt_gb,
    hub_copy,
    local_copies,
    readers,
)
from shoal.models.catalog import builtin_cards
from shoal.types.ids import ModelId
from shoal.types.model_card import HubWeights, LocalWeights, ModelCard
from shoal.types.model_config import ARCHITECTURES

GB = 10**9
MLX = HubWeights(format="mlx", repo="mlx-community/M-4bit", quantization="4bit")
GGUF = HubWeights(
    format="gguf", repo="o/M-GGUF", file="M-Q4_K_M.gguf", quantization="Q4_K_M", storage_bytes=GB
)
ORIGINAL = HubWeights(
    format="safetensors", repo="meta/M", quantization="bf16", storage_bytes=4 * GB, gated=True
)
FP8 = HubWeights(format="safetensors", repo="deepseek/M", quantization="fp8")


def card(*weights: HubWeights | LocalWeights, architecture: str = "llama") -> ModelCard:
    return ModelCard.model_validate(
        {"id": "m", "name": "M", "family": "f", "architecture": architecture,
         "hf_repo": "mlx-community/M-4bit", "layers": 16, "hidden_size": 2048, "heads": 32,
         "kv_heads": 8, "head_dim": 64, "vocab_size": 128256, "context_length": 131072,
         "storage_bytes": 700_000_000, "quantization": "4bit", "license": "l",
         "weights": weights}
    )  # fmt: skip


ALL = ("torch", "numpy", "native", "llamacpp", "mlx", "fake")
HERE = Path("/models/m")
NEED = {"torch": 6 * GB, "numpy": 2 * GB, "native": 2 * GB, "llamacpp": GB, "mlx": 6 * GB}

CASES: list[tuple[str, ModelCard, dict[str, Any], Availability]] = [
    ("a local copy runs now", card(MLX, GGUF), {"local": {0: Local(HERE, 7)}},
     RunsHere("mlx", HERE)),
    ("the first source wins", card(MLX, GGUF), {}, NeedsDownload(700_000_000, MLX.repo)),
    ("a partial download counts", card(MLX), {"local": {0: Local(None, 200_000_000)}},
     NeedsDownload(500_000_000, MLX.repo)),
    ("llama.cpp reads the GGUF only", card(MLX, GGUF), {"engines": ["llamacpp"]},
     NeedsDownload(GB, GGUF.repo, GGUF.file)),
    ("a gated repo without a token", card(ORIGINAL), {}, NeedsDownload(4 * GB, ORIGINAL.repo,
     needs_token=True)),
    ("a gated repo with a token", card(ORIGINAL), {"token": True},
     NeedsDownload(4 * GB, ORIGINAL.repo)),
    ("a later source that is here beats a download", card(MLX, GGUF),
     {"local": {1: Local(HERE, GB)}}, RunsHere("gguf", HERE)),
    ("the source that fits is chosen", card(MLX, GGUF), {"engines": ["torch", "llamacpp"],
     "memory": {"torch": 3 * GB, "llamacpp": 3 * GB}}, NeedsDownload(GB, GGUF.repo, GGUF.file)),
    ("architecture", card(MLX, architecture="gpt2"), {},
     CannotRun("no engine runs architecture gpt2 yet")),
    ("a mixture of experts runs", card(MLX, architecture="qwen3_moe"), {},
     NeedsDownload(700_000_000, MLX.repo)),
    ("latent attention runs", card(MLX, architecture="deepseek_v3"), {},
     NeedsDownload(700_000_000, MLX.repo)),
    ("no engine", card(MLX), {"engines": ["fake"]},
     CannotRun("no inference engine is installed (numpy, torch, llama-cpp-python, mlx)")),
    ("no reader", card(MLX, FP8), {"engines": ["llamacpp"]},
     CannotRun("no engine here reads its weights (mlx 4bit, safetensors fp8; engines: llamacpp)")),
    ("memory", card(MLX, GGUF), {"memory": {"numpy": GB // 2, "llamacpp": GB // 2}},
     CannotRun("needs 1.00 GB of memory (llamacpp), 0.50 GB available")),
    ("a local copy too big to run", card(MLX), {"engines": ["numpy"], "memory": {"numpy": GB},
     "local": {0: Local(HERE, 7)}},
     CannotRun("needs 2.00 GB of memory (numpy), 1.00 GB available")),
    ("nothing to download", card(LocalWeights(format="gguf", path="/absent.gguf")), {},
     CannotRun("its weights are not on this machine and the card names no Hub repo")),
]  # fmt: skip


@pytest.mark.parametrize(("name", "model", "given", "expected"), CASES, ids=[c[0] for c in CASES])
def test_availability(
    name: str, model: ModelCard, given: dict[str, Any], expected: Availability
) -> None:
    inputs: dict[str, Any] = {
        "architectures": ARCHITECTURES,
        "engines": ALL,
        "local": {},
        "need": NEED,
        "memory": None,
        "token": False,
    }
    assert availability(model, **(inputs | given)) == expected


def test_lines_say_what_to_do() -> None:
    assert RunsHere("gguf", HERE).line == "runs here now (gguf)"
    assert NeedsDownload(810_000_000, "o/r", "f.gguf").line == (
        "runs after a download of 0.81 GB from o/r/f.gguf"
    )
    assert NeedsDownload(4 * GB, "meta/M", needs_token=True).line == (
        "runs after a download of 4.00 GB from meta/M; gated: set HF_TOKEN"
    )
    assert CannotRun("why").line == "cannot run here: why"
    assert [fmt_gb(n) for n in (810_000_000, 42_520_000_000, 688_600_000_000)] == [
        "0.81 GB",
        "42.5 GB",
        "689 GB",
    ]


def test_readers() -> None:
    m = card()
    assert readers(GGUF, m) == {"llamacpp", "torch", "numpy", "native"}
    assert readers(MLX, m) == {"torch", "numpy", "native", "mlx"}
    assert readers(ORIGINAL, m) == readers(MLX, m)
    assert readers(FP8, m) == set(), "block-scaled fp8 is not read yet"
    assert readers(MLX.model_copy(update={"engines": ("mlx",)}), m) == {"mlx"}


def test_seed_catalog_lines() -> None:
    # On a node with numpy and 24 GB, nothing downloaded: the cards download their MLX repo
    # (phi3 and granite too), the others are too big: memory, never their architecture.
    cards = builtin_cards()
    answers = {
        model_id: availability(
            cards[ModelId(model_id)],
            architectures=ARCHITECTURES,
            engines=["numpy"],
            local={},
            need={"numpy": 2 * cards[ModelId(model_id)].storage_bytes},
            memory={"numpy": 24 * GB},
        )
        for model_id in (
            "llama-3.2-1b",
            "qwen3-0.6b-8bit",
            "phi-3-mini",
            "granite-3.3-2b",
            "llama-3.3-70b",
            "qwen3-30b",
            "deepseek-v3.1-4bit",
        )
    }
    assert answers["llama-3.2-1b"] == NeedsDownload(
        729808896, "mlx-community/Llama-3.2-1B-Instruct-4bit"
    )
    assert answers["qwen3-0.6b-8bit"] == NeedsDownload(698351616, "mlx-community/Qwen3-0.6B-8bit")
    assert answers["phi-3-mini"] == NeedsDownload(
        2200961024, "mlx-community/Phi-3-mini-128k-instruct-4bit"
    )
    assert answers["granite-3.3-2b"] == NeedsDownload(
        5191499776, "mlx-community/granite-3.3-2b-instruct-fp16"
    )
    for giant in ("llama-3.3-70b", "qwen3-30b", "deepseek-v3.1-4bit"):
        answer = answers[giant]
        assert isinstance(answer, CannotRun) and "memory" in answer.reason


# --- what this machine holds ---------------------------------------------------------------------

COMMIT = "c" * 40


def snapshot(root: Path, repo: str) -> Path:
    repo_root = root / repo.replace("/", "--")
    (repo_root / "refs").mkdir(parents=True)
    (repo_root / "refs" / "main").write_text(COMMIT)
    snap = repo_root / COMMIT
    (snap / ".shoal").mkdir(parents=True)
    return snap


def test_hub_copy_of_a_snapshot_with_a_listing(tmp_path: Path) -> None:
    where = HubWeights(format="mlx", repo="mlx-community/M-4bit")
    assert hub_copy(tmp_path, where) == Local()
    snap = snapshot(tmp_path, where.repo)
    files = [("config.json", 2), ("model-1.safetensors", 10), ("model-2.safetensors", 6),
             ("tokenizer.json", 3)]  # fmt: skip
    listing = {"repo": where.repo, "commit": COMMIT, "files": [
        {"path": p, "size": s, "sha256": None, "blob_id": None} for p, s in files]}  # fmt: skip
    (snap / ".shoal" / "listing.json").write_text(json.dumps(listing))
    (snap / "config.json").write_bytes(b"{}")
    (snap / "model-1.safetensors").write_bytes(b"x" * 10)
    (snap / ".shoal" / "model-2.safetensors.part").write_bytes(b"x" * 4)
    assert hub_copy(tmp_path, where) == Local(None, 16)  # 2 + 10 complete, 4 of 6 partial
    (snap / "model-2.safetensors").write_bytes(b"x" * 6)
    assert hub_copy(tmp_path, where) == Local(snap, 18)  # the tokenizer is not a weight


def test_hub_copy_without_a_listing_reads_the_index(tmp_path: Path) -> None:
    where = HubWeights(format="safetensors", repo="o/m")
    snap = snapshot(tmp_path, where.repo)
    (snap / "config.json").write_text("{}")
    index = {"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    (snap / "m-1.safetensors").write_bytes(b"x")
    assert hub_copy(tmp_path, where).path is None
    (snap / "m-2.safetensors").write_bytes(b"x")
    assert hub_copy(tmp_path, where).path == snap


def test_local_copies_of_a_gguf_source_and_a_local_path(tmp_path: Path) -> None:
    gguf = HubWeights(format="gguf", repo="o/M-GGUF", file="M-Q8_0.gguf")
    there = tmp_path / "m.gguf"
    model = card(MLX, gguf, LocalWeights(format="gguf", path=str(there)))
    root = tmp_path / "hub"
    assert local_copies(model, root, hf_cache_dir=tmp_path / "hf") == {}
    snap = snapshot(root, gguf.repo)
    (snap / ".shoal" / "M-Q8_0.gguf.part").write_bytes(b"x" * 5)
    there.write_bytes(b"GGUF")
    assert local_copies(model, root, hf_cache_dir=tmp_path / "hf") == {
        1: Local(None, 5),
        2: Local(there, 4),
    }
    (snap / "M-Q8_0.gguf").write_bytes(b"x" * 9)
    assert local_copies(model, root, hf_cache_dir=tmp_path / "hf")[1] == Local(
        snap / "M-Q8_0.gguf", 9
    )


# --- `shoal models`: the rows it prints ----------------------------------------------------------


def test_shoal_models_local_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from shoal.cli import main

    # The Llama 3.2 1B GGUF downloaded into the Hub cache: a later source, but here.
    snap = snapshot(tmp_path / "hub", "bartowski/Llama-3.2-1B-Instruct-GGUF")
    (snap / "Llama-3.2-1B-Instruct-Q4_K_M.gguf").write_bytes(b"GGUF")
    main(["models", "--local", "--json", "--data-dir", str(tmp_path)])
    rows = {row["id"]: row for row in json.loads(capsys.readouterr().out)}
    assert len(rows) == 23
    assert rows["smollm2-135m"]["availability"] == "runs here now (gguf)"
    assert rows["llama-3.2-1b"]["availability"] == "runs here now (gguf)"
    # its architecture runs: what it lacks here is memory (it needs all of its 378 GiB)
    assert rows["deepseek-v3.1-4bit"]["availability"].startswith("cannot run here: needs ")
    assert "memory" in rows["deepseek-v3.1-4bit"]["availability"]
    assert rows["deepseek-v3.1-4bit"]["storage_bytes"] == 405874409472


def test_model_rows_from_a_cluster(tmp_path: Path) -> None:
    from shoal.cli import _model_rows
    from shoal.models.catalog import Catalog
    from tests.helpers.state import GIB, profile

    nodes = [profile("a", engines=("numpy",)), profile("b", engines=("numpy",))]  # 2 x 16 GiB
    listed = {
        "llama-3.2-1b": {"id": "llama-3.2-1b", "status": "ready"},
        "llama-3.3-70b-8bit": {"id": "llama-3.3-70b-8bit", "status": "unavailable"},
        "qwen3-0.6b": {"id": "qwen3-0.6b", "status": "failed", "reason": "out of memory"},
        "from-path": {"id": "from-path", "status": "available", "architecture": "llama",
                      "quantization": "bf16", "storage_size_megabytes": 10},
    }  # fmt: skip
    rows = {r["id"]: r for r in _model_rows(Catalog(), listed, nodes, tmp_path / "hub")}
    assert list(rows) == list(listed)
    assert rows["llama-3.2-1b"]["availability"] == "ready on the cluster"
    assert rows["qwen3-0.6b"]["availability"] == "failed on the cluster: out of memory"
    free = 2 * (16 * GIB - int(16 * GIB * 0.1) - 256 * 2**20)  # both nodes after headroom
    assert rows["llama-3.3-70b-8bit"]["availability"].endswith(f"{fmt_gb(free)} available")
    assert rows["from-path"]["availability"] == "available"
    assert rows["from-path"]["storage_bytes"] == 10 * 2**20
