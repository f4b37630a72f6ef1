"""Which engines this machine can run, the options each takes, and building one by name without
importing the others."""

import importlib
import importlib.util
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from shoal.engines.base import Engine
from shoal.errors import BadRequest
from shoal.types.weights import DType, Quant


@dataclass(frozen=True)
class EngineOptions:
    """How a node runs its engines; each backend takes the ones it knows (`Backend.kwargs`)."""

    device: str | None = None  # torch: cpu, cuda, mps (None: the best there is); llamacpp: cpu
    dtype: DType = "float32"  # torch only
    quant: Quant = "none"  # torch, numpy, native: the projections' weight format
    threads: int | None = None  # numpy, native, llamacpp (torch's are set process-wide)
    gpu_layers: int | None = None  # llamacpp: layers on the GPUs (None: all, unless device cpu)
    gpu_split: tuple[int, ...] = ()  # llamacpp: layers per GPU, by index


Kwargs = Callable[[EngineOptions], dict[str, Any]]


def _take(*names: str) -> Kwargs:
    """Options passed under their own names."""
    return lambda options: {name: getattr(options, name) for name in names}


def _llamacpp(options: EngineOptions) -> dict[str, Any]:
    # offloads every layer it can (or placement's count), unless told to stay on the CPU
    gpu_layers = -1 if options.gpu_layers is None else options.gpu_layers
    return {
        "n_threads": options.threads,
        "n_gpu_layers": 0 if options.device == "cpu" else gpu_layers,
        "tensor_split": tuple(float(n) for n in options.gpu_split),
    }


def _native_compiles() -> bool:
    from shoal.engines.native.build import library  # compiles once per machine, then cached

    return library() is not None


@dataclass(frozen=True)
class Backend:
    """Where an engine lives, what it needs installed and takes, and whether it is tried first."""

    module: str
    cls: str
    needs: str | None  # the module it imports (None: nothing beyond shoal)
    package: str | None  # the distribution that provides it: its version keys probe results
    # Native code built outside shoal (llama.cpp, MLX): a build for the wrong CPU kills the
    # process instead of raising, so a node tries it in a child before offering it.
    probed: bool = False
    kwargs: Kwargs = _take()  # the node's options as this engine's constructor arguments
    works: Callable[[], bool] | None = None  # a check beyond the import (None: the import will do)


# best first; "native" runs only int8/int4 shards on the CPU, so placement picks it for those only
_BACKENDS: dict[str, Backend] = {
    "torch": Backend(
        "shoal.engines.torch.engine",
        "TorchEngine",
        "torch",
        "torch",
        kwargs=_take("device", "dtype", "quant"),
    ),
    "mlx": Backend("shoal.engines.mlx.engine", "MlxEngine", "mlx_lm", "mlx", probed=True),
    "llamacpp": Backend(
        "shoal.engines.llamacpp.engine",
        "LlamaCppEngine",
        "llama_cpp",
        "llama-cpp-python",
        probed=True,
        kwargs=_llamacpp,
    ),
    "numpy": Backend(
        "shoal.engines.numpy.engine",
        "NumpyEngine",
        "numpy",
        "numpy",
        kwargs=_take("quant", "threads"),
    ),
    # kernels compiled here for this CPU (engines/native/build.py): no probe, but no compiler, no
    # engine
    "native": Backend(
        "shoal.engines.native.engine",
        "NativeEngine",
        "numpy",
        "numpy",
        kwargs=_take("quant", "threads"),
        works=_native_compiles,
    ),
    "fake": Backend("shoal.engines.fake", "FakeEngine", None, None),
}


def available_engines() -> list[str]:
    """Engines whose framework is installed (and native kernels compile), best first; "fake" is
    always there."""
    names = [name for name, found in _BACKENDS.items() if _usable(found)]
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


def build_engine(name: str, options: EngineOptions) -> Engine:
    """A new, unloaded engine given the node's options, each engine taking those it knows."""
    return create_engine(name, **backend(name).kwargs(options))


def _usable(found: Backend) -> bool:
    return _installed(found.needs) and (found.works is None or found.works())


def _installed(package: str | None) -> bool:
    return package is None or importlib.util.find_spec(package) is not None
