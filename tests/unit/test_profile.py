"""The node profile: collection, the cached benchmark, NVML and Apple probes, the actor."""

import asyncio
import itertools
import logging
import platform
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shoal.errors import BadRequest
from shoal.profile import apple, bench
from shoal.profile.actor import Profiler, changed, should_emit
from shoal.profile.apple import MACMON_MISSING, AppleProbe
from shoal.profile.bench import BenchResult, BenchSizes, cached_bench, fingerprint
from shoal.profile.collect import ProfileCollector, collect_profile
from shoal.profile.cpu import cpu_model
from shoal.profile.gpu_bench import keep_speeds
from shoal.profile.nvidia import NvidiaProbe, parse_devices, simulated_gpus
from shoal.types.ids import NodeId
from shoal.types.profile import GpuInfo, NodeProfile

pytestmark = pytest.mark.timeout(30)

GiB = 1 << 30
TINY = BenchSizes(copy_bytes=1 << 20, matmul_n=32, repeats=2, budget_s=0.1)


@pytest.fixture
def no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml → ImportError


@pytest.fixture
def counted_measure(monkeypatch: pytest.MonkeyPatch) -> list[BenchSizes]:
    calls: list[BenchSizes] = []

    def fake(sizes: BenchSizes) -> BenchResult:
        calls.append(sizes)
        return BenchResult(memory_bandwidth_gbs=12.5, matmul_gflops=80.0)

    monkeypatch.setattr(bench, "measure", fake)
    return calls


# --- collection ---------------------------------------------------------------------------------


def test_profile_validates_and_round_trips(
    tmp_path: Path, no_nvml: None, counted_measure: list[BenchSizes]
) -> None:
    p = collect_profile(
        NodeId("n1"), data_dir=tmp_path, api_url="http://h:1", data_addr="h:2", version="0.1"
    )
    assert p.cpu_cores >= 1 and p.ram_total >= p.ram_available > 0
    assert p.memory_bandwidth_gbs == 12.5 and p.matmul_gflops == 80.0
    assert "fake" not in p.engines
    assert NodeProfile.model_validate_json(p.model_dump_json()) == p
    assert NodeProfile.model_validate(p.model_dump()) == p


def test_engines_passed_explicitly_and_bench_off(tmp_path: Path, no_nvml: None) -> None:
    p = collect_profile(
        NodeId("n1"),
        data_dir=tmp_path,
        api_url="",
        data_addr="",
        version="",
        engines=["fake"],
        bench=False,
    )
    assert p.engines == ("fake",) and p.memory_bandwidth_gbs is None
    assert not (tmp_path / bench.CACHE_FILE).exists()


def test_refresh_keeps_the_static_parts(tmp_path: Path, no_nvml: None) -> None:
    c = ProfileCollector(
        NodeId("n1"), data_dir=tmp_path, api_url="", data_addr="", version="", bench=False
    )
    before = c.full().model_copy(update={"ram_available": 0, "matmul_gflops": 1.0})
    after = c.refresh(before)
    assert after.ram_available > 0 and after.matmul_gflops == 1.0
    c.close()


def test_cpu_model_from_proc_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\n")
    assert cpu_model("Linux", info) == "Test CPU 9000"
    assert cpu_model("Linux", tmp_path / "missing")  # falls back, never empty


# --- benchmark ----------------------------------------------------------------------------------


def test_tiny_measurement_is_positive() -> None:
    r = bench.measure(TINY)
    assert r.memory_bandwidth_gbs > 0 and r.matmul_gflops > 0


def test_bench_cache_is_reused_then_refreshed(
    tmp_path: Path, counted_measure: list[BenchSizes]
) -> None:
    fp = fingerprint("cpu A", 8, 16 * GiB)
    first = cached_bench(tmp_path, fp, TINY)
    assert cached_bench(tmp_path, fp, TINY) == first
    assert len(counted_measure) == 1
    cached_bench(tmp_path, fingerprint("cpu A", 8, 32 * GiB), TINY)  # more RAM: new machine
    assert len(counted_measure) == 2


def test_unreadable_cache_is_measured_again(
    tmp_path: Path, counted_measure: list[BenchSizes]
) -> None:
    (tmp_path / bench.CACHE_FILE).write_text("{not json")
    assert cached_bench(tmp_path, fingerprint("c", 1, 1), TINY).matmul_gflops == 80.0
    assert len(counted_measure) == 1


# --- NVIDIA -------------------------------------------------------------------------------------


class _NVMLError(Exception):
    pass


def fake_pynvml(devices: list[tuple[str | bytes, int, int]], fail_init: bool = False) -> Any:
    calls: dict[str, int] = {"init": 0, "shutdown": 0, "count": 0}

    def init() -> None:
        calls["init"] += 1
        if fail_init:
            raise _NVMLError("NVML Shared Library Not Found")

    def count() -> int:
        calls["count"] += 1
        return len(devices)

    def shutdown() -> None:
        calls["shutdown"] += 1

    mod: Any = types.ModuleType("pynvml")
    mod.NVMLError = _NVMLError
    mod.nvmlInit = init
    mod.nvmlShutdown = shutdown
    mod.nvmlDeviceGetCount = count
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetName = lambda h: devices[h][0]
    mod.nvmlDeviceGetUUID = lambda h: f"GPU-{h:04d}-uuid"
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        total=devices[h][1], free=devices[h][2], used=devices[h][1] - devices[h][2]
    )
    mod.calls = calls
    return mod


def test_no_nvml_means_no_gpus(no_nvml: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="shoal.profile.nvidia")
    probe = NvidiaProbe()
    assert probe.gpus() == () and probe.gpus() == ()
    probe.close()
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]


def test_nvml_init_failure_means_no_gpus(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="shoal.profile.nvidia")
    nvml = fake_pynvml([], fail_init=True)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    probe = NvidiaProbe()
    assert probe.gpus() == ()
    probe.close()
    assert nvml.calls["shutdown"] == 0
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]


def test_nvml_devices_become_gpu_infos(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_pynvml(
        [("NVIDIA H100 80GB HBM3", 80 * GiB, 79 * GiB), (b"NVIDIA A10", 24 * GiB, 0)]
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    probe = NvidiaProbe()
    gpus = probe.gpus()
    assert gpus == (
        GpuInfo(vendor="nvidia", name="NVIDIA H100 80GB HBM3", memory_total=80 * GiB,
                memory_free=79 * GiB, backend="cuda"),
        GpuInfo(vendor="nvidia", name="NVIDIA A10", memory_total=24 * GiB, memory_free=0,
                backend="cuda", index=1),
    )  # fmt: skip
    assert probe.gpus() == gpus
    assert nvml.calls["init"] == 1 and nvml.calls["count"] == 1  # opened once, handles cached
    probe.close()
    assert nvml.calls["shutdown"] == 1


# --- Apple --------------------------------------------------------------------------------------

SYSCTL = {"hw.memsize": str(64 * GiB), "machdep.cpu.brand_string": "Apple M2 Max"}
MACMON_LINE = (
    '{"gpu_usage": [1398, 0.25], "gpu_power": 12.5, "all_power": 20.0, "cpu_power": 7.5}\n'
)


@pytest.fixture
def fake_mac(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    monkeypatch.setattr(apple, "sysctl", SYSCTL.get)


def test_apple_gpu_without_macmon_warns_once(
    fake_mac: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    probe = AppleProbe()
    (gpu,) = probe.gpus()
    assert (gpu.vendor, gpu.backend, gpu.name) == ("apple", "metal", "Apple M2 Max")
    assert gpu.memory_total == 64 * GiB and 0 < gpu.memory_free <= 64 * GiB
    assert probe.gpus() and probe.usage() is None
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == [MACMON_MISSING]


def test_apple_gpu_with_macmon_reads_usage(
    fake_mac: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: f"/opt/homebrew/bin/{name}")
    monkeypatch.setattr(
        subprocess, "run", lambda args, **kw: subprocess.CompletedProcess(args, 0, MACMON_LINE, "")
    )
    probe = AppleProbe()
    assert len(probe.gpus()) == 1
    usage = probe.usage()
    assert usage is not None and (usage.gpu_usage, usage.gpu_power_w) == (0.25, 12.5)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_no_apple_gpu_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    assert AppleProbe().gpus() == () and AppleProbe().usage() is None


# --- change detection ---------------------------------------------------------------------------


def profile(ram_available: int = 8 * GiB, gpu_free: int | None = None, **kw: Any) -> NodeProfile:
    gpus = () if gpu_free is None else (
        GpuInfo(vendor="nvidia", name="g", memory_total=10 * GiB, memory_free=gpu_free,
                backend="cuda"),
    )  # fmt: skip
    base: dict[str, Any] = dict(
        node_id=NodeId("n"), hostname="h", os="Linux", os_version="6", arch="x86_64",
        cpu_model="c", cpu_cores=4, ram_total=16 * GiB, ram_available=ram_available, gpus=gpus,
    )  # fmt: skip
    return NodeProfile(**(base | kw))


MiB = 1 << 20


@pytest.mark.parametrize(
    ("old", "new", "moved"),
    [
        (profile(), profile(), False),
        (profile(), profile(8 * GiB + 200 * MiB), False),  # under 256 MiB and under 2 %
        (profile(), profile(8 * GiB - 300 * MiB), True),  # past 256 MiB
        (profile(ram_total=4 * GiB), profile(8 * GiB - 100 * MiB, ram_total=4 * GiB), True),  # 2 %
        (profile(gpu_free=5 * GiB), profile(gpu_free=5 * GiB + 100 * MiB), False),  # < 2 % of 10
        (profile(gpu_free=5 * GiB), profile(gpu_free=5 * GiB + 300 * MiB), True),
        (profile(gpu_free=5 * GiB), profile(), True),  # a GPU went away
        (profile(), profile(engines=("torch",)), True),
        (profile(), profile(api_url="http://elsewhere:1"), True),
    ],
)
def test_changed(old: NodeProfile, new: NodeProfile, moved: bool) -> None:
    assert changed(old, new) is moved


@pytest.mark.parametrize(("now", "emit"), [(10.0, False), (59.9, False), (60.0, True)])
def test_heartbeat(now: float, emit: bool) -> None:
    same = profile()
    assert should_emit(same, same, now=now, last_emit_at=0.0, heartbeat_s=60.0) is emit


# --- the actor ----------------------------------------------------------------------------------


class ScriptedCollector:
    """Returns `start` once, then each of `script` in turn (the last one forever)."""

    def __init__(self, start: NodeProfile, script: list[NodeProfile], stop_after: int) -> None:
        self.start, self.script, self.stop_after = start, script, stop_after
        self.refreshes = 0
        self.closed = False
        self.loop = asyncio.get_running_loop()
        self.done = asyncio.Event()  # set from the worker thread once stop_after refreshes ran

    def full(self) -> NodeProfile:
        return self.start

    def refresh(self, profile: NodeProfile) -> NodeProfile:
        self.refreshes += 1  # one refresh at a time: the actor awaits each
        if self.refreshes >= self.stop_after:
            self.loop.call_soon_threadsafe(self.done.set)
        return self.script[min(self.refreshes, len(self.script)) - 1]

    def close(self) -> None:
        self.closed = True


async def run_profiler(
    collector: ScriptedCollector, clock: Callable[[], float] = time.monotonic
) -> list[NodeProfile]:
    emitted: list[NodeProfile] = []

    async def emit(p: NodeProfile) -> None:
        emitted.append(p)

    profiler = Profiler(
        NodeId("n"), Path("/nonexistent"), "", "", "", emit=emit, interval_s=0.005,
        collector=collector, clock=clock,
    )  # fmt: skip
    async with asyncio.timeout(5), asyncio.TaskGroup() as tg:
        tg.create_task(profiler.run())
        await collector.done.wait()
        profiler.shutdown()
    assert collector.closed
    return emitted


async def test_profiler_emits_at_start_then_only_on_real_change() -> None:
    start = profile()
    jitter = profile(8 * GiB + 10 * MiB)
    drop = profile(5 * GiB)
    script = [jitter, profile(8 * GiB - 20 * MiB), drop, drop, drop]
    emitted = await run_profiler(ScriptedCollector(start, script, stop_after=6))
    assert emitted == [start, drop]


async def test_profiler_quiet_when_nothing_changes() -> None:
    start = profile()
    assert await run_profiler(ScriptedCollector(start, [start], stop_after=5)) == [start]


async def test_profiler_heartbeat_with_a_fake_clock() -> None:
    start = profile()
    ticks = itertools.count(0.0, 30.0)  # each reading of the clock is 30 s later
    collector = ScriptedCollector(start, [start], stop_after=4)
    emitted = await run_profiler(collector, clock=lambda: next(ticks))
    assert emitted == [start] * 3  # at 0 s, then 60 s and 120 s: nothing changed but time


# --- devices: CUDA's indexes, CUDA_VISIBLE_DEVICES, --devices, simulated GPUs --------------------

GpuRow = tuple[str | bytes, int, int]
FOUR_GPUS: list[GpuRow] = [(f"V100 {i}", 16 * GiB, (16 - i) * GiB) for i in range(4)]


@pytest.mark.parametrize(
    ("visible", "offered", "expected"),
    [(None, None, [("V100 0", 0), ("V100 1", 1), ("V100 2", 2), ("V100 3", 3)]),
     ("2,3", None, [("V100 2", 0), ("V100 3", 1)]),  # CUDA counts the visible ones from 0
     ("GPU-0003,1", None, [("V100 3", 0), ("V100 1", 1)]),  # UUID prefixes, in the given order
     ("1,9,2", None, [("V100 1", 0)]),  # CUDA stops at the first entry it cannot use
     (None, frozenset({0, 2}), [("V100 0", 0), ("V100 2", 2)]),  # --devices 0,2
     ("2,3", frozenset({1}), [("V100 3", 1)]),
     (None, frozenset(), [])],  # --devices cpu
)  # fmt: skip
def test_gpus_carry_the_index_runners_open_them_by(
    monkeypatch: pytest.MonkeyPatch,
    visible: str | None,
    offered: frozenset[int] | None,
    expected: list[tuple[str, int]],
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(FOUR_GPUS))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    probe = NvidiaProbe(offered)
    gpus = probe.gpus()
    probe.close()
    assert [(g.name, g.index) for g in gpus] == expected
    assert all(g.device == f"cuda:{g.index}" for g in gpus)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [(None, None), ("all", None), ("cpu", frozenset()), ("0,2", frozenset({0, 2})),
     (" 1 ", frozenset({1}))],
)  # fmt: skip
def test_parse_devices(spec: str | None, expected: frozenset[int] | None) -> None:
    assert parse_devices(spec) == expected


def test_parse_devices_refuses_nonsense_in_one_line() -> None:
    with pytest.raises(BadRequest, match="--devices 'gpu0'.*indexes"):
        parse_devices("gpu0")


def test_simulated_gpus_stand_in_for_cuda_devices(tmp_path: Path) -> None:
    collector = ProfileCollector(
        NodeId("n"), data_dir=tmp_path, api_url="", data_addr="", version="", bench=False,
        probe=False, engines=["torch"], simulated_gpus="3x2", devices=frozenset({0, 2}),
    )  # fmt: skip
    gpus = collector.full().gpus
    collector.close()
    assert [(g.index, g.backend, g.memory_free) for g in gpus] == [(0, "cuda", 2 * GiB),
                                                                  (2, "cuda", 2 * GiB)]  # fmt: skip
    with pytest.raises(BadRequest, match="COUNTxGIB"):
        simulated_gpus("two")


def test_refresh_keeps_each_gpus_measured_speed() -> None:
    old = (GpuInfo(vendor="nvidia", name="A", memory_total=GiB, memory_free=GiB, backend="cuda",
                   index=1, memory_bandwidth_gbs=900.0, matmul_gflops=1e5),)  # fmt: skip
    new = (old[0].model_copy(update={"memory_free": 0, "memory_bandwidth_gbs": None,
                                     "matmul_gflops": None}),)  # fmt: skip
    kept = keep_speeds(old, new)
    assert kept[0].memory_free == 0 and kept[0].memory_bandwidth_gbs == 900.0
    moved = new[0].model_copy(update={"index": 0})  # another GPU at that index: measured anew
    assert keep_speeds(old, (moved,))[0].memory_bandwidth_gbs is None
