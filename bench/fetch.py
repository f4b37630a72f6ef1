"""Placing a model on 3 nodes: its files from the Hub against from a peer, side by side in one run.

The repo is a random llama in bf16 safetensors (hidden 1024, 12 layers, vocab 32000: ~410 MB by
default), one file per 2 layers plus one for the embeddings and one for the norm and head, served
by the Hub stand-in (tests/helpers/hub_server.py) on loopback. Every scenario starts 3 fresh
`shoal node` processes (a fresh weights cache each, so every load converts the same weights) and
places the repo by its id split in thirds, timing POST /instance → every runner ready:

A. from the Hub: no node holds anything; each stage's node downloads its files from the Hub (the
   small files once, by stage 0's node; the others copy them from it).
B. from a peer: node 1 already holds the whole repo (`shoal pull`), the Hub is down, and the
   stages sit on nodes 2, 3 and 1, so nodes 2 and 3 copy their layers from node 1.
C. whole, per node (exo's layout; `--no-whole` skips it): 3 whole-model instances, one per node,
   placed at once, from the Hub.

Reported per node: its layers, the seconds until its runner left `downloading` and until it was
ready, the bytes it fetched (its Hub cache before → after), and by source (its log's "downloading
… from the Hub" and "copying … from peers" lines), each against the whole repo; per scenario the
bytes the Hub sent (its access log) and the seconds to ready.

Run: python bench/fetch.py [--layers 12] [--hidden 1024] [--vocab 32000] [--repeats 1]
     [--quant int4] [--no-whole]
The repo is written once under $TMPDIR/shoal-bench-fetch-repo-<parameters> and reused.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests.helpers.hub_server import HubServer  # noqa: E402
from tests.helpers.mlx_repos import BOS, EOS, INDEX_FILE, write_tokenizer  # noqa: E402

from shoal.bench.nodes import NodeProcess, start_cluster_node  # noqa: E402

NODES = 3
READY_TIMEOUT_S = 900.0
POLL_S = 0.05
HUB_LINE = re.compile(r"downloading (\S+) from the Hub \(\S+, (\d+) B\)")
PEER_LINE = re.compile(r"copying (\S+) \((\d+) B\) from \d+ peer")


# ---- 1. the repo ----


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    vocab: int

    @property
    def ffn(self) -> int:
        return round(self.hidden * 2.75 / 64) * 64  # 1024 → 2816, as TinyLlama

    @property
    def heads(self) -> int:
        return max(1, self.hidden // 128)  # head_dim 128

    @property
    def kv_heads(self) -> int:
        return max(1, self.heads // 2)

    @property
    def repo_id(self) -> str:
        return f"shoal-bench/random-llama-h{self.hidden}-l{self.layers}-v{self.vocab}"

    def config(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.hidden // self.heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "bos_token_id": BOS,
            "eos_token_id": EOS,
            "torch_dtype": "bfloat16",
        }

    def tensors(self) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
        """File name → its tensors' (name, shape): embeddings, 2 layers a file, norm and head."""
        h, kv = self.hidden, self.kv_heads * (self.hidden // self.heads)
        groups: list[list[tuple[str, tuple[int, ...]]]] = [
            [("model.embed_tokens.weight", (self.vocab, h))]
        ]
        for first in range(0, self.layers, 2):
            group = []
            for i in range(first, min(first + 2, self.layers)):
                p = f"model.layers.{i}"
                group += [
                    (f"{p}.input_layernorm.weight", (h,)),
                    (f"{p}.self_attn.q_proj.weight", (h, h)),
                    (f"{p}.self_attn.k_proj.weight", (kv, h)),
                    (f"{p}.self_attn.v_proj.weight", (kv, h)),
                    (f"{p}.self_attn.o_proj.weight", (h, h)),
                    (f"{p}.post_attention_layernorm.weight", (h,)),
                    (f"{p}.mlp.gate_proj.weight", (self.ffn, h)),
                    (f"{p}.mlp.up_proj.weight", (self.ffn, h)),
                    (f"{p}.mlp.down_proj.weight", (h, self.ffn)),
                ]
            groups.append(group)
        groups.append([("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))])
        n = len(groups)
        return {f"model-{k + 1:05d}-of-{n:05d}.safetensors": g for k, g in enumerate(groups)}


def _bf16(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> bytes:
    """Random weights, O(1) activations (as tests/helpers/tiny.py), rounded to bfloat16."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    if name.endswith("norm.weight"):
        noise = 1.0 + 0.1 * noise
    elif "embed_tokens" not in name:
        noise *= np.float32(shape[-1] ** -0.5)
    bits = noise.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()


def _write_safetensors(
    path: Path, specs: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator
) -> int:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    at = 0
    for name, shape in specs:
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [at, at + size]}
        at += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, shape in specs:
            f.write(_bf16(name, shape, rng))
    return at


def make_repo(shape: Shape) -> Path:
    """The repo's directory, written once per shape (a `.done` file marks it complete)."""
    dest = Path(tempfile.gettempdir()) / (
        f"shoal-bench-fetch-repo-h{shape.hidden}-l{shape.layers}-v{shape.vocab}"
    )
    if (dest / ".done").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    rng = np.random.default_rng(0)
    weight_map: dict[str, str] = {}
    total = 0
    for file, specs in shape.tensors().items():
        total += _write_safetensors(dest / file, specs, rng)
        weight_map |= {name: file for name, _ in specs}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dest / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (dest / "config.json").write_text(json.dumps(shape.config(), indent=2))
    write_tokenizer(dest)
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(dest / "tokenizer.json")).get_vocab_size()
    if ids > shape.vocab:
        raise SystemExit(f"--vocab {shape.vocab} is below the tokenizer's {ids} ids")
    (dest / ".done").write_text("")
    print(f"wrote {_mb(_repo_bytes(dest))} MB to {dest} in {time.perf_counter() - began:.0f} s")
    return dest


def _repo_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and p.name != ".done")


# ---- 2. a cluster of fresh nodes ----


@contextmanager
def cluster(env: dict[str, str], args: list[str], pull: str | None = None) -> Iterator[list[Any]]:
    """3 fresh nodes (the first makes the cluster, the others join), stopped by pid at the end,
    their data dirs removed; pull: a repo node 1 downloads whole before the others join."""
    with tempfile.TemporaryDirectory(prefix="shoal-bench-fetch-") as tmp:
        nodes: list[NodeProcess] = []
        try:
            cache = ["--weights-cache", str(Path(tmp) / "weights-cache")]
            nodes.append(start_cluster_node(Path(tmp), args=[*args, *cache], env=env))
            nodes[0].wait_ready()
            if pull is not None:
                cmd = [sys.executable, "-m", "shoal.cli", "pull", pull]
                subprocess.run(
                    [*cmd, "--data-dir", str(nodes[0].data)],
                    env={**os.environ, **env},
                    check=True,
                    capture_output=True,
                    timeout=READY_TIMEOUT_S,
                )
            for _ in range(NODES - 1):
                nodes.append(
                    start_cluster_node(Path(tmp), [nodes[0]], args=[*args, *cache], env=env)
                )
                nodes[-1].wait_ready()
            _until(lambda: _joined(nodes), 120, "every node joined with its profile")
            yield nodes
        finally:
            for node in nodes:
                node.stop()


def _joined(nodes: list[NodeProcess]) -> bool:
    try:
        state = nodes[0].get("/state")
    except httpx.HTTPError:
        return False
    seen = state.get("nodes", {}).values()
    profiled = {n["node_id"] for n in seen if n.get("profile")}
    return {n.node_id for n in nodes} <= profiled


def _until(ok: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout_s:.0f} s")
        time.sleep(0.2)


def held(node: NodeProcess, repo: str) -> dict[str, int]:
    """The repo's files the node holds in its Hub cache (any commit): name → bytes."""
    folder = node.data / "hub" / repo.replace("/", "--")
    if not folder.is_dir():
        return {}
    return {
        p.name: p.stat().st_size
        for commit in folder.iterdir()
        if commit.is_dir() and commit.name != "refs"
        for p in commit.iterdir()
        if p.is_file()
    }


def logged(node: NodeProcess) -> tuple[int, int]:
    """Bytes the node's log says it took (from the Hub, from peers), one line per transfer."""
    text = node.log()
    hub = sum(int(m[1]) for m in HUB_LINE.findall(text))
    peers = sum(int(m[1]) for m in PEER_LINE.findall(text))
    return hub, peers


@dataclass
class Timeline:
    """When each instance's runners left `downloading` and became ready, from the POST."""

    began: float
    fetched: dict[tuple[str, int], float] = field(default_factory=dict)
    ready: dict[tuple[str, int], float] = field(default_factory=dict)
    nodes: dict[tuple[str, int], str] = field(default_factory=dict)


def place(entry: NodeProcess, repo: str, layers: str) -> str:
    r = httpx.post(
        f"{entry.url}/instance", json={"model": repo, "layers": layers}, timeout=READY_TIMEOUT_S
    )
    if r.status_code != 200:
        raise RuntimeError(f"POST /instance {layers}: {r.status_code} {r.text}")
    return str(r.json()["instance_id"])


def watch(entry: NodeProcess, nodes: list[NodeProcess], ids: list[str], tl: Timeline) -> None:
    """Poll the entry node's /v1/instances until every runner of `ids` is ready."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        now = time.perf_counter() - tl.began
        rows = {i["instance_id"]: i for i in entry.get("/v1/instances")["data"]}
        for iid in ids:
            row = rows.get(iid)
            for k, runner in (row or {}).get("runners", {}).items():
                key, kind = (iid, int(k)), runner["status"]["kind"]
                tl.nodes[key] = row["stages"][int(k)]["node_id"] if row else ""
                if kind == "failed":
                    logs = "\n".join(n.log()[-3000:] for n in nodes)
                    raise RuntimeError(f"{iid} stage {k} failed: {runner['status']}\n{logs}")
                if kind in ("loading", "ready"):
                    tl.fetched.setdefault(key, now)
                if kind == "ready":
                    tl.ready.setdefault(key, now)
        if all(rows.get(i, {}).get("ready") for i in ids):
            return
        time.sleep(POLL_S)
    raise TimeoutError(f"instances not ready after {READY_TIMEOUT_S:.0f} s")


# ---- 3. the scenarios ----


@dataclass
class NodeRow:
    name: str
    layers: str
    fetched_s: float
    ready_s: float
    fetched: int  # bytes added to its Hub cache
    from_hub: int
    from_peers: int
    holds: int


@dataclass
class Result:
    scenario: str
    seconds: float
    hub_sent: int
    hub_served: int  # requests the Hub answered (not dropped while down)
    rows: list[NodeRow]


def run_placement(
    scenario: str,
    hub: HubServer,
    repo: str,
    nodes: list[NodeProcess],
    layouts: list[list[tuple[int, int, int]]],  # per instance: (node index, start, end)
) -> Result:
    before = {n.node_id: held(n, repo) for n in nodes}
    logs_before = {n.node_id: logged(n) for n in nodes}
    access_before = len(hub.access())
    sent_before = hub.sent(repo)
    names = {n.node_id: f"node {i + 1}" for i, n in enumerate(nodes)}
    entry = nodes[0]
    tl = Timeline(time.perf_counter())
    specs = [",".join(f"{nodes[i].node_id}:{a}-{b}" for i, a, b in lay) for lay in layouts]
    ids = [place(entry, repo, spec) for spec in specs]
    watch(entry, nodes, ids, tl)
    seconds = max(tl.ready.values())
    hub.wait_idle()
    served = [a for a in hub.access()[access_before:] if a.status not in (0, 503)]
    rows = []
    for key, node_id in sorted(tl.nodes.items(), key=lambda kv: names[kv[1]]):
        node = next(n for n in nodes if n.node_id == node_id)
        iid, k = key
        lay = layouts[ids.index(iid)][k]
        after = held(node, repo)
        hub_b, peer_b = (x - y for x, y in zip(logged(node), logs_before[node_id], strict=True))
        rows.append(
            NodeRow(
                names[node_id],
                f"{lay[1]}-{lay[2]}",
                tl.fetched[key],
                tl.ready[key],
                sum(s for f, s in after.items() if before[node_id].get(f) != s),
                hub_b,
                peer_b,
                sum(after.values()),
            )
        )
    return Result(scenario, seconds, hub.sent(repo) - sent_before, len(served), rows)


def thirds(layers: int, order: list[int]) -> list[tuple[int, int, int]]:
    cuts = [round(i * layers / NODES) for i in range(NODES + 1)]
    return [(node, cuts[s], cuts[s + 1]) for s, node in enumerate(order)]


def scenario_hub(hub: HubServer, repo: str, n_layers: int, env: dict, args: list) -> Result:
    with cluster(env, args) as nodes:
        return run_placement("A. from the Hub", hub, repo, nodes, [thirds(n_layers, [0, 1, 2])])


def scenario_peer(hub: HubServer, repo: str, n_layers: int, env: dict, args: list) -> Result:
    with cluster(env, args, pull=repo) as nodes:
        hub.down = True
        try:
            lay = [thirds(n_layers, [1, 2, 0])]
            return run_placement("B. from a peer (Hub down)", hub, repo, nodes, lay)
        finally:
            hub.down = False


def scenario_whole(hub: HubServer, repo: str, n_layers: int, env: dict, args: list) -> Result:
    with cluster(env, args) as nodes:
        lay = [[(i, 0, n_layers)] for i in range(NODES)]
        return run_placement("C. whole model per node, from the Hub", hub, repo, nodes, lay)


# ---- 4. the report ----


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def report(result: Result, whole: int) -> None:
    print(f"\n{result.scenario}: {result.seconds:.1f} s from POST /instance to every runner ready")
    print(
        f"  Hub sent {_mb(result.hub_sent)} MB = {result.hub_sent / whole:.2f} x the repo "
        f"({result.hub_served} requests answered)"
    )
    head = ("node", "layers", "fetched s", "ready s", "fetched MB", "x repo", "Hub MB", "peer MB")
    print("  " + "".join(f"{h:>11}" for h in head) + f"{'holds MB':>11}")
    for r in result.rows:
        cells = (
            r.name,
            r.layers,
            f"{r.fetched_s:.1f}",
            f"{r.ready_s:.1f}",
            _mb(r.fetched),
            f"{r.fetched / whole:.2f}",
            _mb(r.from_hub),
            _mb(r.from_peers),
            _mb(r.holds),
        )
        print("  " + "".join(f"{c:>11}" for c in cells))
    total = sum(r.fetched for r in result.rows)
    print(f"  all nodes fetched {_mb(total)} MB = {total / whole:.2f} x the repo")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quant", default="int4", help="the nodes' --quant (torch engine)")
    parser.add_argument("--no-whole", action="store_true", help="skip scenario C")
    args = parser.parse_args()
    if args.layers < NODES:
        parser.error(f"--layers must be at least {NODES}")
    shape = Shape(args.hidden, args.layers, args.vocab)
    directory = make_repo(shape)
    whole = _repo_bytes(directory)
    node_args = ["--engine", "torch", "--quant", args.quant, "--no-probe-engines"]
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(
        f"{shape.repo_id}: {_mb(whole)} MB in {len(shape.tensors())} safetensors files "
        f"(hidden {shape.hidden}, ffn {shape.ffn}, {shape.layers} layers, vocab {shape.vocab})"
    )
    print(
        f"{cpu_model()}, {os.cpu_count()} cores, loopback (TLS and sha256 bound the transfer "
        f"by CPU; every node, runner and the Hub share the cores); load average {load}"
    )
    scenarios = [scenario_hub, scenario_peer] + ([] if args.no_whole else [scenario_whole])
    results: dict[str, list[Result]] = {}
    with HubServer({shape.repo_id: directory}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
        for i in range(args.repeats):
            for scenario in scenarios:
                result = scenario(hub, shape.repo_id, shape.layers, env, node_args)
                print(f"\n-- run {i + 1} of {args.repeats}", end="")
                report(result, whole)
                results.setdefault(result.scenario, []).append(result)
    print("\nsummary (medians over runs)")
    base = statistics.median(r.seconds for r in results["A. from the Hub"])
    for name, runs in results.items():
        seconds = statistics.median(r.seconds for r in runs)
        fetched = statistics.median(sum(x.fetched for x in r.rows) for r in runs)
        hub_sent = statistics.median(r.hub_sent for r in runs)
        print(
            f"  {name:<40} {seconds:6.1f} s ({seconds / base:.2f} x A)   "
            f"Hub sent {hub_sent / whole:.2f} x repo   nodes fetched {fetched / whole:.2f} x repo"
        )


if __name__ == "__main__":
    main()
