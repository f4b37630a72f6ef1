"""Which engines this machine can run, and building one by name without importing the others."""

import importlib
import importlib.util
import platform
from dataclasses import dataclass
from typing import Any, cast

from shoal.engines.base import Engine
from shoal.errors import BadRequest


@dataclass(frozen=True)
class Backend:
    """Where an engine lives, what it needs installed, and whether it must be tried first."""

    module: str
    cls: str
    needs: str | None  # the module it imports (None: nothing beyond shoal)
    package: str | None  # the distribution that provides it: its version keys probe results
    # Native code built outside shoal (llama.cpp, MLX): a build for the wrong CPU kills the
    # process instead of raising, so a node tries it in a child before offering it.
    probed: bool = False


# best first
_BACKENDS: dict[str, Backend] = {
    "torch": Backend("shoal.engines.torch.engine", "TorchEngine", "torch", "torch"),
    "mlx": Backend("shoal.engines.mlx.engine", "MlxEngine", "mlx_lm", "mlx", probed=True),
    "llamacpp": Backend(
        "shoal.engines.llamacpp.engine",
        "LlamaCppEngine",
        "llama_cpp",
        "llama-cpp-python",
        probed=True,
    ),
    "numpy": Backend("shoal.engines.numpy.engine", "NumpyEngine", "numpy", "numpy"),
    "fake": Backend("shoal.engines.fake", "FakeEngine", None, None),
}


def available_engines() -> list[str]:
    """Engines whose framework is installed, best first; "fake" is always there."""
    names = [name for name, backend in _BACKENDS.items() if _installed(backend.needs)]
    if platform.system() == "Darwin" and platform.machine() == "arm64" and "mlx" in names:
        names.remove("mlx")  # Metal: MLX is the fast path on Apple Silicon
        names.insert(0, "mlx")
    return names


def backend(name: str) -> Backend:
    """The registry entry of a known engine."""
    found = _BACKENDS.get(name)
    if found is None:
        raise BadRequest(f"unknown engine {name!r}; known: {', '.join(_BACKENDS)}", param="engine")
    return found


def create_engine(name: str, **options: Any) -> Engine:
    """A new, unloaded engine; options go to its constructor (e.g. device, dtype for torch)."""
    found = backend(name)
    if not _installed(found.needs):
        raise BadRequest(
            f"engine {name!r} needs {found.needs}, which is not installed", param="engine"
        )
    return cast(Engine, getattr(importlib.import_module(found.module), found.cls)(**options))


def _installed(package: str | None) -> bool:
    return package is None or importlib.util.find_spec(package) is not None
