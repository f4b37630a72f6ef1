"""granite and phi3 in the torch, numpy and native engines, against transformers and mlx-lm.

Both run as llama once their checkpoints are adapted (engines/adapt.py); phi3's LongRoPE picks its
frequencies per pass, as transformers does: the short factors while a pass stays within the
original context, the long ones for a pass that reaches it, keys already cached keeping theirs.
The whole-model and two-shard comparisons with transformers run for these variants in
test_torch_vs_transformers.py and test_numpy_engine.py (tests/helpers/tiny.py VARIANTS).
"""

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.engines.base import Engine, StepInput
from shoal.engines.numpy.engine import NumpyEngine
from shoal.models.safetensors import SafetensorsSource
from shoal.types.ids import ModelId, RequestId
from shoal.types.model_config import ModelConfig
from shoal.types.shard import Shard
from tests.helpers import mlx_repos
from tests.helpers.tiny import N_LAYERS, VARIANTS, VOCAB, shard, tiny_hf, tiny_source

pytest.importorskip("torch")
pytest.importorskip("transformers")

from shoal.engines.torch.engine import TorchEngine  # noqa: E402

ORIGINAL = 32  # the tiny phi3's original context (tests/helpers/tiny.py)
FLOAT_ATOL = 1e-4
NO_MLX = importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx_lm") is None
with_mlx = pytest.mark.skipif(NO_MLX, reason="mlx is not installed (pip install 'mlx[cpu]' mlx-lm)")
ENGINES: dict[str, Callable[[], Engine]] = {
    "torch": lambda: TorchEngine(device="cpu"),
    "numpy": lambda: NumpyEngine(),
    "torch-int8": lambda: TorchEngine(device="cpu", quant="int8"),  # the native engine
    "numpy-int4": lambda: NumpyEngine(quant="int4"),  # the native engine
}


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n)


def step(rid: str, data: np.ndarray, start: int) -> StepInput:
    return StepInput(RequestId(rid), data, start)


def last(logits: np.ndarray) -> np.ndarray:
    """The last row's logits [vocab] of an engine's output ([vocab] or [T, vocab])."""
    return logits.reshape(-1, VOCAB)[-1]


def load(kind: str, variant: str, start: int = 0, end: int = N_LAYERS) -> Engine:
    engine: Engine = ENGINES[kind]()
    engine.load(shard(start, end), tiny_source(variant))
    return engine


def hf_steps(variant: str, prompt: np.ndarray, then: np.ndarray) -> list[np.ndarray]:
    """transformers' logits [vocab] after the prompt, then after each token of `then` fed one at
    a time through its cache."""
    import torch
    from transformers import DynamicCache

    model = tiny_hf(variant)
    cache = DynamicCache(config=model.config)
    out = []
    with torch.no_grad():
        ids = torch.from_numpy(prompt.astype(np.int64))[None]
        out.append(model(ids, past_key_values=cache, use_cache=True).logits[0, -1].numpy())
        for i, token in enumerate(then):
            position = torch.tensor([[len(prompt) + i]])
            ids = torch.tensor([[int(token)]])
            logits = model(ids, past_key_values=cache, position_ids=position, use_cache=True)
            out.append(logits.logits[0, -1].numpy())
    return out


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_longrope_decoding_across_the_original_context_matches_transformers(kind: str) -> None:
    """A prompt within the original context, then decode steps past it: each step's logits are
    transformers' (short factors for the prompt's keys, long for the steps that reach 32)."""
    prompt, then = tokens(ORIGINAL - 4), tokens(8, seed=1)
    want = hf_steps("phi3", prompt, then)
    engine = load(kind, "phi3")
    got = [last(engine.forward([step("r", prompt, 0)])[0])]
    for i, token in enumerate(then):
        got.append(last(engine.forward([step("r", np.array([token]), len(prompt) + i)])[0]))
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(g, w, rtol=0, atol=FLOAT_ATOL, err_msg=f"step {i}")


def test_the_long_factors_are_used_past_the_original_context() -> None:
    """The same prompt past the original context differs with the short factors: the test above
    would notice a model that never switched."""
    config = tiny_source("phi3").config
    scaling = dict(config.rope_scaling or {})
    scaling["long_factor"] = scaling["short_factor"]
    short_only = config.model_copy(update={"rope_scaling": scaling})
    source = tiny_source("phi3")
    engine = TorchEngine(device="cpu")
    engine.load(shard(), type(source)(short_only, source.weights))
    prompt = tokens(ORIGINAL + 8)
    got = engine.forward([step("r", prompt, 0)], all_logits=True)[0]
    want = load("torch", "phi3").forward([step("r", prompt, 0)], all_logits=True)[0]
    assert np.abs(got - want).max() > 1e-2


@pytest.mark.parametrize("kind", list(ENGINES))
@pytest.mark.parametrize("variant", ["granite", "phi3"])
def test_four_requests_batched_equal_each_alone(kind: str, variant: str) -> None:
    """Four prompts, two of them past phi3's original context, prefilled as one batch and then
    decoded as one batch, give each request what it gets alone."""
    prompts = [tokens(n, seed=n) for n in (5, 20, ORIGINAL + 3, ORIGINAL + 10)]
    batched = load(kind, variant)
    together = batched.forward([step(f"r{i}", p, 0) for i, p in enumerate(prompts)])
    nexts = [np.array([int(last(out).argmax())]) for out in together]
    after = batched.forward(
        [step(f"r{i}", n, len(p)) for i, (p, n) in enumerate(zip(prompts, nexts, strict=True))]
    )
    for i, prompt in enumerate(prompts):
        alone = load(kind, variant)
        first = alone.forward([step("a", prompt, 0)])[0]
        second = alone.forward([step("a", nexts[i], len(prompt))])[0]
        np.testing.assert_allclose(together[i], first, rtol=0, atol=FLOAT_ATOL)
        np.testing.assert_allclose(after[i], second, rtol=0, atol=FLOAT_ATOL)


@pytest.mark.parametrize("kind", list(ENGINES))
@pytest.mark.parametrize("variant", ["granite", "phi3"])
def test_three_stages_equal_the_whole(kind: str, variant: str) -> None:
    prompt = tokens(ORIGINAL + 4)
    whole = load(kind, variant).forward([step("r", prompt, 0)], all_logits=True)[0]
    h = prompt
    for start, end in ((0, 1), (1, 3), (3, N_LAYERS)):
        h = load(kind, variant, start, end).forward([step("r", h, 0)], all_logits=True)[0]
    np.testing.assert_allclose(h, whole, rtol=0, atol=FLOAT_ATOL)


def test_config_values_are_read_from_config_json() -> None:
    """granite's multipliers and phi3's LongRoPE with what transformers derives from them."""
    granite = tiny_source("granite").config
    assert (granite.embedding_multiplier, granite.residual_multiplier) == (12.0, 0.22)
    assert (granite.attention_multiplier, granite.logits_scaling) == (0.015625, 8.0)
    phi3 = ModelConfig.from_hf(tiny_hf("phi3").config.to_dict())
    scaling = phi3.rope_scaling or {}
    assert scaling["rope_type"] == "longrope"
    assert scaling["original_max_position_embeddings"] == ORIGINAL
    factor = 256 / ORIGINAL  # max_position_embeddings / original: transformers' default
    assert scaling["attention_factor"] == pytest.approx(
        float(np.sqrt(1 + np.log(factor) / np.log(ORIGINAL)))
    )


# -- MLX 4-bit files, against mlx-lm's forward ------------------------------------------------

MLX_LAYERS = 3
MLX_TOKENS = np.random.default_rng(5).integers(0, 256, 40)  # past phi3's original context
BLOCK_BOUND = 2e-3  # relative; every weight packed, held exactly in blocks (as for llama)
FLOAT_BOUND = 1e-5


def mlx_config(variant: str) -> dict[str, Any]:
    """A config.json of the variant with mlx_repos' tiny llama's shape (groups of 64 fit).

    mlx-lm's phi3 always rotates with the long factors; the prompt reaches past the original
    context, where transformers (and shoal) use them too."""
    config = mlx_repos.hf_config(MLX_LAYERS, tie=variant == "granite")
    model_type, overrides = VARIANTS[variant]
    config.update(overrides, model_type=model_type, architectures=[])
    config.update(attention_bias=False, mlp_bias=False)  # mlx-lm's granite asks for them
    if variant == "phi3":
        half = config["head_dim"] // 2
        rope = dict(overrides["rope_scaling"])
        rope["short_factor"] = list(np.linspace(1.0, 2.0, half))
        rope["long_factor"] = list(np.linspace(1.0, 9.0, half))
        config.update(rope_scaling=rope, num_key_value_heads=config["num_attention_heads"])
    return config


@pytest.fixture(scope="module")
def mlx_repos_and_logits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("granite-phi3")
    out: dict[str, Any] = {}
    for variant in ("granite", "phi3"):
        path = mlx_repos.make_mlx_repo(root / variant, 4, config=mlx_config(variant))
        want = mlx_repos.mlx_logits(path, MLX_TOKENS, root / f"{variant}.npy")
        out[variant] = (path, want)
    return out


@pytest.mark.slow
@with_mlx
@pytest.mark.parametrize("kind", ["torch", "numpy", "torch-int4", "numpy-int4"])
@pytest.mark.parametrize("variant", ["granite", "phi3"])
def test_mlx_4bit_files_against_mlx_lm(
    mlx_repos_and_logits: dict[str, Any], kind: str, variant: str
) -> None:
    path, want = mlx_repos_and_logits[variant]
    engine: Engine
    if kind.startswith("torch"):
        engine = TorchEngine(device="cpu", quant="int4" if kind.endswith("int4") else "none")
    else:
        engine = NumpyEngine(quant="int4" if kind.endswith("int4") else "none")
    n_layers = MLX_LAYERS
    engine.load(Shard(model_id=ModelId("m"), start=0, end=n_layers, n_layers=n_layers),
                SafetensorsSource(Path(path)))  # fmt: skip
    got = engine.forward([step("r", MLX_TOKENS, 0)], all_logits=True)[0]
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < (BLOCK_BOUND if kind.endswith("int4") else FLOAT_BOUND), err
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_a_partially_rotated_head_is_refused() -> None:
    """phi4-mini (phi3 with partial_rotary_factor 0.75) is refused by name, not run wrong."""
    from shoal.engines.args import ModelArgs
    from shoal.errors import UnsupportedModel

    config = tiny_hf("phi3").config.to_dict()
    config["rope_parameters"] = {**config["rope_parameters"], "partial_rotary_factor": 0.75}
    with pytest.raises(UnsupportedModel, match="partial_rotary_factor 0.75"):
        ModelArgs.from_config(ModelConfig.from_hf(config))
