"""This host's RAM: total and what is available now, in bytes."""

from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class RamInfo:
    """RAM in bytes; available counts what can be had without swapping."""

    total: int
    available: int


def ram() -> RamInfo:
    """Total and available RAM, read now."""
    vm = psutil.virtual_memory()
    return RamInfo(total=int(vm.total), available=int(vm.available))
