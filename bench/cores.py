"""Two models busy on one node: decode tok/s when its runners share the cores, and when each
takes them all.

A real `shoal node` on loopback holds two whole-model instances of the shipped SmolLM2 (int4, the
native kernels), so it runs two runner processes. One greedy chat request alone, then two at
once (the node routes them to the two instances, least loaded first), timed end to end. Two
settings in one run, each its own node:

- shared: no --threads, the node splits its cores among the runners that compute on them
  (worker/worker.py: cores // runners each, all of them for a runner alone);
- every core each: --threads <cores>, what every runner took before it shared.

    python bench/cores.py              # --tokens 96 --runs 3
"""

import argparse
import concurrent.futures
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from shoal.bench.nodes import CLUSTER_FLAGS, NodeProcess, start_node  # noqa: E402
from shoal.worker.worker import node_cores  # noqa: E402

MODEL = "smollm2-135m"
PROMPT = "Write a long story about a lighthouse keeper and the ships she guided home."


def chat(node: NodeProcess, tokens: int) -> tuple[int, str]:
    """One greedy request; its completion tokens and its text."""
    answer = node.chat(MODEL, PROMPT, tokens)
    text = str(answer["choices"][0]["message"]["content"])
    return int(answer["usage"]["completion_tokens"]), text


def two_instances(node: NodeProcess) -> None:
    """Place the model twice, whole, on this node; wait until both answer."""
    node.place_here(MODEL)
    node.place_here(MODEL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready = [i for i in node.get("/v1/instances")["data"] if i["ready"]]
        if len(ready) == 2:
            return
        time.sleep(0.5)
    raise TimeoutError(f"two instances not ready:\n{node.log()[-3000:]}")


def measure(node: NodeProcess, tokens: int, runs: int) -> dict[str, Any]:
    chat(node, 8)  # warm both runners up
    chat(node, 8)
    alone: list[float] = []
    together: list[float] = []
    texts: set[str] = set()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for _ in range(runs):
            start = time.perf_counter()
            n, text = chat(node, tokens)
            alone.append(n / (time.perf_counter() - start))
            texts.add(text)
            start = time.perf_counter()
            both = list(pool.map(lambda _: chat(node, tokens), range(2)))
            together.append(sum(n for n, _ in both) / (time.perf_counter() - start))
            texts.update(text for _, text in both)
    if len(texts) != 1:
        raise SystemExit("the answers differ between runs: greedy output must not")
    return {"alone": statistics.median(alone), "together": statistics.median(together)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    cores = node_cores()
    settings: dict[str, int | None] = {"shared": None, "every core each": cores}
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, threads in settings.items():
            flags = [*CLUSTER_FLAGS, "--quant", "int4"]
            node = start_node(Path(tmp) / name.replace(" ", "-"), flags, threads=threads)
            try:
                node.wait_ready()
                two_instances(node)
                results[name] = measure(node, args.tokens, args.runs)
            finally:
                node.stop()
    print(f"\nSmolLM2 int4, 2 instances on one node, {cores} cores, {args.tokens} tokens a request")
    print(f"{'setting':<18} {'1 request tok/s':>16} {'2 at once, total':>17}")
    for name, r in results.items():
        print(f"{name:<18} {r['alone']:>16.1f} {r['together']:>17.1f}")
    shared, each = results["shared"], results["every core each"]
    print(
        f"shared / every core each: alone {shared['alone'] / each['alone']:.2f}x, "
        f"2 at once {shared['together'] / each['together']:.2f}x"
    )


if __name__ == "__main__":
    main()
