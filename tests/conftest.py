"""Shared pytest setup. Its presence (with tests/__init__.py) puts the repo root on sys.path."""

from pathlib import Path
from typing import Any

import pytest

from tests.helpers.smollm2 import SMOLLM_DIR, SMOLLM_FILE
from tests.helpers.tiny import tiny_hf


@pytest.fixture(scope="session")
def hf_smollm2() -> Any:
    """transformers' SmolLM2 from the same GGUF, float32, eval: loaded once per test run."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        SMOLLM_DIR, gguf_file=SMOLLM_FILE, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random llama (tests/helpers/tiny.py) as a Hugging Face directory: config.json
    and model.safetensors, saved once per test run for the runner tests that load it."""
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf("llama").save_pretrained(path)
    return path
