"""Tiny random Hugging Face-style model repos on disk: MLX 4/8-bit, MLX bf16 and transformers bf16.

Each repo is split over several safetensors files by layer (file k holds a contiguous run of
layers; the embeddings sit with the first, the norm and head with the last) with a
`model.safetensors.index.json` weight map, plus config.json and a byte-level tokenizer with a
chat template, so a node can serve it and a stage needs only some of the files.

mlx is native code that may crash on a foreign CPU, so it never runs in the test process: the MLX
repos are written, and mlx-lm's forward is run, by this module in a child
(`python -m tests.helpers.mlx_repos ...`), as tests/helpers/isolate.py does for the engine tests.
"""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tests.helpers.tiny import randomize

ROOT = Path(__file__).resolve().parents[2]
HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 128, 256, 4, 2, 320
BOS, EOS = 256, 257  # the tokenizer's <|im_start|> and <|im_end|>
INDEX_FILE = "model.safetensors.index.json"
CHILD_TIMEOUT_S = 300.0


def hf_config(layers: int, *, tie: bool = False) -> dict[str, Any]:
    """The config.json of a tiny llama (hidden sizes multiples of MLX's group of 64)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HIDDEN // HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "torch_dtype": "bfloat16",
    }


def qwen3_moe_config(layers: int) -> dict[str, Any]:
    """hf_config's shape as a qwen3_moe: 8 experts, top 2 (renormalised), layer 1 dense."""
    return {
        **hf_config(layers),
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 128,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
        "rope_theta": 1e6,
    }


def write_tokenizer(path: Path) -> None:
    """A byte-level tokenizer.json (256 bytes + ChatML specials) and a chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|im_start|>", "<|im_end|>"]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.save(str(path / "tokenizer.json"))
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "chat_template": template,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS, "eos_token_id": EOS})
    )


def layer_of(name: str, layers: int) -> int:
    """The layer a tensor is stored with: embeddings with layer 0, norm and head with the last."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    return 0 if "embed_tokens" in name else layers - 1


def split_names(names: list[str], layers: int, files: int) -> dict[str, str]:
    """Tensor name → file name: file k holds layers [k*L/files, (k+1)*L/files)."""
    files = max(1, min(files, layers))
    return {
        n: f"model-{layer_of(n, layers) * files // layers + 1:05d}-of-{files:05d}.safetensors"
        for n in names
    }


def write_index(dest: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {
        "metadata": {"total_size": total_size},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (dest / INDEX_FILE).write_text(json.dumps(index, indent=4))


def _run_child(*args: str) -> None:
    cmd = [sys.executable, "-m", "tests.helpers.mlx_repos", *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(
            f"mlx child {args[0]} failed ({done.returncode}):\n{done.stderr[-4000:]}"
        )


# -- entry points for tests ----------------------------------------------------------------------


def make_mlx_repo(
    dest: Path,
    bits: int | None,
    *,
    layers: int = 4,
    files: int = 3,
    seed: int = 0,
    tie: bool = False,
    group_size: int = 64,
    dtype: str = "bfloat16",
    overrides: dict[str, int | bool] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """A tiny random llama saved by mlx-lm: affine-quantized at `bits` (4 or 8; None → dense
    `dtype`), scales and biases in `dtype` (bfloat16 or float16), split over `files` files.

    overrides: module path → bits for that module (a per-layer entry in `quantization`), or
    False to leave it unquantized (mlx-lm then records nothing: the loader sees no `scales`).
    config: a whole config.json of any model_type mlx-lm knows (default: hf_config(layers)).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    spec = {
        "bits": bits,
        "layers": layers,
        "files": files,
        "seed": seed,
        "tie": tie,
        "group_size": group_size,
        "dtype": dtype,
        "overrides": overrides or {},
        "config": config,
    }
    _run_child("make", str(dest), json.dumps(spec))
    write_tokenizer(dest)
    return dest


def make_hf_repo(
    dest: Path,
    *,
    layers: int = 4,
    files: int = 3,
    seed: int = 0,
    tie: bool = False,
    config: dict[str, Any] | None = None,
) -> Path:
    """A tiny random transformers causal LM (a llama unless `config`, a whole config.json of any
    model_type, says otherwise) saved as bf16 safetensors over `files` files."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    config = config or hf_config(layers, tie=tie)
    layers, tie = config["num_hidden_layers"], config.get("tie_word_embeddings", False)
    torch.manual_seed(seed)
    hf_args = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    model: Any = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(config["model_type"], **hf_args)
    )
    model = model.to(torch.bfloat16).eval()
    randomize(model, torch.Generator().manual_seed(seed))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if tie:
        state.pop("lm_head.weight", None)
    weight_map = split_names(sorted(state), layers, files)
    for file in sorted(set(weight_map.values())):
        part = {n: state[n] for n, f in weight_map.items() if f == file}
        save_file(part, str(dest / file), metadata={"format": "pt"})
    write_index(dest, weight_map, sum(v.numel() * v.element_size() for v in state.values()))
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(dest)
    return dest


def hf_logits(path: Path, tokens: np.ndarray) -> np.ndarray:
    """transformers' float32 logits [T, vocab] of a repo (any written here but MLX-quantized)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None]
        return model(ids).logits[0].float().numpy()  # [T, vocab]


def mlx_logits(path: Path, tokens: np.ndarray, out: Path, *, dtype: str = "float32") -> np.ndarray:
    """mlx-lm's logits [T, vocab] for one sequence, computed in a child (written to out).

    dtype: what mlx-lm computes in; float32 (its float parameters, quantization scales and
    biases widened exactly) makes it a reference for the file's values, not for bf16 rounding.
    """
    _run_child("logits", str(path), json.dumps([int(t) for t in tokens]), str(out), dtype)
    return np.load(out)


def mlx_dequantized(path: Path, out: Path) -> dict[str, np.ndarray]:
    """mx.dequantize of every quantized weight in the repo, in float32, under `<module>.weight`."""
    _run_child("dequantize", str(path), str(out))
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def mlx_reference(
    path: Path, tokens: np.ndarray, out: Path
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """mlx_logits (float32) and mlx_dequantized of a repo from one child, files under dir out."""
    out.mkdir(parents=True, exist_ok=True)
    args = json.dumps([int(t) for t in tokens])
    _run_child("reference", str(path), args, str(out / "logits.npy"), str(out / "weights.npz"))
    with np.load(out / "weights.npz") as f:
        return np.load(out / "logits.npy"), {k: f[k] for k in f.files}


# -- the child: everything below imports mlx ---------------------------------------------------


def _child_make(dest: Path, spec: dict[str, Any]) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, quantize_model, save_config

    bits = spec["bits"]
    dtype = getattr(mx, spec["dtype"])
    config = spec["config"] or hf_config(spec["layers"], tie=spec["tie"])
    layers = config["num_hidden_layers"]
    config["torch_dtype"] = spec["dtype"]
    Model, ModelArgs = _get_classes(config)
    mx.random.seed(spec["seed"])
    model: Any = Model(ModelArgs.from_dict(config))
    flat: Any = tree_flatten(model.parameters())
    params = []
    for name, p in flat:
        noise = mx.random.normal(p.shape)
        if name.endswith("norm.weight"):
            p = 1.0 + 0.1 * noise
        elif "embed_tokens" in name:
            p = noise
        else:
            p = noise * p.shape[-1] ** -0.5
        params.append((name, p.astype(dtype)))
    model.load_weights(params)
    if bits is not None:
        overrides: dict[str, int | bool] = spec["overrides"]
        group = spec["group_size"]

        def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
            rule = overrides.get(path, True)
            if rule is False:
                return False
            if rule is True:
                return True
            return {"group_size": group, "bits": int(rule), "mode": "affine"}

        model, config = quantize_model(model, config, group, bits, quant_predicate=predicate)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    weight_map = split_names(sorted(weights), layers, spec["files"])
    for file in sorted(set(weight_map.values())):
        part = {n: weights[n] for n, f in weight_map.items() if f == file}
        mx.save_safetensors(str(dest / file), part, metadata={"format": "mlx"})
    write_index(dest, weight_map, sum(v.nbytes for v in weights.values()))
    save_config(config, dest / "config.json")


def _child_logits(path: Path, tokens: list[int], out: Path, dtype: str) -> None:
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    model.set_dtype(getattr(mx, dtype))  # float parameters only: packed weights stay uint32
    logits = model(mx.array(tokens)[None])[0].astype(mx.float32)  # [T, vocab]
    mx.eval(logits)
    np.save(out, np.array(logits))


def _child_dequantize(path: Path, out: Path) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    got: dict[str, Any] = {}
    modules: list[tuple[str, Any]] = model.named_modules()
    for name, module in modules:
        if isinstance(module, QuantizedSwitchLinear):  # stacked experts: one matrix per expert
            s: Any = module
            scales, biases = s.scales.astype(mx.float32), s.biases.astype(mx.float32)
            w = mx.dequantize(s.weight, scales, biases, s.group_size, s.bits)  # [E, out, in]
            mx.eval(w)
            mlp, _, proj = name.rpartition(".switch_mlp.")
            for e, matrix in enumerate(np.array(w)):
                got[f"{mlp}.experts.{e}.{proj}.weight"] = matrix
        elif isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding):
            # float32 scales and biases (widened exactly): MLX computes scale * q + bias in
            # float32 and rounds the result to the scales' dtype, which would hide the sum
            q: Any = module
            scales, biases = q.scales.astype(mx.float32), q.biases.astype(mx.float32)
            w = mx.dequantize(q.weight, scales, biases, q.group_size, q.bits)
            mx.eval(w)
            got[f"{name}.weight"] = np.array(w)
    np.savez(out, **got)


def main(argv: list[str]) -> None:
    what, path = argv[0], Path(argv[1])
    if what == "make":
        _child_make(path, json.loads(argv[2]))
    elif what == "logits":
        _child_logits(path, json.loads(argv[2]), Path(argv[3]), argv[4])
    elif what == "dequantize":
        _child_dequantize(path, Path(argv[2]))
    elif what == "reference":
        _child_logits(path, json.loads(argv[2]), Path(argv[3]), "float32")
        _child_dequantize(path, Path(argv[4]))
    else:
        raise SystemExit(f"unknown command {what}")


if __name__ == "__main__":
    main(sys.argv[1:])
