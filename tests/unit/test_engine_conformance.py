"""One conformance suite for every engine backend, on a tiny random 4-layer model.

Each case runs the same checks: output shapes and dtypes, decoding from the cache equals one
pass over all tokens, chunked prefill, batches of mixed lengths, two shards passing raw float32
bytes equal the whole model, and free() restarting a request.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from shoal.engines.base import Engine, StepInput, WeightSource
from shoal.engines.registry import available_engines, create_engine
from shoal.errors import BadRequest
from shoal.types.ids import RequestId
from tests.helpers.isolate import native_here
from tests.helpers.tiny import HIDDEN, N_LAYERS, VOCAB, DictSource, shard, tiny_config

ATOL = 1e-4


@dataclass
class Case:
    """An engine backend and the tiny model it runs."""

    engine: str
    source: WeightSource
    exact: bool  # the fake engine is bit-identical however the work is cut
    options: dict[str, str] = field(default_factory=dict)  # engine constructor options

    def load(self, start: int = 0, end: int = N_LAYERS) -> Engine:
        engine = create_engine(self.engine, **self.options)
        engine.load(shard(start, end), self.source)
        return engine

    def close(self, a: np.ndarray, b: np.ndarray) -> None:
        if self.exact:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=0, atol=ATOL)


def _fake() -> Case:
    return Case("fake", DictSource(tiny_config(), {}), exact=True)


def _torch(variant: str, quant: str = "none") -> Callable[[], Case]:
    def make() -> Case:
        pytest.importorskip("transformers")
        from tests.helpers.tiny import tiny_source

        return Case("torch", tiny_source(variant), exact=False, options={"quant": quant})

    return make


def _other(engine: str, variant: str, quant: str | None = None) -> Callable[[], Case]:
    """An engine checked against the same tiny model the torch cases use."""

    def make() -> Case:
        pytest.importorskip("transformers")
        from tests.helpers.tiny import tiny_source

        options = {} if quant is None else {"quant": quant}
        return Case(engine, tiny_source(variant), exact=False, options=options)

    return make


def _cuda(variant: str, quant: str = "none") -> Callable[[], Case]:
    """The torch engine on an NVIDIA GPU; skipped cleanly where there is none (CI)."""

    def make() -> Case:
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device on this machine")
        pytest.importorskip("transformers")
        from tests.helpers.tiny import tiny_source

        options = {"device": "cuda", "quant": quant}
        return Case("torch", tiny_source(variant), exact=False, options=options)

    return make


CASES = {
    "fake": _fake,
    "torch-llama": _torch("llama"),
    "torch-qwen3": _torch("qwen3"),
    # Quantized weights: every path through the engine must still agree with every other.
    "torch-fp16-llama": _torch("llama", "fp16"),
    "torch-int8-qwen3": _torch("qwen3", "int8"),
    "torch-int4-llama": _torch("llama", "int4"),
    "torch-int4-qwen2": _torch("qwen2", "int4"),  # q/k/v bias through the native decoder
    "numpy-llama": _other("numpy", "llama"),
    "numpy-qwen3": _other("numpy", "qwen3"),
    "numpy-int4-llama": _other("numpy", "llama", quant="int4"),
    "numpy-int8-qwen3": _other("numpy", "qwen3", quant="int8"),
    "numpy-int4-qwen2": _other("numpy", "qwen2", quant="int4"),
    # granite's multipliers and phi3's fused projections and LongRoPE, adapted at load
    "torch-granite": _torch("granite"),
    "torch-int4-phi3": _torch("phi3", "int4"),
    "numpy-phi3": _other("numpy", "phi3"),
    "numpy-int8-granite": _other("numpy", "granite", quant="int8"),
    "mlx-llama": _other("mlx", "llama"),
    "mlx-qwen3": _other("mlx", "qwen3"),
    "torch-cuda-llama": _cuda("llama"),
    "torch-cuda-int8-llama": _cuda("llama", "int8"),
    "torch-cuda-int4-qwen3": _cuda("qwen3", "int4"),
}


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    engine = request.param.split("-")[0]
    if engine not in available_engines():
        pytest.skip(f"{request.param}: framework not installed")
    if engine == "mlx" and not native_here():  # native code: a crash would end the whole run
        pytest.skip(f"{request.param}: runs in a child (test_mlx_engine.py)")
    return CASES[request.param]()


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n)


def step(rid: str, data: np.ndarray, start: int) -> StepInput:
    return StepInput(request_id=RequestId(rid), data=data, start=start)


def wire(hidden: np.ndarray) -> np.ndarray:
    """A hidden state as the next stage receives it: raw float32 bytes."""
    return np.frombuffer(hidden.astype(np.float32).tobytes(), dtype=np.float32).reshape(-1, HIDDEN)


def test_shapes_and_dtypes(case: Case) -> None:
    whole, head, tail = case.load(), case.load(0, 2), case.load(2, N_LAYERS)
    (last,) = whole.forward([step("a", tokens(5), 0)])
    (every,) = whole.forward([step("b", tokens(5), 0)], all_logits=True)
    (hidden,) = head.forward([step("a", tokens(5), 0)])
    (one,) = head.forward([step("a", tokens(1), 5)])
    (logits,) = tail.forward([step("a", wire(hidden), 0)])
    assert last.shape == (VOCAB,) and every.shape == (5, VOCAB)
    assert hidden.shape == (5, HIDDEN) and one.shape == (1, HIDDEN) and logits.shape == (VOCAB,)
    for out in (last, every, hidden, one, logits):
        assert out.dtype == np.float32 and np.isfinite(out).all()
    case.close(last, logits)


def test_decoding_from_cache_equals_one_pass(case: Case) -> None:
    seq = tokens(12)
    (full,) = case.load().forward([step("full", seq, 0)], all_logits=True)
    engine = case.load()
    got = [engine.forward([step("r", seq[:5], 0)])[0]]
    got += [engine.forward([step("r", seq[i : i + 1], i)])[0] for i in range(5, 12)]
    case.close(np.stack(got), full[4:])


def test_chunked_prefill_equals_prefill_at_once(case: Case) -> None:
    seq = tokens(12, seed=1)
    engine = case.load()
    (full,) = engine.forward([step("full", seq, 0)], all_logits=True)
    parts, start = [], 0
    for size in (3, 4, 5):
        parts += engine.forward(
            [step("chunked", seq[start : start + size], start)], all_logits=True
        )
        start += size
    case.close(np.concatenate(parts), full)


def test_batch_of_mixed_lengths_equals_each_alone(case: Case) -> None:
    prompts = {"a": tokens(5, 1), "b": tokens(9, 2), "c": tokens(1, 3), "d": tokens(5, 4)}
    batched, alone = case.load(), case.load()
    out = batched.forward([step(r, p, 0) for r, p in prompts.items()], all_logits=True)
    for (rid, prompt), got in zip(prompts.items(), out, strict=True):
        case.close(got, alone.forward([step(rid, prompt, 0)], all_logits=True)[0])
    # Decode: one token each, at different positions, in one batch.
    nxt = {rid: tokens(1, 10 + i) for i, rid in enumerate(prompts)}
    out = batched.forward([step(r, nxt[r], len(p)) for r, p in prompts.items()])
    for (rid, prompt), got in zip(prompts.items(), out, strict=True):
        case.close(got, alone.forward([step(rid, nxt[rid], len(prompt))])[0])


def test_shards_concatenated_equal_whole(case: Case) -> None:
    seqs = {"a": tokens(10, 5), "b": tokens(7, 6)}
    whole, head, tail = case.load(), case.load(0, 2), case.load(2, N_LAYERS)

    def both(items: dict[str, tuple[np.ndarray, int]]) -> None:
        want = whole.forward([step(r, d, s) for r, (d, s) in items.items()], all_logits=True)
        hidden = head.forward([step(r, d, s) for r, (d, s) in items.items()])
        got = tail.forward(
            [step(r, wire(h), s) for (r, (_, s)), h in zip(items.items(), hidden, strict=True)],
            all_logits=True,
        )
        for g, w in zip(got, want, strict=True):
            case.close(g, w)

    both({"a": (seqs["a"][:6], 0), "b": (seqs["b"][:3], 0)})  # prefill
    both({"a": (seqs["a"][6:], 6), "b": (seqs["b"][3:], 3)})  # a second chunk
    for i in range(3):  # decode
        both({"a": (tokens(1, 20 + i), 10 + i), "b": (tokens(1, 30 + i), 7 + i)})


def test_free_drops_the_cache(case: Case) -> None:
    engine = case.load()
    seq = tokens(5)
    (first,) = engine.forward([step("r", seq, 0)])
    for wrong in (0, 3, 6):  # the cache holds exactly 5 positions
        with pytest.raises(ValueError):
            engine.forward([step("r", seq[:1], wrong)])
    engine.free(RequestId("r"))
    engine.free(RequestId("never-seen"))
    with pytest.raises(ValueError):
        engine.forward([step("r", seq[:1], 5)])
    (again,) = engine.forward([step("r", seq, 0)])
    case.close(again, first)


def test_malformed_steps_are_refused_without_side_effects(case: Case) -> None:
    engine, tail = case.load(), case.load(2, N_LAYERS)
    good = step("ok", tokens(3), 0)
    for bad in (
        [good, step("ok", tokens(3), 0)],  # the same request twice
        [good, step("x", np.zeros((3, HIDDEN), np.float32), 0)],  # hidden into the first shard
        [good, step("x", np.array([VOCAB]), 0)],  # token outside the vocabulary
    ):
        with pytest.raises(ValueError):
            engine.forward(bad)
    engine.forward([good])  # "ok" was not advanced by the refused batches
    with pytest.raises(ValueError):
        tail.forward([step("x", tokens(3), 0)])  # ids into a later shard


def test_load_reports_progress_per_layer(case: Case) -> None:
    seen: list[tuple[int, int]] = []
    create_engine(case.engine).load(shard(1, 3), case.source, lambda d, t: seen.append((d, t)))
    assert seen[-1] == (2, 2) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_registry() -> None:
    assert "fake" in available_engines()
    assert create_engine("fake", vocab_size=8, hidden_size=4).name == "fake"
    with pytest.raises(BadRequest, match="fake"):
        create_engine("no-such-engine")
