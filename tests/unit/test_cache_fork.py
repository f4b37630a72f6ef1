"""Copying a request's cache prefix for another (n choices share one prefill): the store, and
each engine's `fork`."""

from collections.abc import Callable

import numpy as np
import pytest

from shoal.engines.base import Engine, StepInput
from shoal.engines.cache import CacheStore
from shoal.engines.registry import create_engine
from shoal.engines.split import SplitEngine
from shoal.types.ids import RequestId
from tests.helpers.tiny import DictSource


def store() -> CacheStore[np.ndarray]:
    return CacheStore(2, 1, 4, lambda shape: np.zeros(shape, np.float32), value_dim=3)


def filled(s: CacheStore[np.ndarray], rid: str, n: int) -> None:
    cache = s.get(RequestId(rid))
    cache.reserve(n)
    cache.k[:, :, :n] = np.arange(n, dtype=np.float32)[None, None, :, None] + 1
    cache.v[:, :, :n] = -1.0
    cache.advance(n)


def test_a_fork_copies_the_prefix_and_then_lives_apart() -> None:
    s = store()
    filled(s, "a", 5)
    s.fork(RequestId("a"), RequestId("b"), 3)
    b = s.get(RequestId("b"))
    assert b.length == 3 and b.v.shape[3] == 3
    assert b.k[0, 0, :3, 0].tolist() == [1.0, 2.0, 3.0] and not b.k[:, :, 3:].any()
    b.k[0, 0, 0] = 99.0  # a copy: the source is untouched
    assert s.get(RequestId("a")).k[0, 0, 0, 0] == 1.0


def test_a_fork_longer_than_the_source_is_refused() -> None:
    s = store()
    filled(s, "a", 2)
    with pytest.raises(ValueError, match="holds 2"):
        s.fork(RequestId("a"), RequestId("b"), 3)


def engines() -> dict[str, Callable[[], Engine]]:
    def split() -> Engine:
        return SplitEngine([(create_engine("torch", device="cpu"), 2), (create_engine("numpy"), 2)])

    return {
        "torch": lambda: create_engine("torch", device="cpu"),
        "numpy": lambda: create_engine("numpy"),
        "native": lambda: create_engine("torch", device="cpu", quant="int4"),
        "split": split,
    }


@pytest.mark.parametrize("name", list(engines()))
def test_an_engines_fork_continues_as_the_source_would(name: str) -> None:
    pytest.importorskip("transformers")
    from tests.helpers.tiny import VOCAB, shard, tiny_source

    engine = engines()[name]()
    engine.load(shard(), tiny_source("llama"))
    prompt = np.random.default_rng(0).integers(0, VOCAB, 7)
    a, b = RequestId("a"), RequestId("b")
    engine.forward([StepInput(a, prompt[:6], 0)])
    engine.fork(a, b, 6)
    assert engine.cache_length(b) == 6 and engine.cached_positions() == 12
    out_a, out_b = engine.forward([StepInput(a, prompt[6:], 6), StepInput(b, prompt[6:], 6)])
    np.testing.assert_allclose(out_a, out_b, atol=1e-5)
    engine.free(a)  # the copy lives on alone
    assert engine.cache_length(b) == 7
    with pytest.raises(ValueError, match="holds"):
        engine.fork(b, RequestId("c"), 9)
    # truncate: drop positions from 4 on, then continue as a request of 4 positions would
    engine.truncate(b, 4)
    assert engine.cache_length(b) == 4
    again = engine.forward([StepInput(b, prompt[4:], 4)])[0]
    fresh = engines()[name]()
    fresh.load(shard(), tiny_source("llama"))
    np.testing.assert_allclose(again, fresh.forward([StepInput(a, prompt, 0)])[0], atol=1e-4)
    with pytest.raises(ValueError, match="holds"):
        engine.truncate(b, 99)
    engine.close()
    fresh.close()


def test_engines_that_cannot_copy_say_so() -> None:
    fake = create_engine("fake")
    from tests.helpers.tiny import shard, tiny_config

    fake.load(shard(), DictSource(tiny_config(), {}))
    fake.forward([StepInput(RequestId("a"), np.array([1, 2, 3]), 0)])
    fake.fork(RequestId("a"), RequestId("b"), 3)  # all of it: a copy of its state
    assert fake.cache_length(RequestId("b")) == 3
    with pytest.raises(ValueError, match="whole caches only"):
        fake.fork(RequestId("a"), RequestId("c"), 2)
