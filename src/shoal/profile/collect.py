"""A NodeProfile gathered from the parts: host, RAM, GPUs, engines that run, cached benchmark.

Optional native engines (llama.cpp, MLX) are offered only once they ran a tiny model in a child
process (`engines/probe.py`): a build for another CPU kills the process that tries it, so a node
must never be the first to. Verdicts are cached per engine build, Python and CPU in
`<cache-dir>/engine-probes.json`, so a restart probes nothing until one of those changes.
"""

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from shoal.engines.probe import TIMEOUT_S, ProbeResult, probe_all
from shoal.engines.registry import available_engines, backend
from shoal.paths import cache_dir
from shoal.profile.apple import AppleProbe
from shoal.profile.bench import BenchSizes, cached_bench, fingerprint
from shoal.profile.cpu import cpu_model, host_info
from shoal.profile.gpu_bench import keep_speeds, with_speeds
from shoal.profile.memory import ram
from shoal.profile.nvidia import NvidiaProbe, offered
from shoal.profile.nvidia import simulated_gpus as parse_simulated
from shoal.types.ids import NodeId
from shoal.types.profile import GpuInfo, NodeProfile

log = logging.getLogger(__name__)

PROBE_CACHE_FILE = "engine-probes.json"
PROBE_METHOD = 1  # bump when the probe changes, so cached verdicts are redone
PROBE_CACHE_ENTRIES = 64  # verdicts kept; the oldest go first


def default_engines() -> tuple[str, ...]:
    """Engines installed here, best first, without the test-only "fake"."""
    return tuple(name for name in available_engines() if name != "fake")


def cpu_signature(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """This CPU's model and feature flags, hashed: a build that ran on one may die on another."""
    flags = ""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, Arm
            flags = value.strip()
            break
    raw = f"{platform.machine()}|{cpu_model()}|{flags}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _package_build(package: str | None) -> dict[str, Any]:
    # version and install time: a rebuild with other flags keeps the version, not the RECORD
    if package is None:
        return {}
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return {"version": None}
    record = next((f for f in dist.files or () if f.name == "RECORD"), None)
    if record is None:
        return {"version": dist.version}
    path = Path(str(dist.locate_file(record)))
    try:
        stamp: int | None = path.stat().st_mtime_ns
    except OSError:
        stamp = None
    return {"version": dist.version, "where": str(path.parent), "installed": stamp}


def engine_fingerprint(name: str) -> dict[str, Any]:
    """What a probe verdict holds for: the engine, its package build, this Python, this CPU."""
    return {
        "engine": name,
        "method": PROBE_METHOD,
        "package": backend(name).package,
        **_package_build(backend(name).package),
        "python": sys.version,
        "cpu": cpu_signature(),
    }


def _key(fp: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:24]


def _read_verdicts(path: Path) -> dict[str, dict[str, Any]]:
    try:
        saved = json.loads(path.read_text())
        return {k: v for k, v in saved.items() if isinstance(v, dict)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return {}


def _save_verdicts(path: Path, verdicts: dict[str, dict[str, Any]]) -> None:
    kept = dict(list(verdicts.items())[-PROBE_CACHE_ENTRIES:])
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(kept, indent=2) + "\n")
        tmp.replace(path)  # nodes starting together: the last writer wins, the others re-probe
    except OSError as e:
        log.warning("could not cache engine probes in %s: %s", path, e)


def engines_that_run(
    candidates: Sequence[str],
    cache: Path,
    *,
    probed: Collection[str] | None = None,
    timeout_s: float = TIMEOUT_S,
    commands: Mapping[str, Sequence[str]] | None = None,
    fingerprint: Callable[[str], Mapping[str, Any]] = engine_fingerprint,
) -> tuple[str, ...]:
    """The candidates, in order, less those whose probe failed; one warning per engine left out.

    probed: the candidates to try (default: those the registry marks `probed`); the rest are
    kept untried. A verdict is taken from the cache when its fingerprint matches; a fresh one
    is cached unless the probe timed out (a busy machine, maybe: tried again next start).
    """
    if probed is None:
        probed = {name for name in candidates if backend(name).probed}
    to_try = [name for name in candidates if name in probed]
    if not to_try:
        return tuple(candidates)
    keys = {name: _key(fingerprint(name)) for name in to_try}
    saved = _read_verdicts(cache)
    known = {
        name: ProbeResult(name, bool(entry.get("ok")), str(entry.get("reason", "")))
        for name in to_try
        if (entry := saved.get(keys[name])) is not None
    }
    if missing := [name for name in to_try if name not in known]:
        t0 = time.perf_counter()
        fresh = probe_all(missing, timeout_s=timeout_s, commands=commands)
        log.info(
            "probed engines in %.1f s: %s",
            time.perf_counter() - t0,
            ", ".join(f"{name} {'ok' if r.ok else 'failed'}" for name, r in fresh.items()),
        )
        for name, result in fresh.items():
            if not result.timed_out:
                saved.pop(keys[name], None)  # re-inserted last: the newest are kept
                saved[keys[name]] = {"engine": name, "ok": result.ok, "reason": result.reason}
        _save_verdicts(cache, saved)
        known |= fresh
    for name in to_try:
        if not known[name].ok:
            cached = "" if name in missing else f" (cached in {cache}; delete it to probe again)"
            log.warning("engine %s left out: %s%s", name, known[name].reason, cached)
    return tuple(name for name in candidates if name not in probed or known[name].ok)


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
        probe: bool = True,
        probe_cache: Path | None = None,
        probe_timeout_s: float = TIMEOUT_S,
        devices: Collection[int] | None = None,
        simulated_gpus: str | None = None,
    ) -> None:
        """devices: the GPU indexes this node offers (None: all; empty: none, the CPU only).
        simulated_gpus: GPUs that are not there (profile/nvidia.py `simulated_gpus`), for tests."""
        self._node_id = node_id
        self._data_dir = data_dir
        self._where = (api_url, data_addr, version)
        self._engines = tuple(engines) if engines is not None else None
        self._bench = bench
        self._bench_sizes = bench_sizes or BenchSizes()
        self._probe = probe
        self._probe_cache = probe_cache or cache_dir() / PROBE_CACHE_FILE
        self._probe_timeout_s = probe_timeout_s
        self._devices = devices
        self._nvidia = NvidiaProbe(devices)
        self._apple = AppleProbe()
        self._simulated = parse_simulated(simulated_gpus) if simulated_gpus else None

    def gpus(self) -> tuple[GpuInfo, ...]:
        """Every GPU offered, with its free memory read now."""
        if self._simulated is not None:
            return offered(self._simulated, self._devices)
        apple = self._apple.gpus() if self._devices is None or self._devices else ()
        return self._nvidia.gpus() + apple

    def engines(self) -> tuple[str, ...]:
        """The engines asked for (default: all installed), less any whose probe fails."""
        engines = self._engines if self._engines is not None else default_engines()
        if not self._probe:
            return engines
        return engines_that_run(engines, self._probe_cache, timeout_s=self._probe_timeout_s)

    def full(self) -> NodeProfile:
        """Everything, probing engines and measuring the benchmark where not cached (blocking).

        Probes come first: measuring speed while they run would cache a slow figure.
        """
        engines = self.engines()
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
            gpus=with_speeds(self.gpus(), self._data_dir) if self._bench else self.gpus(),
            engines=engines,
            memory_bandwidth_gbs=speed.memory_bandwidth_gbs if speed else None,
            matmul_gflops=speed.matmul_gflops if speed else None,
            api_url=api_url,
            data_addr=data_addr,
            version=version,
        )

    def refresh(self, profile: NodeProfile) -> NodeProfile:
        """The profile with RAM available and GPUs re-read; the rest (benchmark too) kept."""
        fields = dict(profile)
        fields.update(ram_available=ram().available, gpus=keep_speeds(profile.gpus, self.gpus()))
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
    probe: bool = True,
) -> NodeProfile:
    """This node's profile, read now; engines default to those installed (and that run here)."""
    collector = ProfileCollector(
        node_id,
        data_dir=data_dir,
        api_url=api_url,
        data_addr=data_addr,
        version=version,
        engines=engines,
        bench=bench,
        probe=probe,
    )
    try:
        return collector.full()
    finally:
        collector.close()
