"""Which engines this machine can run, and building one by name without importing the others."""

import importlib
import importlib.util
import platform
from typing import Any, cast

from shoal.engines.base import Engine
from shoal.errors import BadRequest

# name → (module, class, framework it needs or None); best first.
_BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "torch": ("shoal.engines.torch.engine", "TorchEngine", "torch"),
    "mlx": ("shoal.engines.mlx.engine", "MlxEngine", "mlx_lm"),
    "llamacpp": ("shoal.engines.llamacpp.engine", "LlamaCppEngine", "llama_cpp"),
    "numpy": ("shoal.engines.numpy.engine", "NumpyEngine", "numpy"),
    "fake": ("shoal.engines.fake", "FakeEngine", None),
}


def available_engines() -> list[str]:
    """Engines whose framework is installed, best first; "fake" is always there."""
    names = [name for name, (_, _, need) in _BACKENDS.items() if _installed(need)]
    if platform.system() == "Darwin" and platform.machine() == "arm64" and "mlx" in names:
        names.remove("mlx")  # Metal: MLX is the fast path on Apple Silicon
        names.insert(0, "mlx")
    return names


def create_engine(name: str, **options: Any) -> Engine:
    """A new, unloaded engine; options go to its constructor (e.g. device, dtype for torch)."""
    backend = _BACKENDS.get(name)
    if backend is None:
        raise BadRequest(f"unknown engine {name!r}; known: {', '.join(_BACKENDS)}", param="engine")
    module, cls, need = backend
    if not _installed(need):
        raise BadRequest(f"engine {name!r} needs {need}, which is not installed", param="engine")
    return cast(Engine, getattr(importlib.import_module(module), cls)(**options))


def _installed(package: str | None) -> bool:
    return package is None or importlib.util.find_spec(package) is not None
