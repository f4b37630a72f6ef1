"""Try an engine once in a child process: a tiny random model, one load, a prefill, a decode.

A native engine built for another CPU does not raise: llama.cpp compiled with -march=native on
one machine dies with SIGILL or SIGSEGV on another. So an engine is never first tried inside a
process that matters. `python -m shoal.engines.probe ENGINE` builds a seeded two-layer Llama
(in memory, and as a GGUF file with Q4_1/Q8_0 blocks like the shipped models for llama.cpp),
loads it, runs a prompt and one decode step, and exits 0 if both gave finite logits of the right
shape. `probe_all` runs one such child per engine, all at once, and says why each one that did
not pass failed: died with a signal, exited with an error, or ran past its time.
"""

import contextlib
import logging
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from shoal.engines.base import StepInput
from shoal.engines.registry import create_engine
from shoal.types.ids import ModelId, RequestId
from shoal.types.model_config import ModelConfig
from shoal.types.shard import Shard

log = logging.getLogger(__name__)

TIMEOUT_S = 30.0  # a probe takes about a second; a busy machine may take many
REASON_CHARS = 200

# The tiny model. llama.cpp's SPM vocabulary wants <unk>, <s>, </s> and the 256 byte tokens.
SPECIALS = ("<unk>", "<s>", "</s>")
VOCAB = len(SPECIALS) + 256
LAYERS = 2
PROMPT = np.asarray([1, 75, 104, 111, 111, 114, 35], np.int64)  # <s> then bytes, offset by 3
# constructor options that keep a probe small
OPTIONS: dict[str, dict[str, Any]] = {"llamacpp": {"n_ctx": 256, "n_seq_max": 1}}


# -- the child: a tiny model through one engine --------------------------------------------------


def tiny_config() -> ModelConfig:
    """A two-layer Llama with grouped-query attention, rows a multiple of GGUF's 32-blocks."""
    return ModelConfig(
        architecture="llama",
        num_hidden_layers=LAYERS,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
        max_position_embeddings=256,
    )


def tiny_weights(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float32 weights under Hugging Face names, scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    d, f, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * cols**-0.5).astype(np.float32)

    weights = {
        "model.embed_tokens.weight": rng.standard_normal((config.vocab_size, d)).astype(np.float32),
        "model.norm.weight": np.ones(d, np.float32),
        "lm_head.weight": matrix(config.vocab_size, d),
    }
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": np.ones(d, np.float32),
            p + "self_attn.q_proj.weight": matrix(d, d),
            p + "self_attn.k_proj.weight": matrix(kv * config.head_dim, d),
            p + "self_attn.v_proj.weight": matrix(kv * config.head_dim, d),
            p + "self_attn.o_proj.weight": matrix(d, d),
            p + "post_attention_layernorm.weight": np.ones(d, np.float32),
            p + "mlp.gate_proj.weight": matrix(f, d),
            p + "mlp.up_proj.weight": matrix(f, d),
            p + "mlp.down_proj.weight": matrix(d, f),
        }
    return weights


# Hugging Face name → GGUF name (layer i as {i}); the block format the shipped SmolLM2 uses
_GGUF_NAMES = {
    "model.embed_tokens.weight": ("token_embd.weight", "Q8_0"),
    "model.norm.weight": ("output_norm.weight", "F32"),
    "lm_head.weight": ("output.weight", "Q4_1"),
    "model.layers.{i}.input_layernorm.weight": ("blk.{i}.attn_norm.weight", "F32"),
    "model.layers.{i}.self_attn.q_proj.weight": ("blk.{i}.attn_q.weight", "Q4_1"),
    "model.layers.{i}.self_attn.k_proj.weight": ("blk.{i}.attn_k.weight", "Q4_1"),
    "model.layers.{i}.self_attn.v_proj.weight": ("blk.{i}.attn_v.weight", "Q4_1"),
    "model.layers.{i}.self_attn.o_proj.weight": ("blk.{i}.attn_output.weight", "Q4_1"),
    "model.layers.{i}.post_attention_layernorm.weight": ("blk.{i}.ffn_norm.weight", "F32"),
    "model.layers.{i}.mlp.gate_proj.weight": ("blk.{i}.ffn_gate.weight", "Q4_1"),
    "model.layers.{i}.mlp.up_proj.weight": ("blk.{i}.ffn_up.weight", "Q4_1"),
    "model.layers.{i}.mlp.down_proj.weight": ("blk.{i}.ffn_down.weight", "Q4_1"),
}


def write_gguf(path: Path, config: ModelConfig, weights: dict[str, np.ndarray]) -> None:
    """The model as a llama GGUF file with an SPM byte vocabulary."""
    import gguf  # only the llama.cpp probe reads files

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("llama")
    tokens = [*SPECIALS, *(f"<0x{b:02X}>" for b in range(256))]
    byte, control = gguf.TokenType.BYTE, gguf.TokenType.CONTROL
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([control] * len(SPECIALS) + [byte] * 256)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for pattern, (gguf_pattern, kind) in _GGUF_NAMES.items():
        layers = range(config.num_hidden_layers) if "{i}" in pattern else [0]
        for i in layers:
            array = weights[pattern.format(i=i)]
            qtype = gguf.GGMLQuantizationType[kind]
            data = array if kind == "F32" else gguf.quants.quantize(array, qtype)
            writer.add_tensor(gguf_pattern.format(i=i), data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@dataclass
class TinyModel:
    """A WeightSource over the tiny weights; `path` is the same model as a GGUF (llama.cpp's)."""

    config: ModelConfig
    weights: dict[str, np.ndarray]
    path: Path

    def tensors(self, shard: Shard) -> dict[str, np.ndarray]:
        assert shard.is_whole, "a probe loads the whole model"
        return dict(self.weights)


def _check(logits: np.ndarray, what: str) -> None:
    if logits.shape != (VOCAB,):
        raise RuntimeError(f"{what} gave logits of shape {logits.shape}, not ({VOCAB},)")
    if not np.isfinite(logits).all():
        raise RuntimeError(f"{what} gave logits that are not finite")


def run(name: str, workdir: Path) -> None:
    """Load the tiny model into the engine, prefill PROMPT and decode one token; raise if off."""
    config = tiny_config()
    model = TinyModel(config, tiny_weights(config), workdir / "tiny.gguf")
    if name == "llamacpp":
        write_gguf(model.path, config, model.weights)
    engine = create_engine(name, **OPTIONS.get(name, {}))
    rid = RequestId("probe")
    try:
        engine.load(Shard.whole(ModelId("probe-tiny"), LAYERS), model)
        first = engine.forward([StepInput(rid, PROMPT, 0)])[0]
        _check(first, "the prompt")
        nxt = np.asarray([int(first.argmax())])
        _check(engine.forward([StepInput(rid, nxt, len(PROMPT))])[0], "the decode step")
    finally:
        engine.close()


# -- the parent: children at once, a verdict each ------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """How one engine's probe ended; reason says why it failed, in a few words."""

    engine: str
    ok: bool
    reason: str = ""
    timed_out: bool = False  # a busy machine, maybe: worth trying again next start


def command(engine: str) -> list[str]:
    """The child that probes engine, with this interpreter."""
    return [sys.executable, "-m", "shoal.engines.probe", engine]


def explain(returncode: int, stderr: str) -> str:
    """Why a probe that exited with returncode failed ("" if it passed)."""
    if returncode == 0:
        return ""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"its probe died with {name}"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1][:REASON_CHARS] if lines else "no message"
    return f"its probe failed (exit {returncode}): {last}"


def _verdict(
    engine: str, proc: "subprocess.Popen[bytes]", err: IO[bytes], deadline: float, timeout_s: float
) -> ProbeResult:
    try:
        returncode = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return ProbeResult(engine, False, f"its probe took over {timeout_s:g} s", timed_out=True)
    err.seek(0)
    stderr = err.read().decode("utf-8", errors="replace")
    if returncode != 0:
        log.debug("probe of %s, exit %d, stderr:\n%s", engine, returncode, stderr[-4000:])
    return ProbeResult(engine, returncode == 0, explain(returncode, stderr))


def probe_all(
    engines: Sequence[str],
    *,
    timeout_s: float = TIMEOUT_S,
    commands: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, ProbeResult]:
    """Probe every engine at once, each in its own child; no child outlives this call.

    commands: the child to run per engine, instead of `command(engine)` (tests).
    """
    commands = commands or {}
    deadline = time.monotonic() + timeout_s
    running: dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}
    with contextlib.ExitStack() as files:
        try:
            for engine in engines:
                err = files.enter_context(tempfile.TemporaryFile())  # no pipe: nothing blocks
                cmd = list(commands.get(engine) or command(engine))
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
                running[engine] = (proc, err)
            return {
                engine: _verdict(engine, proc, err, deadline, timeout_s)
                for engine, (proc, err) in running.items()
            }
        finally:
            for proc, _ in running.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m shoal.engines.probe ENGINE`: exit 0 if the engine ran the tiny model."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write("usage: python -m shoal.engines.probe ENGINE\n")
        return 2
    if hasattr(signal, "alarm"):
        # The parent kills a child that runs late; this ends one whose parent died first.
        signal.alarm(int(TIMEOUT_S * 4))
    try:
        with tempfile.TemporaryDirectory(prefix="shoal-probe-") as tmp:
            run(args[0], Path(tmp))
    except Exception as e:  # process boundary: the reason goes to the parent on stderr
        sys.stderr.write(f"{type(e).__name__}: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
