"""The llamacpp engine on the real SmolLM2 GGUF: torch's greedy answer, one cache per request.

Run in a child pytest by test_llamacpp_engine.py: a crash there fails one test, not the run.
"""

from collections.abc import Iterator

import numpy as np
import pytest

from shoal.engines.base import Engine, StepInput
from shoal.errors import ContextOverflow, ModelUnavailable, UnsupportedModel
from shoal.models.gguf import GGUFSource
from shoal.types.ids import ModelId, RequestId
from shoal.types.shard import Shard
from tests.helpers.smollm2 import SMOLLM
from tests.helpers.tiny import DictSource, tiny_config

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the llamacpp extra)")

from shoal.engines.llamacpp.engine import LlamaCppEngine  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

LAYERS = 30
WHOLE = Shard.whole(ModelId("smollm2-135m"), LAYERS)
PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
OTHER = [{"role": "user", "content": "Name three colours."}]
STEPS = 8


def rid(name: str) -> RequestId:
    return RequestId(name)


@pytest.fixture(scope="module")
def source() -> GGUFSource:
    return GGUFSource(SMOLLM)


@pytest.fixture(scope="module")
def engine(source: GGUFSource) -> Iterator[LlamaCppEngine]:
    e = LlamaCppEngine(n_ctx=512, n_threads=1)  # 2 threads stall on a busy 2-core box
    e.load(WHOLE, source)
    yield e
    e.close()


def encode(source: GGUFSource, messages: list[dict[str, str]]) -> np.ndarray:
    return np.asarray(source.tokenizer().encode_chat(messages), dtype=np.int64)


def greedy(engine: Engine, name: str, tokens: np.ndarray, steps: int = STEPS) -> list[int]:
    """Greedy ids after a one-step prefill; the request is freed after."""
    logits = engine.forward([StepInput(rid(name), tokens, 0)])[0]
    out = [int(logits.argmax())]
    for pos in range(len(tokens), len(tokens) + steps - 1):
        logits = engine.forward([StepInput(rid(name), np.asarray([out[-1]]), pos)])[0]
        out.append(int(logits.argmax()))
    engine.free(rid(name))
    return out


@pytest.fixture(scope="module")
def torch_reference(source: GGUFSource) -> dict[str, object]:
    """Torch's greedy ids and all-position logits for PROMPT (the reference engine)."""
    pytest.importorskip("torch")
    from shoal.engines.torch.engine import TorchEngine

    torch_engine = TorchEngine(device="cpu")
    torch_engine.load(WHOLE, source)
    tokens = encode(source, PROMPT)
    logits = torch_engine.forward([StepInput(rid("all"), tokens, 0)], all_logits=True)[0]
    ids = greedy(torch_engine, "g", tokens)
    torch_engine.close()
    return {"ids": ids, "logits": logits}


def test_greedy_tokens_start_like_torch(
    engine: LlamaCppEngine, source: GGUFSource, torch_reference: dict[str, object]
) -> None:
    ours = greedy(engine, "g", encode(source, PROMPT))
    theirs = torch_reference["ids"]
    assert isinstance(theirs, list)
    assert ours[:5] == theirs[:5], (ours, theirs)
    assert source.tokenizer().decode(ours[:6]).strip().startswith("The capital of France is")


def test_logits_agree_with_torch_in_argmax(
    engine: LlamaCppEngine, source: GGUFSource, torch_reference: dict[str, object]
) -> None:
    tokens = encode(source, PROMPT)
    ours = engine.forward([StepInput(rid("all"), tokens, 0)], all_logits=True)[0]
    engine.free(rid("all"))
    theirs = torch_reference["logits"]
    assert isinstance(theirs, np.ndarray)
    assert ours.shape == theirs.shape == (len(tokens), 49152) and ours.dtype == np.float32
    agree = ours.argmax(-1) == theirs.argmax(-1)
    assert agree[-1] and agree.mean() >= 0.9, agree  # Q4_1 arithmetic vs float32
    last = engine.forward([StepInput(rid("last"), tokens, 0)])[0]
    engine.free(rid("last"))
    assert last.shape == (49152,)
    np.testing.assert_allclose(last, ours[-1], atol=1e-3)


def test_interleaved_requests_keep_separate_caches(
    engine: LlamaCppEngine, source: GGUFSource
) -> None:
    a, b = encode(source, PROMPT), encode(source, OTHER)
    alone = {"a": greedy(engine, "a", a), "b": greedy(engine, "b", b)}
    # a prefills in two chunks around b's prefill; then both decode in one batch per step
    half = len(a) // 2
    engine.forward([StepInput(rid("a"), a[:half], 0)])
    first_b = engine.forward([StepInput(rid("b"), b, 0)])[0]
    first_a = engine.forward([StepInput(rid("a"), a[half:], half)])[0]
    got = {"a": [int(first_a.argmax())], "b": [int(first_b.argmax())]}
    pos = {"a": len(a), "b": len(b)}
    for _ in range(STEPS - 1):
        step = [StepInput(rid(n), np.asarray([got[n][-1]]), pos[n]) for n in ("b", "a")]
        for n, logits in zip(("b", "a"), engine.forward(step), strict=True):
            got[n].append(int(logits.argmax()))
            pos[n] += 1
    assert got == alone
    assert engine.cache_length(rid("a")) == len(a) + STEPS - 1
    engine.free(rid("a"))
    engine.free(rid("b"))


def test_batch_of_mixed_lengths_with_all_logits(engine: LlamaCppEngine) -> None:
    x, y = np.arange(10, 17), np.arange(20, 23)
    outs = engine.forward([StepInput(rid("x"), x, 0), StepInput(rid("y"), y, 0)], all_logits=True)
    assert [o.shape for o in outs] == [(7, 49152), (3, 49152)]
    alone = engine.forward([StepInput(rid("z"), y, 0)], all_logits=True)[0]
    np.testing.assert_allclose(outs[1], alone, atol=1e-3)
    for name in "xyz":
        engine.free(rid(name))


def test_free_then_reuse(engine: LlamaCppEngine, source: GGUFSource) -> None:
    tokens = encode(source, PROMPT)
    before = engine.forward([StepInput(rid("r"), tokens, 0)])[0]
    engine.free(rid("r"))
    engine.free(rid("never-seen"))  # ignored
    assert engine.cache_length(rid("r")) == 0
    with pytest.raises(ValueError, match="its cache holds 0 positions"):
        engine.forward([StepInput(rid("r"), tokens[:1], len(tokens))])
    again = engine.forward([StepInput(rid("r"), tokens, 0)])[0]
    np.testing.assert_allclose(again, before, atol=1e-3)
    engine.free(rid("r"))


def test_new_threads_keep_the_logits(engine: LlamaCppEngine, source: GGUFSource) -> None:
    tokens = encode(source, PROMPT)
    before = engine.forward([StepInput(rid("t"), tokens, 0)])[0]
    engine.free(rid("t"))
    engine.set_threads(2)
    try:
        assert engine.n_threads == 2
        again = engine.forward([StepInput(rid("t"), tokens, 0)])[0]
        np.testing.assert_allclose(again, before, atol=1e-3)
    finally:
        engine.free(rid("t"))
        engine.set_threads(1)  # the module's engine runs on one thread


def test_a_fork_continues_as_the_source_would(engine: LlamaCppEngine, source: GGUFSource) -> None:
    tokens = encode(source, [{"role": "user", "content": "Name a colour."}])
    k = len(tokens) - 1
    engine.free(rid("r"))
    engine.forward([StepInput(rid("r"), tokens[:k], 0)])
    engine.free(rid("copy"))
    engine.fork(rid("r"), rid("copy"), k)
    assert engine.cache_length(rid("copy")) == k
    last = tokens[k:]
    a, b = engine.forward([StepInput(rid("r"), last, k), StepInput(rid("copy"), last, k)])
    np.testing.assert_allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="holds"):
        engine.fork(rid("r"), rid("other"), len(tokens) + 5)
    engine.free(rid("r"))
    engine.free(rid("copy"))


def test_progress_and_sequence_ids_lent_and_given_back(source: GGUFSource) -> None:
    e = LlamaCppEngine(n_ctx=256, n_threads=1, n_seq_max=2)  # llama.cpp pads to 256
    progress: list[tuple[int, int]] = []
    e.load(WHOLE, source, lambda done, total: progress.append((done, total)))
    assert progress[-1] == (LAYERS, LAYERS) and progress == sorted(progress)
    try:
        one = np.asarray([1, 2, 3])
        e.forward([StepInput(rid("a"), one, 0), StepInput(rid("b"), one, 0)])
        with pytest.raises(ModelUnavailable, match="runs 2 requests at once"):
            e.forward([StepInput(rid("c"), one, 0)])
        assert e.cache_length(rid("c")) == 0
        e.free(rid("a"))
        e.forward([StepInput(rid("c"), one, 0)])  # a's sequence, cleared
        with pytest.raises(ContextOverflow, match="context of 256"):
            e.forward([StepInput(rid("b"), np.ones(254, dtype=np.int64), 3)])
        with pytest.raises(ModelUnavailable, match="KV cache holds 256 tokens"):
            e.forward([StepInput(rid("b"), np.ones(251, dtype=np.int64), 3)])
        assert e.cache_length(rid("b")) == 3
    finally:
        e.close()


def one(data: np.ndarray, start: int = 0) -> StepInput:
    return StepInput(rid("d"), data, start)


REFUSED: list[tuple[str, list[StepInput], str]] = [
    ("duplicate", [one(np.asarray([1]))] * 2, "appears twice"),
    ("wrong start", [one(np.asarray([1]), 4)], "starts at 4 but its cache holds 0"),
    ("hidden states", [one(np.ones((1, 576), np.float32))], "int token ids"),
    ("empty", [one(np.asarray([], np.int64))], "empty step"),
    ("bad id", [one(np.asarray([49152]))], r"outside \[0, 49152\)"),
]


@pytest.mark.parametrize(("batch", "match"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_batches_change_nothing(
    engine: LlamaCppEngine, batch: list[StepInput], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        engine.forward(batch)
    assert engine.cache_length(rid("d")) == 0


def test_partial_shards_and_other_sources_are_refused(source: GGUFSource) -> None:
    e = LlamaCppEngine()
    partial = Shard(model_id=ModelId("smollm2-135m"), start=0, end=12, n_layers=LAYERS)
    with pytest.raises(UnsupportedModel, match="runs whole GGUF models only"):
        e.load(partial, source)
    with pytest.raises(UnsupportedModel, match="DictSource is not a GGUF file"):
        e.load(Shard.whole(ModelId("tiny"), 4), DictSource(tiny_config(), {}))
    with pytest.raises(RuntimeError, match="before load"):
        e.forward([StepInput(rid("x"), np.asarray([1]), 0)])
