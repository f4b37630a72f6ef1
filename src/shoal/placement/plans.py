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
from dataclasses import dataclass, field

from shoal.engines.native.blocks import BLOCK
from shoal.engines.native.decoder import Decoder
from shoal.engines.native.engine import KINDS
from shoal.engines.native.model import ARCHITECTURES, ROUTED
from shoal.placement.allocate import NodeCapacity, allocate_layers
from shoal.placement.memory import (
    SLOT_ENGINES,
    MemoryModel,
    capacity,
    cuda_gpus,
    fmt_bytes,
    usable_memory,
)
from shoal.placement.speed import (
    DEFAULT_HOP_S,
    Links,
    decode_tok_s,
    gpu_speed,
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
class Slot:
    """One device of a node as placement sees it: memory to plan with and time per layer."""

    device: str | None  # "cuda:1", "cpu"; None: the node's default device
    free: int  # bytes usable before headroom
    capacity: int  # bytes a plan may use
    layer_time: float  # seconds per layer per token
    gpu: int | None = None  # the GPU's index (llamacpp's split)


@dataclass(frozen=True)
class Candidate:
    """A usable node: the engine it would run, its memory and its time per layer.

    slots: its GPUs, fastest first, when its engine runs on them (else one slot, the node);
    free, capacity and layer_time are then the GPUs' together (the fastest one's time).
    spill: its CPU, for the last layers of a stage that does not fit its GPUs."""

    node_id: NodeId
    engine: str
    free: int  # bytes usable by the engine before headroom
    capacity: int  # bytes a plan may use
    layer_time: float  # seconds per layer per token
    notes: tuple[str, ...] = ()
    slots: tuple[Slot, ...] = ()
    spill: Slot | None = None

    @property
    def whole_only(self) -> bool:
        """Whether its engine runs whole models only (never one stage of a split)."""
        return self.engine in WHOLE_MODEL_ENGINES

    @property
    def units(self) -> tuple[Slot, ...]:
        """The devices its stages run on: its GPUs, else the node itself."""
        return self.slots or (Slot(None, self.free, self.capacity, self.layer_time),)

    def max_layers(self, mem: MemoryModel, *, first: bool, last: bool) -> int:
        """The most layers its devices hold at this place in the stage order (the first
        device holding the embeddings, the last one the head)."""
        units = self.units
        return sum(
            mem.max_layers(u.capacity, first=first and i == 0, last=last and i == len(units) - 1)
            for i, u in enumerate(units)
        )


@dataclass(frozen=True)
class Part:
    """Layers [start, end) on one device of a node; the last `cpu_layers` on its CPU; for
    llamacpp on several GPUs, the layers each holds by index (`gpu_split`)."""

    node: Candidate
    slot: Slot
    start: int
    end: int
    cpu_layers: int = 0
    gpu_split: tuple[int, ...] = ()

    def time(self) -> float:
        """Seconds the part takes per token."""
        cpu_time = self.node.spill.layer_time if self.node.spill is not None else 0.0
        return (self.end - self.start - self.cpu_layers) * self.slot.layer_time + (
            self.cpu_layers * cpu_time
        )


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
        usable.append(_candidate(profile, chosen, mem))
    usable.sort(key=lambda c: (c.layer_time, c.node_id))
    return Survey(tuple(usable), skipped)


def _candidate(profile: NodeProfile, engine: str, mem: MemoryModel) -> Candidate:
    """The node as placement sees it for `engine`: one slot per CUDA GPU that holds a layer
    (the CPU for spilling behind them), else the node itself."""
    speed = node_speed(profile)
    t_cpu = layer_time(mem, speed)
    ram = profile.ram_available
    if engine not in SLOT_ENGINES or not (gpus := cuda_gpus(profile)):
        free = usable_memory(profile, engine)
        return Candidate(profile.node_id, engine, free, capacity(free), t_cpu, speed.notes)
    slots: list[Slot] = []
    notes: list[str] = []
    for gpu in gpus:
        g = gpu_speed(profile.node_id, gpu)
        slot = Slot(gpu.device, gpu.memory_free, capacity(gpu.memory_free), layer_time(mem, g),
                    gpu.index)  # fmt: skip
        if slot.capacity >= mem.per_layer:
            slots.append(slot)
            notes += g.notes
    if not slots:  # no GPU holds a layer: the CPU alone
        cpu = Slot("cpu", ram, capacity(ram), t_cpu)
        return Candidate(profile.node_id, engine, ram, cpu.capacity, t_cpu, speed.notes, (cpu,))
    slots.sort(key=lambda u: (u.layer_time, u.gpu))
    return Candidate(
        profile.node_id,
        engine,
        sum(u.free for u in slots),
        sum(u.capacity for u in slots),
        slots[0].layer_time,
        (*notes, *speed.notes),
        tuple(slots),
        Slot("cpu", ram, capacity(ram), t_cpu),
    )


@dataclass(frozen=True)
class Plan:
    """Stages over nodes with the bytes each node (and each device) holds and both speed
    figures."""

    stages: tuple[StagePlan, ...]
    memory_per_node: dict[NodeId, int]
    tok_s: float  # one request in flight
    pipeline_tok_s: float  # as many requests in flight as stages
    memory_per_device: dict[tuple[NodeId, str | None], int] = field(default_factory=dict)


def evaluate(
    mem: MemoryModel,
    parts: Sequence[Part],
    links: Links | None = None,
    hop_s: float = DEFAULT_HOP_S,
) -> Plan:
    """The plan of the parts as given, with its memory and speed."""
    stages: list[StagePlan] = []
    memory: dict[NodeId, int] = {}
    devices: dict[tuple[NodeId, str | None], int] = {}
    for part in parts:
        node, on_device = part.node.node_id, part.end - part.cpu_layers
        stages.append(
            StagePlan(
                node_id=node,
                start=part.start,
                end=part.end,
                engine=part.node.engine,
                device=part.slot.device,
                cpu_layers=part.cpu_layers,
                gpu_split=part.gpu_split,
            )
        )
        held = {part.slot.device: _bytes(mem, part.start, on_device, last=not part.cpu_layers)}
        if part.cpu_layers:
            held["cpu"] = held.get("cpu", 0) + mem.stage_bytes(on_device, part.end)
        for device, n_bytes in held.items():
            memory[node] = memory.get(node, 0) + n_bytes
            devices[node, device] = devices.get((node, device), 0) + n_bytes
    hops = ring_hops([s.node_id for s in stages], links, hop_s)
    times = [part.time() for part in parts]
    return Plan(tuple(stages), memory, decode_tok_s(times, hops), pipeline_tok_s(times), devices)


def _bytes(mem: MemoryModel, start: int, end: int, *, last: bool) -> int:
    """Bytes of layers [start, end), the head only if `last` (else it is on the CPU)."""
    held = mem.stage_bytes(start, end)
    return held if last or end != mem.n_layers else held - mem.head_bytes


def on_devices(
    mem: MemoryModel, node: Candidate, start: int, end: int, *, capped: bool = True
) -> list[Part] | None:
    """Layers [start, end) of one node over its devices: on one when the fastest device that
    holds them all does, else over all its GPUs by speed within each one's memory (one stage
    each, but one for llamacpp, which splits them itself); None if they do not fit."""
    units = node.units
    whole = mem.stage_bytes(start, end)
    fits = [u for u in units if whole <= u.capacity] if capped else []
    if fits or len(units) == 1:
        slot = (fits or list(units))[0]
        if node.whole_only and slot.gpu is not None:
            return [_llamacpp(node, start, end, [(slot, end - start)])]
        return [Part(node, slot, start, end)]
    first, last = start == 0, end == mem.n_layers
    shares = [
        NodeCapacity(
            node.node_id,
            u.layer_time,
            mem.max_layers(u.capacity, first=first and i == 0, last=last and i == len(units) - 1)
            if capped
            else end - start,
        )
        for i, u in enumerate(units)
    ]
    counts = allocate_layers(end - start, shares)
    if counts is None:
        return None
    if node.whole_only:
        return [_llamacpp(node, start, end, list(zip(units, counts, strict=True)))]
    parts, at = [], start
    for unit, count in zip(units, counts, strict=True):
        parts.append(Part(node, unit, at, at + count))
        at += count
    return parts


def _llamacpp(
    node: Candidate, start: int, end: int, shares: Sequence[tuple[Slot, int]], cpu: int = 0
) -> Part:
    """llama.cpp's one stage over a node's GPUs: device "cuda", layers per GPU index."""
    split = [0] * (1 + max(slot.gpu or 0 for slot, _ in shares))
    for slot, count in shares:
        split[slot.gpu or 0] += count
    fastest = min((slot for slot, _ in shares), key=lambda u: u.layer_time)
    whole = Slot("cuda", sum(u.free for u, _ in shares), sum(u.capacity for u, _ in shares),
                 fastest.layer_time)  # fmt: skip
    return Part(node, whole, start, end, cpu, tuple(split))


def spill(
    mem: MemoryModel, node: Candidate, links: Links | None = None, hop_s: float = DEFAULT_HOP_S
) -> Plan | None:
    """The whole model on one node whose GPUs together cannot hold it: as many layers on its
    GPUs as they hold, the rest (and the head) on its CPU, in the last GPU stage's runner.
    None when the node has no GPUs, they hold it all, or its CPU cannot take the rest."""
    if node.spill is None or not node.slots:
        return None
    n = mem.n_layers
    caps = [mem.max_layers(u.capacity, first=i == 0, last=False) for i, u in enumerate(node.slots)]
    if caps[0] < 1:
        return None  # the first GPU holds the embeddings; without room for them, no spill
    cpu = max(1, n - sum(caps))  # the head goes with the CPU's layers: at least one
    if mem.max_layers(node.spill.capacity, first=False, last=True) < cpu or cpu >= n:
        return None
    used, room = [], n - cpu
    for unit, cap in zip(node.slots, caps, strict=True):
        if room > 0 and cap > 0:
            used.append((unit, min(cap, room)))
            room -= used[-1][1]
    if node.whole_only:
        return evaluate(mem, [_llamacpp(node, 0, n, used, cpu)], links, hop_s)
    parts, at = [], 0
    for i, (unit, cap) in enumerate(used):
        extra = cpu if i == len(used) - 1 else 0
        parts.append(Part(node, unit, at, at + cap + extra, cpu_layers=extra))
        at += cap + extra
    return evaluate(mem, parts, links, hop_s)


def split(
    mem: MemoryModel,
    ordered: Sequence[Candidate],
    links: Links | None = None,
    hop_s: float = DEFAULT_HOP_S,
    *,
    capped: bool = True,
) -> Plan | None:
    """All layers over `ordered` (the stage order) by speed within memory; None if none fits.

    Each node's layers then go over its devices (`on_devices`). None too when `ordered` has
    several nodes and one of them runs whole models only.
    """
    last = len(ordered) - 1
    if last > 0 and any(c.whole_only for c in ordered):
        return None
    nodes = [
        NodeCapacity(
            c.node_id,
            c.layer_time,
            c.max_layers(mem, first=i == 0, last=i == last) if capped else mem.n_layers,
        )
        for i, c in enumerate(ordered)
    ]
    counts = allocate_layers(mem.n_layers, nodes)
    if counts is None:
        return None
    parts: list[Part] = []
    at = 0
    for node, count in zip(ordered, counts, strict=True):
        placed = on_devices(mem, node, at, at + count, capped=capped)
        if placed is None:
            return None
        parts += placed
        at += count
    return evaluate(mem, parts, links, hop_s)


def over_memory(plan: Plan, nodes: Iterable[Candidate]) -> list[str]:
    """One phrase per node (or device of one) the plan puts over its memory, with numbers."""
    out = []
    for node in nodes:
        slots = {u.device: u for u in (*node.units, *((node.spill,) if node.spill else ()))}
        for stage in plan.stages:  # llamacpp's one stage over GPUs is checked as a whole
            if stage.node_id == node.node_id and stage.device == "cuda":
                slots["cuda"] = Slot("cuda", node.free, node.capacity, node.layer_time)
        for (node_id, device), need in plan.memory_per_device.items():
            have = slots.get(device)
            if node_id != node.node_id or have is None or need <= have.capacity:
                continue
            layers = [
                f"{s.start}-{s.end}"
                for s in plan.stages
                if s.node_id == node_id and (s.device == device or device == "cpu" and s.cpu_layers)
            ]
            on = f" on {device}" if device is not None and len(slots) > 1 else ""
            out.append(
                f"{node_id} needs {fmt_bytes(need)}{on} for layers {', '.join(layers)} but has "
                f"{fmt_bytes(have.capacity)} after headroom ({fmt_bytes(have.free)} free)"
            )
    return out
