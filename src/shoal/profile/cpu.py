"""This host's CPU and operating system: model name, logical cores, os, version, arch, hostname."""

import logging
import os
import platform
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostInfo:
    """Facts about this machine that do not change while it runs."""

    hostname: str
    os: str  # "Linux", "Darwin", ...
    os_version: str
    arch: str
    cpu_model: str
    cpu_cores: int  # logical


def sysctl(name: str) -> str | None:
    """One macOS sysctl value as text, or None when it cannot be read."""
    try:
        done = subprocess.run(
            ["sysctl", "-n", name], capture_output=True, text=True, timeout=2.0, check=True
        )
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("sysctl %s unreadable: %s", name, e)
        return None
    return done.stdout.strip() or None


def _linux_model_name(cpuinfo: Path) -> str:
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return ""


def cpu_model(system: str | None = None, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's marketing name, else the best that platform offers."""
    system = system or platform.system()
    name = ""
    if system == "Linux":
        name = _linux_model_name(cpuinfo)
    elif system == "Darwin":
        name = sysctl("machdep.cpu.brand_string") or ""
    return name or platform.processor() or platform.machine() or "unknown"


def os_version(system: str) -> str:
    """The product version on macOS ("14.5"), the kernel release elsewhere."""
    if system == "Darwin" and (mac := platform.mac_ver()[0]):
        return mac
    return platform.release()


def host_info() -> HostInfo:
    """Everything static about this host, read now."""
    system = platform.system() or "unknown"
    return HostInfo(
        hostname=socket.gethostname() or platform.node(),
        os=system,
        os_version=os_version(system),
        arch=platform.machine() or "unknown",
        cpu_model=cpu_model(system),
        cpu_cores=max(1, os.cpu_count() or 1),
    )
