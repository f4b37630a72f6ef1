"""Time one decode step of the torch engine per weight format, on CPU or CUDA, and profile it.

Random weights in the shape of a catalog card (default smollm2-135m), so it needs no checkpoint
and runs on a machine that has torch and pydantic only. For each --quant: prefill of --prompt
tokens for B requests, then the median time of one decode step of B tokens; aggregate tok/s is
B / step. The first step is reported apart: on CUDA it includes capturing the step's graph
(engines/torch/graphs.py). `--profile` prints torch.profiler's top ops for the first format at
the first B.

    python bench/engine_step.py --device cpu --quant none fp16 int8 int4 --batch 1 8
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from shoal.engines.base import StepInput  # noqa: E402
from shoal.engines.torch.engine import TorchEngine  # noqa: E402
from shoal.types.ids import ModelId, RequestId  # noqa: E402
from shoal.types.model_config import ModelConfig  # noqa: E402
from shoal.types.shard import Shard  # noqa: E402

SMOLLM2 = ModelConfig(
    architecture="llama",
    num_hidden_layers=30,
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)


class RandomSource:
    """Seeded random weights of the config's shapes (scaled so activations stay O(1))."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    def tensors(self, shard: Shard) -> dict[str, np.ndarray]:
        c, rng = self.config, np.random.default_rng(0)
        kv = c.num_key_value_heads * c.head_dim

        def w(out: int, inp: int) -> np.ndarray:
            return (rng.standard_normal((out, inp), dtype=np.float32) * inp**-0.5).astype(
                np.float32
            )

        out: dict[str, np.ndarray] = {}
        for i in range(shard.start, shard.end):
            p = f"model.layers.{i}."
            out[p + "self_attn.q_proj.weight"] = w(
                c.num_attention_heads * c.head_dim, c.hidden_size
            )
            out[p + "self_attn.k_proj.weight"] = w(kv, c.hidden_size)
            out[p + "self_attn.v_proj.weight"] = w(kv, c.hidden_size)
            out[p + "self_attn.o_proj.weight"] = w(
                c.hidden_size, c.num_attention_heads * c.head_dim
            )
            out[p + "mlp.gate_proj.weight"] = w(c.intermediate_size, c.hidden_size)
            out[p + "mlp.up_proj.weight"] = w(c.intermediate_size, c.hidden_size)
            out[p + "mlp.down_proj.weight"] = w(c.hidden_size, c.intermediate_size)
            out[p + "input_layernorm.weight"] = np.ones(c.hidden_size, np.float32)
            out[p + "post_attention_layernorm.weight"] = np.ones(c.hidden_size, np.float32)
        embed = w(c.vocab_size, c.hidden_size)
        out["model.embed_tokens.weight"] = embed
        out["model.norm.weight"] = np.ones(c.hidden_size, np.float32)
        out["lm_head.weight"] = embed
        return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    engine: TorchEngine, device: str, batch: int, prompt: int, steps: int
) -> tuple[float, float]:
    """Seconds of the first decode step and the median one, `batch` requests after a prompt
    each."""
    rids = [RequestId(f"r{batch}-{i}") for i in range(batch)]
    ids = np.arange(1, prompt + 1, dtype=np.int64)
    engine.forward([StepInput(r, ids, 0) for r in rids])
    times = []
    for s in range(steps):
        t0 = time.perf_counter()
        engine.forward([StepInput(r, np.array([7]), prompt + s) for r in rids])
        sync(device)
        times.append(time.perf_counter() - t0)
    for r in rids:
        engine.free(r)
    return times[0], statistics.median(times[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quant", nargs="+", default=["none", "fp16", "int8", "int4"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shard = Shard.whole(ModelId("smollm2-shape"), SMOLLM2.num_hidden_layers)
    source = RandomSource(SMOLLM2)
    rows = []
    for quant in args.quant:
        engine = TorchEngine(device=args.device, dtype=args.dtype, quant=quant)
        t0 = time.perf_counter()
        engine.load(shard, source)
        load_s = time.perf_counter() - t0
        for batch in args.batch:
            first, step = measure(engine, args.device, batch, args.prompt, args.steps)
            row = {
                "quant": quant,
                "batch": batch,
                "first_step_ms": first * 1000,
                "step_ms": step * 1000,
                "tok_s": batch / step,
            }
            rows.append({**row, "load_s": load_s})
            print(json.dumps(row), flush=True)
        if args.profile and quant == args.quant[0]:
            from torch.profiler import profile

            with profile() as prof:
                measure(engine, args.device, args.batch[0], args.prompt, 10)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        engine.close()
    report = {"device": args.device, "dtype": args.dtype, "torch": torch.__version__, "rows": rows}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
