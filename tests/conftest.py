"""Shared pytest setup. Its presence (with tests/__init__.py) puts the repo root on sys.path."""

from typing import Any

import pytest

from tests.helpers.smollm2 import SMOLLM_DIR, SMOLLM_FILE


@pytest.fixture(scope="session")
def hf_smollm2() -> Any:
    """transformers' SmolLM2 from the same GGUF, float32, eval: loaded once per test run."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        SMOLLM_DIR, gguf_file=SMOLLM_FILE, dtype=torch.float32
    )
    return model.eval()
