"""Splitting n layers over ordered nodes: shares proportional to speed, never over a memory cap.

Each node's ideal share is n * speed / total speed (speed = 1 / time per layer), so every stage
takes about as long as every other. Whole layers come by largest-remainder rounding; a node left
with none takes one from the node furthest over its share; then layers above a node's cap move,
one at a time, to the node with room whose stage stays quickest after taking it (the fastest node
when the others are level). The caps already include the first stage's embeddings and the last
stage's head, so they depend on the order the caller chose.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

from shoal.types.ids import NodeId


@dataclass(frozen=True)
class NodeCapacity:
    """One node, at its place in the stage order, as the allocator sees it."""

    node_id: NodeId
    layer_time: float  # seconds per layer per token
    max_layers: int  # the most layers its memory holds at this position


def allocate_layers(n_layers: int, nodes: Sequence[NodeCapacity]) -> list[int] | None:
    """Layers per node, in order: exact total, each >= 1 and <= its cap; None if impossible."""
    if any(node.layer_time <= 0 for node in nodes):
        raise ValueError("every node's layer_time must be positive")
    if not nodes or n_layers < len(nodes):
        return None
    caps = [min(node.max_layers, n_layers) for node in nodes]
    if min(caps) < 1 or sum(caps) < n_layers:
        return None
    times = [node.layer_time for node in nodes]
    quotas = _quotas(n_layers, times)
    counts = _largest_remainder(n_layers, quotas)
    _at_least_one(counts, quotas)
    _within_caps(counts, caps, times)
    assert sum(counts) == n_layers and all(
        1 <= c <= cap for c, cap in zip(counts, caps, strict=True)
    )
    return counts


def _quotas(n_layers: int, times: Sequence[float]) -> list[float]:
    speeds = [1.0 / t for t in times]
    total = sum(speeds)
    return [n_layers * s / total for s in speeds]


def _largest_remainder(n_layers: int, quotas: Sequence[float]) -> list[int]:
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: n_layers - sum(counts)]:
        counts[i] += 1
    return counts


def _at_least_one(counts: list[int], quotas: Sequence[float]) -> None:
    for i in range(len(counts)):
        if counts[i] == 0:
            donors = [j for j in range(len(counts)) if counts[j] > 1]
            donor = max(donors, key=lambda j: (counts[j] - quotas[j], -j))
            counts[donor] -= 1
            counts[i] = 1


def _within_caps(counts: list[int], caps: Sequence[int], times: Sequence[float]) -> None:
    excess = 0
    for i, cap in enumerate(caps):
        if counts[i] > cap:
            excess += counts[i] - cap
            counts[i] = cap
    for _ in range(excess):
        room = [j for j in range(len(counts)) if counts[j] < caps[j]]
        taker = min(room, key=lambda j: ((counts[j] + 1) * times[j], j))
        counts[taker] += 1
