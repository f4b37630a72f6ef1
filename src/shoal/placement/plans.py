"""Nodes as placement sees them (engine, memory to plan with, time per layer) and plans over them.

A node is usable when it has a profile and an engine: the forced one if the caller names one (the
node must list it), else the first it lists that is not the test-only "fake" nor "native"; where
that engine would run an int8/int4 shard on the CPU and the node lists "native", native instead (the
torch and numpy engines hand those shards to it anyway: naming it keeps the state true). Usable
nodes are
ranked fastest first (time per layer), then by node id; that rank is also the stage order of every
split, so the same inputs always give the same plan. A `Plan` is stages with the bytes each node
holds and both speed figures; `split` makes one by `allocate_layers`, `evaluate` scores given ones.
A node whose engine runs whole models only (llamacpp reads the GGUF file itself and cannot pass
hidden states) only ever gets [0, n_layers): splits leave it out.
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from shoal.engines.native.blocks import BLOCK
from shoal.engines.native.decoder import Decoder
from shoal.engines.native.engine import KINDS
from shoal.engines.native.model import ARCHITECTURES, ROUTED
from shoal.placement.allocate import NodeCapacity, allocate_layers
from shoal.placement.memory import MemoryModel, capacity, fmt_bytes, usable_memory
from shoal.placement.speed import (
    DEFAULT_HOP_S,
    Links,
    decode_tok_s,
    layer_time,
    node_speed,
    pipeline_tok_s,
    ring_hops,
)
from shoal.types.ids import NodeId
from shoal.types.instance import StagePlan
from shoal.types.model_card import ModelCard
from shoal.types.profile import NodeProfile
from shoal.types.weights import Quant

Profiles = Mapping[NodeId, NodeProfile | None] | Iterable[NodeProfile]
WHOLE_MODEL_ENGINES = frozenset({"llamacpp"})  # engines that run all layers of a model or none
NATIVE = "native"
HANDS_TO_NATIVE = frozenset({"torch", "numpy"})  # engines whose int8/int4 CPU shards run on native


@dataclass(frozen=True)
class Candidate:
    """A usable node: the engine it would run, its memory and its time per layer."""

    node_id: NodeId
    engine: str
    free: int  # bytes usable by the engine before headroom
    capacity: int  # bytes a plan may use
    layer_time: float  # seconds per layer per token
    notes: tuple[str, ...] = ()

    @property
    def whole_only(self) -> bool:
        """Whether its engine runs whole models only (never one stage of a split)."""
        return self.engine in WHOLE_MODEL_ENGINES


@dataclass(frozen=True)
class Survey:
    """The usable nodes, fastest first, and why each other node is out."""

    ranked: tuple[Candidate, ...]
    skipped: dict[NodeId, str]

    @property
    def node_ids(self) -> list[NodeId]:
        """Every node placement was told about, usable or not, sorted."""
        return sorted([*(c.node_id for c in self.ranked), *self.skipped])


def profile_map(profiles: Profiles) -> dict[NodeId, NodeProfile | None]:
    """The profiles keyed by node id, sorted; a None value is a node with no profile yet."""
    if isinstance(profiles, Mapping):
        pairs = list(profiles.items())
    else:
        pairs = [(p.node_id, p) for p in profiles]
    return dict(sorted(pairs, key=lambda pair: pair[0]))


def native_runs(card: ModelCard, quant: Quant) -> bool:
    """Whether the native engine runs `card` in `quant`, as far as a card tells
    (engines/native/engine.py `runs`): a block format, a Llama-family model or qwen3_moe, widths
    in whole blocks of 32 (the MLP's and the experts' too where the card gives them). A runner
    whose model fails there all the same runs on torch or numpy and says so in its Ready status."""
    d = card.head_dim
    return (
        quant in KINDS
        and card.architecture in ARCHITECTURES | ROUTED
        and card.expert_intermediate_size % BLOCK == 0  # 0: no experts
        and card.hidden_size % BLOCK == 0
        and card.heads * d % BLOCK == 0
        and card.intermediate_size % BLOCK == 0  # 0: not given
        and d % 2 == 0
        and d <= Decoder.MAX_HEAD_DIM
        and card.heads % card.kv_heads == 0
    )


def choose_engine(profile: NodeProfile, forced: str | None, *, native: bool = False) -> str | None:
    """The engine this node would run the model with, or None when it has none to offer.

    native: whether the model's shards may run on the native engine (`native_runs`); then a CPU
    stage of torch or numpy is named native where the node lists it."""
    if forced is not None:
        return forced if forced in profile.engines else None
    chosen = next((name for name in profile.engines if name not in ("fake", NATIVE)), None)
    on_cpu = chosen == "numpy" or (chosen == "torch" and not profile.gpus)
    if native and on_cpu and NATIVE in profile.engines:
        return NATIVE
    return chosen


def survey(
    profiles: Profiles, mem: MemoryModel, *, engine: str | None = None, native: bool = False
) -> Survey:
    """Which nodes can take part, how fast and with how much memory, and why the rest cannot.

    native: as for `choose_engine`."""
    usable: list[Candidate] = []
    skipped: dict[NodeId, str] = {}
    for node_id, profile in profile_map(profiles).items():
        if profile is None:
            skipped[node_id] = "no profile yet"
            continue
        chosen = choose_engine(profile, engine, native=native)
        if chosen is None:
            has = ", ".join(profile.engines) or "none"
            want = f"engine {engine!r}" if engine else "an engine other than 'fake'"
            skipped[node_id] = f"does not list {want} (lists: {has})"
            continue
        free = usable_memory(profile, chosen)
        speed = node_speed(profile)
        t = layer_time(mem, speed)
        usable.append(Candidate(node_id, chosen, free, capacity(free), t, speed.notes))
    usable.sort(key=lambda c: (c.layer_time, c.node_id))
    return Survey(tuple(usable), skipped)


@dataclass(frozen=True)
class Plan:
    """Stages over nodes with the bytes each node holds and both speed figures."""

    stages: tuple[StagePlan, ...]
    memory_per_node: dict[NodeId, int]
    tok_s: float  # one request in flight
    pipeline_tok_s: float  # as many requests in flight as stages


def evaluate(
    mem: MemoryModel,
    parts: Sequence[tuple[Candidate, int, int]],
    links: Links | None = None,
    hop_s: float = DEFAULT_HOP_S,
) -> Plan:
    """The plan of stages (node, start, end) as given, with its memory and speed."""
    stages: list[StagePlan] = []
    memory: dict[NodeId, int] = {}
    times: list[float] = []
    for node, start, end in parts:
        stages.append(StagePlan(node_id=node.node_id, start=start, end=end, engine=node.engine))
        memory[node.node_id] = memory.get(node.node_id, 0) + mem.stage_bytes(start, end)
        times.append((end - start) * node.layer_time)
    hops = ring_hops([s.node_id for s in stages], links, hop_s)
    return Plan(tuple(stages), memory, decode_tok_s(times, hops), pipeline_tok_s(times))


def split(
    mem: MemoryModel,
    ordered: Sequence[Candidate],
    links: Links | None = None,
    hop_s: float = DEFAULT_HOP_S,
    *,
    capped: bool = True,
) -> Plan | None:
    """All layers over `ordered` (the stage order) by speed within memory; None if none fits.

    None too when `ordered` has several nodes and one of them runs whole models only.
    """
    last = len(ordered) - 1
    if last > 0 and any(c.whole_only for c in ordered):
        return None
    nodes = [
        NodeCapacity(
            c.node_id,
            c.layer_time,
            mem.max_layers(c.capacity, first=i == 0, last=i == last) if capped else mem.n_layers,
        )
        for i, c in enumerate(ordered)
    ]
    counts = allocate_layers(mem.n_layers, nodes)
    if counts is None:
        return None
    parts, at = [], 0
    for node, count in zip(ordered, counts, strict=True):
        parts.append((node, at, at + count))
        at += count
    return evaluate(mem, parts, links, hop_s)


def over_memory(plan: Plan, nodes: Iterable[Candidate]) -> list[str]:
    """One phrase per node that the plan puts over its memory, with the numbers."""
    out = []
    for node in nodes:
        need = plan.memory_per_node.get(node.node_id, 0)
        if need > node.capacity:
            layers = [f"{s.start}-{s.end}" for s in plan.stages if s.node_id == node.node_id]
            out.append(
                f"{node.node_id} needs {fmt_bytes(need)} for layers {', '.join(layers)} but has "
                f"{fmt_bytes(node.capacity)} after headroom ({fmt_bytes(node.free)} free)"
            )
    return out
