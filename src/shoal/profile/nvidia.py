"""NVIDIA GPUs through NVML (the pynvml module of nvidia-ml-py): names, VRAM total and free."""

import importlib
import logging
from typing import Any

from shoal.types.profile import GpuInfo

log = logging.getLogger(__name__)


def _text(name: str | bytes) -> str:
    # nvidia-ml-py returns str; older bindings returned bytes.
    return name.decode(errors="replace") if isinstance(name, bytes) else name


class NvidiaProbe:
    """NVML opened on first use and kept open; each call re-reads every device's free memory."""

    def __init__(self) -> None:
        self._nvml: Any = None  # the pynvml module while NVML is initialised
        self._devices: tuple[tuple[Any, str], ...] | None = None  # (handle, name); None = untried

    def gpus(self) -> tuple[GpuInfo, ...]:
        """Every NVIDIA GPU with its memory now; () when there is no driver, library or device."""
        if self._devices is None:
            self._devices = self._open()
        nvml = self._nvml
        if not self._devices or nvml is None:
            return ()
        try:
            found = []
            for handle, name in self._devices:
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                found.append(
                    GpuInfo(
                        vendor="nvidia",
                        name=name,
                        memory_total=int(mem.total),
                        memory_free=int(mem.free),
                        backend="cuda",
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

    def _open(self) -> tuple[tuple[Any, str], ...]:
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
            return tuple((h, _text(nvml.nvmlDeviceGetName(h))) for h in handles)
        except nvml.NVMLError as e:
            log.debug("no NVIDIA GPUs: NVML could not list devices (%s)", e)
            self.close()
            return ()
