"""The speed model: how long a node takes per layer per token, and what a pipeline of them yields.

Decoding one token reads every weight it uses once and does two FLOPs per weight, so a layer on
a node takes the longer of the two:

    t_layer = max(bytes read / (memory_bandwidth_gbs * 1e9), 2 * params / (matmul_gflops * 1e9))

A dense layer's token uses all of it; a mixture of experts' only its active share (attention,
router, shared and per-token experts: MemoryModel.read_per_layer), though it holds them all.

Nodes that have not measured themselves get conservative defaults (10 GB/s, 50 GFLOP/s) and a
note. A token crosses one hop per stage boundary and one more from the last stage back to the
first (where the next token is fed in); a hop costs the measured latency from `links` (seconds,
either direction) or a default of 0.3 ms, and nothing when both ends are the same node. With one
request in flight, a pipeline yields

    tok/s = 1 / (sum over stages of layers * t_layer(node) + sum of hop latencies)

and with the pipeline full (as many requests as stages) it yields 1 / (the slowest stage's time),
the throughput policy's figure.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shoal.placement.memory import MemoryModel
from shoal.types.ids import NodeId
from shoal.types.profile import GpuInfo, NodeProfile

DEFAULT_BANDWIDTH_GBS = 10.0
DEFAULT_MATMUL_GFLOPS = 50.0
DEFAULT_HOP_S = 0.3e-3
# a GPU that has not measured itself (profile/gpu_bench.py): a modest one, about a T4's
DEFAULT_GPU_BANDWIDTH_GBS = 250.0
DEFAULT_GPU_GFLOPS = 8000.0

Links = Mapping[tuple[NodeId, NodeId], float]


@dataclass(frozen=True)
class NodeSpeed:
    """A node's figures as placement uses them, with a note for each default filled in."""

    bandwidth_gbs: float
    matmul_gflops: float
    notes: tuple[str, ...] = ()


def node_speed(profile: NodeProfile) -> NodeSpeed:
    """The node's measured figures, or the conservative defaults where it has none."""
    notes: list[str] = []
    bandwidth = profile.memory_bandwidth_gbs
    if bandwidth is None or bandwidth <= 0:
        bandwidth = DEFAULT_BANDWIDTH_GBS
        notes.append(f"{profile.node_id}: memory bandwidth unmeasured, assuming {bandwidth:g} GB/s")
    gflops = profile.matmul_gflops
    if gflops is None or gflops <= 0:
        gflops = DEFAULT_MATMUL_GFLOPS
        notes.append(f"{profile.node_id}: matmul speed unmeasured, assuming {gflops:g} GFLOP/s")
    return NodeSpeed(bandwidth, gflops, tuple(notes))


def gpu_speed(node_id: NodeId, gpu: GpuInfo) -> NodeSpeed:
    """A GPU's measured figures, or the GPU defaults (with a note) where it has none."""
    bandwidth, gflops = gpu.memory_bandwidth_gbs, gpu.matmul_gflops
    notes: list[str] = []
    if bandwidth is None or bandwidth <= 0 or gflops is None or gflops <= 0:
        bandwidth, gflops = DEFAULT_GPU_BANDWIDTH_GBS, DEFAULT_GPU_GFLOPS
        notes.append(
            f"{node_id}: {gpu.device} speed unmeasured, assuming {bandwidth:g} GB/s and "
            f"{gflops:g} GFLOP/s"
        )
    return NodeSpeed(bandwidth, gflops, tuple(notes))


def layer_time(mem: MemoryModel, speed: NodeSpeed) -> float:
    """Seconds one layer takes per decoded token on a node: memory- or compute-bound."""
    read = mem.read_per_layer / (speed.bandwidth_gbs * 1e9)
    compute = 2 * mem.params_per_layer / (speed.matmul_gflops * 1e9)
    return max(read, compute)


def hop_time(a: NodeId, b: NodeId, links: Links | None, default: float = DEFAULT_HOP_S) -> float:
    """Seconds a hidden vector takes from a to b: measured either way, else `default`."""
    if a == b:
        return 0.0
    if links:
        for key in ((a, b), (b, a)):
            if key in links:
                return links[key]
    return default


def ring_hops(
    nodes: Sequence[NodeId], links: Links | None, default: float = DEFAULT_HOP_S
) -> list[float]:
    """Hop latencies along the stages and from the last stage back to the first."""
    return [
        hop_time(a, b, links, default) for a, b in zip(nodes, [*nodes[1:], nodes[0]], strict=True)
    ]


def decode_tok_s(stage_times: Sequence[float], hops: Sequence[float]) -> float:
    """Tokens per second with one request in flight."""
    return 1.0 / (sum(stage_times) + sum(hops))


def pipeline_tok_s(stage_times: Sequence[float]) -> float:
    """Tokens per second over all requests with the pipeline full: 1 / the slowest stage."""
    return 1.0 / max(stage_times)
