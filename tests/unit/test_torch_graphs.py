"""Decode steps at fixed shapes (what a CUDA graph replays) compute what eager steps compute."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from shoal.engines.base import StepInput  # noqa: E402
from shoal.engines.torch.engine import TorchEngine  # noqa: E402
from shoal.engines.torch.llama import Context  # noqa: E402
from shoal.types.ids import RequestId  # noqa: E402
from tests.helpers.tiny import VOCAB, shard, tiny_source  # noqa: E402

PROMPTS = {"a": 7, "b": 3}  # request → prompt length


def tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n)


def fixed_step(engine: TorchEngine, batch: list[StepInput]) -> list[np.ndarray]:
    """engine.forward of one token per item, through Context.fixed instead of sliced caches."""
    model, caches = engine._loaded()
    kv = [caches.get(item.request_id) for item in batch]
    for cache in kv:
        cache.reserve(cache.length + 1)
    x = torch.from_numpy(np.stack([item.data for item in batch]))  # [B, 1]
    positions = torch.tensor([[item.start] for item in batch])  # [B, 1]
    with torch.inference_mode():
        out = model(x, positions, Context.fixed(kv, positions), all_logits=False)
    for cache in kv:
        cache.advance(1)
    return list(out.float().numpy()[:, 0])


@pytest.mark.parametrize("variant", ["llama", "qwen3"])
def test_fixed_shape_decode_steps_equal_eager_ones(variant: str) -> None:
    eager, fixed = TorchEngine(device="cpu"), TorchEngine(device="cpu")
    for engine in (eager, fixed):
        engine.load(shard(), tiny_source(variant))
        for i, (rid, n) in enumerate(PROMPTS.items()):
            engine.forward([StepInput(RequestId(rid), tokens(n, i), 0)])
    lengths = dict(PROMPTS)
    for step in range(5):
        batch = [
            StepInput(RequestId(rid), tokens(1, 100 + 10 * step + i), lengths[rid])
            for i, rid in enumerate(lengths)
        ]
        want = eager.forward(batch)
        got = fixed_step(fixed, batch)
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
        lengths = {rid: n + 1 for rid, n in lengths.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_graphs_replay_what_eager_steps_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    graphed = TorchEngine(device="cuda")
    graphed.load(shard(), tiny_source("llama"))
    monkeypatch.setenv("SHOAL_CUDA_GRAPHS", "0")
    eager = TorchEngine(device="cuda")
    eager.load(shard(), tiny_source("llama"))
    assert graphed._graphs is not None and eager._graphs is None
    # "a" crosses its cache's first growth (256 positions): the graph is captured again
    lengths = {"a": 250, "b": 3}
    for engine in (graphed, eager):
        for i, (rid, n) in enumerate(lengths.items()):
            engine.forward([StepInput(RequestId(rid), tokens(n, i), 0)])
    for step in range(10):
        rids = list(lengths) if step < 8 else ["a"]  # "b" leaves: another batch, another graph
        batch = [
            StepInput(RequestId(rid), tokens(1, 100 + 10 * step + i), lengths[rid])
            for i, rid in enumerate(rids)
        ]
        for w, g in zip(eager.forward(batch), graphed.forward(batch), strict=True):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-4)
        lengths.update({rid: lengths[rid] + 1 for rid in rids})
    # 2 captures for the pair (capacity 256, then 512), 1 for "a" alone
    assert graphed._graphs.captured == 3
