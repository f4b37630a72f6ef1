"""Placement: the memory and speed models, allocate_layers, place under each policy, previews."""

import itertools
from collections.abc import Sequence
from typing import Any

import pytest

from shoal.models.catalog import builtin_cards
from shoal.placement import (
    NodeCapacity,
    NoFit,
    Placement,
    Preview,
    allocate_layers,
    bits_per_weight,
    memory_model,
    place,
    previews,
    usable_memory,
)
from shoal.placement.memory import (
    MIB,
    Held,
    capacity,
    fmt_bytes,
    held_bits,
    need_per_engine,
    offered_per_engine,
)
from shoal.placement.speed import NodeSpeed, layer_time, node_speed
from shoal.types.ids import InstanceId, ModelId, NodeId
from shoal.types.model_card import HubWeights, ModelCard, PackagedWeights
from shoal.types.profile import GpuInfo, NodeProfile
from tests.helpers.state import GIB, profile

pytestmark = pytest.mark.timeout(30)

IID = InstanceId("i1")

# --- builders -------------------------------------------------------------------------------------

SMOL: dict[str, Any] = dict(
    id="smollm2-135m", layers=30, hidden_size=576, heads=9, kv_heads=3, head_dim=64,
    vocab_size=49152, context_length=8192, storage_bytes=98362432, quantization="Q4_1",
    quant="none",  # weights held at float32: the memory numbers below assume it
)  # fmt: skip
LLAMA70: dict[str, Any] = dict(
    id="llama-3.1-70b", layers=80, hidden_size=8192, heads=64, kv_heads=8, head_dim=128,
    vocab_size=128256, context_length=131072, storage_bytes=38769 * MIB, quantization="4bit",
    quant="none",
)  # fmt: skip


def card(shape: dict[str, Any], **overrides: Any) -> ModelCard:
    """A ModelCard of `shape`; keyword arguments replace fields."""
    fields = {"name": "n", "family": "f", "architecture": "llama", "hf_repo": "r", "license": "l"}
    fields |= shape | overrides
    fields["id"] = ModelId(fields["id"])
    return ModelCard(**fields)


def node(
    name: str,
    ram_gib: float = 16,
    bw: float | None = 20.0,
    gflops: float | None = 150.0,
    **overrides: Any,
) -> NodeProfile:
    """A profile with `ram_gib` free, `bw` GB/s and `gflops` GFLOP/s."""
    ram = int(ram_gib * GIB)
    return profile(
        name, ram_available=ram, memory_bandwidth_gbs=bw, matmul_gflops=gflops, **overrides
    )


def big(name: str, bw: float, ram_gib: float = 128) -> NodeProfile:
    """A compute-rich node; 128 GiB hold ~34 layers of the 70B at float32."""
    return node(name, ram_gib, bw, 2000.0)


def layers_of(result: Placement | NoFit) -> list[tuple[str, int]]:
    assert isinstance(result, Placement), result
    return [(s.node_id, s.layers) for s in result.instance.stages]


def assert_within_memory(result: Placement, c: ModelCard, nodes: Sequence[NodeProfile]) -> None:
    """Every node's bytes, recomputed from the memory model, fit what it offers after headroom."""
    mem = memory_model(c)
    by_id = {p.node_id: p for p in nodes}
    for node_id, held in result.memory_per_node.items():
        stages = [s for s in result.instance.stages if s.node_id == node_id]
        assert held == sum(mem.stage_bytes(s.start, s.end) for s in stages)
        assert held <= capacity(usable_memory(by_id[node_id], stages[0].engine))


def stage_times(result: Placement, c: ModelCard, nodes: Sequence[NodeProfile]) -> list[float]:
    mem, by_id = memory_model(c), {p.node_id: p for p in nodes}
    return [
        s.layers * layer_time(mem, node_speed(by_id[s.node_id])) for s in result.instance.stages
    ]


# --- the memory and speed models ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "bits"),
    [("4bit", 4.5), ("8bit", 8.5), ("fp16", 16), ("bf16", 16), ("F16", 16), ("fp32", 32),
     ("F32", 32), ("Q4_0", 4.5), ("Q4_1", 5.0), ("Q5_0", 5.5), ("Q5_1", 6.0), ("Q4_K", 4.5),
     ("Q5_K", 5.5), ("Q6_K", 6.5625), ("Q8_0", 8.5), ("Q4_K_M", 4.89), ("Q5_K_M", 5.70),
     ("3bit", 3.5), ("6bit", 6.5), ("fp8", 8), ("mystery", 16)],
)  # fmt: skip
def test_bits_per_weight(label: str, bits: float) -> None:
    assert bits_per_weight(label) == bits


def test_memory_model_smollm2() -> None:
    mem = memory_model(card(SMOL))
    embed = 49152 * 576
    assert mem.embed_bytes == mem.head_bytes == embed * 4
    per_layer_storage = (98362432 - embed * 5.0 / 8) / 30
    assert mem.layer_bytes == pytest.approx(per_layer_storage * 32 / 5.0, abs=1)
    assert mem.kv_layer_bytes == 2 * 3 * 64 * 4 * 4096
    assert mem.total_bytes() == 30 * (mem.layer_bytes + mem.kv_layer_bytes) + 2 * embed * 4
    assert mem.stage_bytes(0, 10) + mem.stage_bytes(10, 30) == mem.total_bytes()
    assert memory_model(card(SMOL), context=100, sequences=3).kv_layer_bytes == 1536 * 300


@pytest.mark.parametrize(
    ("quant", "engine", "weight", "head"),
    [("none", None, 4.0, 4.0), ("fp16", "torch", 2.0, 2.0), ("int8", "torch", 34 / 32, 34 / 32),
     ("int4", "torch", 20 / 32, 2.0), ("int4", "numpy", 20 / 32, 34 / 32),
     ("int8", "native", 34 / 32, 34 / 32), ("fp16", "numpy", 4.0, 4.0),
     ("int4", "llamacpp", 4.0, 4.0), ("int4", "mlx", 4.0, 4.0)],
)  # fmt: skip
def test_weights_are_budgeted_in_the_format_the_engine_holds(
    quant: str, engine: str | None, weight: float, head: float
) -> None:
    # Q4_1 stores 5 bits a weight, so a layer's share of the file scales by weight * 8 / 5.
    mem = memory_model(card(SMOL, quant=quant), engine=engine)
    embed = 49152 * 576
    per_layer_storage = (98362432 - embed * 5.0 / 8) / 30
    assert mem.layer_bytes == pytest.approx(per_layer_storage * weight * 8 / 5.0, abs=1)
    assert mem.head_bytes == pytest.approx(embed * head, abs=1)
    assert mem.embed_bytes == embed * 4  # a float32 lookup table whatever the format
    assert mem.params_per_layer == pytest.approx(per_layer_storage * 8 / 5.0, abs=1)


def test_llamacpp_holds_the_gguf_files_bits() -> None:
    # SmolLM2's packaged Q4_1 file: 5 bits a weight in every layer (its exact share of the file),
    # the embedding table at 5 bits too, the head at 8.5 (llama.cpp writes it at Q6_K or Q8_0).
    gguf = PackagedWeights(format="gguf", package="p", resource="m.gguf")
    mem = memory_model(card(SMOL, weights=(gguf,)), engine="llamacpp")
    embed = 49152 * 576
    assert mem.layer_bytes == pytest.approx((98362432 - embed * 5.0 / 8) / 30, abs=1)
    assert (mem.embed_bytes, mem.head_bytes) == (embed * 5 // 8, embed * 17 // 16)
    # 122.5 MiB of weights from a 93.8 MiB file: the head counted apart from the tied table.
    assert mem.total_bytes() - mem.kv_bytes() == 30 * 2688924 + 17694720 + 30081024
    # Without a GGUF source llama.cpp cannot run the card: planned at the dtype, as before.
    assert memory_model(card(SMOL), engine="llamacpp").layer_bytes == 17209112


def test_a_gguf_source_sets_the_bits_llamacpp_holds() -> None:
    # An MLX 4-bit card (4.5 bits a weight on disk) whose GGUF source is Q4_K_M (≈ 4.89 bits).
    q4km = HubWeights(format="gguf", repo="o/r-GGUF", file="r-Q4_K_M.gguf", quantization="Q4_K_M")
    mlx = HubWeights(format="mlx", repo="o/r-4bit")
    c = card(LLAMA70, weights=(mlx, q4km))
    embed = 128256 * 8192
    per_layer_storage = (38769 * MIB - embed * 4.5 / 8) / 80
    mem = memory_model(c, engine="llamacpp")
    assert mem.layer_bytes == pytest.approx(per_layer_storage * 4.89 / 4.5, abs=1)
    assert mem.embed_bytes == pytest.approx(embed * 4.89 / 8, abs=1)
    assert mem.head_bytes == pytest.approx(embed * 8.5 / 8, abs=1)
    q8 = q4km.model_copy(update={"quantization": "Q8_0"})
    assert memory_model(card(LLAMA70, weights=(q8,)), engine="llamacpp").layer_bytes == (
        pytest.approx(per_layer_storage * 8.5 / 4.5, abs=1)
    )
    # A GGUF source without its own label is in the card's format.
    bare = HubWeights(format="gguf", repo="o/r-GGUF", file="r.gguf")
    assert held_bits(card(SMOL, weights=(bare,)), "llamacpp", 4) == Held(5.0, 8.5, 5.0)


@pytest.mark.parametrize(
    ("engine", "quant", "held"),
    [(None, "none", Held(32, 32, 32)), ("torch", "fp16", Held(16, 16, 32)),
     ("torch", "int8", Held(8.5, 8.5, 32)), ("torch", "int4", Held(5, 16, 32)),
     ("numpy", "int4", Held(5, 8.5, 32)), ("native", "int4", Held(5, 8.5, 32)),
     ("numpy", "fp16", Held(32, 32, 32)), ("mlx", "int4", Held(32, 32, 32))],
)  # fmt: skip
def test_held_bits_per_engine(engine: str | None, quant: str, held: Held) -> None:
    assert held_bits(card(SMOL, quant=quant), engine, 4) == held


# The seed card Llama 3.2 1B (MLX 4-bit, 696 MiB) at 4096 tokens of context, whole model in MiB:
# torch float32 / torch int4 / numpy int4 / numpy int8 / llama.cpp Q4_K_M / mlx float32. numpy
# holds the MLX 4-bit weights as Q4_1 blocks under int4 and int8 alike (5 bits, the head too)
# and keeps the embedding table packed (4.5 bits).
LLAMA_1B_MIB = [
    (None, "none", 6207.3), (None, "int4", 2375.8), ("numpy", "int4", 1170.2),
    ("numpy", "int8", 1170.2), ("llamacpp", "none", 1278.5), ("mlx", "none", 6207.3),
]  # fmt: skip


@pytest.mark.parametrize(
    ("bits", "engine", "held"),
    [(4, "numpy", Held(5, 5, 4.5)), (8, "native", Held(9, 9, 8.5)), (8, "torch", Held(9, 8.5, 32)),
     (4, "torch", Held(5, 16, 32)), (4, "mlx", Held(32, 32, 32))],
)  # fmt: skip
def test_mlx_packed_weights_keep_their_format_in_the_block_kernels(
    bits: int, engine: str, held: Held
) -> None:
    mlx = HubWeights(format="mlx", repo="mlx-community/x", quantization=f"{bits}bit")
    quant = "int4" if bits == 4 else "int8"
    assert held_bits(card(SMOL, weights=(mlx,), quant=quant), engine, 4) == held


@pytest.mark.parametrize(("engine", "quant", "mib"), LLAMA_1B_MIB)
def test_seed_card_figures(engine: str | None, quant: str, mib: float) -> None:
    seed = builtin_cards()[ModelId("llama-3.2-1b")].model_copy(update={"quant": quant})
    assert memory_model(seed, engine=engine).total_bytes() / MIB == pytest.approx(mib, abs=0.1)


def test_int4_fits_where_float32_does_not() -> None:
    # The 70B at float32 needs ~276 GiB: four 96 GiB nodes. At int4 its layers take a sixth of
    # that, and the whole model fits one of them.
    nodes = [big(n, 400.0, 96) for n in "abcd"]
    assert len(layers_of(place(card(LLAMA70), nodes, instance_id=IID))) == 4
    int4 = card(LLAMA70, quant="int4")
    result = place(int4, nodes, instance_id=IID)
    assert len(layers_of(result)) == 1


def cuda(free_gib: int) -> GpuInfo:
    return GpuInfo(vendor="nvidia", name="H100", memory_total=80 * GIB,
                   memory_free=free_gib * GIB, backend="cuda")  # fmt: skip


METAL = GpuInfo(vendor="apple", name="M2", memory_total=64 * GIB, memory_free=60 * GIB,
                backend="metal")  # fmt: skip


@pytest.mark.parametrize(
    ("gpus", "engine", "usable_gib"),
    [((), "torch", 8), ((cuda(40),), "torch", 40), ((cuda(40), cuda(30)), "torch", 70),
     ((cuda(40),), "fake", 8), ((METAL,), "torch", 8)],
)  # fmt: skip
def test_usable_memory(gpus: tuple[GpuInfo, ...], engine: str, usable_gib: int) -> None:
    assert usable_memory(node("a", 8, gpus=gpus), engine) == usable_gib * GIB


def test_unmeasured_node_gets_defaults_and_a_note() -> None:
    speed = node_speed(node("a", bw=None, gflops=None))
    assert (speed.bandwidth_gbs, speed.matmul_gflops) == (10.0, 50.0) and len(speed.notes) == 2
    result = place(card(SMOL), [node("a", bw=None)], instance_id=IID)
    assert isinstance(result, Placement) and any("unmeasured" in n for n in result.notes)


# --- allocate_layers ------------------------------------------------------------------------------


def caps(*pairs: tuple[float, int]) -> list[NodeCapacity]:
    return [NodeCapacity(NodeId(f"n{i}"), t, cap) for i, (t, cap) in enumerate(pairs)]


ALLOCATE: list[tuple[str, int, list[NodeCapacity], list[int] | None]] = [
    ("even", 10, caps((1, 10), (1, 10)), [5, 5]),
    ("twice as fast gets twice", 30, caps((1, 30), (2, 30)), [20, 10]),
    ("largest remainder, ties by order", 10, caps((1, 10), (1, 10), (1, 10)), [4, 3, 3]),
    ("cap moves the rest", 10, caps((1, 3), (1, 10)), [3, 7]),
    ("at least one each", 10, caps((1, 10), (100, 10)), [9, 1]),
    ("excess to the quickest stage", 12, caps((1, 2), (1, 20), (2, 20)), [2, 7, 3]),
    ("exactly the caps", 9, caps((1, 2), (5, 3), (1, 4)), [2, 3, 4]),
    ("caps too small", 10, caps((1, 4), (1, 5)), None),
    ("a node holds nothing", 10, caps((1, 0), (1, 10)), None),
    ("more nodes than layers", 2, caps((1, 5), (1, 5), (1, 5)), None),
    ("no nodes", 5, [], None),
]


@pytest.mark.parametrize(("n", "nodes", "expected"), [c[1:] for c in ALLOCATE],
                         ids=[c[0] for c in ALLOCATE])  # fmt: skip
def test_allocate_layers(n: int, nodes: list[NodeCapacity], expected: list[int] | None) -> None:
    assert allocate_layers(n, nodes) == expected


@pytest.mark.parametrize("n", [1, 7, 30, 80, 126])
def test_allocate_layers_invariants(n: int) -> None:
    for times in itertools.product([0.5, 1.0, 3.0], repeat=3):
        for cap_list in itertools.product([1, n // 3 + 1, n], repeat=3):
            nodes = caps(*zip(times, cap_list, strict=True))
            counts = allocate_layers(n, nodes)
            if n < 3 or sum(cap_list) < n:
                assert counts is None
                continue
            assert counts is not None and sum(counts) == n
            assert all(1 <= c <= cap for c, cap in zip(counts, cap_list, strict=True))


# --- place: latency -------------------------------------------------------------------------------

A, B = node("a", bw=20.0, gflops=150.0), node("b", bw=10.0, gflops=50.0)


@pytest.mark.parametrize(
    ("nodes", "exp"),
    [([A, B], "a"), ([B, A], "a"),
     ([node("a", 0.5, bw=100.0), B, node("c", bw=15.0)], "c"),  # the fastest cannot hold it
     ([node("y"), node("x")], "x")],  # equal speed: node id decides
)  # fmt: skip
def test_fits_on_one_node_uses_the_fastest_that_fits(nodes: list[NodeProfile], exp: str) -> None:
    result = place(card(SMOL), nodes, instance_id=IID)
    assert layers_of(result) == [(exp, 30)]
    assert isinstance(result, Placement) and result.instance.predicted_tok_s is not None
    assert_within_memory(result, card(SMOL), nodes)


def test_latency_single_node_prediction() -> None:
    mem = memory_model(card(SMOL))
    t_a = max(mem.layer_bytes / 20e9, 2 * mem.params_per_layer / 150e9)
    result = place(card(SMOL), [A, B], instance_id=IID)
    assert isinstance(result, Placement)
    assert result.instance.predicted_tok_s == pytest.approx(1 / (30 * t_a))


FOUR = [big("fast1", 400.0), big("fast2", 400.0), big("slow", 100.0), big("tiny", 800.0, 16)]
EQUAL = [big("a", 100.0, 192), big("b", 300.0, 192), big("c", 200.0, 192), big("d", 300.0, 192)]
PAIR = [big("s", 100.0, 192), big("f", 300.0, 192)]

SPLITS: list[tuple[str, list[NodeProfile], list[tuple[str, int]]]] = [
    ("3 of 4; tiny is fastest but cannot help", FOUR, [("fast1", 33), ("fast2", 34), ("slow", 13)]),
    ("the fastest 2 of 4", EQUAL, [("b", 40), ("d", 40)]),
    ("faster node gets more, up to its cap", PAIR, [("f", 50), ("s", 30)]),
]


@pytest.mark.parametrize(("nodes", "expected"), [c[1:] for c in SPLITS], ids=[c[0] for c in SPLITS])
def test_too_big_for_one_splits_over_the_fewest(
    nodes: list[NodeProfile], expected: list[tuple[str, int]]
) -> None:
    c = card(LLAMA70)
    result = place(c, nodes, instance_id=IID)
    assert layers_of(result) == expected
    assert isinstance(result, Placement)
    assert_within_memory(result, c, nodes)
    assert any("split over" in n for n in result.notes)
    reordered = {p.node_id: p for p in reversed(nodes)}  # a mapping, in another order
    assert place(c, reordered, instance_id=IID) == result


def test_throughput_balances_stages_and_may_use_more_nodes() -> None:
    c = card(LLAMA70)
    latency = place(c, EQUAL, instance_id=IID)
    result = place(c, EQUAL, instance_id=IID, policy="throughput")
    assert isinstance(result, Placement) and isinstance(latency, Placement)
    assert len(result.instance.stages) == 4 > len(latency.instance.stages)
    times = stage_times(result, c, EQUAL)
    assert max(times) / min(times) < 1.2
    assert result.instance.predicted_tok_s == pytest.approx(1 / max(times))
    assert result.instance.policy == "throughput"
    assert_within_memory(result, c, EQUAL)


def test_throughput_on_a_small_model() -> None:
    result = place(card(SMOL), [A, B], instance_id=IID, policy="throughput")
    assert layers_of(result) == [("a", 20), ("b", 10)]
    assert isinstance(result, Placement)
    times = stage_times(result, card(SMOL), [A, B])
    assert times[0] == pytest.approx(times[1])


# --- overrides and forced engines ---------------------------------------------------------------

NAMED = [node("alpha"), node("alpha2"), node("beta", bw=10.0), node("small", 0.5)]


@pytest.mark.parametrize(
    "spec", ["alpha:0-12,beta:12-30", "alpha:0-12,be:12-30", [("alpha", 0, 12), ("beta", 12, 30)]]
)
def test_override_is_honoured_exactly(spec: Any) -> None:
    result = place(card(SMOL), NAMED, instance_id=IID, overrides=spec)
    assert layers_of(result) == [("alpha", 12), ("beta", 18)]


def test_override_with_links_predicts_with_the_hops() -> None:
    c, nodes = card(SMOL), [A, B]
    links = {(NodeId("b"), NodeId("a")): 0.01}
    result = place(c, nodes, instance_id=IID, overrides="a:0-15,b:15-30", links=links)
    assert isinstance(result, Placement)
    compute = sum(stage_times(result, c, nodes))
    assert result.instance.predicted_tok_s == pytest.approx(1 / (compute + 2 * 0.01))  # both ways


REFUSED: list[tuple[str, str, str]] = [
    ("unknown node", "zz:0-30", "no node 'zz' (nodes: alpha, alpha2, beta, ghost, small)"),
    ("ambiguous prefix", "alp:0-30", "'alp' is ambiguous: alpha, alpha2"),
    ("gap", "alpha:0-12,beta:14-30", "layers 12-14 are not assigned (between alpha:0-12 and"),
    ("overlap", "alpha:0-12,beta:10-30", "beta:10-30 overlaps alpha:0-12 at layers 10-12"),
    ("short", "alpha:0-12,beta:12-28", "layers 28-30 are not assigned"),
    ("late start", "alpha:2-30", "layers 0-2 are not assigned (before alpha:2-30)"),
    ("past the end", "alpha:0-12,beta:12-31", "beta:12-31 runs past the model's 30 layers"),
    ("empty", "alpha:0-0,beta:0-30", "alpha:0-0 is empty"),
    ("syntax", "alpha0-30", "'alpha0-30' is not NODE:START-END"),
    ("over memory", "alpha:0-2,small:2-30", "small needs 736 MiB for layers 2-30 but has 205 MiB"),
    ("no profile", "alpha:0-2,ghost:2-30", "ghost:2-30: ghost no profile yet"),
]


@pytest.mark.parametrize(("spec", "reason"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_override_refused_with_the_reason(spec: str, reason: str) -> None:
    nodes: dict[NodeId, NodeProfile | None] = {p.node_id: p for p in NAMED}
    nodes[NodeId("ghost")] = None
    result = place(card(SMOL), nodes, instance_id=IID, overrides=spec)
    assert isinstance(result, NoFit) and reason in result.reason, result


def test_forced_engine() -> None:
    nodes = [node("a", bw=90.0), node("b", engines=("torch", "mlx"))]
    result = place(card(SMOL), nodes, instance_id=IID, engine="mlx")
    assert isinstance(result, Placement)
    assert [(s.node_id, s.engine) for s in result.instance.stages] == [("b", "mlx")]
    assert any("a: skipped, does not list engine 'mlx'" in n for n in result.notes)
    refused = place(card(SMOL), nodes, instance_id=IID, engine="mlx", overrides="a:0-30")
    assert isinstance(refused, NoFit) and "a does not list engine 'mlx' (lists: torch)" in (
        refused.reason
    )


CPU_NATIVE = ("torch", "numpy", "native")


@pytest.mark.parametrize(
    ("quant", "engines", "gpus", "forced", "shape", "expected"),
    [
        ("int4", CPU_NATIVE, False, None, {}, "native"),  # what torch would hand its shards to
        ("int8", ("numpy", "native"), False, None, {}, "native"),
        ("int4", ("native", "torch"), False, None, {}, "native"),  # never first for its own sake
        ("fp16", CPU_NATIVE, False, None, {}, "torch"),  # not a block format
        ("none", ("native", "numpy"), False, None, {}, "numpy"),
        ("int4", ("torch", "numpy"), False, None, {}, "torch"),  # no kernels compiled here
        ("int4", CPU_NATIVE, True, None, {}, "torch"),  # torch runs on the GPU
        ("int4", CPU_NATIVE, False, "torch", {}, "torch"),  # the caller named it
        ("int4", CPU_NATIVE, False, "native", {}, "native"),
        ("int4", CPU_NATIVE, False, None, {"hidden_size": 580}, "torch"),  # not blocks of 32
        ("int4", CPU_NATIVE, False, None, {"intermediate_size": 1540}, "torch"),
        ("int4", CPU_NATIVE, False, None, {"intermediate_size": 1536}, "native"),
        # the native kernels run routed experts (qwen3_moe), not latent attention
        ("int4", CPU_NATIVE, False, None, {"architecture": "qwen3_moe"}, "native"),
        ("int4", CPU_NATIVE, False, None, {"architecture": "deepseek_v3"}, "torch"),
    ],
)  # fmt: skip
def test_native_is_named_where_it_runs(
    quant: str,
    engines: tuple[str, ...],
    gpus: bool,
    forced: str | None,
    shape: dict[str, Any],
    expected: str,
) -> None:
    n = node("a", engines=engines, gpus=(cuda(70),) if gpus else ())
    result = place(card(SMOL, quant=quant, **shape), [n], instance_id=IID, engine=forced)
    assert isinstance(result, Placement), result
    assert [s.engine for s in result.instance.stages] == [expected]


def test_fake_only_and_profileless_nodes_are_skipped() -> None:
    nodes = {NodeId("f"): node("f", engines=("fake",)), NodeId("g"): None}
    result = place(card(SMOL), nodes, instance_id=IID)
    assert isinstance(result, NoFit)
    assert "no usable node: f does not list an engine other than 'fake'" in result.reason
    assert "g no profile yet" in result.reason
    assert layers_of(place(card(SMOL), nodes, instance_id=IID, engine="fake")) == [("f", 30)]


def test_gpu_memory_is_used_for_engines_that_run_there() -> None:
    gpu = node("g", 0.5, gpus=(cuda(8),))
    assert layers_of(place(card(SMOL), [gpu], instance_id=IID)) == [("g", 30)]
    mac = node("m", 0.5, gpus=(METAL,))  # unified: the free RAM is all there is
    assert isinstance(place(card(SMOL), [mac], instance_id=IID), NoFit)


# --- no fit ---------------------------------------------------------------------------------------


def test_no_fit_even_together_names_the_numbers() -> None:
    nodes = [node("a", 32), node("b", 32), node("c", 32)]
    result = place(card(LLAMA70), nodes, instance_id=IID)
    assert isinstance(result, NoFit)
    assert result.reason == (
        "llama-3.1-70b needs 275.6 GiB (weights 273.1 GiB + KV cache 2.5 GiB for 4096 tokens); "
        "the largest node (a) has 28.6 GiB after headroom (32.0 GiB free) and all 3 usable nodes "
        "together 85.7 GiB after headroom (96.0 GiB free)"
    )


def test_no_fit_in_whole_layers() -> None:
    # 90 nodes hold one layer each, but none holds a layer and the embeddings
    nodes = [node(f"n{i:02}", 4.5) for i in range(90)]
    result = place(card(LLAMA70), nodes, instance_id=IID)
    assert isinstance(result, NoFit) and "no split into whole layers fits" in result.reason


# --- previews -------------------------------------------------------------------------------------


def test_previews_list_every_option_sorted() -> None:
    nodes = [A, B, node("small", 0.5, bw=15.0)]
    options = previews(card(SMOL), nodes)
    fits = [p for p in options if p.fits]
    assert options[: len(fits)] == fits  # fitting ones first
    speeds = [p.predicted_tok_s or 0 for p in fits]
    assert speeds == sorted(speeds, reverse=True)
    assert fits[0].label == "a" and fits[0].chosen_by == ("latency",)
    assert {p.label for p in options} >= {"a", "b", "small", "a+small", "a+b", "a+small+b"}
    small = next(p for p in options if p.label == "small")
    assert not small.fits and small.predicted_tok_s is None
    assert small.reason == (
        f"small needs {fmt_bytes(memory_model(card(SMOL)).total_bytes())} for layers 0-30 "
        "but has 205 MiB after headroom (512 MiB free)"
    )
    for p in options:
        assert Preview.model_validate(p.to_json()) == p


def test_previews_skip_subsets_beyond_four_nodes() -> None:
    nodes = [node(f"n{i}", bw=10.0 + i) for i in range(5)] + [node("f", engines=("fake",))]
    options = previews(card(SMOL), nodes)
    assert sum("+" in p.label for p in options) <= 1  # only the throughput policy's split
    assert options[-1].label == "f" and options[-1].reason is not None


def test_previews_when_nothing_fits() -> None:
    options = previews(card(LLAMA70), [node("a", 32), node("b", 32)])
    assert not any(p.fits for p in options)
    assert options[0].chosen_by == ("latency", "throughput") and options[0].reason


# --- whole-model engines (llamacpp) ---------------------------------------------------------------


def lcpp(name: str, ram_gib: float = 16, bw: float = 20.0, gflops: float = 150.0) -> NodeProfile:
    """A node whose only engine is llamacpp (whole models only)."""
    return node(name, ram_gib, bw, gflops, engines=("llamacpp",))


def engines_of(result: Placement | NoFit) -> list[tuple[str, int, int, str]]:
    assert isinstance(result, Placement), result
    return [(s.node_id, s.start, s.end, s.engine) for s in result.instance.stages]


WHOLE_ONLY: list[tuple[str, dict[str, Any], list[NodeProfile], dict[str, Any], object]] = [
    ("llamacpp alone runs the whole model", SMOL, [lcpp("l")], {},
     [("l", 0, 30, "llamacpp")]),
    ("the fastest node is llamacpp: whole model there", SMOL, [lcpp("l", bw=90.0), A, B], {},
     [("l", 0, 30, "llamacpp")]),
    ("throughput splits over torch nodes only", SMOL, [A, lcpp("l", bw=10.0, gflops=50.0), B],
     {"policy": "throughput"}, [("a", 0, 20, "torch"), ("b", 20, 30, "torch")]),
    ("throughput keeps the whole model on a fast llamacpp node", SMOL, [lcpp("l", bw=90.0), A, B],
     {"policy": "throughput"}, [("l", 0, 30, "llamacpp")]),
    ("too big for the llamacpp node: the split leaves it out", LLAMA70,
     [lcpp("l", 128, 800.0, 2000.0), big("f1", 400.0, 192), big("f2", 400.0, 192)], {},
     [("f1", 0, 40, "torch"), ("f2", 40, 80, "torch")]),
    ("forced llamacpp places a whole model", SMOL,
     [node("a", bw=90.0), node("b", engines=("torch", "llamacpp"))], {"engine": "llamacpp"},
     [("b", 0, 30, "llamacpp")]),
    ("too big for every llamacpp node: no split", LLAMA70,
     [lcpp("l1", 192), lcpp("l2", 192)], {},
     "splits leave out nodes running llamacpp (whole models only)"),
    ("forced llamacpp never splits", LLAMA70,
     [node(n, 192, engines=("torch", "llamacpp")) for n in "ab"], {"engine": "llamacpp"},
     "splits leave out nodes running llamacpp"),
    ("override: all layers on llamacpp", SMOL, [lcpp("l"), A], {"overrides": "l:0-30"},
     [("l", 0, 30, "llamacpp")]),
    ("override: llamacpp first stage refused", SMOL, [lcpp("l"), A],
     {"overrides": "l:0-12,a:12-30"},
     "l:0-12: l runs engine 'llamacpp', which runs whole models only (layers 0-30 on one node)"),
    ("override: llamacpp last stage refused", SMOL, [lcpp("l"), A],
     {"overrides": "a:0-12,l:12-30"}, "l:12-30: l runs engine 'llamacpp'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("shape", "nodes", "options", "expected"),
    [c[1:] for c in WHOLE_ONLY],
    ids=[c[0] for c in WHOLE_ONLY],
)
def test_llamacpp_runs_whole_models_only(
    shape: dict[str, Any], nodes: list[NodeProfile], options: dict[str, Any], expected: object
) -> None:
    result = place(card(shape), nodes, instance_id=IID, **options)
    if isinstance(expected, str):
        assert isinstance(result, NoFit) and expected in result.reason, result
        return
    assert engines_of(result) == expected
    for s in engines_of(result):
        assert s[3] != "llamacpp" or s[1:3] == (0, card(shape).layers)


def test_previews_never_split_onto_llamacpp() -> None:
    options = previews(card(SMOL), [A, lcpp("l", bw=15.0), B])
    labels = {p.label for p in options}
    assert {"a", "l", "b", "a+b"} <= labels and not any("l" in x.split("+") for x in labels - {"l"})
    for p in options:
        for s in p.stages:
            assert s.engine != "llamacpp" or (s.start, s.end) == (0, 30)


def test_llamacpp_plans_with_gpu_memory() -> None:
    assert usable_memory(node("g", 8, gpus=(cuda(40),)), "llamacpp") == 40 * GIB
    assert usable_memory(node("m", 8, gpus=(METAL,)), "llamacpp") == 8 * GIB


def test_need_and_offer_per_engine() -> None:
    seed = builtin_cards()[ModelId("llama-3.2-1b")]
    need = need_per_engine(seed, ["numpy", "llamacpp"])
    assert need == {e: memory_model(seed, engine=e).total_bytes() for e in ("numpy", "llamacpp")}
    nodes = [
        node("a", 16, engines=("numpy", "llamacpp")),
        node("b", 8, engines=("numpy",)),
        node("c", 32, engines=("torch",)),
    ]
    offered = offered_per_engine(nodes, ["numpy", "llamacpp", "mlx"])
    a, b = capacity(16 * GIB), capacity(8 * GIB)
    assert offered == {"numpy": a + b, "llamacpp": a, "mlx": 0}  # llama.cpp: one node, whole


# --- mixtures of experts and latent attention -----------------------------------------------------

CARDS = builtin_cards()


def seed(model_id: str, **changes: Any) -> ModelCard:
    return CARDS[ModelId(model_id)].model_copy(update=changes)


def as_dense(c: ModelCard) -> ModelCard:
    """The same card and file as if every weight were read for every token."""
    return c.model_copy(update={"experts": 0, "experts_per_token": 0, "dense_layers": 0})


def one_node_tok_s(c: ModelCard, **options: Any) -> float:
    """Predicted decode tok/s of the whole model on one roomy, memory-bound node."""
    result = place(c, [node("n", 4096, 400.0, 1e6)], instance_id=IID, **options)
    assert isinstance(result, Placement) and len(result.instance.stages) == 1, result
    assert result.instance.predicted_tok_s is not None
    return result.instance.predicted_tok_s


# The seed mixtures of experts: (card, active, total parameters as published, in billions). A
# token reads its active share only, so its decode time is at most active / total of the same
# model read whole (the published figures count embeddings and head, which no token reads
# whole), and not much less.
MOE_SHARES = [
    ("qwen3-30b", 3.3, 30.5), ("qwen3-30b-8bit", 3.3, 30.5),
    ("qwen3-235b-a22b-4bit", 22, 235), ("qwen3-coder-480b-a35b-8bit", 35, 480),
    ("deepseek-v3.1-4bit", 37, 671), ("deepseek-v3.1-8bit", 37, 671),
    ("kimi-k2-instruct-4bit", 32, 1040), ("kimi-k2-thinking", 32, 1040),
]  # fmt: skip


@pytest.mark.parametrize(("model_id", "active", "total"), MOE_SHARES)
def test_moe_decode_reads_the_active_share(model_id: str, active: float, total: float) -> None:
    c = seed(model_id)
    share = one_node_tok_s(as_dense(c)) / one_node_tok_s(c)  # its time / the dense time
    assert 0.8 * active / total < share <= active / total
    # and it holds every expert: the same bytes as the whole file read dense
    assert memory_model(c).total_bytes() == pytest.approx(memory_model(as_dense(c)).total_bytes())


@pytest.mark.parametrize(
    ("moe", "dense", "low", "high"),
    # a 30B-A3B decodes like a ~3B dense model: Llama 3.2 3B, 2.8B weights in its layers
    [("qwen3-30b", "llama-3.2-3b", 0.9, 1.25), ("qwen3-30b-8bit", "llama-3.2-3b-8bit", 0.9, 1.25),
     # DeepSeek V3.1 (37B active) at least as fast as a 70B dense, at most 2.5x
     ("deepseek-v3.1-4bit", "llama-3.3-70b", 1.0, 2.5)],
)  # fmt: skip
def test_moe_decodes_like_a_dense_model_of_its_active_size(
    moe: str, dense: str, low: float, high: float
) -> None:
    assert low < one_node_tok_s(seed(moe)) / one_node_tok_s(seed(dense)) < high
    assert memory_model(seed(moe)).total_bytes() > 3 * memory_model(seed(dense)).total_bytes()


def test_compute_bound_moe_counts_active_weights() -> None:
    c = seed("qwen3-30b", quant="int4")
    mem, slow = memory_model(c), NodeSpeed(bandwidth_gbs=1e6, matmul_gflops=10.0)
    assert mem.params_per_layer == pytest.approx(mem.read_per_layer / mem.weight_bytes)
    assert layer_time(mem, slow) == pytest.approx(2 * mem.params_per_layer / 10e9)
    assert mem.params_per_layer < 0.1 * mem.layer_bytes / mem.weight_bytes


@pytest.mark.parametrize(
    ("ram_gib", "expected"),
    # DeepSeek V3.1 4-bit holds all 671B weights: 378 GiB on disk, ~420 GiB as torch's Q4_1
    # blocks (5 bits a weight), so one 512 GiB node, or two 256 GiB nodes, never one of 256
    [(512, 1), (256, 2), (192, 3)],
)
def test_deepseek_needs_all_of_its_memory(ram_gib: int, expected: int) -> None:
    c = seed("deepseek-v3.1-4bit")
    mem = memory_model(c)
    assert mem.total_bytes() - mem.kv_bytes() >= c.storage_bytes * 5 / 4.5 * 0.99
    nodes = [node(n, ram_gib, 400.0, 1e6) for n in "abc"]
    result = place(c, nodes, instance_id=IID)
    assert isinstance(result, Placement), result
    assert len(result.instance.stages) == expected
    assert_within_memory(result, c, nodes)


def test_dense_layers_of_a_moe_cost_their_own_share() -> None:
    mem = memory_model(seed("deepseek-v3.1-4bit"))
    assert mem.dense_layers == 3 and mem.dense_layer_bytes < mem.layer_bytes / 10
    assert mem.stage_bytes(1, 3) < mem.stage_bytes(3, 5) / 10
    assert mem.stage_bytes(0, 20) + mem.stage_bytes(20, 61) == mem.total_bytes()
    assert mem.per_layer == mem.layer_bytes + mem.kv_layer_bytes  # the largest layer
    # a first stage fits its dense layers cheaply; another stage is sized by the largest layer
    room = mem.embed_bytes + 3 * (mem.dense_layer_bytes + mem.kv_layer_bytes) + 2 * mem.per_layer
    assert mem.max_layers(room, first=True, last=False) == 5
    assert mem.max_layers(room - mem.embed_bytes, first=False, last=False) == 2
    assert mem.max_layers(mem.embed_bytes + mem.dense_layer_bytes, first=True, last=False) == 0


@pytest.mark.parametrize(
    ("model_id", "values"),
    # values one layer caches per token: MLA's latent + rope key, else 2 x kv_heads x head_dim
    [("deepseek-v3.1-4bit", 512 + 64), ("kimi-k2-instruct-4bit", 512 + 64),
     ("qwen3-30b", 2 * 4 * 128), ("llama-3.2-1b", 2 * 8 * 64)],
)  # fmt: skip
def test_kv_cache_at_its_real_size(model_id: str, values: int) -> None:
    mem = memory_model(seed(model_id), context=1000, sequences=2, dtype_bytes=2)
    assert mem.kv_layer_bytes == values * 2 * 1000 * 2
    assert mem.kv_bytes() == seed(model_id).kv_bytes_per_token * 1000 * 2


def test_moe_card_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="experts_per_token"):
        ModelCard.model_validate(seed("qwen3-30b").model_dump() | {"experts_per_token": 0})
    with pytest.raises(ValueError, match="qk_rope"):
        ModelCard.model_validate(seed("deepseek-v3.1-4bit").model_dump() | {"qk_rope_head_dim": 0})
