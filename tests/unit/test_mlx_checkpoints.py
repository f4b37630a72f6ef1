"""MLX checkpoints (4-bit, 8-bit, dense) in the numpy, native and torch engines.

The repos are tiny random llamas written by mlx-lm itself (tests/helpers/mlx_repos.py), and the
references are mlx-lm's own forward and dequantization, run in a child process: mlx is native
code and never runs in the test process.
"""

import importlib.util
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.engines import native
from shoal.engines.base import Engine, StepInput
from shoal.engines.native.blocks import BlockWeights, blocks_of, stacked_blocks
from shoal.engines.numpy.engine import NumpyEngine
from shoal.engines.packed import Packed
from shoal.errors import UnsupportedModel
from shoal.models.safetensors import SafetensorsSource
from shoal.types.ids import ModelId, RequestId
from shoal.types.shard import Shard
from tests.helpers import mlx_repos
from tests.helpers.mlx_repos import VOCAB, make_hf_repo, make_mlx_repo

# Repos made by mlx-lm, and its forward, take child processes and some seconds: the slow tier.
NO_MLX = importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx_lm") is None
with_mlx = pytest.mark.skipif(NO_MLX, reason="mlx is not installed (pip install 'mlx[cpu]' mlx-lm)")

LAYERS = 4
TOKENS = np.random.default_rng(3).integers(0, 256, 16)
# The 4-bit repo's per-module overrides: one module 8-bit, one left dense.
OVERRIDES: dict[str, int | bool] = {
    "model.layers.1.mlp.down_proj": 8,
    "model.layers.2.self_attn.q_proj": False,
}
BUILDS = {"simd": False, "portable": True}


def shard(start: int = 0, end: int = LAYERS) -> Shard:
    return Shard(model_id=ModelId("m"), start=start, end=end, n_layers=LAYERS)


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("repos")
    return {
        "q4": make_mlx_repo(root / "q4", 4, overrides=OVERRIDES),
        "q8-tied": make_mlx_repo(root / "q8", 8, tie=True, seed=1),
        "q4-f16-g32": make_mlx_repo(root / "q4h", 4, dtype="float16", group_size=32, seed=2),
        "mlx-bf16": make_mlx_repo(root / "bf16", None, seed=3),
        "hf-bf16": make_hf_repo(root / "hf", seed=4),
    }


@pytest.fixture(scope="module")
def mlx_reference(repos: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """mlx-lm's float32 logits [T, vocab] and dequantized weights, per MLX repo."""
    out = tmp_path_factory.mktemp("mlx")
    ref: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
    for name in ("q4", "q8-tied", "q4-f16-g32", "mlx-bf16"):
        ref[name] = mlx_repos.mlx_reference(repos[name], TOKENS, out / name)
    return ref


@pytest.fixture(params=list(BUILDS))
def lib(request: pytest.FixtureRequest) -> native.Library:
    built = native.library(portable=BUILDS[request.param])
    if built is None:
        pytest.skip("the native kernels do not compile here")
    return built


def logits(engine: Engine, tokens: np.ndarray = TOKENS) -> np.ndarray:
    return engine.forward([StepInput(RequestId("r"), tokens, 0)], all_logits=True)[0]


def packed_of(path: Path) -> dict[str, Packed]:
    """The packed tensors of the whole model, a tied head once (as the embeddings)."""
    tensors = SafetensorsSource(path).tensors(shard())
    tied = tensors["lm_head.weight"] is tensors["model.embed_tokens.weight"]
    return {
        n: t
        for n, t in tensors.items()
        if isinstance(t, Packed) and not (tied and n == "lm_head.weight")
    }


# -- reading ---------------------------------------------------------------------------------


@pytest.mark.slow
@with_mlx
def test_packed_tensors_dequantize_to_mlx_values_exactly(repos: dict, mlx_reference: dict) -> None:
    for name in ("q4", "q8-tied", "q4-f16-g32"):
        packed, (_, expected) = packed_of(repos[name]), mlx_reference[name]
        assert set(packed) == set(expected)
        for tensor, p in packed.items():
            got = p.dequantize()
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got.view(np.uint32), expected[tensor].view(np.uint32))
        # MLX's scales are negative in about half of all groups: the tests cover them
        scales = np.concatenate([p.group_scales()[0].ravel() for p in packed.values()])
        assert 0.3 < (scales < 0).mean() < 0.7


@pytest.mark.slow
@with_mlx
def test_per_module_overrides_embeddings_and_tied_heads(repos: dict) -> None:
    source = SafetensorsSource(repos["q4"])
    assert source.quantized
    t = source.tensors(shard())
    down, q = t["model.layers.1.mlp.down_proj.weight"], t["model.layers.2.self_attn.q_proj.weight"]
    assert isinstance(down, Packed) and down.bits == 8 and down.group_size == 64
    assert isinstance(q, np.ndarray) and q.dtype == np.float32 and q.shape == (128, 128)
    embed, head = t["model.embed_tokens.weight"], t["lm_head.weight"]
    assert isinstance(embed, Packed) and embed.bits == 4 and embed.shape == (VOCAB, 128)
    assert isinstance(head, Packed) and head is not embed
    # nbytes: what is held, the packed integers and bf16 scales and biases
    assert embed.nbytes == VOCAB * 128 // 2 + 2 * 2 * VOCAB * 128 // 64
    np.testing.assert_array_equal(embed[np.array([5, 7])], embed.dequantize()[[5, 7]])
    tied = SafetensorsSource(repos["q8-tied"])
    last = tied.tensors(shard(3, 4))
    assert "model.embed_tokens.weight" not in last and isinstance(last["lm_head.weight"], Packed)
    whole = tied.tensors(shard())
    assert whole["lm_head.weight"] is whole["model.embed_tokens.weight"]


@pytest.mark.slow
@with_mlx
def test_other_quantization_methods_are_refused(repos: dict, tmp_path: Path) -> None:
    path = tmp_path / "gptq"
    shutil.copytree(repos["hf-bf16"], path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="gptq"):
        SafetensorsSource(path)


@pytest.mark.slow
@with_mlx
def test_a_directory_with_some_shard_files(repos: dict, tmp_path: Path) -> None:
    path = tmp_path / "partial"
    shutil.copytree(repos["q4"], path)
    (path / "model-00003-of-00003.safetensors").unlink()  # layer 3, the norm and the head
    source = SafetensorsSource(path)
    assert source.files_for(shard(0, 2)) == {"model-00001-of-00003.safetensors"}
    engine = NumpyEngine()
    engine.load(shard(0, 2), source)  # the first stage's files are all here
    hidden = logits(engine)
    assert hidden.shape == (len(TOKENS), 128)
    with pytest.raises(UnsupportedModel, match="model-00003-of-00003.safetensors"):
        source.tensors(shard(2, 4))


# -- native blocks -----------------------------------------------------------------------------


@pytest.mark.slow
@with_mlx
def test_blocks_hold_the_mlx_weights_exactly(
    repos: dict, mlx_reference: dict, lib: native.Library
) -> None:
    for name in ("q4", "q8-tied", "q4-f16-g32"):
        _, expected = mlx_reference[name]
        for tensor, p in packed_of(repos[name]).items():
            blocks = BlockWeights.from_packed(lib, p)
            assert blocks is not None, tensor
            assert blocks.kind == ("q4" if p.bits == 4 else "q8")
            got = blocks.dequantize()
            np.testing.assert_array_equal(got.view(np.uint32), expected[tensor].view(np.uint32))
            # the product: 15-bit activations per block of 32 are the only rounding
            x = np.random.default_rng(0).standard_normal((3, p.shape[1])).astype(np.float32)
            want = x @ expected[tensor].T.astype(np.float64)
            err = np.abs(blocks.matmul(x) - want).max() / np.abs(want).max()
            assert err < 2e-4, (tensor, err)


def test_negative_scales(lib: native.Library) -> None:
    """Every group's scale negative: w = d q + m with d < 0, in both block formats."""
    rng = np.random.default_rng(5)
    n, k = 24, 128
    for bits in (4, 8):
        words = rng.integers(0, 2**32, (n, k * bits // 32), dtype=np.uint32)
        scales = -rng.uniform(0.01, 0.1, (n, k // 64)).astype(np.float16)
        biases = rng.uniform(-1, 1, (n, k // 64)).astype(np.float16)
        p = Packed(words, scales, biases, bits, 64, "F16")
        blocks = BlockWeights.from_packed(lib, p)
        assert blocks is not None
        np.testing.assert_array_equal(blocks.dequantize(), p.dequantize())
        x = rng.standard_normal((5, k)).astype(np.float32)
        want = x @ p.dequantize().T.astype(np.float64)
        assert np.abs(blocks.matmul(x) - want).max() / np.abs(want).max() < 2e-4


def test_scales_fp16_cannot_hold_fall_back_to_requantizing(
    lib: native.Library, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(6)
    n, k = 8, 64
    words = rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32)
    scales = rng.uniform(0.01, 0.1, (n, 1)).astype(np.float32)
    scales[3, 0] = 5e-6  # below fp16's normal range: bf16 holds it, fp16 does not exactly
    to_bf16 = (scales.view(np.uint32) >> 16).astype(np.uint16)
    p = Packed(words, to_bf16, to_bf16.copy(), 4, 64, "BF16")
    assert BlockWeights.from_packed(lib, p) is None
    with caplog.at_level(logging.INFO, logger="shoal.engines.native.blocks"):
        blocks = blocks_of(lib, p, "q4", 1, "model.layers.0.mlp.up_proj.weight")
    assert "model.layers.0.mlp.up_proj.weight" in caplog.text
    assert blocks.kind == "q4"


def test_mixed_formats_stack_exactly(lib: native.Library) -> None:
    """Fused q/k/v of a dense q (Q8_0 blocks) and packed 4-bit k, v: one q8 matrix with
    minimums holding each part exactly."""
    rng = np.random.default_rng(7)
    dense = rng.standard_normal((16, 64)).astype(np.float32)
    words = rng.integers(0, 2**32, (8, 8), dtype=np.uint32)
    scales = rng.uniform(-0.1, 0.1, (8, 1)).astype(np.float16)
    p = Packed(words, scales, scales.copy(), 4, 64, "F16")
    q8 = BlockWeights.quantize(lib, dense, "q8")
    q4 = BlockWeights.from_packed(lib, p)
    assert q4 is not None
    stacked = BlockWeights.stack([q8, q4, q4])
    assert stacked is not None and stacked.kind == "q8" and stacked.minimums is not None
    want = np.concatenate([q8.dequantize(), p.dequantize(), p.dequantize()])
    np.testing.assert_array_equal(stacked.dequantize(), want)
    fused = stacked_blocks(lib, [dense, p, p], "q8", 1, "qkv")
    np.testing.assert_array_equal(fused.dequantize(), want)
    same = BlockWeights.stack([q4, q4])
    assert same is not None and same.kind == "q4" and same.minimums is not None


# -- engines against mlx-lm ------------------------------------------------------------------

# (engine, quant): numpy and torch in float32 hold MLX's dequantized weights exactly; int8 and
# int4 hand the shard to the native engine, which holds packed weights exactly in blocks (the
# error is its 15-bit activations and fp16 KV cache) and quantizes dense ones to its format.
ENGINES = [
    ("numpy", "none"),
    ("numpy", "int4"),
    ("numpy", "int8"),
    ("torch", "none"),
    ("torch", "int4"),
]
# max |Δlogit| / max |logit| against mlx-lm in float32 (measured: 9e-7, 4.2e-4, 1.3e-3, 1.8e-2)
FLOAT_BOUND = 1e-5  # float32 sums in another order
BLOCK_BOUND = 2e-3  # every weight packed, held exactly in blocks
# the q4 repo's one dense module (layer 2's q_proj) quantized by the engine: a loss, not a bug
DENSE_MODULE_BOUND = {"int8": 5e-3, "int4": 5e-2}


def make_engine(kind: str, quant: str) -> Engine:
    if kind == "numpy":
        return NumpyEngine(quant=quant)
    pytest.importorskip("torch")
    from shoal.engines.torch.engine import TorchEngine

    return TorchEngine(device="cpu", quant=quant)


@pytest.mark.slow
@with_mlx
@pytest.mark.parametrize("repo", ["q4", "q8-tied", "q4-f16-g32", "mlx-bf16"])
@pytest.mark.parametrize(("kind", "quant"), ENGINES)
def test_logits_against_mlx_lm(
    repos: dict, mlx_reference: dict, repo: str, kind: str, quant: str
) -> None:
    if repo == "mlx-bf16" and quant != "none":
        pytest.skip("dense weights quantized by the engine: tests/unit/test_native_kernels.py")
    want, _ = mlx_reference[repo]
    engine = make_engine(kind, quant)
    engine.load(shard(), SafetensorsSource(repos[repo]))
    got = logits(engine)
    err = np.abs(got - want).max() / np.abs(want).max()
    if quant == "none":
        bound = FLOAT_BOUND
    else:
        bound = DENSE_MODULE_BOUND[quant] if repo == "q4" else BLOCK_BOUND
    assert err < bound, err
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.slow
@with_mlx
@pytest.mark.parametrize("repo", ["q8-tied", "q4-f16-g32"])
def test_torch_blocked_takes_packed_weights_exactly(
    repos: dict, mlx_reference: dict, repo: str
) -> None:
    """torch on the CPU in bfloat16 keeps its own modules (no hand-off to the native engine);
    its int4 block projections still hold the MLX weights exactly."""
    pytest.importorskip("torch")
    from shoal.engines.torch.engine import TorchEngine
    from shoal.engines.torch.quant import Blocked

    want, weights = mlx_reference[repo]
    engine = TorchEngine(device="cpu", dtype="bfloat16", quant="int4")
    engine.load(shard(), SafetensorsSource(repos[repo]))
    model: Any = engine._model
    assert model is not None and engine._native is None
    for i in range(LAYERS):
        attn = model.model.layers[str(i)].self_attn
        assert isinstance(attn.qkv, Blocked)
        p = f"model.layers.{i}.self_attn."
        qkv = np.concatenate([weights[p + f"{n}_proj.weight"] for n in "qkv"])
        np.testing.assert_array_equal(attn.qkv.blocks.dequantize(), qkv)
    assert isinstance(model.head, Blocked)
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    np.testing.assert_array_equal(model.head.blocks.dequantize(), head)
    err = np.abs(logits(engine) - want).max() / np.abs(want).max()
    assert err < 3e-2, err  # bfloat16 activations between the projections


@pytest.mark.slow
@with_mlx
@pytest.mark.parametrize(("kind", "quant"), [("numpy", "none"), ("torch", "none")])
def test_bf16_dense_against_transformers(repos: dict, kind: str, quant: str) -> None:
    pytest.importorskip("transformers")
    want = mlx_repos.hf_logits(repos["hf-bf16"], TOKENS)
    engine = make_engine(kind, quant)
    engine.load(shard(), SafetensorsSource(repos["hf-bf16"]))
    err = np.abs(logits(engine) - want).max() / np.abs(want).max()
    assert err < 1e-4, err  # transformers' rotary and softmax in another order


@pytest.mark.slow
@with_mlx
@pytest.mark.parametrize("quant", ["none", "int4"])
def test_two_stages_equal_the_whole(repos: dict, quant: str) -> None:
    source = SafetensorsSource(repos["q4"])
    whole = NumpyEngine(quant=quant)
    whole.load(shard(), source)
    first, second = NumpyEngine(quant=quant), NumpyEngine(quant=quant)
    first.load(shard(0, 2), source)
    second.load(shard(2, 4), source)
    hidden = logits(first)
    split = second.forward([StepInput(RequestId("r"), hidden, 0)], all_logits=True)[0]
    np.testing.assert_array_equal(split, logits(whole))
