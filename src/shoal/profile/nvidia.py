"""NVIDIA GPUs through NVML (the pynvml module of nvidia-ml-py): names, VRAM total and free.

Each GPU carries the index a runner opens it by. NVML lists devices in PCI bus order; runners
are started with CUDA_DEVICE_ORDER=PCI_BUS_ID (worker/supervisor.py), so CUDA's indexes are the
same, counted over the devices CUDA_VISIBLE_DEVICES leaves visible (its entries as indexes in
PCI order, or GPU UUIDs). `devices` then limits what the node offers (`--devices 0,2`).
"""

import importlib
import logging
import os
import re
from collections.abc import Collection, Sequence
from typing import Any

from shoal.errors import BadRequest
from shoal.types.profile import GpuInfo

log = logging.getLogger(__name__)

SIMULATED_ENV = "SHOAL_SIMULATED_GPUS"
_SIMULATED = re.compile(r"(\d+)x(\d+(?:\.\d+)?)(?:GiB|G)?")


def visible(uuids: Sequence[str], spec: str | None) -> list[int]:
    """The NVML indexes CUDA_VISIBLE_DEVICES (`spec`) leaves visible, in CUDA's order.

    None: every device. CUDA stops at the first entry it cannot read, and so does this."""
    if spec is None:
        return list(range(len(uuids)))
    chosen: list[int] = []
    for entry in (e.strip() for e in spec.split(",")):
        if entry.isdigit() and int(entry) < len(uuids):
            found: int | None = int(entry)
        else:
            found = next((i for i, u in enumerate(uuids) if entry and u.startswith(entry)), None)
        if found is None or found in chosen:
            break
        chosen.append(found)
    return chosen


def parse_devices(spec: str | None) -> frozenset[int] | None:
    """`--devices`: None or "all" offers every GPU, "cpu" none, "0,2" those indexes."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    if spec.strip().lower() == "cpu":
        return frozenset()
    try:
        return frozenset(int(part) for part in spec.split(",") if part.strip())
    except ValueError:
        raise BadRequest(
            f"--devices {spec!r}: expected GPU indexes like 0,2, or 'cpu', or 'all'"
        ) from None


def simulated_gpus(spec: str) -> tuple[GpuInfo, ...]:
    """GPUs that are not there, for tests of multi-GPU placement on a CPU machine
    (SHOAL_SIMULATED_GPUS="2x4": two of 4 GiB); runners run their stages on the CPU."""
    match = _SIMULATED.fullmatch(spec.strip())
    if match is None:
        raise BadRequest(f"{SIMULATED_ENV}={spec!r}: expected COUNTxGIB, like 2x4")
    size = int(float(match[2]) * (1 << 30))
    return tuple(
        GpuInfo(
            vendor="other",
            name=f"simulated GPU {i}",
            memory_total=size,
            memory_free=size,
            backend="cuda",
            index=i,
        )
        for i in range(int(match[1]))
    )


def offered(gpus: Sequence[GpuInfo], devices: Collection[int] | None) -> tuple[GpuInfo, ...]:
    """The GPUs whose index `devices` names (None: all)."""
    return tuple(g for g in gpus if devices is None or g.index in devices)


def _text(name: str | bytes) -> str:
    # nvidia-ml-py returns str; older bindings returned bytes.
    return name.decode(errors="replace") if isinstance(name, bytes) else name


class NvidiaProbe:
    """NVML opened on first use and kept open; each call re-reads every device's free memory."""

    def __init__(self, devices: Collection[int] | None = None) -> None:
        self._nvml: Any = None  # the pynvml module while NVML is initialised
        # (handle, name, CUDA index) of the visible devices; None = untried
        self._devices: tuple[tuple[Any, str, int], ...] | None = None
        self._offered = devices

    def gpus(self) -> tuple[GpuInfo, ...]:
        """Every NVIDIA GPU with its memory now; () when there is no driver, library or device."""
        if self._devices is None:
            self._devices = self._open()
        nvml = self._nvml
        if not self._devices or nvml is None:
            return ()
        try:
            found = []
            for handle, name, index in self._devices:
                if self._offered is not None and index not in self._offered:
                    continue
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                found.append(
                    GpuInfo(
                        vendor="nvidia",
                        name=name,
                        memory_total=int(mem.total),
                        memory_free=int(mem.free),
                        backend="cuda",
                        index=index,
                    )
                )
        except nvml.NVMLError as e:
            log.warning("NVML stopped answering (%s); reporting no NVIDIA GPUs until it does", e)
            self.close()  # the next call opens NVML afresh
            return ()
        return tuple(found)

    def close(self) -> None:
        """Shut NVML down if this probe initialised it."""
        nvml, self._nvml, self._devices = self._nvml, None, None
        if nvml is not None:
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError as e:
                log.debug("nvmlShutdown failed: %s", e)

    def _open(self) -> tuple[tuple[Any, str, int], ...]:
        try:
            nvml: Any = importlib.import_module("pynvml")
        except ImportError as e:
            log.debug("no NVIDIA GPUs: pynvml is not importable (%s)", e)
            return ()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:
            log.debug("no NVIDIA GPUs: NVML did not initialise (%s)", e)
            return ()
        self._nvml = nvml
        try:
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
            order = visible(uuids, os.environ.get("CUDA_VISIBLE_DEVICES"))
            return tuple(
                (handles[i], _text(nvml.nvmlDeviceGetName(handles[i])), cuda)
                for cuda, i in enumerate(order)
            )
        except nvml.NVMLError as e:
            log.debug("no NVIDIA GPUs: NVML could not list devices (%s)", e)
            self.close()
            return ()
