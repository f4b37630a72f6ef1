"""Decode tok/s of a mixture-of-experts model against dense models of its total and active sizes.

Random int4 weights, no checkpoint: a qwen3_moe (default 16 experts, top 2, hidden 1024, 4
layers) and two llamas with the same attention, one whose MLP holds as many weights as all the
experts (the total size) and one as many as the experts a token uses (the active size). Each
runs in the numpy and torch engines at --threads, which hand int4 CPU shards to the native
engine (one call a pass, routed experts in forward.c); the MoE also runs on its model files
without that hand-off (`moe-file`: qwen3_moe.py/moe.py, the block products per projection from
Python), so the last ratio is what the one-call pass gains. Reported: the median decode step of
--batch requests after a --prompt-token prefill (all engines loaded at once and stepped in turn,
so a shared machine's load falls on all alike), and tok/s ratios moe / the others. With
--llamacpp the same MoE weights are written as a qwen3moe GGUF (Q4_0 experts) and timed in
llama.cpp (llama-cpp-python), one sequence.

    python bench/moe.py --threads 2
"""

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from shoal.engines.base import Engine, StepInput  # noqa: E402
from shoal.engines.native import engine as native  # noqa: E402
from shoal.types.ids import ModelId, RequestId  # noqa: E402
from shoal.types.model_config import ModelConfig  # noqa: E402
from shoal.types.shard import Shard  # noqa: E402


def configs(experts: int, top: int, hidden: int, inner: int, layers: int) -> dict[str, ModelConfig]:
    """The MoE and its dense peers of the same total and active MLP sizes."""
    base = {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": max(1, hidden // 512),
        "head_dim": 128,
        "vocab_size": 8192,
        "max_position_embeddings": 4096,
        "rope_theta": 1e6,
    }
    return {
        "moe": ModelConfig(
            architecture="qwen3_moe",
            intermediate_size=inner,
            qk_norm=True,
            num_experts=experts,
            experts_per_token=top,
            moe_intermediate_size=inner,
            norm_topk_prob=True,
            **base,
        ),
        "dense-total": ModelConfig(architecture="llama", intermediate_size=experts * inner, **base),
        "dense-active": ModelConfig(architecture="llama", intermediate_size=top * inner, **base),
    }


class RandomSource:
    """Seeded random weights of a config's shapes, scaled so activations stay O(1)."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    def tensors(self, shard: Shard) -> dict[str, np.ndarray]:
        c, rng = self.config, np.random.default_rng(0)

        def w(*shape: int) -> np.ndarray:
            return rng.standard_normal(shape, dtype=np.float32) * np.float32(shape[-1] ** -0.5)

        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        out: dict[str, np.ndarray] = {
            "model.embed_tokens.weight": w(c.vocab_size, c.hidden_size),
            "model.norm.weight": np.ones(c.hidden_size, np.float32),
            "lm_head.weight": w(c.vocab_size, c.hidden_size),
        }
        for i in range(shard.start, shard.end):
            p = f"model.layers.{i}."
            out |= {
                p + "self_attn.q_proj.weight": w(q, c.hidden_size),
                p + "self_attn.k_proj.weight": w(kv, c.hidden_size),
                p + "self_attn.v_proj.weight": w(kv, c.hidden_size),
                p + "self_attn.o_proj.weight": w(c.hidden_size, q),
                p + "input_layernorm.weight": np.ones(c.hidden_size, np.float32),
                p + "post_attention_layernorm.weight": np.ones(c.hidden_size, np.float32),
            }
            if c.qk_norm:
                out[p + "self_attn.q_norm.weight"] = np.ones(c.head_dim, np.float32)
                out[p + "self_attn.k_norm.weight"] = np.ones(c.head_dim, np.float32)
            if c.num_experts:
                out[p + "mlp.gate.weight"] = w(c.num_experts, c.hidden_size)
                mlps = [f"{p}mlp.experts.{e}." for e in range(c.num_experts)]
                inner = c.moe_intermediate_size
            else:
                mlps, inner = [p + "mlp."], c.intermediate_size
            for m in mlps:
                out[m + "gate_proj.weight"] = w(inner, c.hidden_size)
                out[m + "up_proj.weight"] = w(inner, c.hidden_size)
                out[m + "down_proj.weight"] = w(c.hidden_size, inner)
        return out


@contextlib.contextmanager
def on_model_files(yes: bool) -> Iterator[None]:
    """With yes, the engines keep int4 shards on their own model files (no native hand-off)."""
    runs = native.runs
    if yes:
        native.runs = lambda quant, args: False
    try:
        yield
    finally:
        native.runs = runs


def decode_steps_s(loaded: dict[Any, Engine], batch: int, prompt: int, steps: int) -> dict:
    """The median seconds of one decode step of `batch` requests after a prompt each, per engine;
    the engines take turns step by step, so a busy machine slows them alike."""
    rids = [RequestId(f"r{i}") for i in range(batch)]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 8192, prompt) for _ in rids]
    for engine in loaded.values():
        engine.forward([StepInput(r, p, 0) for r, p in zip(rids, prompts, strict=True)])
    times: dict[Any, list[float]] = {key: [] for key in loaded}
    for s in range(steps):
        tokens = rng.integers(0, 8192, batch)  # other tokens, other experts each step
        step = [StepInput(r, tokens[i : i + 1], prompt + s) for i, r in enumerate(rids)]
        for key, engine in loaded.items():
            t0 = time.perf_counter()
            engine.forward(step)
            times[key].append(time.perf_counter() - t0)
    for engine in loaded.values():
        for r in rids:
            engine.free(r)
    return {key: statistics.median(t[1:]) for key, t in times.items()}


def engines(threads: int) -> dict[str, Callable[[], Engine]]:
    import torch

    from shoal.engines.numpy.engine import NumpyEngine
    from shoal.engines.torch.engine import TorchEngine

    torch.set_num_threads(threads)
    return {
        "numpy": lambda: NumpyEngine(quant="int4", threads=threads),
        "torch": lambda: TorchEngine(device="cpu", quant="int4"),
    }


def llamacpp_step_s(cfg: ModelConfig, source: RandomSource, threads: int, steps: int) -> float:
    """Seconds of one llama.cpp decode step of the MoE written as a qwen3moe GGUF."""
    import gguf
    from llama_cpp import Llama

    shard = Shard.whole(ModelId("moe"), cfg.num_hidden_layers)
    t = source.tensors(shard)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "moe.gguf"
        w = gguf.GGUFWriter(str(path), "qwen3moe")
        w.add_block_count(cfg.num_hidden_layers)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.experts_per_token)
        w.add_tokenizer_model("none")
        w.add_vocab_size(cfg.vocab_size)

        def add(name: str, array: np.ndarray, quant: bool = True) -> None:
            if quant and array.shape[-1] % 32 == 0:
                q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q4_0)
                w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
            else:
                w.add_tensor(name, array)

        add("token_embd.weight", t["model.embed_tokens.weight"], quant=False)
        add("output_norm.weight", t["model.norm.weight"], quant=False)
        q8 = gguf.quants.quantize(t["lm_head.weight"], gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor("output.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        for i in range(cfg.num_hidden_layers):
            p, b = f"model.layers.{i}.", f"blk.{i}."
            for hf, name in (
                ("q", "attn_q"),
                ("k", "attn_k"),
                ("v", "attn_v"),
                ("o", "attn_output"),
            ):
                add(f"{b}{name}.weight", t[f"{p}self_attn.{hf}_proj.weight"])
            add(f"{b}attn_q_norm.weight", t[f"{p}self_attn.q_norm.weight"], quant=False)
            add(f"{b}attn_k_norm.weight", t[f"{p}self_attn.k_norm.weight"], quant=False)
            add(f"{b}attn_norm.weight", t[f"{p}input_layernorm.weight"], quant=False)
            add(f"{b}ffn_norm.weight", t[f"{p}post_attention_layernorm.weight"], quant=False)
            add(f"{b}ffn_gate_inp.weight", t[f"{p}mlp.gate.weight"], quant=False)
            for hf, name in (
                ("gate", "ffn_gate_exps"),
                ("up", "ffn_up_exps"),
                ("down", "ffn_down_exps"),
            ):
                stacked = np.stack(
                    [t[f"{p}mlp.experts.{e}.{hf}_proj.weight"] for e in range(cfg.num_experts)]
                )  # [E, out, in]
                add(f"{b}{name}.weight", stacked)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        llm: Any = Llama(
            str(path), n_ctx=512, n_threads=threads, n_batch=128, verbose=False, vocab_only=False
        )
        llm.eval(list(range(1, 65)))
        times = []
        for s in range(steps):
            t0 = time.perf_counter()
            llm.eval([(7 * s + 3) % cfg.vocab_size])
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inner", type=int, default=512, help="one expert's MLP width")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--llamacpp", action="store_true")
    args = p.parse_args()
    cfgs = configs(args.experts, args.top, args.hidden, args.inner, args.layers)
    runs = [("moe", "moe", False), ("dense-total", "dense-total", False),
            ("dense-active", "dense-active", False), ("moe-file", "moe", True)]  # fmt: skip
    loaded: dict[tuple[str, str], Engine] = {}
    for kind, make in engines(args.threads).items():
        for label, name, on_files in runs:
            cfg = cfgs[name]
            loaded[kind, label] = engine = make()
            with on_model_files(on_files):
                engine.load(Shard.whole(ModelId(name), cfg.num_hidden_layers), RandomSource(cfg))
    step_s = decode_steps_s(loaded, args.batch, args.prompt, args.steps)
    tok_s = {key: args.batch / s for key, s in step_s.items()}
    for (kind, label), s in step_s.items():
        print(f"{kind:6} {label:18} {s * 1e3:8.2f} ms/step {args.batch / s:8.1f} tok/s")
    moe = cfgs["moe"]
    print(
        f"\nqwen3_moe {moe.num_experts} experts top {moe.experts_per_token}, hidden "
        f"{moe.hidden_size}, expert width {moe.moe_intermediate_size}, {moe.num_hidden_layers} "
        f"layers, int4, {args.threads} threads, batch {args.batch}"
    )
    print(f"{'engine':8}{'moe tok/s':>11}" + "".join(f"{'/ ' + r[0]:>20}" for r in runs[1:]))
    for kind in ("numpy", "torch"):
        m = tok_s[kind, "moe"]
        ratios = "".join(f"{m / tok_s[kind, r[0]]:>19.2f}x" for r in runs[1:])
        print(f"{kind:8}{m:>11.1f}{ratios}")
    if args.llamacpp:
        step = llamacpp_step_s(moe, RandomSource(moe), args.threads, args.steps)
        print(f"llama.cpp qwen3moe Q4_0: {1 / step:.1f} tok/s (batch 1); "
              f"numpy moe / llama.cpp {tok_s['numpy', 'moe'] / (1 / step):.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
