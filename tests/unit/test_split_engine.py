"""A stage over two devices in one runner (engines/split.py): it answers as one engine does."""

from collections.abc import Callable

import numpy as np
import pytest

from shoal.engines.base import Engine, StepInput
from shoal.engines.registry import create_engine
from shoal.engines.split import SplitEngine
from shoal.types.ids import ModelId, RequestId
from shoal.types.model_config import ModelConfig
from shoal.worker.pipe import RunnerConfig
from shoal.worker.runner import build, running
from tests.helpers.tiny import N_LAYERS, VOCAB, shard, tiny_source

pytestmark = pytest.mark.timeout(120)
pytest.importorskip("transformers")


def step(rid: str, data: np.ndarray, start: int) -> StepInput:
    return StepInput(request_id=RequestId(rid), data=data, start=start)


def cuda_or_skip() -> str:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    return "cuda:0"


def greedy(engine: Engine, prompt: np.ndarray, steps: int) -> list[int]:
    out, data, start = [], prompt, 0
    for _ in range(steps):
        logits = engine.forward([step("r", data, start)])[0]
        out.append(int(logits.argmax()))
        start, data = start + len(data), np.array([out[-1]])
    engine.free(RequestId("r"))
    return out


def torch_on(device: str, quant: str = "none") -> Callable[[], Engine]:
    return lambda: create_engine("torch", device=device, quant=quant)


@pytest.mark.parametrize(
    ("first", "quant"),
    [("cpu", "none"), ("cpu", "int4"), ("cuda", "none"), ("cuda", "int8")],
)
def test_device_then_cpu_answers_like_the_cpu_alone(first: str, quant: str) -> None:
    device = cuda_or_skip() if first == "cuda" else "cpu"
    source = tiny_source("llama")
    alone = create_engine("torch", device="cpu", quant=quant)
    alone.load(shard(), source)
    split = SplitEngine([(torch_on(device, quant)(), 3), (torch_on("cpu", quant)(), 1)])
    seen: list[tuple[int, int]] = []
    split.load(shard(), source, lambda done, total: seen.append((done, total)))
    assert seen[-1] == (N_LAYERS, N_LAYERS) and all(t == N_LAYERS for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    prompt = np.random.default_rng(0).integers(0, VOCAB, 9)
    assert greedy(split, prompt, 8) == greedy(alone, prompt, 8)
    # a batch of two requests of different lengths: each row as the whole engine gives it
    batch = [step("a", prompt, 0), step("b", prompt[:4], 0)]
    tol = 1e-4 if quant == "none" and first == "cpu" else 5e-2
    for got, want in zip(split.forward(batch), alone.forward(batch), strict=True):
        np.testing.assert_allclose(got, want, atol=tol * max(1.0, float(np.abs(want).max())))
    split.close()
    alone.close()


def test_a_middle_shard_split_passes_hidden_states_on() -> None:
    source = tiny_source("llama")
    alone = create_engine("torch", device="cpu")
    alone.load(shard(1, 3), source)
    split = SplitEngine([(create_engine("torch", device="cpu"), 1), (create_engine("numpy"), 1)])
    split.load(shard(1, 3), source)
    hidden = np.random.default_rng(1).standard_normal((5, source.config.hidden_size))
    got = split.forward([step("x", hidden.astype(np.float32), 0)])[0]
    want = alone.forward([step("x", hidden.astype(np.float32), 0)])[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    split.free(RequestId("x"))  # freed in every part: the request starts again at 0
    again = split.forward([step("x", hidden.astype(np.float32), 0)])[0]
    np.testing.assert_allclose(again, got, atol=1e-6)


def test_parts_must_cover_the_shard() -> None:
    with pytest.raises(ValueError, match="two or more parts"):
        SplitEngine([(create_engine("numpy"), 4)])
    split = SplitEngine([(create_engine("numpy"), 1), (create_engine("numpy"), 1)])
    with pytest.raises(ValueError, match="do not add up"):
        split.load(shard(), tiny_source("llama"))


def test_the_runner_builds_a_split_for_a_stage_with_cpu_layers() -> None:
    config = RunnerConfig(
        model_path="unused", model_id=ModelId("m"), start=0, end=4, n_layers=4, engine="torch",
        device="cpu", cpu_layers=1, quant="int4", credentials=None,
    )  # fmt: skip
    model: ModelConfig = tiny_source("llama").config
    engine = build(config, model)
    assert isinstance(engine, SplitEngine) and len(engine.engines) == 2
    assert running(engine) == "torch"  # not yet loaded: no native part yet
    with pytest.raises(Exception, match="at least one layer"):
        RunnerConfig.model_validate(config.model_dump() | {"cpu_layers": 4})


def test_llamacpp_options_come_from_placement() -> None:
    from shoal.engines.registry import backend

    config = RunnerConfig(
        model_path="unused", model_id=ModelId("m"), start=0, end=30, n_layers=30, engine="llamacpp",
        device="cuda", cpu_layers=6, gpu_split=(10, 0, 14), credentials=None,
    )  # fmt: skip
    kwargs = backend("llamacpp").kwargs(config.engine_options)
    assert kwargs["n_gpu_layers"] == 24 and kwargs["tensor_split"] == (10.0, 0.0, 14.0)
    whole = config.model_copy(update={"cpu_layers": 0, "gpu_split": ()})
    assert backend("llamacpp").kwargs(whole.engine_options)["n_gpu_layers"] == -1
    on_cpu = config.model_copy(update={"device": "cpu"})
    assert backend("llamacpp").kwargs(on_cpu.engine_options)["n_gpu_layers"] == 0
