"""qwen3_moe in the torch and numpy engines, and the mixture-of-experts pieces they share.

The model is a tiny random Qwen3MoeForCausalLM (tests/helpers/tiny.py "qwen3_moe": 8 experts,
top 2, renormalised, layer 1 dense). References: transformers' own forward and routers, and
mlx-lm's forward on 4-bit files mlx-lm wrote (in a child: mlx never runs in this process).
"""

import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.engines import native
from shoal.engines.args import ModelArgs
from shoal.engines.base import Engine, StepInput, WeightSource
from shoal.engines.native import engine as native_engine
from shoal.engines.native import model as native_model
from shoal.engines.numpy import moe as numpy_moe
from shoal.engines.numpy.engine import NumpyEngine
from shoal.engines.packed import Packed
from shoal.models.hub import RepoFile, RepoListing, files_for_layers
from shoal.models.safetensors import SafetensorsSource
from shoal.types.ids import ModelId, RequestId
from shoal.types.shard import Shard
from tests.helpers import mlx_repos
from tests.helpers.tiny import N_LAYERS, VOCAB, DictSource, hf_logits, shard

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from shoal.engines.torch import moe as torch_moe  # noqa: E402
from shoal.engines.torch.engine import TorchEngine  # noqa: E402
from tests.helpers.tiny import tiny_source  # noqa: E402

NO_MLX = importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx_lm") is None
with_mlx = pytest.mark.skipif(NO_MLX, reason="mlx is not installed (pip install 'mlx[cpu]' mlx-lm)")

VARIANT = "qwen3_moe"
PROMPT = np.frombuffer(b"The capital of France is Paris.", np.uint8).astype(np.int64) % VOCAB
ENGINES: dict[str, Callable[..., Engine]] = {
    "torch": lambda quant="none": TorchEngine(device="cpu", quant=quant),
    "numpy": lambda quant="none": NumpyEngine(quant=quant),
}


def load(kind: str, source: WeightSource, part: Shard | None = None, quant: str = "none") -> Any:
    engine = ENGINES[kind](quant)
    engine.load(part or shard(), source)
    return engine


def run(engine: Engine, data: np.ndarray, start: int = 0, rid: str = "r") -> np.ndarray:
    return engine.forward([StepInput(RequestId(rid), data, start)], all_logits=True)[0]


# -- routers -----------------------------------------------------------------------------------


def _sorted(idx: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's experts in ascending order, with their weights (the routers' order differs)."""
    order = np.argsort(idx, axis=-1)
    return np.take_along_axis(idx, order, -1), np.take_along_axis(weights, order, -1)


@pytest.mark.parametrize(("experts", "k", "norm"), [(8, 2, True), (8, 2, False), (128, 8, True)])
def test_route_softmax_equals_transformers(experts: int, k: int, norm: bool) -> None:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    cfg = Qwen3MoeConfig(
        hidden_size=experts, num_experts=experts, num_experts_per_tok=k, norm_topk_prob=norm
    )
    router = Qwen3MoeTopKRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(experts))  # its logits are its input
    logits = torch.randn(64, experts, generator=torch.Generator().manual_seed(experts + k))
    with torch.no_grad():
        _, want_w, want_idx = router(logits)
    want = _sorted(want_idx.numpy(), want_w.numpy())
    for idx, weights in (
        torch_moe.route_softmax(logits, k, norm),
        numpy_moe.route_softmax(logits.numpy(), k, norm),
    ):
        assert idx.dtype in (torch.int64, np.int64) and weights.dtype in (torch.float32, np.float32)
        got = _sorted(np.asarray(idx), np.asarray(weights))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("experts", "k", "n_group", "topk_group", "norm", "scaling"),
    [(16, 4, 4, 2, True, 2.5), (16, 2, 1, 1, False, 1.0), (64, 8, 8, 4, True, 2.827)],
)
def test_route_sigmoid_equals_transformers(
    experts: int, k: int, n_group: int, topk_group: int, norm: bool, scaling: float
) -> None:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(
        hidden_size=experts,
        n_routed_experts=experts,
        num_experts_per_tok=k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        routed_scaling_factor=scaling,
    )
    router = DeepseekV3TopkRouter(cfg)
    generator = torch.Generator().manual_seed(experts + k + n_group)
    bias = 0.5 * torch.randn(experts, generator=generator)  # it moves the choice, not the weights
    with torch.no_grad():
        router.weight.copy_(torch.eye(experts))
        router.e_score_correction_bias.copy_(bias)
    logits = torch.randn(64, experts, generator=generator)
    with torch.no_grad():
        _, want_w, want_idx = router(logits)
    want = _sorted(want_idx.numpy(), want_w.numpy())
    unbiased = _sorted(*map(np.asarray, torch_moe.route_softmax(logits, k, norm)))
    assert not np.array_equal(unbiased[0], want[0])  # the bias and the groups matter here
    args = (k, n_group, topk_group, norm, scaling)
    for idx, weights in (
        torch_moe.route_sigmoid(logits, bias, *args),
        numpy_moe.route_sigmoid(logits.numpy(), bias.numpy(), *args),
    ):
        got = _sorted(np.asarray(idx), np.asarray(weights))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-6)


# -- float32 against transformers --------------------------------------------------------------


@pytest.mark.parametrize("kind", list(ENGINES))
def test_float32_logits_equal_transformers(kind: str) -> None:
    want = hf_logits(VARIANT, PROMPT)
    got = run(load(kind, tiny_source(VARIANT)), PROMPT)
    assert np.abs(got - want).max() < 1e-3  # measured 2.1e-6 (torch 1.9e-6), logits ~4
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("kind", list(ENGINES))
def test_decoding_from_the_cache_equals_one_pass(kind: str) -> None:
    source = tiny_source(VARIANT)
    whole = run(load(kind, source), PROMPT)  # [T, vocab]
    engine = load(kind, source)
    t = len(PROMPT) - 3
    steps = [run(engine, PROMPT[:t])[-1]]  # a prefill, then one token at a time
    steps += [run(engine, PROMPT[i : i + 1], i)[0] for i in range(t, len(PROMPT))]
    np.testing.assert_allclose(np.stack(steps), whole[t - 1 :], rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", list(ENGINES))
@pytest.mark.parametrize("cuts", [(2,), (1, 3)])
def test_stages_concatenated_equal_the_whole(kind: str, cuts: tuple[int, ...]) -> None:
    source = tiny_source(VARIANT)
    whole = load(kind, source)
    bounds = [0, *cuts, N_LAYERS]
    stages = [load(kind, source, shard(a, b)) for a, b in zip(bounds, bounds[1:], strict=False)]
    prompt, step = PROMPT[:-1], PROMPT[-1:]
    for data, start in ((prompt, 0), (step, len(prompt))):  # a prefill, then a decode step
        h = data
        for stage in stages:
            h = run(stage, h, start)
        np.testing.assert_allclose(h, run(whole, data, start), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", list(ENGINES))
def test_a_batch_gives_each_request_what_it_gets_alone(kind: str) -> None:
    source = tiny_source(VARIANT)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, VOCAB, 9) for _ in range(4)]  # one length: torch batches them
    alone, together = load(kind, source), load(kind, source)
    want = [run(alone, p, rid=f"a{i}") for i, p in enumerate(prompts)]
    got = together.forward(
        [StepInput(RequestId(f"b{i}"), p, 0) for i, p in enumerate(prompts)], all_logits=True
    )
    steps = [np.array([int(w[-1].argmax())]) for w in want]
    want += [run(alone, s, 9, rid=f"a{i}") for i, s in enumerate(steps)]
    got += together.forward(
        [StepInput(RequestId(f"b{i}"), s, 9) for i, s in enumerate(steps)], all_logits=True
    )
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(g.argmax(-1), w.argmax(-1))
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-4)


# -- only the chosen experts run ---------------------------------------------------------------


def _watch_torch(engine: TorchEngine) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Record every Experts call's choices and every expert's (id, rows) as they run."""
    routes: list[np.ndarray] = []
    calls: list[tuple[int, int]] = []
    assert engine._model is not None
    for block in engine._model.model.layers.values():
        experts = getattr(block.mlp, "experts", None)
        if experts is None:
            continue
        experts.register_forward_hook(lambda _m, args, _o: routes.append(args[1].numpy()))
        for e, expert in enumerate(experts):
            expert.register_forward_hook(
                lambda _m, args, _o, e=e: calls.append((e, args[0].shape[0]))
            )
    return routes, calls


def _watch_numpy(engine: NumpyEngine) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    routes: list[np.ndarray] = []
    calls: list[tuple[int, int]] = []
    assert engine._model is not None
    for block in engine._model.layers.values():
        moe: Any = block.mlp
        experts = getattr(moe, "experts", None)
        if experts is None:
            continue
        route = experts.__call__

        def watched(x: np.ndarray, idx: np.ndarray, w: np.ndarray, route: Any = route) -> Any:
            routes.append(idx)
            return route(x, idx, w)

        moe.experts = watched
        for e, expert in enumerate(experts.experts):

            def counted(x: np.ndarray, e: int = e, expert: Any = expert) -> Any:
                calls.append((e, x.shape[0]))
                return expert(x)

            experts.experts[e] = counted
    return routes, calls


@pytest.mark.parametrize("kind", list(ENGINES))
def test_each_used_expert_runs_once_over_its_rows_and_no_other_runs(kind: str) -> None:
    engine = load(kind, tiny_source(VARIANT))
    watch = _watch_torch if kind == "torch" else _watch_numpy
    routes, calls = watch(engine)
    decode = [StepInput(RequestId(f"r{i}"), np.array([t]), 0) for i, t in enumerate(PROMPT[:3])]
    for batch in ([StepInput(RequestId("p"), PROMPT, 0)], decode):  # a prefill, then 3 rows
        routes.clear()
        calls.clear()
        engine.forward(batch)
        assert len(routes) == 3  # layers 0, 2, 3 route; layer 1 is dense
        expected = []
        for idx in routes:
            used, counts = np.unique(idx, return_counts=True)
            expected += list(zip(used.tolist(), counts.tolist(), strict=True))
        assert calls == expected
    # a decode step of 3 rows, top 2 of 8: at most 6 experts a layer, and these rows used fewer
    assert sum(n for _, n in calls) == 3 * 2 * 3
    assert len(calls) < 3 * 8


# -- the native engine: int8/int4 shards in one call a pass ------------------------------------

NATIVE_BUILDS = {"simd": False, "portable": True}


@pytest.fixture(params=list(NATIVE_BUILDS))
def native_build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The NativeEngine on the build for this CPU, then on the plain-C one (no AVX2)."""
    built = native.library(portable=NATIVE_BUILDS[request.param])
    if built is None:
        pytest.skip("the native kernels do not compile here")
    monkeypatch.setattr(native_engine, "library", lambda: built)
    return built


def native_load(source: WeightSource, part: Shard | None = None, quant: str = "int4") -> Any:
    engine = native_engine.NativeEngine(quant, threads=2)
    engine.load(part or shard(), source)
    return engine


def file_load(
    monkeypatch: pytest.MonkeyPatch,
    source: WeightSource,
    part: Shard | None = None,
    quant: str = "int4",
) -> NumpyEngine:
    """The numpy model file (qwen3_moe.py, moe.py) on the same block weights: no hand-off."""
    with monkeypatch.context() as m:
        m.setattr(native_engine, "runs", lambda quant, args: False)
        engine = load("numpy", source, part, quant)
    assert engine._native is None and engine._model is not None
    return engine


def variant(*, attention: bool = True, router: float | None = None, **config: Any) -> WeightSource:
    """The tiny qwen3_moe with o_proj zeroed (no attention: the layers are their feed-forwards
    alone), every router filled with `router` (ties), or config fields changed."""
    source = tiny_source(VARIANT)
    weights = dict(source.weights)
    for name in weights:
        if (not attention and name.endswith("o_proj.weight")) or (
            router is not None and name.endswith("mlp.gate.weight")
        ):
            weights[name] = np.full_like(weights[name], 0.0 if router is None else router)
    return DictSource(source.config.model_copy(update=config), weights)


# max |Δlogit| of the native pass against the numpy model file on the same blocks, logits ~3.5:
# the fp16 cache, float orders and the 15-bit activation rounding they move (measured int4
# 1.35e-3, int8 1.30e-3, either build; a dense qwen3 of this size differs by 1.1e-2 over logits
# ~45). Without attention, the feed-forwards alone: measured 8.1e-4 (int4), 1.9e-4 (int8); a
# routing that differs (top 1 for top 2, experts swapped) moves the logits by 1.0 to 2.4.
FILE_BOUND = 5e-3
FFN_BOUND = 2e-3


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_native_logits_equal_the_model_file_on_the_same_blocks(
    native_build: Any, monkeypatch: pytest.MonkeyPatch, quant: str
) -> None:
    source = tiny_source(VARIANT)
    got = run(native_load(source, quant=quant), PROMPT)
    want = run(file_load(monkeypatch, source, quant=quant), PROMPT)
    assert np.abs(got - want).max() < FILE_BOUND
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("quant", ["int4", "int8"])
@pytest.mark.parametrize(
    "config",
    [{}, {"norm_topk_prob": False}, {"experts_per_token": 3}],
)
def test_native_feed_forwards_equal_the_model_files(
    native_build: Any, monkeypatch: pytest.MonkeyPatch, quant: str, config: dict[str, Any]
) -> None:
    source = variant(attention=False, **config)
    got = run(native_load(source, quant=quant), PROMPT)
    want = run(file_load(monkeypatch, source, quant=quant), PROMPT)
    assert np.abs(got - want).max() < FFN_BOUND
    top1 = run(file_load(monkeypatch, variant(attention=False, experts_per_token=1)), PROMPT)
    assert np.abs(top1 - want).max() > 100 * FFN_BOUND  # the bound tells routings apart


@pytest.mark.parametrize("norm", [True, False])
def test_native_router_ties_go_to_the_lower_index(
    native_build: Any, monkeypatch: pytest.MonkeyPatch, norm: bool
) -> None:
    """A router of zeros: every logit ties, so every row takes experts 0 and 1, as a stable
    argsort does (weights 1/2 renormalised, 1/8 otherwise)."""
    source = variant(attention=False, router=0.0, norm_topk_prob=norm)
    got = run(native_load(source), PROMPT)
    want = run(file_load(monkeypatch, source), PROMPT)
    assert np.abs(got - want).max() < FFN_BOUND
    engine = file_load(monkeypatch, source)
    assert engine._model is not None
    for index in (0, 2, 3):  # the same model with experts 0 and 1 swapped for 6 and 7
        experts = engine._model.layers[index].mlp.experts.experts  # type: ignore[attr-defined]
        experts[0], experts[1], experts[6], experts[7] = (
            experts[6],
            experts[7],
            experts[0],
            experts[1],
        )
    assert np.abs(run(engine, PROMPT) - want).max() > 100 * FFN_BOUND


def test_native_dense_layers_of_a_moe_model_stay_dense(native_build: Any) -> None:
    engine = native_load(tiny_source(VARIANT))
    layers = engine._model.decoder._keep
    assert [layer.experts is None for layer in layers] == [False, True, False, False]
    assert layers[1].gate_up.n == 2 * 128 and layers[0].experts.gate_up[0].n == 2 * 64
    alone = native_load(tiny_source(VARIANT), shard(1, 2))  # a stage of the dense layer alone
    h = np.random.default_rng(5).standard_normal((5, 128)).astype(np.float32)
    assert alone._model.decoder._keep[0].experts is None
    assert np.isfinite(run(alone, h)).all()


def test_native_batch_gives_each_request_the_bits_it_gets_alone(native_build: Any) -> None:
    source = tiny_source(VARIANT)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, VOCAB, n) for n in (9, 4, 13, 1)]
    alone, together = native_load(source), native_load(source)
    want = [run(alone, p, rid=f"a{i}") for i, p in enumerate(prompts)]
    got = together.forward(
        [StepInput(RequestId(f"b{i}"), p, 0) for i, p in enumerate(prompts)], all_logits=True
    )
    steps = [np.array([int(w[-1].argmax())]) for w in want]
    starts = [len(p) for p in prompts]
    want += [
        run(alone, s, t, rid=f"a{i}") for i, (s, t) in enumerate(zip(steps, starts, strict=True))
    ]
    decode = [
        StepInput(RequestId(f"b{i}"), s, t)
        for i, (s, t) in enumerate(zip(steps, starts, strict=True))
    ]
    got += together.forward(decode, all_logits=True)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("cuts", [(2,), (1, 3)])
def test_native_stages_concatenated_give_the_bits_of_the_whole(
    native_build: Any, cuts: tuple[int, ...]
) -> None:
    source = tiny_source(VARIANT)
    whole = native_load(source)
    bounds = [0, *cuts, N_LAYERS]
    stages = [native_load(source, shard(a, b)) for a, b in zip(bounds, bounds[1:], strict=False)]
    prompt, step = PROMPT[:-1], PROMPT[-1:]
    for data, start in ((prompt, 0), (step, len(prompt))):  # a prefill, then a decode step
        h = data
        for stage in stages:
            h = run(stage, h, start)
        np.testing.assert_array_equal(h, run(whole, data, start))


@pytest.mark.parametrize("kind", list(ENGINES))
@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_torch_and_numpy_hand_int_shards_to_native(
    native_build: Any, kind: str, quant: str
) -> None:
    engine = load(kind, tiny_source(VARIANT), quant=quant)
    assert engine._native is not None
    assert native_engine.runs(quant, ModelArgs.from_config(tiny_source(VARIANT).config))


def test_native_supports_qwen3_moe_in_whole_blocks_only() -> None:
    base = ModelArgs.from_config(tiny_source(VARIANT).config)
    assert native_model.supports(base)
    assert not native_model.supports(replace(base, moe_intermediate_size=48))
    assert not native_model.supports(replace(base, intermediate_size=100))  # layer 1 is dense
    assert native_model.supports(replace(base, intermediate_size=100, mlp_only_layers=()))
    assert not native_model.supports(replace(base, model_type="deepseek_v3"))


# -- checkpoints: transformers' save_pretrained, mlx-lm's 4-bit files, a stage's files -----------


@pytest.mark.parametrize("original", [True, False])
def test_save_pretrained_files_load_as_the_model(tmp_path: Path, original: bool) -> None:
    """transformers 5 writes experts one per name by default, stacked (`mlp.experts.gate_up_proj`)
    without save_original_format: either becomes one matrix per expert."""
    from safetensors import safe_open

    from tests.helpers.tiny import tiny_hf

    tiny_hf(VARIANT).save_pretrained(tmp_path, save_original_format=original)
    with safe_open(tmp_path / "model.safetensors", "np") as f:
        stacked = "model.layers.0.mlp.experts.gate_up_proj" in set(f.keys())
    assert stacked is not original
    source = SafetensorsSource(tmp_path)
    tensors = source.tensors(shard())
    gate = tensors["model.layers.0.mlp.experts.3.gate_proj.weight"]
    assert isinstance(gate, np.ndarray) and gate.shape == (64, 128)
    np.testing.assert_array_equal(
        gate, tiny_source(VARIANT).weights["model.layers.0.mlp.experts.3.gate_proj.weight"]
    )
    if not original:  # views of the stacked array, not copies
        up = tensors["model.layers.0.mlp.experts.3.up_proj.weight"]
        assert isinstance(up, np.ndarray)
        assert gate.base is not None and gate.base is up.base and gate.base.ndim == 3
    got = run(load("numpy", source), PROMPT)
    assert np.abs(got - hf_logits(VARIANT, PROMPT)).max() < 1e-3


# mlx-lm keeps the routers 8-bit (its quant_predicate); one layer's experts' down_proj 8-bit too
OVERRIDES: dict[str, int | bool] = {
    **{f"model.layers.{i}.mlp.gate": 8 for i in (0, 2, 3)},
    "model.layers.2.mlp.switch_mlp.down_proj": 8,
}
MLX_TOKENS = np.random.default_rng(3).integers(0, 256, 16)
# max |Δlogit| against mlx-lm in float32 over logits of max ~3.7 (measured: torch 5.2e-4,
# numpy 6.9e-4 int4 blocks; 2.7e-6 float32)
MLX_BOUND = {"int4": 2e-3, "none": 1e-5}


@pytest.fixture(scope="module")
def mlx_q4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, dict]:
    """A 4-bit qwen3_moe written by mlx-lm, its float32 logits and dequantized weights."""
    root = tmp_path_factory.mktemp("moe")
    repo = mlx_repos.make_mlx_repo(
        root / "q4", 4, config=mlx_repos.qwen3_moe_config(N_LAYERS), overrides=OVERRIDES
    )
    want, weights = mlx_repos.mlx_reference(repo, MLX_TOKENS, root / "ref")
    return repo, want, weights


@pytest.mark.slow
@with_mlx
def test_mlx_switch_mlp_becomes_packed_experts_exactly(mlx_q4: tuple) -> None:
    repo, _, weights = mlx_q4
    tensors = SafetensorsSource(repo).tensors(shard())
    experts = [n for n in weights if ".experts." in n]
    assert len(experts) == 3 * 8 * 3  # every routed layer's experts, each its own matrix
    for name, want in weights.items():
        got = tensors[name]
        assert isinstance(got, Packed), name
        np.testing.assert_array_equal(got.dequantize(), want)
    down = tensors["model.layers.2.mlp.experts.5.down_proj.weight"]
    gate = tensors["model.layers.0.mlp.gate.weight"]
    assert isinstance(down, Packed) and isinstance(gate, Packed)
    assert (down.bits, gate.bits) == (8, 8)  # the overrides name switch_mlp and gate modules
    siblings = tensors["model.layers.2.mlp.experts.4.down_proj.weight"]
    assert isinstance(siblings, Packed) and down.weight.base is siblings.weight.base


@pytest.mark.slow
@with_mlx
@pytest.mark.parametrize("kind", list(ENGINES))
@pytest.mark.parametrize("quant", ["int4", "none"])
def test_mlx_4bit_logits_equal_mlx_lm(mlx_q4: tuple, kind: str, quant: str) -> None:
    repo, want, _ = mlx_q4
    engine = load(kind, SafetensorsSource(repo), quant=quant)
    if quant == "int4":  # the native engine, taking MLX's integers as they are
        if native.library() is None:
            pytest.skip("the native block kernels do not compile here")
        assert engine._native is not None
        layers = engine._native._model.decoder._keep
        kinds = [
            [m.kind for m in (e.gate_up[5], e.down[5])]
            for e in (layers[0].experts, layers[2].experts)
        ]
        assert kinds == [["q4", "q4"], ["q4", "q8"]]  # layer 2's 8-bit down_proj kept 8-bit
    got = run(engine, MLX_TOKENS)
    assert np.abs(got - want).max() < MLX_BOUND[quant]
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


@pytest.fixture(scope="module")
def mlx_bf16(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """An unquantized qwen3_moe written by mlx-lm (stacked bf16 experts), its float32 logits."""
    root = tmp_path_factory.mktemp("moe-bf16")
    repo = mlx_repos.make_mlx_repo(
        root / "bf16", None, config=mlx_repos.qwen3_moe_config(N_LAYERS), seed=1
    )
    return repo, mlx_repos.mlx_logits(repo, MLX_TOKENS, root / "logits.npy")


@pytest.mark.slow
@with_mlx
@pytest.mark.parametrize("kind", list(ENGINES))
def test_mlx_bf16_switch_mlp_logits_equal_mlx_lm(mlx_bf16: tuple, kind: str) -> None:
    """Stacked float experts split into views, one matrix per expert."""
    repo, want = mlx_bf16
    got = run(load(kind, SafetensorsSource(repo)), MLX_TOKENS)
    assert np.abs(got - want).max() < MLX_BOUND["none"]


def test_a_stage_needs_only_its_files(tmp_path: Path) -> None:
    """files_for_layers picks a stage's shard files by the experts' names too, and the stage
    loads from those alone."""
    repo = mlx_repos.make_hf_repo(
        tmp_path / "repo", config=mlx_repos.qwen3_moe_config(N_LAYERS), files=4
    )
    listing = RepoListing(
        "org/moe",
        "a" * 40,
        tuple(RepoFile(f.name, f.stat().st_size, None, "b" * 40) for f in sorted(repo.iterdir())),
    )
    whole = load("numpy", SafetensorsSource(repo))
    h = MLX_TOKENS
    for start, end in ((0, 2), (2, 4)):
        files = files_for_layers(listing, repo, start, end, N_LAYERS)
        weights = [f for f in files if f.endswith(".safetensors")]
        assert len(weights) == 2
        stage_dir = tmp_path / f"stage{start}"
        stage_dir.mkdir()
        for f in files:
            shutil.copy(repo / f, stage_dir / f)
        part = Shard(model_id=ModelId("m"), start=start, end=end, n_layers=N_LAYERS)
        h = run(load("numpy", SafetensorsSource(stage_dir), part), h)
    np.testing.assert_allclose(h, run(whole, MLX_TOKENS), rtol=0, atol=1e-5)
