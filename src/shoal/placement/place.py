"""`place`: which nodes run which layers of a model, or a one-line reason why it cannot run.

Memory is a hard cap (memory.py); speed decides the rest (speed.py). With one request in flight a
pipeline is never faster than the sum of its stages plus its hops, so the latency policy (the
default) runs the model on one node whenever it fits there (the fastest such node), and otherwise
on the fewest nodes that fit, preferring the fastest, with layers split by speed. A node's CUDA
GPUs are its devices: a model that fits one GPU runs there, else over all of the node's GPUs (a
stage and a runner each, layers by speed within each one's memory). A node whose GPUs hold only
part of the model may run the rest on its CPU (the last GPU stage's last layers); either policy
takes that when its speed model says it beats every placement that fits. The throughput
policy instead balances stage times over every node that raises 1 / (slowest stage): it may use
more nodes. Overrides are validated (names, tiling, memory) and then honoured exactly, never
re-split. Pure: the same inputs always give the same answer.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations
from math import comb

from shoal.errors import BadRequest
from shoal.placement.memory import MemoryModel, fmt_bytes, memory_model
from shoal.placement.overrides import Overrides, check_tiling, parse_overrides, resolve_node
from shoal.placement.plans import (
    Candidate,
    Part,
    Plan,
    Profiles,
    Survey,
    evaluate,
    native_runs,
    on_devices,
    over_memory,
    spill,
    split,
    survey,
)
from shoal.placement.speed import DEFAULT_HOP_S, Links
from shoal.types.ids import InstanceId, ModelId, NodeId
from shoal.types.instance import Instance, Policy
from shoal.types.model_card import ModelCard

MAX_GROUPS = 1000  # node subsets of one size tried exhaustively; beyond, two heuristic picks


@dataclass(frozen=True)
class Placement:
    """A placed instance, the bytes each of its nodes will hold, and what placement assumed."""

    instance: Instance
    memory_per_node: dict[NodeId, int]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class NoFit:
    """The model cannot be placed as asked; `reason` says why, with the numbers."""

    reason: str


# --- the policies ---------------------------------------------------------------------------------


def _single(
    mem: MemoryModel, ranked: Sequence[Candidate], links: Links | None, hop_s: float
) -> Plan | None:
    """The fastest node that holds the whole model (on one of its GPUs, or over all of them)."""
    for c in ranked:
        if mem.total_bytes() <= c.capacity and (plan := split(mem, [c], links, hop_s)):
            return plan
    return None


def _spilled(
    mem: MemoryModel, ranked: Sequence[Candidate], links: Links | None, hop_s: float
) -> list[Plan]:
    """The whole model on each node whose GPUs hold only part of it, the rest on its CPU."""
    return [plan for c in ranked if (plan := spill(mem, c, links, hop_s)) is not None]


def _groups(ranked: Sequence[Candidate], k: int) -> Iterator[tuple[Candidate, ...]]:
    """The k-node subsets to try, each in rank (= stage) order."""
    if comb(len(ranked), k) <= MAX_GROUPS:
        yield from combinations(ranked, k)
        return
    yield tuple(ranked[:k])
    roomiest = sorted(ranked, key=lambda c: -c.capacity)[:k]
    yield tuple(c for c in ranked if c in roomiest)


def _splittable(ranked: Sequence[Candidate]) -> list[Candidate]:
    """The nodes that may run one stage of a split (not the whole-model-only ones)."""
    return [c for c in ranked if not c.whole_only]


def _fewest(
    mem: MemoryModel, ranked: Sequence[Candidate], links: Links | None, hop_s: float
) -> Plan | None:
    ranked = _splittable(ranked)
    for k in range(2, len(ranked) + 1):
        best: Plan | None = None
        for group in _groups(ranked, k):
            plan = split(mem, group, links, hop_s)
            if plan is not None and (best is None or plan.tok_s > best.tok_s):
                best = plan
        if best is not None:
            return best
    return None


def _latency(
    mem: MemoryModel, ranked: Sequence[Candidate], links: Links | None, hop_s: float
) -> Plan | None:
    plan = _single(mem, ranked, links, hop_s) or _fewest(mem, ranked, links, hop_s)
    spilled = max(_spilled(mem, ranked, links, hop_s), key=lambda p: p.tok_s, default=None)
    if spilled is not None and (plan is None or spilled.tok_s > plan.tok_s):
        return spilled  # a GPU node's CPU beats every placement that fits (or none fits)
    return plan


def _throughput(
    mem: MemoryModel, ranked: Sequence[Candidate], links: Links | None, hop_s: float
) -> Plan | None:
    best: Plan | None = None
    splittable = _splittable(ranked)
    groups = [ranked[:1], *(splittable[:k] for k in range(2, len(splittable) + 1))]
    for group in groups:
        plan = split(mem, group, links, hop_s)
        # a node must raise the figure by more than float noise to be worth its hop
        if plan is not None and (
            best is None or plan.pipeline_tok_s > best.pipeline_tok_s * (1 + 1e-9)
        ):
            best = plan
    for plan in _spilled(mem, ranked, links, hop_s):
        if best is None or plan.pipeline_tok_s > best.pipeline_tok_s * (1 + 1e-9):
            best = plan
    return best or _latency(mem, ranked, links, hop_s)


def choose(
    model: ModelId,
    mem: MemoryModel,
    nodes: Survey,
    policy: Policy,
    links: Links | None,
    hop_s: float,
) -> Plan | str:
    """The policy's plan over the usable nodes, or the reason none fits."""
    ranked = [c for c in nodes.ranked if c.capacity >= mem.per_layer]
    pick = _latency if policy == "latency" else _throughput
    return pick(mem, ranked, links, hop_s) or no_fit_reason(model, mem, nodes)


def no_fit_reason(model: ModelId, mem: MemoryModel, nodes: Survey) -> str:
    """Why no split fits: what the model needs against what the nodes have, in numbers."""
    need, kv = mem.total_bytes(), mem.kv_bytes()
    many = f" x {mem.sequences} sequences" if mem.sequences > 1 else ""
    text = (
        f"{model} needs {fmt_bytes(need)} (weights {fmt_bytes(need - kv)} + KV cache "
        f"{fmt_bytes(kv)} for {mem.context} tokens{many})"
    )
    skipped = "; ".join(f"{node} {why}" for node, why in nodes.skipped.items())
    if not nodes.ranked:
        return f"{text}; no usable node: {skipped or 'none known'}"
    largest = max(nodes.ranked, key=lambda c: c.capacity)
    total_cap = sum(c.capacity for c in nodes.ranked)
    total_free = sum(c.free for c in nodes.ranked)
    if len(nodes.ranked) == 1:
        text += f"; the only usable node ({largest.node_id}) has"
    else:
        text += f"; the largest node ({largest.node_id}) has"
    text += f" {fmt_bytes(largest.capacity)} after headroom ({fmt_bytes(largest.free)} free)"
    if len(nodes.ranked) > 1:
        text += (
            f" and all {len(nodes.ranked)} usable nodes together {fmt_bytes(total_cap)} "
            f"after headroom ({fmt_bytes(total_free)} free)"
        )
    if total_cap >= need:
        text += (
            f", but no split into whole layers fits (a layer needs {fmt_bytes(mem.per_layer)}; "
            f"the first stage {fmt_bytes(mem.embed_bytes)} more, the last "
            f"{fmt_bytes(mem.head_bytes)} more)"
        )
    whole = sorted({c.engine for c in nodes.ranked if c.whole_only})
    if whole and len(nodes.ranked) > 1:
        text += f"; splits leave out nodes running {', '.join(whole)} (whole models only)"
    return f"{text}; skipped: {skipped}" if skipped else text


# --- overrides ------------------------------------------------------------------------------------


def _overridden(
    mem: MemoryModel, nodes: Survey, spec: Overrides, links: Links | None, hop_s: float
) -> Plan | str:
    try:
        items = parse_overrides(spec)
        resolved = [resolve_node(o.node, nodes.node_ids) for o in items]
        check_tiling(items, mem.n_layers)
    except BadRequest as e:
        return str(e)
    usable = {c.node_id: c for c in nodes.ranked}
    parts: list[Part] = []
    for item, node_id in zip(items, resolved, strict=True):
        if node_id not in usable:
            return f"{item}: {node_id} {nodes.skipped[node_id]}"
        node = usable[node_id]
        if node.whole_only and (item.start, item.end) != (0, mem.n_layers):
            return (
                f"{item}: {node_id} runs engine {node.engine!r}, which runs whole models only "
                f"(layers 0-{mem.n_layers} on one node)"
            )
        # over its devices as placement would; what cannot fit is named by over_memory below
        placed = on_devices(mem, node, item.start, item.end) or on_devices(
            mem, node, item.start, item.end, capped=False
        )
        parts += placed or [Part(node, node.units[0], item.start, item.end)]
    plan = evaluate(mem, parts, links, hop_s)
    over = over_memory(plan, [usable[n] for n in dict.fromkeys(resolved)])
    return "; ".join(over) if over else plan


# --- the entry point ------------------------------------------------------------------------------


def place(
    card: ModelCard,
    profiles: Profiles,
    *,
    instance_id: InstanceId,
    policy: Policy = "latency",
    overrides: Overrides | None = None,
    links: Links | None = None,
    context: int | None = None,
    engine: str | None = None,
    sequences: int = 1,
    dtype_bytes: int = 4,
    hop_s: float = DEFAULT_HOP_S,
) -> Placement | NoFit:
    """Where to run `card` over the profiled nodes under `policy`, or why it cannot run."""
    mem = memory_model(
        card, context=context, sequences=sequences, dtype_bytes=dtype_bytes, engine=engine
    )
    nodes = survey(profiles, mem, engine=engine, native=native_runs(card, card.quant))
    if overrides is not None:
        result = _overridden(mem, nodes, overrides, links, hop_s)
    else:
        result = choose(card.id, mem, nodes, policy, links, hop_s)
    if isinstance(result, str):
        return NoFit(result)
    instance = Instance(
        instance_id=instance_id,
        model_id=card.id,
        n_layers=card.layers,
        stages=result.stages,
        policy=policy,
        predicted_tok_s=result.tok_s if policy == "latency" else result.pipeline_tok_s,
    )
    return Placement(instance, result.memory_per_node, _notes(mem, nodes, result))


def _notes(mem: MemoryModel, nodes: Survey, plan: Plan) -> tuple[str, ...]:
    used = {s.node_id for s in plan.stages}
    notes = [f"{node}: skipped, {why}" for node, why in nodes.skipped.items()]
    notes += [note for c in nodes.ranked if c.node_id in used for note in c.notes]
    largest = max(nodes.ranked, key=lambda c: c.capacity)
    if len(used) > 1 and mem.total_bytes() > largest.capacity:
        notes.append(
            f"split over {len(used)} nodes: the model needs {fmt_bytes(mem.total_bytes())}, "
            f"the largest node ({largest.node_id}) has {fmt_bytes(largest.capacity)} after headroom"
        )
    return tuple(notes)
