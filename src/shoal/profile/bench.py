"""Memory bandwidth and matmul throughput, measured once per machine and cached on disk."""

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CACHE_FILE = "profile_bench.json"
METHOD = 1  # bump when the measurement changes, so old caches are re-measured


@dataclass(frozen=True)
class BenchSizes:
    """How much work each measurement does; tests shrink these."""

    copy_bytes: int = 128 << 20  # per buffer; well past any CPU's last-level cache
    matmul_n: int = 1280  # square float32 matrices
    repeats: int = 3  # timed runs after one warm-up; the best counts
    budget_s: float = 0.6  # per measurement: stop repeating once past it


@dataclass(frozen=True)
class BenchResult:
    """What this machine sustains: GB/s copied and GFLOP/s of float32 matmul."""

    memory_bandwidth_gbs: float
    matmul_gflops: float


def fingerprint(cpu_model: str, cpu_cores: int, ram_total: int) -> dict[str, Any]:
    """What a cached measurement is valid for: this hardware, this numpy, this method."""
    return {
        "cpu_model": cpu_model,
        "cpu_cores": cpu_cores,
        "ram_total": ram_total,
        "numpy": np.__version__,
        "method": METHOD,
    }


def _best_rate(work: float, run: Callable[[], object], repeats: int, budget_s: float) -> float:
    run()  # warm-up: page faults, BLAS threads
    best = 0.0
    start = time.perf_counter()
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        run()
        best = max(best, work / max(time.perf_counter() - t0, 1e-9))
        if time.perf_counter() - start > budget_s:
            break
    return best


def measure_bandwidth(copy_bytes: int, repeats: int = 3, budget_s: float = 0.6) -> float:
    """GB/s of a numpy buffer copy, counting bytes read plus bytes written."""
    src = np.ones(max(1, copy_bytes // 8), dtype=np.float64)
    dst = np.empty_like(src)
    return _best_rate(2 * src.nbytes / 1e9, lambda: np.copyto(dst, src), repeats, budget_s)


def measure_matmul(n: int, repeats: int = 3, budget_s: float = 0.6) -> float:
    """GFLOP/s of an n×n float32 matmul (2n³ FLOPs), on all the cores BLAS uses."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    return _best_rate(2 * n**3 / 1e9, lambda: np.matmul(a, b, out=out), repeats, budget_s)


def measure(sizes: BenchSizes) -> BenchResult:
    """Both measurements, now."""
    return BenchResult(
        memory_bandwidth_gbs=round(
            measure_bandwidth(sizes.copy_bytes, sizes.repeats, sizes.budget_s), 2
        ),
        matmul_gflops=round(measure_matmul(sizes.matmul_n, sizes.repeats, sizes.budget_s), 2),
    )


def _load(path: Path, fp: dict[str, Any]) -> BenchResult | None:
    try:
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") != fp:
            log.info("machine changed since the last benchmark; measuring again")
            return None
        return BenchResult(float(saved["memory_bandwidth_gbs"]), float(saved["matmul_gflops"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return None


def _save(path: Path, fp: dict[str, Any], result: BenchResult) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"fingerprint": fp, **asdict(result)}, indent=2) + "\n")
        tmp.replace(path)
    except OSError as e:
        log.warning("could not cache the benchmark in %s: %s", path, e)


def cached_bench(
    data_dir: Path, fp: dict[str, Any], sizes: BenchSizes = BenchSizes()
) -> BenchResult:
    """The cached result for this fingerprint, else a fresh measurement (then cached)."""
    path = data_dir / CACHE_FILE
    if (cached := _load(path, fp)) is not None:
        return cached
    t0 = time.perf_counter()
    result = measure(sizes)
    log.info(
        "benchmarked this machine in %.1f s: %.1f GB/s memory, %.1f GFLOP/s matmul",
        time.perf_counter() - t0,
        result.memory_bandwidth_gbs,
        result.matmul_gflops,
    )
    _save(path, fp, result)
    return result
