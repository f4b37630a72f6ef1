"""Each CUDA GPU's memory bandwidth and fp16 matmul speed, measured once in a child and cached.

The child (`python -m shoal.profile.gpu_bench`) imports torch and opens every GPU; the node never
does, so it holds no CUDA context (hundreds of MB on each GPU) for its lifetime. A device-to-device
copy of 256 MiB counts bytes read plus written, like the CPU's numpy copy (profile/bench.py); the
matmul is 4096 x 4096 in fp16, the precision the engines run GPUs at. Results are cached in the
data dir by the GPUs' names and indexes, torch's version and the method; a failed or timed-out
measurement is logged once and leaves the figures None (placement then assumes defaults and says
so in its notes).
"""

import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shoal.types.profile import GpuInfo

log = logging.getLogger(__name__)

CACHE_FILE = "gpu_bench.json"
METHOD = 1
TIMEOUT_S = 120.0
COPY_BYTES = 256 << 20
MATMUL_N = 4096


def _measure(index: int) -> dict[str, float]:  # pragma: no cover - needs a CUDA GPU
    import torch

    device = torch.device(f"cuda:{index}")
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    a = torch.randn(MATMUL_N, MATMUL_N, dtype=torch.float16, device=device)
    b = torch.randn_like(a)

    def best(work: float, run: Any) -> float:
        run()
        torch.cuda.synchronize(device)
        rate = 0.0
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            rate = max(rate, work / max(start.elapsed_time(end) / 1e3, 1e-9))
        return rate

    bandwidth = best(2 * COPY_BYTES / 1e9, lambda: dst.copy_(src))
    gflops = best(2 * MATMUL_N**3 / 1e9, lambda: torch.mm(a, b))
    return {"memory_bandwidth_gbs": round(bandwidth, 1), "matmul_gflops": round(gflops, 1)}


def fingerprint(gpus: Sequence[GpuInfo], torch_version: str) -> dict[str, Any]:
    """What a cached measurement is valid for: these GPUs at these indexes, this torch."""
    return {
        "gpus": [[g.index, g.name, g.memory_total] for g in gpus],
        "torch": torch_version,
        "method": METHOD,
    }


def _torch_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return None


def _child(indexes: Sequence[int], timeout_s: float) -> dict[int, dict[str, float]]:
    env = dict(os.environ, CUDA_DEVICE_ORDER="PCI_BUS_ID")
    cmd = [sys.executable, "-m", "shoal.profile.gpu_bench", *map(str, indexes)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        log.warning("measuring the GPUs took over %.0f s; assuming default GPU speeds", timeout_s)
        return {}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        log.warning("could not measure the GPUs (%s); assuming default GPU speeds", last)
        return {}
    return {int(k): v for k, v in json.loads(done.stdout).items()}


def with_speeds(
    gpus: Sequence[GpuInfo], data_dir: Path, *, timeout_s: float = TIMEOUT_S
) -> tuple[GpuInfo, ...]:
    """The GPUs with their CUDA ones' measured figures (cached; measured when not)."""
    cuda = [g for g in gpus if g.vendor == "nvidia" and g.backend == "cuda"]
    torch_version = _torch_version()
    if not cuda or torch_version is None:
        return tuple(gpus)
    fp = fingerprint(cuda, torch_version)
    path = data_dir / CACHE_FILE
    speeds: dict[int, dict[str, float]] = {}
    try:
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == fp:
            speeds = {int(k): v for k, v in saved["speeds"].items()}
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
    if not speeds:
        speeds = _child([g.index for g in cuda], timeout_s)
        if speeds:
            log.info("measured %d GPUs: %s", len(speeds), speeds)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"fingerprint": fp, "speeds": speeds}) + "\n")
            except OSError as e:
                log.warning("could not cache the GPU benchmark in %s: %s", path, e)
    return tuple(g.model_copy(update=speeds.get(g.index, {})) if g in cuda else g for g in gpus)


def keep_speeds(old: Sequence[GpuInfo], new: Sequence[GpuInfo]) -> tuple[GpuInfo, ...]:
    """`new` (free memory re-read) with the figures `old` measured for the same GPU."""
    known = {(g.index, g.name): g for g in old}
    out = []
    for gpu in new:
        was = known.get((gpu.index, gpu.name))
        if was is not None:
            gpu = gpu.model_copy(
                update={
                    "memory_bandwidth_gbs": was.memory_bandwidth_gbs,
                    "matmul_gflops": was.matmul_gflops,
                }
            )
        out.append(gpu)
    return tuple(out)


if __name__ == "__main__":  # pragma: no cover - needs a CUDA GPU
    sys.stdout.write(json.dumps({int(i): _measure(int(i)) for i in sys.argv[1:]}) + "\n")
