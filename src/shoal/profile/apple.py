"""The Apple Silicon GPU: one Metal device over unified memory, and optional macmon readings."""

import json
import logging
import platform
import shutil
import subprocess
from dataclasses import dataclass

import psutil

from shoal.profile.cpu import sysctl
from shoal.types.profile import GpuInfo

log = logging.getLogger(__name__)

MACMON_MISSING = "macmon not found: no Apple GPU usage figures; brew install macmon"


def is_apple_silicon() -> bool:
    """Whether this is macOS on an arm64 chip."""
    return platform.system() == "Darwin" and platform.machine() == "arm64"


@dataclass(frozen=True)
class AppleUsage:
    """One macmon sample: how busy the GPU is and what the chip draws."""

    gpu_usage: float  # fraction busy, 0..1
    gpu_power_w: float
    all_power_w: float  # CPU + GPU + ANE


def parse_macmon(line: str) -> AppleUsage | None:
    """One line of `macmon pipe` output, or None when it is not the JSON expected."""
    try:
        sample = json.loads(line)
        return AppleUsage(
            gpu_usage=float(sample["gpu_usage"][1]),
            gpu_power_w=float(sample["gpu_power"]),
            all_power_w=float(sample["all_power"]),
        )
    except (ValueError, KeyError, IndexError, TypeError) as e:
        log.debug("unreadable macmon output %r: %s", line[:200], e)
        return None


class AppleProbe:
    """The Metal GPU on Apple Silicon; warns once, per probe, when macmon is missing."""

    def __init__(self) -> None:
        self._static: tuple[str, int] | None = None  # (chip name, unified memory bytes)
        self._macmon: str | None = None
        self._looked_for_macmon = False

    def gpus(self) -> tuple[GpuInfo, ...]:
        """One GpuInfo for the chip on macOS arm64, with free memory read now; () elsewhere."""
        if not is_apple_silicon():
            return ()
        if self._static is None:
            memsize = sysctl("hw.memsize")
            total = int(memsize) if memsize and memsize.isdigit() else psutil.virtual_memory().total
            self._static = (sysctl("machdep.cpu.brand_string") or "Apple GPU", int(total))
        self._find_macmon()
        name, total = self._static
        free = min(int(psutil.virtual_memory().available), total)
        return (
            GpuInfo(
                vendor="apple", name=name, memory_total=total, memory_free=free, backend="metal"
            ),
        )

    def usage(self, timeout_s: float = 2.0) -> AppleUsage | None:
        """One macmon sample (takes ~0.2 s), or None without Apple Silicon or macmon."""
        if not is_apple_silicon() or (macmon := self._find_macmon()) is None:
            return None
        try:
            done = subprocess.run(
                [macmon, "pipe", "-s", "1", "-i", "200"],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=True,
            )
        except (OSError, subprocess.SubprocessError) as e:
            log.debug("macmon failed: %s", e)
            return None
        lines = done.stdout.strip().splitlines()
        return parse_macmon(lines[-1]) if lines else None

    def _find_macmon(self) -> str | None:
        if not self._looked_for_macmon:
            self._looked_for_macmon = True
            self._macmon = shutil.which("macmon")
            if self._macmon is None:
                log.warning(MACMON_MISSING)
        return self._macmon
