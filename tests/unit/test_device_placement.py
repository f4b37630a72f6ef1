"""Placement over a node's devices: one stage per GPU, GPU + CPU in one stage, llama.cpp's split."""

from typing import Any

import pytest

from shoal.placement import NoFit, Placement, memory_model, place, previews
from shoal.placement.memory import MIB, capacity, offered_per_engine
from shoal.types.ids import InstanceId, ModelId, NodeId
from shoal.types.instance import StagePlan
from shoal.types.model_card import ModelCard
from shoal.types.profile import GpuInfo, NodeProfile
from tests.helpers.state import GIB, profile

pytestmark = pytest.mark.timeout(30)

IID = InstanceId("i1")


def card(storage_gib: float, **overrides: Any) -> ModelCard:
    """A 48-layer fp16 model whose file (= its weights as held) is `storage_gib`."""
    fields: dict[str, Any] = dict(
        id=ModelId("m"), name="m", family="f", architecture="llama", hf_repo="r", license="l",
        layers=48, hidden_size=5120, heads=40, kv_heads=8, head_dim=128, vocab_size=32000,
        context_length=4096, storage_bytes=int(storage_gib * GIB), quantization="fp16",
        quant="fp16",
    )  # fmt: skip
    return ModelCard(**fields | overrides)


def gpu(index: int, free_gib: float, bw: float | None = 900.0, name: str = "V100") -> GpuInfo:
    flops = None if bw is None else 100_000.0
    return GpuInfo(vendor="nvidia", name=name, memory_total=int(free_gib * GIB) + GIB,
                   memory_free=int(free_gib * GIB), backend="cuda", index=index,
                   memory_bandwidth_gbs=bw, matmul_gflops=flops)  # fmt: skip


def box(name: str, gpus: tuple[GpuInfo, ...] = (), ram_gib: float = 64, **kw: Any) -> NodeProfile:
    return profile(name, gpus=gpus, ram_available=int(ram_gib * GIB), memory_bandwidth_gbs=20.0,
                   matmul_gflops=200.0, **kw)  # fmt: skip


def stages(result: Placement | NoFit) -> list[StagePlan]:
    assert isinstance(result, Placement), result
    return list(result.instance.stages)


def devices_hold(result: Placement, c: ModelCard, nodes: list[NodeProfile]) -> None:
    """Each device's bytes, recomputed from the memory model, fit that device's capacity."""
    mem = memory_model(c, dtype_bytes=4)
    by_id = {p.node_id: p for p in nodes}
    held: dict[tuple[NodeId, str | None], int] = {}
    for s in result.instance.stages:
        on_device = s.end - s.cpu_layers
        gpu_bytes = mem.stage_bytes(s.start, on_device)
        if s.cpu_layers:
            gpu_bytes -= mem.head_bytes if on_device == mem.n_layers else 0
            cpu = mem.stage_bytes(on_device, s.end)
            held[s.node_id, "cpu"] = held.get((s.node_id, "cpu"), 0) + cpu
        held[s.node_id, s.device] = held.get((s.node_id, s.device), 0) + gpu_bytes
    for (node_id, device), n_bytes in held.items():
        node = by_id[node_id]
        if device == "cpu":
            free = node.ram_available
        elif device == "cuda":
            free = sum(g.memory_free for g in node.gpus)
        else:
            free = next(g.memory_free for g in node.gpus if g.device == device)
        assert n_bytes <= capacity(free), (node_id, device, n_bytes / GIB)


V100S = tuple(gpu(i, 16) for i in range(4))


def test_a_model_over_one_gpu_goes_over_all_four_not_one_30gb_stage() -> None:
    c, nodes = card(30), [box("master", V100S, ram_gib=128)]
    result = place(c, nodes, instance_id=IID)
    got = stages(result)
    assert [s.device for s in got] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert [s.layers for s in got] == [12, 12, 12, 12]  # equal GPUs: equal shares
    assert all(s.node_id == "master" and s.cpu_layers == 0 for s in got)
    assert isinstance(result, Placement)
    devices_hold(result, c, nodes)


def test_a_model_that_fits_one_gpu_stays_on_one() -> None:
    c = card(8)
    got = stages(place(c, [box("master", V100S)], instance_id=IID))
    assert [(s.device, s.layers) for s in got] == [("cuda:0", 48)]


def test_the_gpu_with_room_takes_a_model_the_others_cannot_hold() -> None:
    gpus = (gpu(0, 4), gpu(1, 14))  # another process holds most of GPU 0
    got = stages(place(card(10), [box("a", gpus)], instance_id=IID))
    assert [(s.device, s.layers) for s in got] == [("cuda:1", 48)]


def test_faster_gpus_get_more_layers_within_their_memory() -> None:
    gpus = (gpu(0, 22, bw=1800.0, name="A"), gpu(1, 22, bw=600.0, name="B"))
    got = stages(place(card(30), [box("a", gpus)], instance_id=IID))
    assert [s.device for s in got] == ["cuda:0", "cuda:1"]
    assert got[0].layers > got[1].layers


def test_slightly_over_a_gpu_spills_its_last_layers_to_the_same_nodes_cpu() -> None:
    # the RTX 5070 box: 12 GB of VRAM, 64 GB of RAM; a 13 GiB model
    c, nodes = card(13), [box("rtx", (gpu(0, 12),), ram_gib=64)]
    result = place(c, nodes, instance_id=IID)
    (stage,) = stages(result)
    assert (stage.device, stage.start, stage.end) == ("cuda:0", 0, 48)
    assert 0 < stage.cpu_layers < 48
    assert isinstance(result, Placement)
    devices_hold(result, c, nodes)
    # as many layers as fit stay on the GPU: one fewer would fit too, but be slower
    mem = memory_model(c, dtype_bytes=4)
    on_gpu = stage.device_layers
    assert mem.stage_bytes(0, on_gpu + 1) > capacity(12 * GIB)
    assert result.instance.predicted_tok_s is not None


def test_no_spill_when_another_node_is_faster() -> None:
    c = card(13)
    rtx = box("rtx", (gpu(0, 12),), ram_gib=64)
    roomy = box("roomy", (gpu(0, 40, bw=2000.0),))
    got = stages(place(c, [rtx, roomy], instance_id=IID))
    assert [(s.node_id, s.device, s.cpu_layers) for s in got] == [("roomy", "cuda:0", 0)]


def test_spill_beats_a_pipeline_through_a_slow_cpu_node() -> None:
    c = card(13)
    rtx = box("rtx", (gpu(0, 12),), ram_gib=64)
    cpu_node = box("cpu", ram_gib=64)
    hops = {("rtx", "cpu"): 5e-3}  # a slow link
    result = place(c, [rtx, cpu_node], instance_id=IID, links=hops)  # type: ignore[arg-type]
    got = stages(result)
    assert [(s.node_id, s.device) for s in got] == [("rtx", "cuda:0")] and got[0].cpu_layers > 0


def test_gpus_too_small_for_the_embeddings_do_not_spill() -> None:
    c = card(13)
    result = place(c, [box("tiny", (gpu(0, 0.3),), ram_gib=4)], instance_id=IID)
    assert isinstance(result, NoFit)


def test_llamacpp_splits_one_whole_model_over_the_gpus_and_the_cpu() -> None:
    gguf = dict(quantization="Q8_0", quant="int8")
    c = card(13, **gguf)
    two = box("a", (gpu(0, 5), gpu(1, 5)), ram_gib=64, engines=("llamacpp",))
    (stage,) = stages(place(c, [two], instance_id=IID, engine="llamacpp"))
    assert (stage.device, stage.start, stage.end, stage.engine) == ("cuda", 0, 48, "llamacpp")
    assert len(stage.gpu_split) == 2 and all(n > 0 for n in stage.gpu_split)
    assert stage.cpu_layers > 0 and sum(stage.gpu_split) + stage.cpu_layers == 48
    # (no GGUF source on these cards: llama.cpp is planned at float32, the safe side)
    (stage,) = stages(place(card(1, **gguf), [two], instance_id=IID, engine="llamacpp"))
    assert stage.cpu_layers == 0 and len(stage.gpu_split) == 2 and sum(stage.gpu_split) == 48
    (stage,) = stages(place(card(0.3, **gguf), [two], instance_id=IID, engine="llamacpp"))
    assert (stage.device, stage.gpu_split, stage.cpu_layers) == ("cuda", (48,), 0)


def test_offered_memory_counts_the_ram_behind_the_gpus() -> None:
    node = box("a", (gpu(0, 12),), ram_gib=64)
    offered = offered_per_engine([node], ["torch"])["torch"]
    assert offered == capacity(12 * GIB) + capacity(64 * GIB)
    assert offered_per_engine([box("b", ram_gib=64)], ["torch"])["torch"] == capacity(64 * GIB)


def test_unmeasured_gpus_get_defaults_and_a_note() -> None:
    result = place(card(8), [box("a", (gpu(0, 16, bw=None),))], instance_id=IID)
    assert isinstance(result, Placement)
    assert any("cuda:0 speed unmeasured" in note for note in result.notes)


def test_overrides_on_a_multi_gpu_node_go_over_its_gpus() -> None:
    c = card(30)
    got = stages(place(c, [box("m", V100S)], instance_id=IID, overrides="m:0-48"))
    assert len(got) == 4 and {s.device for s in got} == {f"cuda:{i}" for i in range(4)}
    too_big = place(card(70), [box("m", V100S)], instance_id=IID, overrides="m:0-48")
    assert isinstance(too_big, NoFit) and "on cuda:" in too_big.reason


def test_previews_show_devices_and_round_trip() -> None:
    options = previews(card(13), [box("rtx", (gpu(0, 12),), ram_gib=64), box("cpu")])
    fits = [p for p in options if p.fits]
    assert fits and fits[0].stages[0].where().startswith("cuda:0 + cpu ")
    for p in options:
        assert type(p).model_validate(p.to_json()) == p
    assert StagePlan.model_validate_json(fits[0].stages[0].model_dump_json()) == fits[0].stages[0]


def test_stage_plan_refuses_impossible_device_splits() -> None:
    with pytest.raises(ValueError, match="at least one layer"):
        StagePlan(node_id="a", start=0, end=4, device="cuda:0", cpu_layers=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gpu_split"):
        StagePlan(node_id="a", start=0, end=4, device="cuda", gpu_split=(1, 1))  # type: ignore[arg-type]


def test_cpu_nodes_place_as_before() -> None:
    got = stages(place(card(8), [box("a", ram_gib=64)], instance_id=IID))
    assert [(s.device, s.cpu_layers, s.gpu_split) for s in got] == [(None, 0, ())]
    assert MIB  # the module's units are the placement's
