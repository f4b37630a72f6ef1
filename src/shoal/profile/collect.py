"""A NodeProfile gathered from the parts: host, RAM, GPUs, engines, cached benchmark."""

from collections.abc import Sequence
from pathlib import Path

from shoal.engines.registry import available_engines
from shoal.profile.apple import AppleProbe
from shoal.profile.bench import BenchSizes, cached_bench, fingerprint
from shoal.profile.cpu import host_info
from shoal.profile.memory import ram
from shoal.profile.nvidia import NvidiaProbe
from shoal.types.ids import NodeId
from shoal.types.profile import GpuInfo, NodeProfile


def default_engines() -> tuple[str, ...]:
    """Engines installed here, best first, without the test-only "fake"."""
    return tuple(name for name in available_engines() if name != "fake")


class ProfileCollector:
    """Gathers the whole profile once, then re-reads only what moves (RAM and GPU free memory)."""

    def __init__(
        self,
        node_id: NodeId,
        *,
        data_dir: Path,
        api_url: str,
        data_addr: str,
        version: str,
        engines: Sequence[str] | None = None,
        bench: bool = True,
        bench_sizes: BenchSizes | None = None,
    ) -> None:
        self._node_id = node_id
        self._data_dir = data_dir
        self._where = (api_url, data_addr, version)
        self._engines = tuple(engines) if engines is not None else None
        self._bench = bench
        self._bench_sizes = bench_sizes or BenchSizes()
        self._nvidia = NvidiaProbe()
        self._apple = AppleProbe()

    def gpus(self) -> tuple[GpuInfo, ...]:
        """Every GPU found, with its free memory read now."""
        return self._nvidia.gpus() + self._apple.gpus()

    def full(self) -> NodeProfile:
        """Everything, measuring the benchmark if it is not cached yet (blocking, ~1 s then)."""
        host = host_info()
        memory = ram()
        speed = None
        if self._bench:
            fp = fingerprint(host.cpu_model, host.cpu_cores, memory.total)
            speed = cached_bench(self._data_dir, fp, self._bench_sizes)
        api_url, data_addr, version = self._where
        return NodeProfile(
            node_id=self._node_id,
            hostname=host.hostname,
            os=host.os,
            os_version=host.os_version,
            arch=host.arch,
            cpu_model=host.cpu_model,
            cpu_cores=host.cpu_cores,
            ram_total=memory.total,
            ram_available=memory.available,
            gpus=self.gpus(),
            engines=self._engines if self._engines is not None else default_engines(),
            memory_bandwidth_gbs=speed.memory_bandwidth_gbs if speed else None,
            matmul_gflops=speed.matmul_gflops if speed else None,
            api_url=api_url,
            data_addr=data_addr,
            version=version,
        )

    def refresh(self, profile: NodeProfile) -> NodeProfile:
        """The profile with RAM available and GPUs re-read; the rest (benchmark too) kept."""
        fields = dict(profile)
        fields.update(ram_available=ram().available, gpus=self.gpus())
        return NodeProfile(**fields)

    def close(self) -> None:
        """Release NVML."""
        self._nvidia.close()


def collect_profile(
    node_id: NodeId,
    *,
    data_dir: Path,
    api_url: str,
    data_addr: str,
    version: str,
    engines: Sequence[str] | None = None,
    bench: bool = True,
) -> NodeProfile:
    """This node's profile, read now; engines default to those installed, without "fake"."""
    collector = ProfileCollector(
        node_id,
        data_dir=data_dir,
        api_url=api_url,
        data_addr=data_addr,
        version=version,
        engines=engines,
        bench=bench,
    )
    try:
        return collector.full()
    finally:
        collector.close()
